import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import pino from "pino";
import { afterEach, describe, expect, it, vi } from "vitest";
import { LeaseFile } from "../migration/lease.js";
import { plainIo } from "../stack/layer.js";
import type { ExportSpec } from "../stack/compose.js";
import { StackHandles } from "../stack/stack-handles.js";
import { StorageNode } from "./storage-node.js";
import { FileOwnership } from "../migration/file-ownership.js";
import { NbdServer } from "../server/server.js";
import { Export } from "../stack/export.js";
import { DiskLayer } from "../stack/disk/disk-layer.js";
import { MemoryPort } from "../stack/port/memory-port.js";
import { NbdError } from "../errors.js";
import type { Layer } from "../stack/layer.js";

const dirs: string[] = [];
afterEach(() => {
  vi.restoreAllMocks();
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

function image(): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdstack-node-"));
  dirs.push(dir);
  const img = path.join(dir, "disk.img");
  fs.writeFileSync(img, Buffer.alloc(1024 * 1024));
  return img;
}

const readAt = (img: string, offset: number, length: number) => fs.readFileSync(img).subarray(offset, offset + length);

/** Node `id` serving `img` as export "disk", opened (`spec`: more of the export's spec). */
async function nodeServing(id: string, img: string, ttlMs: number, spec: Partial<ExportSpec> = {}, handles?: StackHandles) {
  const node = new StorageNode({ nodeId: id, nbd: "127.0.0.1:9", log: pino({ level: "silent" }), ttlMs });
  const exp = await node.createExport({ source: img, name: "disk", ...spec }, handles);
  await exp.open();
  return { node, exp };
}

/** Polls `done` until it holds; fails after `ms` with what `state` says then (wall clock: some tests fake performance.now). */
async function waitFor(done: () => boolean, ms: number, state: () => unknown): Promise<void> {
  const t0 = Date.now();
  while (!done()) {
    if (Date.now() - t0 > ms) throw new Error(`still ${JSON.stringify(state())} after ${ms} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
const stateOf = (n: StorageNode) => n.statusNow().exports[0]!.state;

/**
 * Port A's own epoch check, with a real lease record: a write made after the local deadline
 * (80 % of the lease time since the last renewal) looks at the record first. The renewal loop is
 * not started here, and the clock is moved on by hand, as for an owner that was paused between a
 * renewal and a write: only that check stands between the write and the image.
 */
describe("StorageNode: a write past the lease's local deadline checks the record", () => {
  it("writes through port A while the record names this node, and never once another node holds the lease", async () => {
    const img = image();
    const ttlMs = 60_000;
    const { node: a, exp } = await nodeServing("a", img, ttlMs);
    await exp.layer.pwrite(Buffer.alloc(4096, 0x11), 0, plainIo);
    expect(readAt(img, 0, 4096).every((b) => b === 0x11)).toBe(true);

    // Well past the deadline, the record still names a: the write checks it, renews, and goes to the image.
    const t0 = performance.now();
    const now = vi.spyOn(performance, "now").mockImplementation(() => t0 + 0.9 * ttlMs);
    await exp.layer.pwrite(Buffer.alloc(4096, 0x22), 4096, plainIo);
    expect(readAt(img, 4096, 4096).every((b) => b === 0x22)).toBe(true);
    expect(new LeaseFile(img).read()).toMatchObject({ owner: "a", epoch: 1 });

    // Another node took the image over meanwhile (as after a's lease expired while a was paused).
    new LeaseFile(img).handOver({ nodeId: "a", nbd: "", control: "" }, 1, { nodeId: "b", nbd: "127.0.0.1:9", control: "" }, ttlMs);
    now.mockImplementation(() => t0 + 1.8 * ttlMs + 1);
    const late = exp.layer.pwrite(Buffer.alloc(4096, 0x33), 8192, plainIo);
    late.catch(() => undefined); // held for b (unreachable here); ended with ESHUTDOWN at close
    await waitFor(() => stateOf(a) === "REMOTE", 5000, () => stateOf(a));
    expect(readAt(img, 8192, 4096).every((b) => b === 0)).toBe(true); // a did not write the image
    expect((await a.status()).exports[0]).toMatchObject({ owner: "b", epoch: 2 });
    await a.close();
    await exp.close().catch(() => undefined);
    await expect(late).rejects.toThrow();
    expect(readAt(img, 8192, 4096).every((b) => b === 0)).toBe(true);
  });

  // Nemesis seed 9 (3 nodes, at 742 s): b's FLUSH passed its fence, waited in a fault rule's
  // delay while b was frozen past its lease, and once b continued its power-loss cache persisted
  // an old write over the new owner's newer one. Layers that write back later (a power-loss cache,
  // a cow overlay's map) sit below port A's fence: the image itself is fenced too.
  it("a FLUSH let through before the lease was lost never writes a held-back write into the image after it", async () => {
    const img = image();
    const ttlMs = 60_000;
    const handles = new StackHandles();
    const { node: a, exp } = await nodeServing("a", img, ttlMs, { fault: { powerloss: true } }, handles);
    await exp.layer.pwrite(Buffer.alloc(4096, 0x44), 0, plainIo); // held in the power-loss cache
    expect(readAt(img, 0, 4096).every((b) => b === 0)).toBe(true);
    handles.faults.get("disk")!.addRule("op=flush,delay=300ms");
    const flushed = exp.layer.flush(plainIo).then(() => "ok", (e: Error) => e.message); // let through now
    await new Promise((r) => setTimeout(r, 50));
    // a is frozen in the delay; b takes the image over and writes the block.
    new LeaseFile(img).handOver({ nodeId: "a", nbd: "", control: "" }, 1, { nodeId: "b", nbd: "127.0.0.1:9", control: "" }, ttlMs);
    fs.writeFileSync(img, Buffer.alloc(4096, 0x55), { flag: "r+" });
    const t0 = performance.now();
    vi.spyOn(performance, "now").mockImplementation(() => t0 + 2 * ttlMs);
    const late = await Promise.race([flushed, new Promise((r) => setTimeout(() => r("still waiting"), 1000))]);
    expect(late).not.toBe("ok"); // the FLUSH cannot vouch for a write it could not make durable
    expect(readAt(img, 0, 4096).every((b) => b === 0x55)).toBe(true); // b's write stands
    await a.close();
    await exp.close().catch(() => undefined);
    expect(readAt(img, 0, 4096).every((b) => b === 0x55)).toBe(true);
  });

  it("fences port A from the renewal loop, with no write needed, once another node holds the lease", async () => {
    const img = image();
    const { node: a, exp } = await nodeServing("a", img, 600);
    await a.start("http://127.0.0.1:9");
    new LeaseFile(img).handOver({ nodeId: "a", nbd: "", control: "" }, 1, { nodeId: "b", nbd: "127.0.0.1:9", control: "" }, 600);
    await waitFor(() => stateOf(a) === "REMOTE", 5000, () => stateOf(a));
    await a.close();
    await exp.close().catch(() => undefined);
  });

  it("trusts a renewal from before it started, not from when it returned: a pause inside renew() shortens the trust", async () => {
    const img = image();
    const ttlMs = 60_000;
    const { node: a, exp } = await nodeServing("a", img, ttlMs);
    let t = performance.now();
    vi.spyOn(performance, "now").mockImplementation(() => t);
    const real = LeaseFile.prototype.renew;
    const renew = vi.spyOn(LeaseFile.prototype, "renew").mockImplementation(function (this: LeaseFile, ...args) {
      t += 0.5 * ttlMs; // the process was paused in the middle of the renewal
      return real.apply(this, args);
    });
    await exp.layer.pwrite(Buffer.alloc(4096, 1), 0, plainIo); // past the deadline (none yet): checks and renews
    expect(renew).toHaveBeenCalledTimes(1);
    renew.mockClear();
    // 0.85 of the lease after the renewal began: past the 0.8 share of it, so the record is checked again.
    t += 0.35 * ttlMs;
    await exp.layer.pwrite(Buffer.alloc(4096, 2), 4096, plainIo);
    expect(renew).toHaveBeenCalledTimes(1);
    await exp.close();
    await a.close();
  });

  it("waits, never writes, while the record past the deadline cannot be read; writes once it can", async () => {
    const img = image();
    const ttlMs = 60_000;
    const { node: a, exp } = await nodeServing("a", img, ttlMs);
    await exp.layer.pwrite(Buffer.alloc(4096, 0x11), 0, plainIo);
    const t0 = performance.now();
    vi.spyOn(performance, "now").mockImplementation(() => t0 + 0.9 * ttlMs);
    const renew = vi.spyOn(LeaseFile.prototype, "renew").mockImplementation(() => {
      throw Object.assign(new Error("EACCES: permission denied, open 'disk.img.lease'"), { code: "EACCES" });
    });
    let done = false;
    const w = exp.layer.pwrite(Buffer.alloc(4096, 0x44), 4096, plainIo).then(() => (done = true));
    await new Promise((r) => setTimeout(r, 300));
    expect(done).toBe(false);
    expect(readAt(img, 4096, 4096).every((b) => b === 0)).toBe(true);
    expect(renew.mock.calls.length).toBeGreaterThan(1); // it keeps asking
    renew.mockRestore();
    await w;
    expect(readAt(img, 4096, 4096).every((b) => b === 0x44)).toBe(true);
    expect((await a.status()).exports[0]).toMatchObject({ state: "LOCAL", owner: "a", epoch: 1 });
    await exp.close();
    await a.close();
  });

  it("adopts a lease handed to it whose adopt call never came (the source died right after the hand-over), at the next renewal tick", async () => {
    const img = image();
    const ttlMs = 9000; // renewal ticks every 3 s; the lease would expire for an observer only after 9 s
    const me = os.hostname();
    // "a", a process that runs (pid 1), owns the image.
    const lease = new LeaseFile(img, { pid: 1, host: me });
    lease.acquire({ nodeId: "a", nbd: "127.0.0.1:9", control: "" }, ttlMs);
    const { node: b, exp } = await nodeServing("b", img, ttlMs);
    await b.start("http://127.0.0.1:9");
    expect((await b.status()).exports[0]).toMatchObject({ state: "REMOTE", owner: "a" });
    lease.handOver({ nodeId: "a", nbd: "", control: "" }, 1, { nodeId: "b", nbd: "127.0.0.1:9", control: "" }, ttlMs); // then a dies
    await waitFor(() => stateOf(b) === "LOCAL", 6000, () => stateOf(b));
    expect((await b.status()).exports[0]).toMatchObject({ owner: "b", epoch: 2 });
    expect(new LeaseFile(img).read()).toMatchObject({ owner: "b", epoch: 2, pid: process.pid }); // claimed
    await exp.layer.pwrite(Buffer.alloc(4096, 0x5a), 0, plainIo);
    expect(readAt(img, 0, 4096).every((x) => x === 0x5a)).toBe(true);
    await exp.close();
    await b.close();
  }, 15_000);

  it("a take-over of a record released cleanly vouches for the owners it lists (handedFrom), as a hand-over does; one of an expired lease vouches for none", async () => {
    // Found by the lab nemesis (seed 77): b handed the export to c, c claimed it and could not open
    // port A, so it released it cleanly; a took it over before b took it back, and failed its
    // client's next FLUSH (EIO) for writes that b had flushed before its hand-over.
    for (const released of [true, false]) {
      const img = image();
      const me = os.hostname();
      const b = { nodeId: "b", nbd: "127.0.0.1:9", control: "" };
      const c = { nodeId: "c", nbd: "127.0.0.1:9", control: "" };
      const lease = new LeaseFile(img, { pid: 1, host: me }); // pid 1 runs: only expiry or a release frees it
      lease.acquire(b, 600);
      lease.handOver(b, 1, c, 600);
      lease.renew(c, 2); // c's claim
      const { node: a, exp } = await nodeServing("a", img, 600);
      expect(stateOf(a)).toBe("REMOTE"); // c owns it
      const m = (a as unknown as { managed: Map<string, { redirector: { adopt: (how: unknown) => Promise<void> } }> }).managed.get("disk")!;
      const adopt = vi.spyOn(m.redirector, "adopt");
      if (released) lease.release(c, 2, true); // c's port A would not open: given up, clean
      await a.start("http://127.0.0.1:9");
      await waitFor(() => stateOf(a) === "LOCAL", 5000, () => stateOf(a));
      expect(adopt).toHaveBeenCalledTimes(1);
      expect(adopt.mock.calls[0]![0]).toEqual(released ? { ownerFlushed: true, handedFrom: ["b@1", "c@2"] } : { ownerFlushed: false });
      await exp.close();
      await a.close();
    }
  }, 20_000);

  it("a take-over whose port A does not open gives the lease up instead of naming itself owner with nothing to serve", async () => {
    const img = image();
    new LeaseFile(img, { pid: 1, host: os.hostname() }).acquire({ nodeId: "a", nbd: "127.0.0.1:9", control: "" }, 600); // a never renews: b takes over after 600 ms
    const handles = new StackHandles();
    const { node: b, exp } = await nodeServing("b", img, 600, { fault: {} }, handles);
    handles.faults.get("disk")!.addRule("op=open,errno=EIO"); // port A cannot open now
    await b.start("http://127.0.0.1:9");
    const record = () => new LeaseFile(img).read();
    await waitFor(() => record()?.owner === "b" && record()?.leaseStart === 0, 3000, record);
    handles.faults.get("disk")!.clearRules(); // the next tick takes it over and serves it
    await waitFor(() => stateOf(b) === "LOCAL", 3000, () => stateOf(b));
    await exp.layer.pwrite(Buffer.alloc(4096, 0x42), 0, plainIo);
    expect(readAt(img, 0, 4096).every((x) => x === 0x42)).toBe(true);
    await exp.close();
    await b.close();
  });

  it("starts serving through port B when the record cannot be taken at start (its lock held by a stopped process), and takes it once it can", async () => {
    const img = image();
    fs.writeFileSync(`${img}.lease.lock`, `${os.hostname()} 1 held`); // pid 1 runs: the lock is never broken
    const { node: b, exp } = await nodeServing("b", img, 600);
    expect((await b.status()).exports[0]).toMatchObject({ state: "REMOTE", owner: null });
    await b.start("http://127.0.0.1:9");
    fs.rmSync(`${img}.lease.lock`);
    await waitFor(() => stateOf(b) === "LOCAL", 3000, () => stateOf(b));
    expect((await b.status()).exports[0]).toMatchObject({ owner: "b", epoch: 1 });
    await exp.close();
    await b.close();
  });
});

/**
 * With etcd, the record lives in a store that may be out of reach (the node cut off from etcd).
 * Port B's requests then wait for the owner's address; they never fail with the store's error.
 */
describe("StorageNode: an unreadable record holds port B's requests", () => {
  it("a write through port B waits while the record cannot be read, and goes to the owner once it can", async () => {
    const img = image();
    const owner = new MemoryPort({ size: 1024 * 1024 });
    const server = new NbdServer({ exports: [new Export("disk", new DiskLayer(owner), () => "[owner=a epoch=1]")], tcp: [{ host: "127.0.0.1", port: 0 }], log: pino({ level: "silent" }) });
    await server.start();
    const at = server.addresses()[0] as { host: string; port: number };
    new LeaseFile(img, { pid: 1, host: os.hostname() }).acquire({ nodeId: "a", nbd: `${at.host}:${at.port}`, control: "" }, 60_000);
    const store = { down: false };
    class Unreachable extends FileOwnership {
      override async read() {
        if (store.down) throw Object.assign(new Error("etcd: no member answered"), { code: "ETCD_UNAVAILABLE" });
        return super.read();
      }
    }
    const node = new StorageNode({ nodeId: "b", nbd: "127.0.0.1:9", log: pino({ level: "silent" }), ttlMs: 60_000, ownership: (image) => new Unreachable(new LeaseFile(image)) });
    const exp = await node.createExport({ source: img, name: "disk" });
    store.down = true;
    await exp.open();
    try {
      let done = false;
      const w = exp.layer.pwrite(Buffer.alloc(4096, 0x3c), 0, plainIo).then(() => (done = true));
      await new Promise((r) => setTimeout(r, 300));
      expect(done).toBe(false);
      store.down = false;
      await w;
      const back = Buffer.alloc(4096);
      await owner.pread(back, 0, plainIo);
      expect(back.every((x) => x === 0x3c)).toBe(true);
    } finally {
      await exp.close();
      await node.close();
      await server.close();
    }
  });
});

/**
 * bench:cluster (h3 → h1, fio through h1): the old owner sent the adopting node's own requests
 * back (ESHUTDOWN: "find the owner again"), and its port B read the record in etcd to learn that
 * the owner was itself — one more store round trip inside the move's stall (18 ms under load); its
 * adoption then read the record once more before it let its own new requests through port A.
 */
describe("StorageNode: requests an adopting node gets back from the old owner", () => {
  it("go to port A at once, and the node's own requests follow them there, without reading the record: this node owns the export already", async () => {
    const img = image();
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    // The old owner: holds the first write, then sends it back as a non-owner does after a move.
    class SendsBack extends DiskLayer {
      override async pwrite(_buf: Buffer, _offset: number): Promise<void> {
        await gate;
        throw new NbdError("ESHUTDOWN", "not the owner any more");
      }
    }
    const server = new NbdServer({ exports: [new Export("disk", new SendsBack(new MemoryPort({ size: 1024 * 1024 }) as Layer), () => "[owner=a epoch=1]")], tcp: [{ host: "127.0.0.1", port: 0 }], log: pino({ level: "silent" }) });
    await server.start();
    const at = server.addresses()[0] as { host: string; port: number };
    const a = { nodeId: "a", nbd: `${at.host}:${at.port}`, control: "" };
    const aProcess = new LeaseFile(img, { pid: 1, host: os.hostname() });
    aProcess.acquire(a, 60_000);
    const store = { reads: 0, slowMs: 0 };
    class Slow extends FileOwnership {
      override async read() {
        store.reads++;
        if (store.slowMs) await new Promise((r) => setTimeout(r, store.slowMs));
        return super.read();
      }
    }
    const node = new StorageNode({ nodeId: "b", nbd: "127.0.0.1:9", log: pino({ level: "silent" }), ttlMs: 60_000, ownership: (image) => new Slow(new LeaseFile(image)) });
    const exp = await node.createExport({ source: img, name: "disk" });
    await exp.open();
    try {
      const w = exp.layer.pwrite(Buffer.alloc(4096, 0x5e), 8192, plainIo); // held by the old owner
      await new Promise((r) => setTimeout(r, 100));
      const handed = await new FileOwnership(aProcess).handOver(a, 1, node.identity, 60_000);
      await node.adopt("disk", handed.epoch, handed.handedFrom);
      store.slowMs = 1000; // the store answers slowly from now on (etcd under load)
      const readsBefore = store.reads;
      const t0 = performance.now();
      release();
      await w;
      const ms = performance.now() - t0;
      await waitFor(() => stateOf(node) === "LOCAL", 300, () => stateOf(node)); // after the adoption's check that it still owns the export
      expect(readAt(img, 8192, 4096).every((x) => x === 0x5e)).toBe(true);
      expect(store.reads - readsBefore).toBe(0);
      expect(ms).toBeLessThan(300);
    } finally {
      release();
      await exp.close();
      await node.close();
      await server.close();
    }
  });
});

/**
 * Nemesis on the lab (seeds 6 and 14, etcd): a read of the record that began before this node
 * adopted the export ended after, and put the old owner's record back. The export's description
 * then named this node owner without the owners it vouches for (handedFrom), and every peer's
 * port B counted the move as a loss: its clients' next FLUSH failed (EIO) after a clean move.
 */
describe("StorageNode: a slow read of the record never puts an older record back", () => {
  it("keeps the adopted record (and its handedFrom in the description) when a read begun before the adoption ends after it", async () => {
    const img = image();
    const ttl = 60_000;
    const a = await nodeServing("a", img, ttl);
    let gate: Promise<void> | null = null;
    let open!: () => void;
    const slowReads = (o: FileOwnership) =>
      new Proxy(o, {
        get(t, k, recv) {
          if (k !== "read") return Reflect.get(t, k, recv);
          return async () => {
            const r = await t.read(); // read now…
            if (gate) await gate; // …answered later
            return r;
          };
        },
      });
    const b = new StorageNode({ nodeId: "b", nbd: "127.0.0.1:9", log: pino({ level: "silent" }), ttlMs: ttl, ownership: (image: string) => slowReads(FileOwnership.of(image)) });
    const exp = await b.createExport({ source: img, name: "disk" });
    await exp.open();
    gate = new Promise<void>((r) => (open = r));
    const reading = b.status(); // reads a@1 now, answers after the adoption
    const handed = await FileOwnership.of(img).handOver(a.node.identity, 1, b.identity, ttl);
    await b.adopt("disk", handed.epoch, handed.handedFrom);
    expect(exp.description).toContain("[owner=b epoch=2; handed from a@1]");
    open();
    await reading;
    await waitFor(() => stateOf(b) === "LOCAL", 5000, () => stateOf(b));
    expect(exp.description).toContain("[owner=b epoch=2; handed from a@1]");
    await a.exp.close();
    await exp.close();
  });
});
