import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, afterEach, describe, expect, it, vi } from "vitest";
import { plainIo, fuaIo } from "../layer.js";
import { FilePort, type FilePortOptions } from "./file-port.js";

const dir = fs.mkdtempSync(path.join(os.tmpdir(), "file-port-"));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));
let n = 0;
function image(bytes: Buffer): string {
  const p = path.join(dir, `img${n++}`);
  fs.writeFileSync(p, bytes);
  return p;
}
async function open(opts: Omit<FilePortOptions, "path">, bytes = Buffer.alloc(1 << 20, 0x61)) {
  const file = image(bytes);
  const port = new FilePort({ path: file, ...opts });
  await port.open();
  return { port, file };
}
afterEach(() => vi.restoreAllMocks());

describe("FilePort", () => {
  it("reads and writes the file, with FUA as write + fdatasync", async () => {
    const { port, file } = await open({});
    const sync = vi.spyOn(fs, "fdatasync");
    await port.pwrite(Buffer.from("hello"), 1000, plainIo);
    expect(sync).not.toHaveBeenCalled();
    await port.pwrite(Buffer.from("durable"), 2000, fuaIo);
    expect(sync).toHaveBeenCalledTimes(1);
    const b = Buffer.alloc(5);
    await port.pread(b, 1000, plainIo);
    expect(b.toString()).toBe("hello");
    await port.flush(plainIo);
    expect(sync).toHaveBeenCalledTimes(2);
    await port.close();
    expect(fs.readFileSync(file).toString("latin1", 2000, 2007)).toBe("durable");
  });

  it("advertises what it can really do: trim by punching holes (unless discard is off), zero by writing, no fast zero", async () => {
    const off = await open({ discard: false });
    expect(off.port.capabilities().trim).toBe(false);
    await expect(off.port.trim(4096, 0, plainIo)).rejects.toMatchObject({ errno: "ENOTSUP" });
    const ro = await open({ readOnly: true });
    expect(ro.port.capabilities().trim).toBe(false);
    const { port } = await open({});
    const c = port.capabilities();
    expect(c).toMatchObject({ writable: true, flush: true, fua: true, trim: true, zero: true, fastZero: false, extents: true, multiConn: true });
    await expect(port.zero(4096, 0, { ...plainIo, fast: true })).rejects.toMatchObject({ errno: "ENOTSUP" });
    await port.zero(3 * 1024 * 1024 - (1 << 20) * 2, 4096, plainIo);
    const b = Buffer.alloc(8192);
    await port.pread(b, 0, plainIo);
    expect(b.subarray(0, 4096).every((x) => x === 0x61)).toBe(true);
    expect(b.subarray(4096).every((x) => x === 0)).toBe(true);
  });

  it("is read-only when opened read-only", async () => {
    const { port } = await open({ readOnly: true });
    expect(port.capabilities()).toMatchObject({ writable: false, flush: false, fua: false, zero: false });
    await expect(port.pwrite(Buffer.alloc(1), 0, plainIo)).rejects.toMatchObject({ code: "EBADF" });
  });

  it("reports 4 KiB blocks that read as zero as ZERO extents in a sparse file", async () => {
    const bytes = Buffer.alloc(1 << 20, 0x61);
    bytes.fill(0, 8192, 8192 + 3 * 4096);
    bytes.fill(0, 100000, 100100); // not a whole block: stays data
    const { port, file } = await open({}, bytes);
    await port.close();
    fs.truncateSync(file, 2 << 20); // a hole of 1 MiB at the end makes the file sparse
    const sparse = new FilePort({ path: file });
    await sparse.open();
    const ext = await sparse.extents(2 << 20, 0, plainIo);
    expect(ext).toEqual([
      { length: 8192, flags: 0 },
      { length: 12288, flags: 2 },
      { length: (1 << 20) - 20480, flags: 0 },
      { length: 1 << 20, flags: 2 },
    ]);
    const unaligned = await sparse.extents(10000, 5000, plainIo);
    expect(unaligned).toEqual([
      { length: 3192, flags: 0 },
      { length: 6808, flags: 2 },
    ]);
    await sparse.close();
  });

  // Found by the grammar-aware fuzzer (issue 21): a BLOCK_STATUS read 8 MiB into one buffer and a
  // CACHE 1 MiB into a fresh one, per request; a client with many in flight made the server hold
  // hundreds of MiB outside the memory budget.
  it("reads at most 1 MiB at a time to find zero blocks or fill the page cache, with the same answers across pieces", async () => {
    const MiB = 1 << 20;
    const bytes = Buffer.alloc(6 * MiB, 0x61);
    bytes.fill(0, MiB - 8192, MiB + 8192); // a zero run across the first piece boundary
    bytes.fill(0, 3 * MiB + 4096, 5 * MiB); // a long one across two
    bytes.fill(0, 5 * MiB + 100, 5 * MiB + 200); // not a whole block: data
    const { port, file } = await open({}, bytes);
    await port.close();
    fs.truncateSync(file, 10 * MiB); // sparse: a 4 MiB hole at the end
    const sparse = new FilePort({ path: file });
    await sparse.open();
    const lengths: number[] = [];
    const readSync = fs.readSync;
    vi.spyOn(fs, "readSync").mockImplementation(((fd: number, buf: Buffer, off: number, len: number, pos: number) => {
      lengths.push(len);
      return readSync(fd, buf, off, len, pos);
    }) as typeof fs.readSync);
    const read = fs.read;
    vi.spyOn(fs, "read").mockImplementation(((fd: number, buf: Buffer, off: number, len: number, pos: number, cb: never) => {
      lengths.push(len);
      return read(fd, buf, off, len, pos, cb);
    }) as typeof fs.read);
    // From an unaligned offset: pieces end on 4 KiB boundaries of the device.
    const ext = await sparse.extents(8 * MiB, 1000, plainIo);
    expect(ext).toEqual([
      { length: MiB - 8192 - 1000, flags: 0 },
      { length: 16384, flags: 2 },
      { length: 2 * MiB - 8192 + 4096, flags: 0 },
      { length: 2 * MiB - 4096, flags: 2 },
      { length: MiB, flags: 0 },
      { length: 2 * MiB + 1000, flags: 2 }, // the hole, up to the 8 MiB scanned
    ]);
    expect(ext.reduce((t, e) => t + e.length, 0)).toBe(8 * MiB);
    await sparse.cache(10 * MiB, 0, plainIo);
    expect(lengths.length).toBeGreaterThan(16);
    expect(Math.max(...lengths)).toBeLessThanOrEqual(MiB);
    await sparse.close();
  });

  it("reports a fully allocated file as data without reading it, until it writes zeroes", async () => {
    const bytes = Buffer.alloc(1 << 20, 0x61);
    bytes.fill(0, 8192, 8192 + 4096);
    const { port } = await open({}, bytes);
    const read = vi.spyOn(fs, "read");
    const readSync = vi.spyOn(fs, "readSync");
    expect(await port.extents(1 << 20, 0, plainIo)).toEqual([{ length: 1 << 20, flags: 0 }]);
    expect(read.mock.calls.length + readSync.mock.calls.length).toBe(0);
    await port.zero(8192, 65536, plainIo);
    expect(await port.extents(1 << 20, 0, plainIo)).toEqual([
      { length: 8192, flags: 0 },
      { length: 4096, flags: 2 },
      { length: 65536 - 12288, flags: 0 },
      { length: 8192, flags: 2 },
      { length: (1 << 20) - 73728, flags: 0 },
    ]);
    await port.close();
  });

  it("fills with zeroes, never stale memory, when the file shrank under it", async () => {
    const { port, file } = await open({});
    fs.truncateSync(file, 4096);
    const b = Buffer.alloc(8192, 0xff);
    await port.pread(b, 0, plainIo);
    expect(b.subarray(0, 4096).every((x) => x === 0x61)).toBe(true);
    expect(b.subarray(4096).every((x) => x === 0)).toBe(true);
  });

  describe("io modes", () => {
    it("sync: small calls on the event loop, large ones in the pool", async () => {
      const { port } = await open({ io: "sync", syncMax: 65536 });
      const readSync = vi.spyOn(fs, "readSync");
      const read = vi.spyOn(fs, "read");
      await port.pread(Buffer.alloc(4096), 0, plainIo);
      expect(readSync).toHaveBeenCalledTimes(1);
      await port.pread(Buffer.alloc(65537), 0, plainIo);
      expect(read).toHaveBeenCalledTimes(1);
      expect(readSync).toHaveBeenCalledTimes(1);
    });

    it("async: every call in the pool", async () => {
      const { port } = await open({ io: "async" });
      const readSync = vi.spyOn(fs, "readSync");
      const writeSync = vi.spyOn(fs, "writeSync");
      await port.pread(Buffer.alloc(512), 0, plainIo);
      await port.pwrite(Buffer.alloc(512), 0, plainIo);
      expect(readSync).not.toHaveBeenCalled();
      expect(writeSync).not.toHaveBeenCalled();
    });

    it("auto: slow synchronous calls send the next calls to the pool for a while", async () => {
      const { port } = await open({ io: "auto", slowCallMs: 0, asyncHoldMs: 60_000 });
      const readSync = vi.spyOn(fs, "readSync");
      const read = vi.spyOn(fs, "read");
      for (let i = 0; i < 3; i++) await port.pread(Buffer.alloc(512), 0, plainIo); // "slow" (every call is, at 0 ms)
      await port.pread(Buffer.alloc(512), 0, plainIo);
      await port.pwrite(Buffer.alloc(512), 0, plainIo);
      expect(readSync).toHaveBeenCalledTimes(3);
      expect(read).toHaveBeenCalledTimes(1);
    });

    it("auto: one slow call among fast ones (a preempted thread) does not leave the event loop", async () => {
      const { port } = await open({ io: "auto", slowCallMs: 5, asyncHoldMs: 60_000 });
      const readSync = vi.spyOn(fs, "readSync");
      const now = vi.spyOn(performance, "now");
      let t = 0;
      now.mockImplementation(() => t);
      // Every 20th call takes 50 ms; the rest take no time.
      readSync.mockImplementation(((_fd: number, _b: Buffer, _o: number, length: number) => {
        if (readSync.mock.calls.length % 20 === 0) t += 50;
        return length;
      }) as typeof fs.readSync);
      for (let i = 0; i < 100; i++) await port.pread(Buffer.alloc(512), 0, plainIo);
      expect(readSync).toHaveBeenCalledTimes(100);
    });

    it("auto: fast calls stay on the event loop", async () => {
      const { port } = await open({ io: "auto", slowCallMs: 10_000 });
      const readSync = vi.spyOn(fs, "readSync");
      for (let i = 0; i < 10; i++) await port.pread(Buffer.alloc(512), i * 512, plainIo);
      expect(readSync).toHaveBeenCalledTimes(10);
    });
  });
});

describe("FilePort trim (hole punching)", () => {
  const blocks = (file: string) => fs.statSync(file).blocks * 512;

  it("punches holes: the file keeps its size, the range reads as zeroes and its blocks are freed", async () => {
    const { port, file } = await open({}, Buffer.alloc(4 << 20, 0x61));
    expect(blocks(file)).toBeGreaterThanOrEqual(4 << 20);
    await port.trim(2 << 20, 1 << 20, plainIo);
    expect(fs.statSync(file).size).toBe(4 << 20);
    expect(blocks(file)).toBeLessThanOrEqual((2 << 20) + 65536);
    const b = Buffer.alloc(4 << 20);
    await port.pread(b, 0, plainIo);
    expect(b.subarray(0, 1 << 20).every((x) => x === 0x61)).toBe(true);
    expect(b.subarray(1 << 20, 3 << 20).every((x) => x === 0)).toBe(true);
    expect(b.subarray(3 << 20).every((x) => x === 0x61)).toBe(true);
    // Block status now looks for zero blocks: the hole is reported as zero.
    const ext = await port.extents(4 << 20, 0, plainIo);
    expect(ext).toEqual([
      { length: 1 << 20, flags: 0 },
      { length: 2 << 20, flags: 2 },
      { length: 1 << 20, flags: 0 },
    ]);
    await port.close();
  });

  it("batches trims that arrive together into one process, ranges coalesced", async () => {
    const calls: Array<Array<{ offset: number; end: number }>> = [];
    const { port } = await open({ punchRunner: async (_f, r) => void calls.push(r.map((x) => ({ ...x }))) });
    await Promise.all([port.trim(4096, 8192, plainIo), port.trim(4096, 0, plainIo), port.trim(4096, 4096, plainIo), port.trim(4096, 65536, plainIo)]);
    expect(calls).toEqual([
      [
        { offset: 0, end: 12288 },
        { offset: 65536, end: 69632 },
      ],
    ]);
    expect(port.punchStats()).toEqual({ ranges: 2, processes: 1 });
    await port.close();
  });

  it("a write that arrives while a punch of its range is pending waits for it: the punch never undoes it", async () => {
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    let punched = false;
    const { port, file } = await open({
      punchRunner: async (f, r) => {
        await gate; // a slow fallocate
        for (const x of r) fs.writeSync(fs.openSync(f, "r+"), Buffer.alloc(x.end - x.offset), 0, x.end - x.offset, x.offset);
        punched = true;
      },
    });
    const trim = port.trim(65536, 0, plainIo);
    await new Promise((r) => setImmediate(r));
    const write = port.pwrite(Buffer.alloc(4096, 0x42), 4096, plainIo);
    const other = port.pwrite(Buffer.alloc(4096, 0x43), 131072, plainIo); // elsewhere: not held
    await other;
    let wrote = false;
    void write.then(() => (wrote = true));
    await new Promise((r) => setTimeout(r, 30));
    expect(wrote).toBe(false);
    release();
    await Promise.all([trim, write]);
    expect(punched).toBe(true);
    const b = Buffer.alloc(4096);
    await port.pread(b, 4096, plainIo);
    expect(b.every((x) => x === 0x42)).toBe(true);
    await port.close();
    expect(fs.readFileSync(file)[4096]).toBe(0x42);
  });

  it("a punch that fails is given up: later trims are acknowledged, data stays, the failure is told once", async () => {
    const told: string[] = [];
    let runs = 0;
    const { port } = await open({
      punchRunner: async () => {
        runs++;
        throw new Error("fallocate: fallocate failed: Operation not supported");
      },
      onPunchFailure: (e) => told.push(e.message),
    });
    await port.trim(4096, 0, plainIo);
    await port.trim(4096, 8192, plainIo);
    expect(runs).toBe(1);
    expect(told).toEqual(["fallocate: fallocate failed: Operation not supported"]);
    await port.close();
  });
});
