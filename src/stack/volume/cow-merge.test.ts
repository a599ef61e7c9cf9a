import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { BS, SIZE, makeBase, openCow, pattern, readAll, tmpdir } from "../../../test/helpers/cow.js";
import { NbdError } from "../../errors.js";
import { plainIo, type Io } from "../layer.js";

describe("cow merge", () => {
  it("merges a snapshot chain while clients write to blocks not yet merged; the emptied overlay is dropped", async () => {
    const { base, initial } = await makeBase();
    const overlay = path.join(tmpdir(), "vm.cow");
    const cow = await openCow(base, overlay, { blockSize: BS, io: "async" });
    const model = Buffer.from(initial);
    const put = async (off: number, len: number, seed: number) => {
      const data = pattern(len, seed, off);
      data.copy(model, off);
      await cow.pwrite(data, off, plainIo);
    };
    await put(0, SIZE, 1);
    const snap1 = await cow.snapshot();
    await put(100, SIZE - 200, 2); // every block in the top overlay
    await cow.zero(BS, 4 * BS, plainIo);
    model.fill(0, 4 * BS, 5 * BS);
    expect(cow.info().chain.length).toBe(2);

    // While the merge runs, write into blocks it has not reached yet (and some it has).
    const writes: Promise<void>[] = [];
    let seed = 10;
    const progress: number[] = [];
    const { done } = cow.startMerge({
      onProgress: (p) => {
        progress.push(p.doneBytes);
        if (p.state !== "running") return;
        const b = (seed * 5) % 14;
        const off = b * BS + ((seed * 37) % (BS - 300));
        writes.push(put(off, 1 + ((seed * 53) % 250), seed++));
      },
    });
    expect(() => cow.startMerge()).toThrow(/merge is running/);
    await expect(cow.snapshot()).rejects.toThrow(/merge is running/);
    await done;
    await Promise.all(writes);
    expect(writes.length).toBeGreaterThan(5);
    expect(progress[progress.length - 1]).toBe(cow.progress.totalBytes);
    expect(cow.progress.state).toBe("done");
    expect((await readAll(cow)).equals(model)).toBe(true);
    // The snapshot took the overlay's name; its own name is gone.
    expect(cow.info().chain.map((e) => e.path)).toEqual([overlay]);
    expect(fs.existsSync(snap1)).toBe(false);
    await cow.close();
    const again = await openCow(base, overlay, {});
    expect((await readAll(again)).equals(model)).toBe(true);
    expect(again.info().chain.length).toBe(1);
    await again.close();
    expect(base.writes).toBe(0);
  });

  it("merges into the base only when asked and the base is writable", async () => {
    const ro = await makeBase();
    const cow = await openCow(ro.base, path.join(tmpdir(), "o.cow"));
    await cow.pwrite(Buffer.alloc(100, 1), 0, plainIo);
    await expect(cow.merge()).rejects.toThrow(/no snapshot below .* mergeIntoBase/);
    await expect(cow.merge({ mergeIntoBase: true })).rejects.toThrow(/read-only/);
    await cow.close();

    const rw = await makeBase({ writable: true, alignment: 512, maxRequest: 4096 });
    const overlay = path.join(tmpdir(), "o.cow");
    const c2 = await openCow(rw.base, overlay, { blockSize: BS, io: "async" });
    const model = Buffer.from(rw.initial);
    const put = async (off: number, len: number, seed: number) => {
      const data = pattern(len, seed, off);
      data.copy(model, off);
      await c2.pwrite(data, off, plainIo);
    };
    for (let i = 0; i < 20; i++) await put((i * 5077) % (SIZE - 3000), 2999, i + 1);
    await c2.trim(BS * 2 + 10, 7 * BS - 5, plainIo);
    // A trimmed range reads as anything (whole blocks show the base again): the merge keeps what it reads now.
    const trimmed = Buffer.alloc(BS * 2 + 10);
    await c2.pread(trimmed, 7 * BS - 5, plainIo);
    trimmed.copy(model, 7 * BS - 5);
    const writes: Promise<void>[] = [];
    let seed = 50;
    await c2.merge({
      mergeIntoBase: true,
      onProgress: (p) => {
        if (p.state === "running") writes.push(put((seed * 4099) % (SIZE - 400), 1 + (seed % 300), seed++));
      },
    });
    await Promise.all(writes);
    expect((await readAll(c2)).equals(model)).toBe(true);
    // Everything went to the base; the overlay is a fresh, empty file.
    expect(c2.info().allocatedBytes + c2.info().chain[0]!.zeroedBytes).toBe(0);
    expect((await readAll(rw.base.port)).equals(model)).toBe(true);
    expect(fs.statSync(overlay).size).toBeLessThanOrEqual(BS);
    await c2.close();
  });

  /** A writable base whose writes can fail or be slow, and an overlay over it holding `blocks` blocks of data, every other block. */
  async function overlayOnFlakyBase(blocks: number) {
    const { base, initial } = await makeBase({ writable: true });
    const ctl = { fail: 0, delayMs: 0, flushes: 0 };
    const pwrite = base.pwrite.bind(base);
    base.pwrite = async (b: Buffer, o: number, io: Io) => {
      if (ctl.delayMs) await new Promise((r) => setTimeout(r, ctl.delayMs));
      if (ctl.fail > 0 && ctl.fail--) throw new NbdError("EIO", "base write failed");
      return pwrite(b, o, io);
    };
    const flush = base.flush.bind(base);
    base.flush = (io: Io) => (ctl.flushes++, flush(io));
    const overlay = path.join(tmpdir(), "f.cow");
    const cow = await openCow(base, overlay, { blockSize: BS, io: "async" });
    const model = Buffer.from(initial);
    for (let i = 0; i < blocks; i++) {
      const d = pattern(BS, i + 1, i * 2 * BS);
      d.copy(model, i * 2 * BS);
      await cow.pwrite(d, i * 2 * BS, plainIo);
    }
    return { base, cow, overlay, model, ctl };
  }

  it("retries a block whose copy into the base failed; the overlay forgets a block only once the base has it", async () => {
    const { base, cow, model, ctl } = await overlayOnFlakyBase(5);
    ctl.fail = 2;
    await cow.merge({ mergeIntoBase: true });
    expect(cow.progress).toMatchObject({ state: "done", failures: 2, doneBytes: 5 * BS, totalBytes: 5 * BS, dirtyBytes: 0 });
    expect((await readAll(cow)).equals(model)).toBe(true);
    expect((await readAll(base.port)).equals(model)).toBe(true);
    await cow.close();
  });

  it("stops with ESHUTDOWN when the layer closes; reopened, the device is whole and the merge can run again", async () => {
    const { base, cow, overlay, model, ctl } = await overlayOnFlakyBase(6);
    ctl.delayMs = 5;
    let closed: Promise<void> | null = null;
    const { done } = cow.startMerge({ mergeIntoBase: true, onProgress: (p) => void (p.doneBytes >= 2 * BS && (closed ??= cow.close())) });
    await expect(done).rejects.toMatchObject({ errno: "ESHUTDOWN" });
    await closed;
    expect(cow.progress).toMatchObject({ state: "failed", error: expect.stringMatching(/closed during the merge/) });
    expect(cow.progress.doneBytes).toBeLessThan(6 * BS);
    // The overlay's map forgets the blocks copied before the stop: the base was made durable first.
    expect(ctl.flushes).toBeGreaterThan(0);
    ctl.delayMs = 0;
    const again = await openCow(base, overlay, { blockSize: BS, io: "async" });
    expect((await readAll(again)).equals(model)).toBe(true);
    await again.merge({ mergeIntoBase: true });
    expect((await readAll(base.port)).equals(model)).toBe(true);
    await again.close();
  });
});
