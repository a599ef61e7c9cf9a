import fc from "fast-check";
import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import pino from "pino";
import { describe, expect, it, vi } from "vitest";
import { Command } from "commander";
import { BS, SIZE, makeBase, openCow, pattern, readAll, tmpdir } from "../../../test/helpers/cow.js";
import { registerCowCommands } from "../../commands/cow.js";
import { setControlToken } from "../../control/control-client.js";
import { ControlServer } from "../../control/control-server.js";
import { attachCowRoutes } from "../../control/cow-routes.js";
import { plainIo, type Extent, type Layer } from "../layer.js";
import { createFilePort } from "../port/file-port.js";

async function allExtents(l: Layer): Promise<Extent[]> {
  const out: Extent[] = [];
  for (let at = 0; at < l.size(); ) {
    const part = await l.extents(l.size() - at, at, plainIo);
    expect(part.length).toBeGreaterThan(0);
    for (const e of part) {
      const last = out[out.length - 1];
      if (last && last.flags === e.flags) last.length += e.length;
      else out.push({ ...e });
      at += e.length;
    }
  }
  return out;
}

type Op =
  | { kind: "write"; off: number; len: number; seed: number; fua: boolean }
  | { kind: "zero"; off: number; len: number; mayTrim: boolean }
  | { kind: "trim"; off: number; len: number }
  | { kind: "read"; off: number; len: number }
  | { kind: "flush" }
  | { kind: "restart" }
  | { kind: "crash" }
  | { kind: "snapshot" }
  | { kind: "merge" };

const range = fc.integer({ min: 0, max: SIZE - 1 }).chain((off) => fc.record({ off: fc.constant(off), len: fc.integer({ min: 1, max: Math.min(SIZE - off, 3 * BS + 700) }) }));
const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 6, arbitrary: range.chain((r) => fc.record({ kind: fc.constant("write" as const), off: fc.constant(r.off), len: fc.constant(r.len), seed: fc.integer({ min: 1, max: 250 }), fua: fc.boolean() })) },
  { weight: 2, arbitrary: range.chain((r) => fc.record({ kind: fc.constant("zero" as const), off: fc.constant(r.off), len: fc.constant(r.len), mayTrim: fc.boolean() })) },
  { weight: 1, arbitrary: range.map((r) => ({ kind: "trim" as const, ...r })) },
  { weight: 4, arbitrary: range.map((r) => ({ kind: "read" as const, ...r })) },
  { weight: 1, arbitrary: fc.constant({ kind: "flush" as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: "restart" as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: "crash" as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: "snapshot" as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: "merge" as const }) },
);

describe("CowLayer", () => {
  it("matches a flat-buffer model under random writes, zeroes, trims, restarts, crashes after flush, snapshots and merges; the base is never written", async () => {
    for (const variant of [{}, { alignment: 512, maxRequest: 4096 }]) {
      await fc.assert(
        fc.asyncProperty(fc.array(opArb, { minLength: 1, maxLength: 40 }), async (ops) => {
          const { base, initial } = await makeBase(variant);
          const overlay = path.join(tmpdir(), "overlay.cow");
          let cow = await openCow(base, overlay);
          const model = Buffer.from(initial);
          // 1 where the model does not know the contents (trimmed and not written since).
          const loose = Buffer.alloc(model.length);
          const same = (got: Buffer, off: number) => {
            for (let i = 0; i < got.length; i++) if (!loose[off + i] && got[i] !== model[off + i]) return false;
            return true;
          };
          for (const op of ops) {
            switch (op.kind) {
              case "write": {
                const data = pattern(op.len, op.seed, op.off);
                await cow.pwrite(data, op.off, { ...plainIo, fua: op.fua });
                data.copy(model, op.off);
                loose.fill(0, op.off, op.off + op.len);
                break;
              }
              case "zero":
                await cow.zero(op.len, op.off, { ...plainIo, mayTrim: op.mayTrim });
                model.fill(0, op.off, op.off + op.len);
                loose.fill(0, op.off, op.off + op.len);
                break;
              case "trim":
                // After a trim the range reads as anything (whole blocks show what is below again).
                await cow.trim(op.len, op.off, plainIo);
                loose.fill(1, op.off, op.off + op.len);
                break;
              case "read": {
                const got = Buffer.alloc(op.len);
                await cow.pread(got, op.off, plainIo);
                expect(same(got, op.off)).toBe(true);
                break;
              }
              case "flush":
                await cow.flush(plainIo);
                break;
              case "restart":
                await cow.close();
                cow = await openCow(base, overlay, {});
                break;
              case "crash":
                // Flushed, then the process "dies": the layer is abandoned and the files reopened.
                await cow.flush(plainIo);
                cow = await openCow(base, overlay, {});
                break;
              case "snapshot":
                await cow.snapshot();
                break;
              case "merge":
                if (cow.info().chain.length > 1) await cow.merge();
                else await expect(cow.merge()).rejects.toThrow(/mergeIntoBase/);
                break;
            }
          }
          const final = await readAll(cow);
          expect(same(final, 0)).toBe(true);
          const chain = cow.info().chain.length;
          await cow.close();
          const again = await openCow(base, overlay, {});
          expect(again.info().chain.length).toBe(chain);
          expect((await readAll(again)).equals(final)).toBe(true);
          await again.close();
          expect(base.writes).toBe(0);
          expect((await readAll(base.port)).equals(initial)).toBe(true);
        }),
        { numRuns: 40, seed: 20261123 },
      );
    }
  }, 120_000);

  it("over a read-only image file: the image's checksum never changes, the overlay survives restart", async () => {
    const dir = tmpdir();
    const image = path.join(dir, "base.img");
    fs.writeFileSync(image, crypto.randomBytes(1024 * 1024 + 512));
    const sum = () => crypto.createHash("sha256").update(fs.readFileSync(image)).digest("hex");
    const before = sum();
    const model = fs.readFileSync(image);
    const overlay = path.join(dir, "base.cow");
    const cow = await openCow(createFilePort({ path: image, readOnly: true }), overlay, {});
    for (let i = 0; i < 50; i++) {
      const off = (i * 104_729) % (model.length - 70_000);
      const data = pattern(1 + ((i * 7919) % 70_000), i, off);
      data.copy(model, off);
      await cow.pwrite(data, off, plainIo);
    }
    await cow.zero(200_000, 300_001, plainIo);
    model.fill(0, 300_001, 500_001);
    await cow.close();
    const again = await openCow(createFilePort({ path: image, readOnly: true }), overlay, {});
    expect((await readAll(again)).equals(model)).toBe(true);
    await again.close();
    expect(sum()).toBe(before);
  });

  it("never loses bytes when concurrent unaligned writes share blocks", async () => {
    const { base, initial } = await makeBase();
    const cow = await openCow(base, path.join(tmpdir(), "o.cow"), { blockSize: BS, io: "async" });
    const model = Buffer.from(initial);
    const writes: Promise<void>[] = [];
    for (let i = 0; i < 400; i++) {
      const off = 100 + i * 37;
      const data = Buffer.alloc(37, (i % 254) + 1);
      data.copy(model, off);
      writes.push(cow.pwrite(data, off, plainIo));
      if (i % 50 === 0) writes.push(cow.zero(5, off + 10, plainIo).then(() => undefined));
    }
    // The zeroes race the writes around them; apply them to the model after the fact.
    await Promise.all(writes);
    for (let i = 0; i < 400; i += 50) {
      const off = 100 + i * 37;
      model.fill(0, off + 10, off + 15);
      // …unless a later write covered those bytes after the zero: rewrite them to make the test exact.
      await cow.pwrite(Buffer.alloc(5), off + 10, plainIo);
    }
    expect((await readAll(cow)).equals(model)).toBe(true);
    await cow.close();
  });

  it("reports blocks held by the overlay, zeroed in it, and the base's own map elsewhere", async () => {
    // Base: data in its first 64 KiB page (flags 0), holes after it (HOLE|ZERO).
    const { base } = await makeBase({ size: 16 * BS });
    const cow = await openCow(base, path.join(tmpdir(), "o.cow"));
    await cow.zero(BS, 2 * BS, plainIo); // inside the base's data
    await cow.pwrite(Buffer.alloc(100, 1), 10 * BS + 7, plainIo); // inside the base's hole
    expect(await allExtents(cow)).toEqual([
      { length: 2 * BS, flags: 0 },
      { length: BS, flags: 3 },
      { length: 5 * BS, flags: 0 },
      { length: 2 * BS, flags: 3 },
      { length: BS, flags: 0 },
      { length: 5 * BS, flags: 3 },
    ]);
    // A query that starts and ends inside blocks.
    expect(await cow.extents(BS, 2 * BS - 100, plainIo)).toEqual([
      { length: 100, flags: 0 },
      { length: BS - 100, flags: 3 },
    ]);
    await cow.close();
  });

  it("takes snapshots while clients write; the chain reopens after a restart", async () => {
    const { base, initial } = await makeBase();
    const overlay = path.join(tmpdir(), "vm.cow");
    const cow = await openCow(base, overlay, { blockSize: BS, io: "async" });
    const model = Buffer.from(initial);
    const frozen: string[] = [];
    /** The device as each snapshot froze it (index 0: snap-1). */
    const atSnapshot: Buffer[] = [];
    const below = (l: Layer) => (l as unknown as { below: Layer }).below;
    // Each round: 60 concurrent writes into disjoint 1500-byte slots (so the model is exact), a snapshot among them.
    // Writes 0..30 of a round entered the layer before the snapshot was asked for, so it holds
    // them; writes 31..59 wait for it and land in the new overlay.
    let seed = 1;
    for (let round = 0; round < 3; round++) {
      const jobs: Promise<unknown>[] = [];
      for (let i = 0; i < 60; i++) {
        const slot = (i * 7 + round * 3) % Math.floor(SIZE / 1500);
        const off = slot * 1500 + ((seed * 13) % 700);
        const len = 1 + ((seed * 101) % 800);
        const data = pattern(len, seed++, off);
        data.copy(model, off);
        jobs.push(cow.pwrite(data, off, plainIo));
        if (i === 30) {
          atSnapshot.push(Buffer.from(model));
          jobs.push(cow.snapshot().then((p) => frozen.push(p)));
        }
      }
      await Promise.all(jobs);
      expect((await readAll(cow)).equals(model)).toBe(true);
      // The writes after the snapshot changed the device (so the check below can tell)...
      expect(model.equals(atSnapshot[round]!)).toBe(false);
      // ...but not the frozen overlay just below the live one.
      expect((await readAll(below(cow))).equals(atSnapshot[round]!)).toBe(true);
    }
    expect(frozen).toEqual([1, 2, 3].map((n) => `${overlay}.snap-${n}`));
    expect(cow.info().chain.map((e) => e.path)).toEqual([overlay, ...frozen.slice().reverse()]);
    expect(cow.describe()).toBe(`cow:${overlay} → cow-snapshot:${overlay}.snap-3 → cow-snapshot:${overlay}.snap-2 → cow-snapshot:${overlay}.snap-1 → memory:${SIZE}`);
    // A snapshot freezes: its bytes stay as they were when it was taken, at every depth of the
    // chain, while the live overlay moves on; and so after a restart.
    for (let depth = 1, l = below(cow); depth <= 3; depth++, l = below(l)) expect((await readAll(l)).equals(atSnapshot[3 - depth]!), `snap-${4 - depth}`).toBe(true);
    await cow.close();
    const again = await openCow(base, overlay, {});
    expect(again.info().chain.length).toBe(4);
    expect((await readAll(again)).equals(model)).toBe(true);
    for (let depth = 1, l = below(again); depth <= 3; depth++, l = below(l)) expect((await readAll(l)).equals(atSnapshot[3 - depth]!), `snap-${4 - depth} reopened`).toBe(true);
    // Each .snap-N file, opened as the overlay over the base, is the device as that snapshot froze it.
    for (let n = 1; n <= 3; n++) {
      const view = await openCow(base, `${overlay}.snap-${n}`, { create: false });
      expect(view.info().chain.length).toBe(n);
      expect((await readAll(view)).equals(atSnapshot[n - 1]!), `${overlay}.snap-${n} opened alone`).toBe(true);
      await view.close();
    }
    await expect(again.snapshot("../elsewhere")).rejects.toThrow(/file name/);
    expect(await again.snapshot("named")).toBe(path.join(path.dirname(overlay), "named"));
    await again.close();
    expect(base.writes).toBe(0);
  });

  it("refuses writes to a frozen snapshot and fast zeroes of partial blocks", async () => {
    const { base } = await makeBase();
    const cow = await openCow(base, path.join(tmpdir(), "o.cow"));
    expect(cow.capabilities()).toMatchObject({ writable: true, flush: true, fua: true, trim: true, zero: true, multiConn: true, cache: true });
    await expect(cow.zero(100, 10, { ...plainIo, fast: true })).rejects.toMatchObject({ errno: "ENOTSUP" });
    await expect(cow.zero(2 * BS, BS, { ...plainIo, fast: true })).resolves.toBeUndefined();
    await cow.snapshot();
    const below = (cow as unknown as { below: Layer }).below;
    expect(below.capabilities().writable).toBe(false);
    await expect(below.pwrite(Buffer.alloc(1), 0, plainIo)).rejects.toMatchObject({ errno: "EPERM" });
    await cow.close();
  });

  it("serves snapshot, merge and status on the control API", async () => {
    const { base } = await makeBase();
    const overlay = path.join(tmpdir(), "vm.cow");
    const cow = await openCow(base, overlay);
    await cow.pwrite(Buffer.alloc(3 * BS, 3), 0, plainIo);
    const server = new ControlServer(pino({ level: "silent" }), "t".repeat(32));
    attachCowRoutes(server, new Map([["vm", cow]]));
    const url = await server.listen("127.0.0.1", 0);
    const call = async (method: string, p: string, body?: unknown) => {
      const res = await fetch(`${url}${p}`, {
        method,
        headers: { authorization: `Bearer ${"t".repeat(32)}`, "content-type": "application/json" },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      return { status: res.status, body: (await res.json()) as Record<string, unknown> };
    };
    try {
      const st = await call("GET", "/v1/exports/vm/cow");
      expect(st.status).toBe(200);
      expect(st.body).toMatchObject({ overlay, allocatedBytes: 3 * BS, blockSize: BS, merge: { state: "idle" } });
      expect((await call("GET", "/v1/exports/nope/cow")).status).toBe(404);
      expect((await call("POST", "/v1/exports/vm/cow", { merge: true })).status).toBe(409);
      const snap = await call("POST", "/v1/exports/vm/cow", { snapshot: true });
      expect(snap.body.snapshot).toBe(`${overlay}.snap-1`);
      expect((snap.body.chain as unknown[]).length).toBe(2);
      await cow.pwrite(Buffer.alloc(2 * BS, 4), BS, plainIo);
      const m = await call("POST", "/v1/exports/vm/cow", { merge: true, wait: true });
      expect(m.status).toBe(200);
      expect(m.body).toMatchObject({ merge: { state: "done", doneBytes: 2 * BS, totalBytes: 2 * BS } });
      expect((m.body.chain as unknown[]).length).toBe(1);
      expect((await call("POST", "/v1/exports/vm/cow", { other: 1 })).status).toBe(400);

      // The same through the commands.
      setControlToken("t".repeat(32));
      const out: string[] = [];
      const spy = vi.spyOn(process.stdout, "write").mockImplementation((chunk: string | Uint8Array) => (out.push(String(chunk)), true));
      try {
        const cli = () => {
          const program = new Command().exitOverride();
          registerCowCommands(program);
          return program;
        };
        await cli().parseAsync(["snapshot", "vm", "--control", url, "--as", "before-upgrade"], { from: "user" });
        await cow.pwrite(Buffer.alloc(BS, 5), 0, plainIo);
        await cli().parseAsync(["merge", "vm", "--control", url, "--wait"], { from: "user" });
        await cli().parseAsync(["cow", "vm", "--control", url], { from: "user" });
      } finally {
        spy.mockRestore();
      }
      const text = out.join("");
      expect(text).toContain(`froze the overlay of vm as ${path.join(path.dirname(overlay), "before-upgrade")}`);
      expect(text).toContain(`merged 8.0 KiB of vm into ${path.join(path.dirname(overlay), "before-upgrade")}`);
      expect(text).toMatch(/overlay +24\.0 KiB data +0 B zeroed  .*vm\.cow\n/);
      expect(text).toMatch(/merge +done/);
    } finally {
      await server.close();
      await cow.close();
    }
  });
});
