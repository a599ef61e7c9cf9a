import net from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import type { NbdError } from "../../errors.js";
import { silentLogger } from "../../log.js";
import { NbdServer } from "../../server/server.js";
import { DiskLayer } from "../disk/disk-layer.js";
import { Export } from "../export.js";
import { PassthroughLayer, plainIo, type Io, type Layer } from "../layer.js";
import { FaultLayer } from "../fault/fault-layer.js";
import { MemoryPort } from "./memory-port.js";
import { buildPortPair } from "./port-pair.js";
import { ownerIsHere } from "./remote-port.js";

const MiB = 1024 * 1024;
let closers: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const c of closers.reverse()) await c();
  closers = [];
});

/** The owner's device: writes hang while `frozen` (an owner stopped with SIGSTOP answers nothing). */
class Freezable extends PassthroughLayer {
  frozen = false;
  /** Apply writes at once but hold their replies (the owner froze right after the write). */
  holdReplies = false;
  private waiting: Array<() => void> = [];
  override pwrite(buf: Buffer, offset: number, io: Io): Promise<void> {
    if (this.holdReplies) return super.pwrite(buf, offset, io).then(() => new Promise<void>((resolve) => this.waiting.push(resolve)));
    if (!this.frozen) return super.pwrite(buf, offset, io);
    return new Promise((resolve, reject) => this.waiting.push(() => super.pwrite(buf, offset, io).then(resolve, reject)));
  }
  /** Flushes wait until released (a slow fdatasync on the owner). */
  holdFlushes = false;
  private flushes: Array<() => void> = [];
  override flush(io: Io): Promise<void> {
    if (!this.holdFlushes) return super.flush(io);
    return new Promise((resolve, reject) => this.flushes.push(() => super.flush(io).then(resolve, reject)));
  }
  releaseFlushes(): void {
    this.holdFlushes = false;
    for (const f of this.flushes.splice(0)) f();
  }
  /** SIGCONT: the writes it held go on. */
  thaw(): void {
    this.frozen = false;
    this.holdReplies = false;
    for (const w of this.waiting.splice(0)) w();
  }
}

/**
 * A node's port pair that starts as a non-owner: port B reaches the owner (a memory export "disk")
 * through a proxy whose links the test can cut; port A is a memory device of its own, opened when
 * the pair adopts the resource.
 */
async function start(requestTimeoutMs?: number, ownerName?: string, resource: Layer = new MemoryPort({ size: 8 * MiB })) {
  const device = new MemoryPort({ size: 8 * MiB });
  const owner = new Freezable(device);
  /** What the owner's export calls itself (NBD_INFO_DESCRIPTION): its owner label, when set. */
  const label = { text: "" };
  const server = new NbdServer({ exports: [new Export("disk", new DiskLayer(owner), () => label.text)], tcp: [{ host: "127.0.0.1", port: 0 }], log: silentLogger() });
  await server.start();
  const target = server.addresses()[0] as { host: string; port: number };
  const links = new Set<net.Socket>();
  const proxy = net.createServer((down) => {
    const up = net.connect(target.port, target.host);
    links.add(down).add(up);
    down.pipe(up).pipe(down);
    const end = () => (down.destroy(), up.destroy());
    down.on("error", end).on("close", end);
    up.on("error", end).on("close", end);
  });
  await new Promise<void>((r) => proxy.listen(0, "127.0.0.1", r));
  const at = proxy.address() as net.AddressInfo;
  const here = { owner: false };
  /** Who the record names (node@epoch) and whom it came from by hand-overs (LeaseRecord.handedFrom). */
  const who = { owner: ownerName, handedFrom: undefined as string[] | undefined };
  const offline = async () => ({ size: 8 * MiB, caps: new MemoryPort({ size: 8 * MiB }).capabilities() });
  /** Whether this node's lease holds (port A's fence and the adoption's check ask it). */
  const lease = { mine: true };
  const pair = buildPortPair("disk", resource, offline, { owned: false, mayWrite: () => lease.mine, locate: () => {
        if (here.owner) throw ownerIsHere("the record names this node");
        return { host: "127.0.0.1", port: at.port, owner: who.owner, handedFrom: who.handedFrom };
      }, stillOwner: () => lease.mine, requestTimeoutMs }, silentLogger());
  const r = pair.redirector;
  await r.open();
  closers.push(
    () => r.close(),
    () => new Promise<void>((res) => proxy.close(() => res())),
    () => server.close(),
  );
  const cut = () => {
    for (const s of links) s.destroy();
    links.clear();
  };
  /** The owner's process stops (SIGSTOP): bytes on its current links are no longer read, nothing answers. */
  const freezeLinks = () => {
    for (const s of links) s.pause();
    links.clear();
  };
  return { r, pair, cut, freezeLinks, owner, here, device, who, lease, label };
}

/** The Io of requests from one client connection. */
const client = (fua = false): Io => ({ ...plainIo, fua, session: { ended: false } });
const block = (v: number) => Buffer.alloc(4096, v);

/**
 * Issue 16, item 4: after its owner or its link changed, port B resends what was never answered,
 * and a FLUSH among them is answered by whoever holds the resource now. Writes acknowledged before
 * the change that no FLUSH covered may be gone: that client's next FLUSHes fail with EIO (two: the
 * first to cover them here, and the first sent after that report; see flush-ledger.ts).
 */
describe("port pair: a FLUSH never succeeds over writes that may be lost with an owner or a link", () => {
  it("a replaced link: EIO for the client with unflushed acknowledged writes (reported twice); nothing for the others", async () => {
    const { r, cut } = await start();
    const x = client();
    const y = client();
    const z = client();
    await r.pwrite(block(1), 0, x);
    await r.pwrite(block(2), 4096, y);
    await r.flush(y);
    await r.zero(4096, 8192, z); // write zeroes count as writes
    cut();
    await expect(r.flush(x)).rejects.toMatchObject({ errno: "EIO", message: expect.stringMatching(/never flushed and may be lost/) });
    await expect(r.flush(x)).rejects.toMatchObject({ errno: "EIO" });
    await r.flush(x);
    await r.flush(y);
    await expect(r.flush(z)).rejects.toMatchObject({ errno: "EIO" });
    // Requests go on through the new link.
    await r.pwrite(block(3), 0, x);
    const back = Buffer.alloc(4096);
    await r.pread(back, 0, x);
    expect(back.equals(block(3))).toBe(true);
  });

  it("the EIO goes to a FLUSH that covers the lost write, not to one sent before it", async () => {
    const { r, cut, owner } = await start();
    const x = client();
    owner.holdFlushes = true;
    const early = r.flush(x).then(() => "ok", (e: NbdError) => e.errno); // sent before the write below
    await new Promise((res) => setTimeout(res, 50));
    await r.pwrite(block(1), 0, x); // acknowledged, never flushed
    cut(); // the early FLUSH is sent again on the new link
    await new Promise((res) => setTimeout(res, 50));
    owner.releaseFlushes();
    expect(await early).toBe("ok"); // it did not cover the write
    await expect(r.flush(x)).rejects.toMatchObject({ errno: "EIO" }); // this one does
    await expect(r.flush(x)).rejects.toMatchObject({ errno: "EIO" }); // and the first sent after that report
    await r.flush(x);
  });

  it("a new link to the same owner process (same node@epoch) loses nothing: no EIO", async () => {
    const { r, cut } = await start(undefined, "a@3");
    const x = client();
    await r.pwrite(block(1), 0, x);
    cut();
    await r.flush(x);
  });

  it("a new link to an owner the old one handed the resource to loses nothing; to one that took it over, EIO", async () => {
    const { r, cut, who } = await start(undefined, "a@3");
    const x = client();
    await r.pwrite(block(1), 0, x);
    Object.assign(who, { owner: "b@4", handedFrom: ["z@1", "a@3"] }); // a drained and flushed, then handed over
    cut();
    await r.flush(x);
    await r.pwrite(block(2), 0, x);
    Object.assign(who, { owner: "c@5", handedFrom: undefined }); // c took it over: b may have lost block 2
    cut();
    await expect(r.flush(x)).rejects.toMatchObject({ errno: "EIO" });
  });

  it("what an owner flushed at its hand-over stays durable when the next owner is taken over before a FLUSH", async () => {
    // Nemesis on the lab, seed 20 at 32 s: b@11 acknowledged writes through this node's port B
    // and handed the image to c@12 (drained and flushed); c lost its etcd session at once and
    // acknowledged nothing; b took the image over from c (13). The client's next FLUSH failed for
    // the writes b had flushed at its hand-over.
    const { r, cut, who } = await start(undefined, "b@11");
    const x = client();
    await r.pwrite(block(1), 0, x);
    Object.assign(who, { owner: "c@12", handedFrom: ["b@11"] });
    cut();
    await r.pread(Buffer.alloc(4096), 0, x); // port B links to c@12, who vouches for b@11
    Object.assign(who, { owner: "b@13", handedFrom: undefined }); // a take-over of c
    cut();
    await r.flush(x);
    // What c@12 itself acknowledged is another matter: c may have lost it.
    await r.pwrite(block(2), 0, x);
    Object.assign(who, { owner: "a@14", handedFrom: undefined });
    cut();
    await expect(r.flush(x)).rejects.toMatchObject({ errno: "EIO" });
    // And so when this node takes the image over from the owner a hand-over reached.
    const adopting = await start(undefined, "b@11");
    const y = client();
    await adopting.r.pwrite(block(1), 0, y);
    Object.assign(adopting.who, { owner: "c@12", handedFrom: ["b@11"] });
    adopting.cut();
    await adopting.r.pread(Buffer.alloc(4096), 0, y);
    await adopting.r.adopt({ ownerFlushed: false });
    await adopting.r.flush(y);
  });

  it("FUA writes are durable when acknowledged: no EIO after a link change", async () => {
    const { r, cut } = await start();
    const x = client(true);
    await r.pwrite(block(1), 0, x);
    cut();
    await r.flush(x);
  });

  it("a take-over (the owner died) fails the next FLUSH of each client with unflushed writes, even through port A; a hand-over does not", async () => {
    const died = await start();
    const x = client();
    await died.r.pwrite(block(1), 0, x);
    await died.r.adopt({ ownerFlushed: false });
    await expect(died.r.flush(x)).rejects.toMatchObject({ errno: "EIO" });
    await expect(died.r.flush(x)).rejects.toMatchObject({ errno: "EIO" });
    await died.r.flush(x);

    const handed = await start();
    const w = client();
    await handed.r.pwrite(block(1), 0, w);
    await handed.r.adopt({ ownerFlushed: true });
    await handed.r.flush(w);
  });

  it("a hand-over from an owner other than the one port B reached (that one was taken over since) fails the next FLUSH; one from that owner does not", async () => {
    // Nemesis seed 7 at 303 s: a (epoch 96) acknowledged a write through this node's port B and
    // froze; b took the image over (97) and handed it to this node (98). b flushed, a never did.
    const skipped = await start(undefined, "a@96");
    const x = client();
    await skipped.r.pwrite(block(1), 0, x);
    await skipped.r.adopt({ ownerFlushed: true, handedFrom: ["b@97"] });
    await expect(skipped.r.flush(x)).rejects.toMatchObject({ errno: "EIO" });
    await expect(skipped.r.flush(x)).rejects.toMatchObject({ errno: "EIO" });
    await skipped.r.flush(x);

    const direct = await start(undefined, "a@96");
    const y = client();
    await direct.r.pwrite(block(1), 0, y);
    await direct.r.adopt({ ownerFlushed: true, handedFrom: ["b@97", "a@96"] });
    await direct.r.flush(y);
  });
});

/** Issue 16, item 7: port B has no timeout, so a stopped owner froze its peers' requests for as long as it was stopped. */
describe("port pair: a frozen owner freezes nothing for long", () => {
  it("a take-over sends what hangs on the old owner to port A at once", async () => {
    const { r, owner, here } = await start();
    owner.frozen = true;
    const x = client();
    const hung = r.pwrite(block(7), 0, x);
    await new Promise((res) => setTimeout(res, 100));
    here.owner = true; // the record names this node now
    await r.adopt({ ownerFlushed: false });
    const t0 = performance.now();
    await hung;
    expect(performance.now() - t0).toBeLessThan(2000);
    const back = Buffer.alloc(4096);
    await r.pread(back, 0, x);
    expect(back.equals(block(7))).toBe(true); // through port A
    owner.thaw();
  });

  it("a request with no reply within the request timeout gives up the link and is sent again", async () => {
    const { r, freezeLinks } = await start(300);
    const x = client();
    await r.pwrite(block(1), 4096, x); // the link is up
    freezeLinks(); // what is sent on it from now on is never read
    await r.pwrite(block(8), 4096, x); // answered on a new link after the timeout
    const back = Buffer.alloc(4096);
    await r.pread(back, 4096, x);
    expect(back.equals(block(8))).toBe(true);
  });
});

/**
 * Issue 16, item 8: port B sends a write again when its link broke before the reply came; if the
 * owner had applied it, and another writer wrote the block since, applying it again would let a
 * reader see W1, W2, W1. The owner applies each write of a port B session once.
 */
describe("port pair: a write sent again after a broken link is applied once by the same owner", () => {
  it("W1 applied, its reply lost, W2 written by another client: the block ends as W2", async () => {
    const { r, cut, owner, device } = await start();
    await device.open();
    const x = client();
    owner.holdReplies = true; // the owner applies W1 but its reply never leaves
    const w1 = r.pwrite(block(1), 0, x);
    for (let t = 0; ; t++) {
      const b = Buffer.alloc(4096);
      await device.pread(b, 0, plainIo);
      if (b.equals(block(1))) break;
      if (t > 200) throw new Error("W1 never reached the owner's device");
      await new Promise((res) => setTimeout(res, 5));
    }
    await device.pwrite(block(2), 0, plainIo); // W2 from another writer, acknowledged
    cut(); // port B sends W1 again on a new link
    await new Promise((res) => setTimeout(res, 50));
    owner.thaw();
    await w1;
    const back = Buffer.alloc(4096);
    await r.pread(back, 0, x);
    expect(back.equals(block(2))).toBe(true);
  });
});

/**
 * Nemesis seed 202, after the fence learnt to end an adoption: b took the resource over while a
 * FLUSH hung on the old owner; sent to port A, it stalled there (a fault rule); b was frozen past
 * the lease and fenced. Closing port A ended the stalled FLUSH with ESHUTDOWN, which went to the
 * client; its writes held while b adopted must reach the owner too.
 */
describe("port pair: a node that loses the resource while it adopts fails nothing", () => {
  it("a request stalled in port A when the adoption ends goes to the owner, as do the requests held meanwhile", async () => {
    const fault = new FaultLayer(new MemoryPort({ size: 8 * MiB }));
    const { r, owner, here, lease } = await start(undefined, "a@3", fault);
    const x = client();
    owner.holdFlushes = true; // the old owner stops answering FLUSHes
    const flushed = r.flush(x);
    await new Promise((res) => setTimeout(res, 50));
    here.owner = true; // this node takes the resource over
    fault.addRule("op=flush,stall,once"); // and its port A stalls the FLUSH sent there
    await r.adopt({ ownerFlushed: false });
    await new Promise((res) => setTimeout(res, 50));
    const w = r.pwrite(block(9), 4096, x); // held while adopting
    lease.mine = false; // frozen past the lease: the old owner has it again
    here.owner = false;
    owner.releaseFlushes();
    await r.fence();
    expect(r.state).toBe("REMOTE");
    await w;
    await flushed.catch((e: NbdError) => expect(e.errno).toBe("EIO")); // never ESHUTDOWN
    const back = Buffer.alloc(4096);
    await r.pread(back, 4096, x);
    expect(back.equals(block(9))).toBe(true);
  }, 10_000);
});

/**
 * Nemesis seed 11 (finding 22): port B linked to a node while it did not own the resource (its
 * description said so), and the node took the resource over while the link stood. Writes were
 * then acknowledged by the new owner on a link named after the stale record (a@1), and when that
 * owner handed on, the relink counted them as lost: the client's FLUSH failed. Port B now sends
 * nothing on a link to a node that does not say it is the owner; it asks again until one does.
 */
describe("port B talks only to a node that names itself owner", () => {
  it("waits while the node it reaches does not own the resource, and names the link after the owner that then answers", async () => {
    const { r, cut, who, label } = await start(undefined, "a@1");
    label.text = "[owner=a epoch=1]";
    const x = client();
    await r.pwrite(block(1), 0, x);
    await r.flush(x);
    // The link goes; the node it reaches now says someone else owns the resource (the record is stale).
    label.text = "[owner=a epoch=1 at 127.0.0.1:1, through port B]";
    cut();
    let acked = false;
    const w2 = r.pwrite(block(2), 4096, x).then(() => (acked = true));
    await new Promise((res) => setTimeout(res, 100));
    expect(acked).toBe(false); // nothing is sent to a node that does not own the resource
    label.text = "[owner=b epoch=2]"; // that node took the resource over
    await w2;
    expect(who.owner).toBe("a@1"); // the record this node reads still says a@1
    // b hands the resource on to c: what b acknowledged, b flushed first.
    label.text = "[owner=c epoch=3; handed from b@2]";
    cut();
    await r.flush(x); // failed with EIO: the link had been named a@1
  });
});

/** A second node's NBD server ("disk" on its own memory device), reached through a proxy that counts the connections made to it. */
async function otherNode(label: string) {
  const device = new MemoryPort({ size: 8 * MiB });
  const server = new NbdServer({ exports: [new Export("disk", new DiskLayer(device), () => label)], tcp: [{ host: "127.0.0.1", port: 0 }], log: silentLogger() });
  await server.start();
  const target = server.addresses()[0] as { host: string; port: number };
  const seen = { connections: 0, open: 0 };
  const proxy = net.createServer((down) => {
    seen.connections++;
    seen.open++;
    const up = net.connect(target.port, target.host);
    down.pipe(up).pipe(down);
    let closed = false;
    const end = () => {
      if (!closed) (closed = true), seen.open--;
      down.destroy();
      up.destroy();
    };
    down.on("error", end).on("close", end);
    up.on("error", end).on("close", end);
  });
  await new Promise<void>((r) => proxy.listen(0, "127.0.0.1", r));
  closers.push(() => new Promise<void>((res) => proxy.close(() => res())), () => server.close());
  return { device, seen, port: (proxy.address() as net.AddressInfo).port };
}

const blockAt = async (device: Layer, offset: number) => {
  const buf = Buffer.alloc(4096);
  await device.pread(buf, offset, plainIo);
  return buf;
};

const until = async (what: string, ok: () => boolean) => {
  for (const t0 = Date.now(); !ok(); await new Promise((r) => setTimeout(r, 5))) if (Date.now() - t0 > 5000) throw new Error(`timed out: ${what}`);
};

/**
 * bench:cluster (issue 17): after a move between two other nodes, a forwarding node gave its link
 * up when etcd named the new owner and only then connected to it: a TCP connection and the NBD
 * handshake (~40 ms on a busy machine) while its clients' requests waited, on top of the hold. An
 * owner now announces a move before its hold; port B links to the announced node ahead (warm) and
 * switches to that link when the record names it.
 */
describe("port B: a link made ahead to the node an owner announced", () => {
  it("takes over when the record names that node: no connection while requests wait; what hung on the old owner goes on it", async () => {
    const { r, pair, freezeLinks, who } = await start(undefined, "a@1");
    const b = await otherNode("[owner=a epoch=1 at 127.0.0.1:1, through port B]"); // b does not own it yet
    const x = client();
    await r.pwrite(block(1), 0, x);
    pair.moveAnnounced({ host: "127.0.0.1", port: b.port, node: "b" });
    await until("the link ahead is made", () => b.seen.connections === 1);
    freezeLinks(); // a holds what is sent now (its hold); a's server and b's share this process, so the link, not a's device, holds it
    const w = r.pwrite(block(2), 4096, x);
    await new Promise((res) => setTimeout(res, 20));
    // b claimed the image (handed from a); etcd tells this node.
    Object.assign(who, { owner: "b@2", handedFrom: ["a@1"] });
    pair.ownerChanged("b@2", ["a@1"]);
    await w;
    expect((await blockAt(b.device, 4096)).equals(block(2))).toBe(true);
    await r.pwrite(block(3), 8192, x);
    expect((await blockAt(b.device, 8192)).equals(block(3))).toBe(true);
    expect(b.seen.connections).toBe(1); // the link made ahead, and no other
    await r.flush(x); // b vouches for a (a hand-over): nothing was lost with the old link
  });

  it("takes over too when the old link went first: the record names that node when port B links again", async () => {
    const { r, pair, cut, who } = await start(undefined, "a@1");
    const b = await otherNode("[owner=a epoch=1 at 127.0.0.1:1, through port B]");
    const x = client();
    await r.pwrite(block(1), 0, x);
    pair.moveAnnounced({ host: "127.0.0.1", port: b.port, node: "b" });
    await until("the link ahead is made", () => b.seen.connections === 1);
    // b claimed the image; the old owner closes its links before etcd's push reaches this node.
    Object.assign(who, { owner: "b@2", handedFrom: ["a@1"] });
    cut();
    await r.pwrite(block(5), 4096, x);
    expect((await blockAt(b.device, 4096)).equals(block(5))).toBe(true);
    expect(b.seen.connections).toBe(1); // the link made ahead, and no other
    await r.flush(x);
  });

  it("is never used for another node: the record names c, so port B links to c and lets the link to b go", async () => {
    const { r, pair, owner, who, device } = await start(undefined, "a@1");
    const b = await otherNode("[owner=a epoch=1 at 127.0.0.1:1, through port B]");
    const x = client();
    pair.moveAnnounced({ host: "127.0.0.1", port: b.port, node: "b" });
    await until("the link ahead is made", () => b.seen.open === 1);
    owner.frozen = true;
    const w = r.pwrite(block(4), 0, x);
    await new Promise((res) => setTimeout(res, 20));
    owner.thaw();
    Object.assign(who, { owner: "c@2", handedFrom: ["a@1"] }); // the record names c (reached where a was, in this harness)
    pair.ownerChanged("c@2", ["a@1"]);
    await w;
    expect((await blockAt(device, 0)).equals(block(4))).toBe(true);
    expect((await blockAt(b.device, 0)).equals(Buffer.alloc(4096))).toBe(true);
    await until("the link to b is let go", () => b.seen.open === 0);
  });
});
