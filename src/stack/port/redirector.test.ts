import { setTimeout as sleep } from "node:timers/promises";
import { describe, expect, it } from "vitest";
import { NbdError } from "../../errors.js";
import { PassthroughLayer, plainIo, type Io, type Layer } from "../layer.js";
import { FaultLayer } from "../fault/fault-layer.js";
import { MemoryPort } from "./memory-port.js";
import { FenceLayer } from "./fence-layer.js";
import { PortRedirector } from "./redirector.js";

const SIZE = 1 << 20;

/** A world of two nodes sharing one device; `owner` is who may write it. */
function world(seed: number, faultA?: (f: FaultLayer) => void, fenced = false) {
  let rnd = seed >>> 0 || 1;
  const rand = () => ((rnd = (rnd * 1103515245 + 12345) >>> 0) / 2 ** 32);
  const disk = new MemoryPort({ size: SIZE });
  const state = { owner: "x" as "x" | "y", violations: [] as string[], refuse: false, adoptThenFail: false, reclaimFails: false, openFails: 0, gaveUp: 0, openDelayMs: 0 };
  const nodes: Record<"x" | "y", PortRedirector> = {} as never;

  /** Port A of a node: the shared device, usable only while that node owns it and has it open. */
  class PortA extends PassthroughLayer {
    private open_ = true;
    constructor(private readonly me: "x" | "y") {
      super(disk);
    }
    private check(op: string): void {
      if (!this.open_ || state.owner !== this.me) state.violations.push(`${this.me} ${op} through port A while owner=${state.owner} open=${this.open_}`);
    }
    override async open() {}
    override async close() {
      this.open_ = false;
    }
    override async pwrite(b: Buffer, o: number, io: Io) {
      this.check("pwrite");
      await sleep(rand() < 0.3 ? 1 : 0);
      this.check("pwrite (landing)");
      return super.pwrite(b, o, io);
    }
    override async pread(b: Buffer, o: number, io: Io) {
      this.check("pread");
      return super.pread(b, o, io);
    }
    override async flush(io: Io) {
      this.check("flush");
      return super.flush(io);
    }
  }
  /** Port B of a node: the other node's stack, reached after a network hop; marks requests as peer. */
  class PortB extends PassthroughLayer {
    constructor(to: "x" | "y") {
      super({ ...disk, size: () => SIZE, capabilities: () => disk.capabilities() } as unknown as Layer);
      this.to = to;
    }
    private to: "x" | "y";
    private closed = false;
    /**
     * Like RemotePort: a node that does not own the device answers ESHUTDOWN, and port B finds the
     * owner again — EOWNER when that is its own node.
     */
    private hop<T>(f: (n: PortRedirector) => Promise<T>): Promise<T> {
      if (this.closed) return Promise.reject(new NbdError("ESHUTDOWN", "port B used after close"));
      return sleep(rand() < 0.5 ? 0 : 1).then(async () => {
        for (;;) {
          let r: T;
          try {
            r = await f(nodes[this.to]);
          } catch (err) {
            if ((err as NbdError).errno !== "ESHUTDOWN" || this.closed) throw err;
            if (state.owner !== this.to) throw Object.assign(new Error("the owner is this node"), { code: "EOWNER" });
            await sleep(1);
            continue;
          }
          await sleep(rand() < 0.5 ? 0 : 1); // the reply's way back
          if (this.closed) throw new NbdError("ESHUTDOWN", "port B closed with a request in flight");
          return r;
        }
      });
    }
    override async open() {}
    override async close() {
      this.closed = true;
    }
    override pwrite(b: Buffer, o: number, io: Io) {
      return this.hop((n) => n.pwrite(b, o, { ...io, peer: true }));
    }
    override pread(b: Buffer, o: number, io: Io) {
      return this.hop((n) => n.pread(b, o, { ...io, peer: true }));
    }
    override flush(io: Io) {
      return this.hop((n) => n.flush({ ...io, peer: true }));
    }
  }
  for (const me of ["x", "y"] as const) {
    const other = me === "x" ? "y" : "x";
    nodes[me] = new PortRedirector(
      `disk@${me}`,
      {
        openLocal: async () => {
          if (state.openDelayMs) await sleep(state.openDelayMs);
          if (state.openFails > 0) {
            state.openFails--;
            throw new Error("injected EIO on open");
          }
          // With fencing, port A lets writes through only while this node owns the device (its lease).
          const a = fenced ? new FenceLayer(new PortA(me), () => state.owner === me) : new PortA(me);
          if (!faultA || me !== "x") return a;
          const f = new FaultLayer(a, { seed });
          faultA(f);
          return f;
        },
        openRemote: async () => new PortB(other), stillOwner: () => state.owner === me },
      me === "x",
    );
  }
  const move = (from: "x" | "y") => {
    const to = from === "x" ? "y" : "x";
    return nodes[from].moveOut({
      assign: async () => {
        await sleep(1);
        if (state.refuse) throw new Error("peer refuses");
        state.owner = to;
        await nodes[to].adopt();
        if (state.adoptThenFail) throw new Error("the peer's answer was lost");
      },
      reclaim: async () => {
        if (state.reclaimFails) throw new Error("lease names the peer");
        state.owner = from;
      },
      giveUp: async () => {
        state.gaveUp++;
      },
    });
  };
  return { disk, state, nodes, move, rand };
}

describe("PortRedirector", () => {
  it("moves an export back and forth under random load: no request fails, every read sees the last acknowledged write", async () => {
    for (const seed of [1, 2, 3]) {
      const w = world(seed);
      await w.nodes.x.open();
      await w.nodes.y.open();
      const REGION = 16 * 1024;
      const clients = 12;
      const model = Buffer.alloc(SIZE);
      const failures: unknown[] = [];
      let stop = false;
      let ops = 0;
      const client = async (id: number) => {
        const node = id % 2 === 0 ? w.nodes.x : w.nodes.y;
        const base = id * REGION;
        for (let i = 0; !stop; i++) {
          const off = base + Math.floor(w.rand() * (REGION - 600));
          const len = 1 + Math.floor(w.rand() * 512);
          try {
            if (w.rand() < 0.6) {
              const data = Buffer.alloc(len, (id * 31 + i) % 251 + 1);
              await node.pwrite(data, off, plainIo);
              data.copy(model, off);
            } else if (w.rand() < 0.9) {
              const got = Buffer.alloc(len);
              await node.pread(got, off, plainIo);
              if (!got.equals(model.subarray(off, off + len))) failures.push(`client ${id}: stale read at ${off}`);
            } else {
              await node.flush(plainIo);
            }
            ops++;
          } catch (err) {
            failures.push(err);
          }
        }
      };
      const running = Array.from({ length: clients }, (_, i) => client(i));
      let from: "x" | "y" = "x";
      for (let m = 0; m < 12; m++) {
        await sleep(Math.floor(w.rand() * 5));
        await w.move(from);
        from = from === "x" ? "y" : "x";
        expect(w.state.owner).toBe(from);
      }
      stop = true;
      await Promise.all(running);
      expect(failures).toEqual([]);
      expect(w.state.violations).toEqual([]);
      expect(ops).toBeGreaterThan(200);
      const all = Buffer.alloc(SIZE);
      await w.disk.pread(all, 0, plainIo);
      expect(all.equals(model)).toBe(true);
      expect(w.nodes.x.stats().moves + w.nodes.y.stats().moves).toBe(24);
    }
  });

  it("rolls back when the peer cannot take the resource, and fails nothing", async () => {
    const w = world(7);
    await w.nodes.x.open();
    await w.nodes.y.open();
    w.state.refuse = true;
    const writes = Array.from({ length: 50 }, (_, i) => w.nodes.x.pwrite(Buffer.alloc(100, i + 1), i * 100, plainIo));
    const moving = w.move("x");
    const later = Array.from({ length: 50 }, (_, i) => w.nodes.x.pwrite(Buffer.alloc(100, i + 101), 10_000 + i * 100, plainIo));
    await expect(moving).rejects.toThrow(/peer refuses/);
    await Promise.all([...writes, ...later]);
    expect(w.nodes.x.state).toBe("LOCAL");
    expect(w.state.owner).toBe("x");
    expect(w.state.violations).toEqual([]);
    const b = Buffer.alloc(100);
    await w.nodes.y.pread(b, 10_000 + 49 * 100, plainIo); // through y's port B to x
    expect(b.every((v) => v === 150)).toBe(true);
  });

  it("holds requests in arrival order during a move and forwards them in that order", async () => {
    const w = world(9);
    await w.nodes.x.open();
    await w.nodes.y.open();
    const slow = w.nodes.x.pwrite(Buffer.alloc(10, 1), 0, plainIo); // in flight on port A
    const moving = w.move("x");
    while (w.nodes.x.state === "LOCAL") await sleep(0);
    expect(["DRAINING", "HANDOVER"]).toContain(w.nodes.x.state);
    const order: number[] = [];
    const held = [1, 2, 3, 4].map((i) => w.nodes.x.pwrite(Buffer.alloc(10, i + 1), 0, plainIo).then(() => order.push(i)));
    expect(w.nodes.x.stats().held).toBe(4);
    await slow;
    await moving;
    await Promise.all(held);
    expect(w.nodes.x.state).toBe("REMOTE");
    expect(order).toEqual([1, 2, 3, 4]);
  });

  it("refuses to move while not the owner", async () => {
    const w = world(3);
    await w.nodes.x.open();
    await w.nodes.y.open();
    await expect(w.move("y")).rejects.toBeInstanceOf(NbdError);
  });

  it("never lets a rolled-back adopter write: it follows the owner that took the resource back", async () => {
    const w = world(11);
    await w.nodes.x.open();
    await w.nodes.y.open();
    w.state.adoptThenFail = true;
    const fromY = Array.from({ length: 30 }, (_, i) => w.nodes.y.pwrite(Buffer.alloc(64, i + 1), i * 64, plainIo));
    const moving = w.move("x");
    const fromX = Array.from({ length: 30 }, (_, i) => w.nodes.x.pwrite(Buffer.alloc(64, i + 101), 4096 + i * 64, plainIo));
    await expect(moving).rejects.toThrow(/answer was lost/);
    await Promise.all([...fromY, ...fromX]);
    while (w.nodes.y.state === "ADOPTING") await sleep(1);
    expect(w.state.owner).toBe("x");
    expect(w.nodes.x.state).toBe("LOCAL");
    expect(w.nodes.y.state).toBe("REMOTE");
    expect(w.state.violations).toEqual([]);
    const after = Buffer.alloc(64);
    await w.nodes.y.pwrite(Buffer.alloc(64, 7), 0, plainIo);
    await w.nodes.x.pread(after, 0, plainIo);
    expect(after.every((v) => v === 7)).toBe(true);
  });

  it("follows the new owner when it cannot take the resource back after a failed hand-over", async () => {
    const w = world(13);
    await w.nodes.x.open();
    await w.nodes.y.open();
    w.state.adoptThenFail = true;
    w.state.reclaimFails = true;
    const moving = w.move("x");
    const held = Array.from({ length: 20 }, (_, i) => w.nodes.x.pwrite(Buffer.alloc(64, i + 1), i * 64, plainIo));
    await expect(moving).rejects.toThrow(/answer was lost/);
    await Promise.all(held);
    expect(w.state.owner).toBe("y");
    expect(w.nodes.x.state).toBe("REMOTE");
    while (w.nodes.y.state === "ADOPTING") await sleep(1);
    expect(w.nodes.y.state).toBe("LOCAL");
    expect(w.state.violations).toEqual([]);
  });

  it("gives the resource up when it took it back but port A would not open again (nemesis seed 11 at 1665 s)", async () => {
    // The peer refused; the owner took the lease back, then port A failed to open (EIO). It
    // followed "its owner" through port B — itself, by the record — and held every request for
    // good. Now it gives the lease up (released, so a node may take it at once).
    const w = world(17);
    await w.nodes.x.open();
    await w.nodes.y.open();
    w.state.refuse = true;
    w.state.openFails = 1;
    await expect(w.move("x")).rejects.toThrow(/peer refuses/);
    expect(w.nodes.x.state).toBe("REMOTE");
    expect(w.state.gaveUp).toBe(1);
  });

  it("fences port A when the resource was taken without a hand-over (a paused owner): no write lands there, none fails", async () => {
    for (const fenced of [true, false]) {
      const w = world(23, undefined, fenced);
      await w.nodes.x.open();
      await w.nodes.y.open();
      // y takes the device over on its own, as after x's lease expired while x was paused.
      w.state.owner = "y";
      await w.nodes.y.adopt();
      const writes = Array.from({ length: 50 }, (_, i) => w.nodes.x.pwrite(Buffer.alloc(512, i + 1), i * 512, plainIo));
      await Promise.all(writes);
      if (!fenced) {
        expect(w.state.violations.length).toBeGreaterThan(0); // what fencing prevents: x writing as a second owner
        continue;
      }
      expect(w.state.violations).toEqual([]);
      expect(w.nodes.x.state).toBe("REMOTE");
      const b = Buffer.alloc(50 * 512);
      await w.disk.pread(b, 0, plainIo);
      for (let i = 0; i < 50; i++) expect(b.subarray(i * 512, i * 512 + 512).every((v) => v === i + 1)).toBe(true);
    }
  });

  it("never lets port A's faults during a hand-over reach held requests", async () => {
    let fault!: FaultLayer;
    const w = world(17, (f) => (fault = f));
    await w.nodes.x.open();
    await w.nodes.y.open();
    fault.addRule("op=pwrite,delay=5ms");
    const inflight = Array.from({ length: 10 }, (_, i) => w.nodes.x.pwrite(Buffer.alloc(64, 1), i * 64, plainIo).then(() => "ok", (e) => e.errno));
    const moving = w.move("x");
    while (w.nodes.x.state === "LOCAL") await sleep(0);
    fault.addRule("op=pwrite,errno=EIO"); // port A now fails every write
    const held = Array.from({ length: 40 }, (_, i) => w.nodes.x.pwrite(Buffer.alloc(64, 2), 8192 + i * 64, plainIo).then(() => "ok", (e) => e.errno));
    await moving;
    expect(await Promise.all(held)).toEqual(Array(40).fill("ok"));
    const early = await Promise.all(inflight);
    expect(early.every((o) => o === "ok" || o === "EIO")).toBe(true); // in flight on A: its faults are theirs
    expect(w.state.violations).toEqual([]);
  });
});

/**
 * An owner's redirector over a shared memory disk behind a fence (`lease.owner`: whether it still
 * holds the lease), with port B to a peer that records the offsets of the writes it forwards.
 * `portA` may wrap the fenced disk (an owner that froze before its fence check).
 */
async function fencedOwner(portA: (fenced: Layer) => Layer = (l) => l) {
  const disk = new MemoryPort({ size: SIZE });
  const lease = { owner: true };
  const forwarded: number[] = [];
  const portB = new (class extends PassthroughLayer {
    override async open() {}
    override pwrite(b: Buffer, o: number, io: Io) {
      forwarded.push(o);
      return super.pwrite(b, o, io);
    }
  })(new MemoryPort({ size: SIZE }));
  const a = portA(new FenceLayer(disk, () => lease.owner));
  const r = new PortRedirector("d", { openLocal: async () => a, openRemote: async () => (await portB.open(), portB) }, true);
  await disk.open();
  await r.open();
  return { r, lease, forwarded };
}

const errnoOf = (p: Promise<unknown>) =>
  p.then(
    () => "ok",
    (e: NbdError) => e.errno,
  );
const client = () => ({ ...plainIo, session: { ended: false } });

/**
 * Issue 16 (review of item 8): a node fenced after a pause must not forward what peers sent it:
 * the peer may have taken the resource over and applied those writes itself; forwarded under this
 * node's own session, they would be applied a second time, over newer writes.
 */
describe("PortRedirector: a fenced node hands peers' requests back", () => {
  it("answers a peer's write ESHUTDOWN after a fence, and forwards its own clients' writes to the new owner", async () => {
    const { r, lease, forwarded } = await fencedOwner();
    lease.owner = false; // the lease is gone (this node was paused)
    const peerWrite = errnoOf(r.pwrite(Buffer.alloc(512, 1), 0, { ...plainIo, peer: true }));
    const ownWrite = r.pwrite(Buffer.alloc(512, 2), 512, plainIo);
    expect(await peerWrite).toBe("ESHUTDOWN");
    await ownWrite;
    expect(forwarded).toEqual([512]);
    expect(r.state).toBe("REMOTE");
    await r.close();
  });
});

/**
 * Nemesis finding 8: an owner frozen past its lease is fenced when it continues; port A closes
 * without a flush (a power-loss cache drops what it held), and a client's next FLUSH, forwarded
 * to the new owner, used to succeed over the writes port A had acknowledged.
 */
describe("PortRedirector: a FLUSH after a fence never vouches for what port A never flushed", () => {
  it("fails the next FLUSHes of a client with unflushed writes through port A (two: see flush-ledger.ts); not of one that flushed", async () => {
    const { r, lease } = await fencedOwner();
    const x = client();
    const y = client();
    await r.pwrite(Buffer.alloc(512, 1), 0, x); // acknowledged, never flushed
    await r.pwrite(Buffer.alloc(512, 2), 512, y);
    await r.flush(y);
    lease.owner = false; // the lease is gone: the next write finds the fence
    await r.pwrite(Buffer.alloc(512, 3), 1024, y);
    expect(r.state).toBe("REMOTE");
    await expect(r.flush(x)).rejects.toMatchObject({ errno: "EIO" });
    await expect(r.flush(x)).rejects.toMatchObject({ errno: "EIO" });
    await r.flush(x);
    await r.flush(y);
    await r.close();
  });
});

/**
 * Nemesis seed 101: three FLUSHes of one client were in flight when its owner froze (all sent after
 * its last write was acknowledged); after the fence one got EIO and two succeeded, vouching for
 * the lost write. Every FLUSH sent before the loss was reported covers it and must fail.
 */
describe("PortRedirector: every FLUSH in flight across a loss fails, not only the first to complete", () => {
  it("fails all three FLUSHes sent after the lost write; the next one, sent after the report, succeeds", async () => {
    let releaseFlushes!: () => void;
    const gate = new Promise<void>((res) => (releaseFlushes = res));
    // The owner froze with the FLUSHes in its queue, before their fence check.
    const { r, lease } = await fencedOwner(
      (fenced) =>
        new (class extends PassthroughLayer {
          override flush(io: Io) {
            return gate.then(() => super.flush(io));
          }
        })(fenced),
    );
    const x = client();
    await r.pwrite(Buffer.alloc(512, 1), 0, x); // acknowledged, never flushed
    const flushes = [errnoOf(r.flush(x)), errnoOf(r.flush(x)), errnoOf(r.flush(x))];
    await new Promise((res) => setTimeout(res, 10));
    lease.owner = false; // the lease is gone while they wait
    releaseFlushes(); // refused by the fence, sent on to the new owner
    expect(await Promise.all(flushes)).toEqual(["EIO", "EIO", "EIO"]);
    expect(await errnoOf(r.flush(x))).toBe("EIO"); // the first sent after the report (see flush-ledger.ts)
    expect(await errnoOf(r.flush(x))).toBe("ok");
    await r.close();
  });
});

/** A held request whose client hung up must not run when the hold ends (the client may have sent it elsewhere). */
describe("PortRedirector: a held request of a client that is gone is not run late", () => {
  it("answers it ESHUTDOWN at release instead of forwarding it", async () => {
    const { r, lease, forwarded } = await fencedOwner();
    lease.owner = false;
    const gone = { ended: false };
    const w = errnoOf(r.pwrite(Buffer.alloc(512, 1), 0, { ...plainIo, session: gone }));
    gone.ended = true; // the client hung up while its write was held
    expect(await w).toBe("ESHUTDOWN");
    expect(forwarded).toEqual([]);
    await r.close();
  });
});

/**
 * Nemesis finding 9: an owner frozen past its lease read, once it continued, a write that a peer
 * had sent it before the peer gave the link up and took the resource over (applying the write
 * through its own port A). Forwarded to that new owner under this node's port B session, it was
 * applied a second time, over newer writes. The same holds for a node that handed the resource
 * over and was then stopped: a node that does not own the resource forwards no peer's request.
 */
describe("PortRedirector: a node that does not own the resource forwards nothing a peer sends it", () => {
  it("while this node's claim is under way (expectAdoption), a peer's write waits for it: port A once adopted, ESHUTDOWN if the claim failed", async () => {
    const { nodes, state, disk } = world(7);
    await nodes.x.open();
    await nodes.y.open();
    const settled = (p: Promise<unknown>) => {
      const s = { done: false };
      p.then(() => (s.done = true), () => (s.done = true));
      return s;
    };
    // A claim that fails: what a peer sent meanwhile goes back to it, unwritten.
    nodes.y.expectAdoption();
    const w1 = nodes.y.pwrite(Buffer.alloc(512, 1), 0, { ...plainIo, peer: true });
    const s1 = settled(w1);
    await sleep(20);
    expect(s1.done).toBe(false); // held, not sent back at once
    nodes.y.adoptionFailed();
    expect(await errnoOf(w1)).toBe("ESHUTDOWN");
    // A claim that succeeds: a peer learnt of it from the store first; its write lands through port A.
    let w2!: Promise<unknown>;
    let s2!: { done: boolean };
    await nodes.x.moveOut({
      assign: async () => {
        nodes.y.expectAdoption();
        w2 = nodes.y.pwrite(Buffer.alloc(512, 2), 512, { ...plainIo, peer: true });
        s2 = settled(w2);
        await sleep(20);
        expect(s2.done).toBe(false);
        state.owner = "y";
        await nodes.y.adopt();
      },
      reclaim: async () => {},
    });
    await w2;
    const back = Buffer.alloc(1024);
    await disk.pread(back, 0, plainIo);
    expect(back.equals(Buffer.concat([Buffer.alloc(512), Buffer.alloc(512, 2)]))).toBe(true);
    expect(state.violations).toEqual([]);
  });

  it("a claim that fails while another adoption opens port A (a take-over) leaves that adoption whole", async () => {
    const { nodes, state } = world(8);
    await nodes.x.open();
    await nodes.y.open();
    state.openDelayMs = 30;
    await nodes.x.moveOut({
      assign: async () => {
        nodes.y.expectAdoption();
        state.owner = "y";
        const adopting = nodes.y.adopt({ ownerFlushed: false });
        await sleep(10); // port A is opening
        nodes.y.adoptionFailed(); // a claim of another epoch failed meanwhile
        await adopting;
      },
      reclaim: async () => {},
    });
    await nodes.y.pwrite(Buffer.alloc(512, 3), 0, plainIo);
    expect(nodes.y.state).toBe("LOCAL");
    expect(state.violations).toEqual([]);
  });

  it("after a hand-over: a peer's write is answered ESHUTDOWN; its own client's goes to the owner", async () => {
    const { nodes, move, disk } = world(5);
    await nodes.x.open();
    await nodes.y.open();
    await move("x");
    expect(nodes.x.state).toBe("REMOTE");
    expect(await errnoOf(nodes.x.pwrite(Buffer.alloc(512, 1), 0, { ...plainIo, peer: true }))).toBe("ESHUTDOWN");
    await nodes.x.pwrite(Buffer.alloc(512, 2), 512, plainIo);
    const back = Buffer.alloc(1024);
    await disk.pread(back, 0, plainIo);
    expect(back.equals(Buffer.concat([Buffer.alloc(512), Buffer.alloc(512, 2)]))).toBe(true);
  });

  it("answers a peer's write that arrives after the fence ESHUTDOWN, and still forwards its own clients'", async () => {
    const { r, lease, forwarded } = await fencedOwner();
    lease.owner = false;
    await r.pwrite(Buffer.alloc(512, 2), 512, plainIo); // finds the fence: port B from now on
    expect(r.state).toBe("REMOTE");
    expect(await errnoOf(r.pwrite(Buffer.alloc(512, 1), 0, { ...plainIo, peer: true }))).toBe("ESHUTDOWN");
    await r.pwrite(Buffer.alloc(512, 3), 1024, plainIo);
    expect(forwarded).toEqual([512, 1024]);
    await r.close();
  });
});

/**
 * Nemesis seed 7: a request waiting for this node's port A (port B found the record naming this
 * node) ran when, much later, this node became the owner again — over writes acknowledged since.
 * Its client (a peer's port B) had long given it up and sent it to the owner of the time.
 */
describe("PortRedirector: a request waiting for port A whose client is gone never runs", () => {
  it("answers it ESHUTDOWN instead of writing it when port A opens", async () => {
    const disk = new MemoryPort({ size: SIZE });
    await disk.open();
    const here = Object.assign(new Error("the record names this node"), { code: "EOWNER" });
    const portB = new (class extends PassthroughLayer {
      override async open() {}
      override pwrite(): Promise<void> {
        return Promise.reject(here);
      }
    })(new MemoryPort({ size: SIZE }));
    const r = new PortRedirector("d", { openLocal: async () => disk, openRemote: async () => portB }, false);
    await r.open();
    const gone = { ended: false };
    const w = errnoOf(r.pwrite(Buffer.alloc(512, 7), 0, { ...plainIo, peer: true, session: gone }));
    await sleep(20);
    gone.ended = true; // the peer gave the link up
    await sleep(20);
    await r.adopt();
    expect(await w).toBe("ESHUTDOWN");
    const back = Buffer.alloc(512);
    await disk.pread(back, 0, plainIo);
    expect(back.equals(Buffer.alloc(512))).toBe(true);
    await r.close();
  });
});

/**
 * Nemesis seed 202: a node took the resource over while a request through port B hung (a stalled
 * flush); its adoption waited for port B to drain, the node lost the lease meanwhile (it was
 * frozen), and the fence did nothing outside LOCAL: the node stayed ADOPTING with port A open and
 * its clients' requests held for good, and a later hand-over to it queued behind that adoption.
 */
describe("PortRedirector: a node that loses the resource while it adopts follows the new owner", () => {
  it("gives up an adoption still waiting for port B when fenced: REMOTE, and its clients' held requests go to the owner", async () => {
    const disk = new MemoryPort({ size: SIZE });
    await disk.open();
    const owner = { here: true };
    const forwarded: number[] = [];
    let first = true;
    let hung: ((e: Error) => void) | null = null;
    const portB = new (class extends PassthroughLayer {
      override async open() {}
      override async close() {
        hung?.(new NbdError("ESHUTDOWN", "port B closed"));
      }
      override pwrite(b: Buffer, o: number, io: Io): Promise<void> {
        if (first) {
          first = false;
          return new Promise<void>((_, reject) => (hung = reject)); // hangs: the old owner stopped
        }
        forwarded.push(o);
        return super.pwrite(b, o, io);
      }
    })(new MemoryPort({ size: SIZE }));
    const r = new PortRedirector("d", { openLocal: async () => new FenceLayer(disk, () => owner.here), openRemote: async () => portB, stillOwner: () => owner.here }, false);
    await r.open();
    const stuck = r.pwrite(Buffer.alloc(512, 1), 0, client()).catch(() => undefined); // stuck on port B
    await r.adopt({ ownerFlushed: false }); // port A open; waits for port B to drain
    expect(r.state).toBe("ADOPTING");
    const held = r.pwrite(Buffer.alloc(512, 2), 512, client()); // this node's own: held while ADOPTING
    owner.here = false; // frozen past the lease: another node took it over
    await r.fence();
    expect(r.state).toBe("REMOTE");
    await held;
    expect(forwarded).toEqual([512]);
    await r.close();
    await stuck;
  }, 5000);
});

/**
 * Nemesis on the lab (seed 6, etcd): an owner frozen past its lease had, queued on a peer's link,
 * a write the peer gave up (its link timed out) and sent to the node that took over. Once the
 * frozen node owned the export again (adopted at a later epoch), it read that link at last and
 * applied the old write over newer, flushed ones (the write audit showed it at the new epoch).
 * A peer's link serves the epoch it was made at only.
 */
describe("PortRedirector: a peer's link made to an earlier ownership of this node serves nothing now", () => {
  it("refuses (as a non-owner) requests on a link made at another epoch; serves links made at this one, and binds a link made to a non-owner to the first epoch it reaches", async () => {
    const disk = new MemoryPort({ size: SIZE });
    let epoch: number | null = 4;
    const r = new PortRedirector("d", { openLocal: async () => disk, openRemote: async () => disk, epoch: () => epoch }, true);
    await r.open();
    const old = { ended: false, peerEpoch: 4 as number | null };
    const toNonOwner = { ended: false, peerEpoch: null as number | null };
    await r.pwrite(Buffer.alloc(512, 1), 0, { ...plainIo, peer: true, session: old });
    epoch = 6; // this node lost the export and owns it again, at a later epoch
    expect(await errnoOf(r.pwrite(Buffer.alloc(512, 9), 0, { ...plainIo, peer: true, session: old }))).toBe("ESHUTDOWN");
    const now = { ended: false, peerEpoch: 6 as number | null };
    await r.pwrite(Buffer.alloc(512, 2), 512, { ...plainIo, peer: true, session: now });
    await r.pwrite(Buffer.alloc(512, 3), 1024, { ...plainIo, peer: true, session: toNonOwner }); // binds to 6
    expect(toNonOwner.peerEpoch).toBe(6);
    await r.pwrite(Buffer.alloc(512, 4), 1536, plainIo); // its own clients: not links
    epoch = 7;
    expect(await errnoOf(r.pwrite(Buffer.alloc(512, 9), 1024, { ...plainIo, peer: true, session: toNonOwner }))).toBe("ESHUTDOWN");
    const back = Buffer.alloc(2048);
    await disk.pread(back, 0, plainIo);
    expect(back.equals(Buffer.concat([1, 2, 3, 4].map((v) => Buffer.alloc(512, v))))).toBe(true);
    await r.close();
  });
});
