import fs from "node:fs";
import path from "node:path";
import { describe, expect, it, vi } from "vitest";
import { BS, SIZE, fua, makeBase, openCow, pattern, readAll, tmpdir } from "../../../test/helpers/cow.js";
import { NbdError } from "../../errors.js";
import { plainIo, type Layer } from "../layer.js";
import { HEADER_SIZE } from "./cow-format.js";
import { createCowLayer } from "./cow-layer.js";

const origWriteSync = fs.writeSync;
const origFdatasync = fs.fdatasync;

describe("CowStore (through a cow layer)", () => {
  it("keeps every flushed write across a restart and a crash; unflushed new blocks are not half-visible", async () => {
    const { base, initial } = await makeBase();
    const overlay = path.join(tmpdir(), "o.cow");
    const model = Buffer.from(initial);
    const cow = await openCow(base, overlay);
    const a = pattern(3 * BS + 333, 7, 5000);
    await cow.pwrite(a, 5000, plainIo);
    a.copy(model, 5000);
    await cow.zero(BS, 8 * BS, plainIo);
    model.fill(0, 8 * BS, 9 * BS);
    await cow.flush(plainIo);
    // Not flushed: a write to blocks the overlay does not hold yet.
    await cow.pwrite(pattern(1000, 9, 10 * BS + 50), 10 * BS + 50, plainIo);
    const crashed = await openCow(base, overlay, {});
    expect((await readAll(crashed)).equals(model)).toBe(true);
    // A FUA write is durable at once.
    const f = pattern(2000, 11, 11 * BS + 10);
    await crashed.pwrite(f, 11 * BS + 10, fua);
    f.copy(model, 11 * BS + 10);
    const crashed2 = await openCow(base, overlay, {});
    expect((await readAll(crashed2)).equals(model)).toBe(true);
    await crashed2.close();
    const restarted = await openCow(base, overlay, {});
    expect((await readAll(restarted)).equals(model)).toBe(true);
    expect(restarted.info().allocatedBytes).toBe(5 * BS);
    await restarted.close();
  });

  it("flush makes the data durable before the map names it, then the map", async () => {
    const { base } = await makeBase();
    const overlay = path.join(tmpdir(), "o.cow");
    const cow = await openCow(base, overlay, { blockSize: BS, io: "sync" });
    const dataOffset = 8192; // header 4 KiB + one 4 KiB map page, rounded up to the block size
    const events: string[] = [];
    const where = (pos: number | null | undefined) => (pos === null || pos === undefined ? "?" : pos >= dataOffset ? "data" : pos >= HEADER_SIZE ? "map" : "header");
    const spies = [
      vi.spyOn(fs, "writeSync").mockImplementation(function (...a: unknown[]) {
        events.push(`write ${where(a[4] as number)}`);
        return Reflect.apply(origWriteSync, fs, a) as number;
      }),
      vi.spyOn(fs, "fdatasync").mockImplementation(function (...a: unknown[]) {
        events.push("sync");
        return Reflect.apply(origFdatasync, fs, a) as void;
      }),
    ];
    try {
      await cow.pwrite(Buffer.alloc(100, 1), 3 * BS + 5, plainIo); // a new block: read-modify-write into a new slot
      await cow.pwrite(Buffer.alloc(100, 2), 3 * BS + 500, plainIo); // the same block again, in place
      expect(events).toEqual(["write data", "write data"]);
      await cow.flush(plainIo);
      expect(events).toEqual(["write data", "write data", "sync", "write map", "sync"]);
      events.length = 0;
      await cow.flush(plainIo); // nothing new: nothing to do
      await cow.zero(BS, 3 * BS, fua); // a map-only change, made durable by FUA
      expect(events).toEqual(["sync", "write map", "sync"]);
    } finally {
      for (const s of spies) s.mockRestore();
    }
    await cow.close();
  });

  it("a snapshot interrupted after linking its name leaves nothing in the way of the next", async () => {
    const { base } = await makeBase();
    const overlay = path.join(tmpdir(), "o.cow");
    const cow = await openCow(base, overlay);
    await cow.pwrite(Buffer.alloc(10, 5), 0, plainIo);
    await cow.flush(plainIo);
    fs.linkSync(overlay, `${overlay}.snap-1`); // as if the process died right after link()
    expect(await cow.snapshot()).toBe(`${overlay}.snap-1`);
    const b = Buffer.alloc(10);
    await cow.pread(b, 0, plainIo);
    expect(b.equals(Buffer.alloc(10, 5))).toBe(true);
    await cow.close();
  });

  it("refuses mismatched, damaged or missing overlays with an error naming the file", async () => {
    const { base } = await makeBase();
    const dir = tmpdir();
    const overlay = path.join(dir, "o.cow");
    const cow = await openCow(base, overlay);
    await cow.pwrite(Buffer.alloc(BS, 1), 0, plainIo);
    await cow.snapshot();
    await cow.pwrite(Buffer.alloc(BS, 2), BS, plainIo);
    await cow.close();
    const fails = async (l: Layer, re: RegExp) => {
      const err = await l.open().catch((e: unknown) => e);
      expect(err).toBeInstanceOf(NbdError);
      expect((err as Error).message).toMatch(re);
    };
    const other = await makeBase({ size: SIZE + 512 });
    await fails(createCowLayer(other.base, overlay), new RegExp(`${overlay}: the overlay was made for a ${SIZE}-byte device, but the base memory:${SIZE + 512} has ${SIZE + 512} bytes`));
    await fails(createCowLayer(base, overlay, { blockSize: 4096 }), new RegExp(`${overlay}: the overlay's block size is ${BS}, not 4096`));
    await fails(createCowLayer(base, path.join(dir, "missing.cow"), { create: false }), /missing\.cow: the overlay does not exist/);

    const copy = (name: string) => {
      const p = path.join(dir, name);
      fs.copyFileSync(overlay, p);
      return p;
    };
    const garbage = path.join(dir, "garbage.cow");
    fs.writeFileSync(garbage, Buffer.alloc(8192, 0x41));
    await fails(createCowLayer(base, garbage), /garbage\.cow: not an nbdstack copy-on-write overlay/);
    const short = path.join(dir, "short.cow");
    fs.writeFileSync(short, "NBDSCOW1");
    await fails(createCowLayer(base, short), /short\.cow: too short/);
    const bad = copy("bad.cow");
    const fd = fs.openSync(bad, "r+");
    fs.writeSync(fd, Buffer.from([0xff]), 0, 1, 30);
    fs.closeSync(fd);
    await fails(createCowLayer(base, bad), /bad\.cow: overlay header checksum mismatch/);
    const cut = copy("cut.cow");
    fs.truncateSync(cut, HEADER_SIZE + 8);
    await fails(createCowLayer(base, cut), /cut\.cow: truncated/);
    const wild = copy("wild.cow");
    const wfd = fs.openSync(wild, "r+");
    const e = Buffer.alloc(4);
    e.writeUInt32LE(1_000_000);
    fs.writeSync(wfd, e, 0, 4, HEADER_SIZE + 4 * 3);
    fs.closeSync(wfd);
    await fails(createCowLayer(base, wild), /wild\.cow: allocation map entry of block 3 .* past the end of the file/);
    fs.rmSync(`${overlay}.snap-1`);
    await fails(createCowLayer(base, overlay), new RegExp(`${overlay}: its backing overlay ${overlay}\\.snap-1 is missing`));
    expect(base.writes).toBe(0);
  });
});
