import net from "node:net";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { NbdClient } from "../../src/client/nbd-client.js";
import { controlCall } from "../../src/control/control-client.js";
import { LeaseFile } from "../../src/migration/lease.js";
import { pollUntil } from "../helpers/migration.js";
import { blankImage, controlUrl, nbdAddress as addr, serve, tempDir, type Served } from "../helpers/serve.js";

const MiB = 1024 * 1024;
let nodes: Served[] = [];
afterEach(async () => {
  await Promise.all(nodes.map((n) => n.stop("SIGKILL")));
  nodes = [];
});

/**
 * Nemesis seed 11 (three nodes on one image and one with its own data directory): a live copy
 * from the shared image to x and back again. Node c, which shares the image and reaches the owner
 * through port B, relinks from x to a after the second copy. Both copies flushed before handing
 * over, so c's client's FLUSH must succeed — it failed with EIO because the destination's record
 * (written by the copy, not by a hand-over) named no owner that had handed the image on.
 */
describe("live copies seen from a node that shares the source's image", () => {
  it("relink from copy to copy without a FLUSH error: every owner handed on cleanly", async () => {
    const dir = tempDir();
    const img = blankImage(path.join(dir, "disk.img"), 16 * MiB);
    const shared = (id: string) => [img, "--name", "disk", "--node-id", id, "--lease-ttl", "2s", "--control", "127.0.0.1:0"];
    const a = await serve(shared("a"), 2);
    const c = await serve(shared("c"), 2);
    const x = await serve(["--data-dir", tempDir(), "--node-id", "x", "--lease-ttl", "2s", "--control", "127.0.0.1:0", "--listen", "127.0.0.1:0"], 1);
    nodes.push(a, c, x);
    const [A, X] = [a, x].map(controlUrl);
    const cl = await NbdClient.connect(addr(c.uris[0]!), { exportName: "disk" });
    try {
      // Each write is acknowledged by the owner of the moment and left unflushed across the move:
      // the copy's hand-over flushes it, so the FLUSH after the move must succeed.
      await cl.pwrite(Buffer.alloc(4096, 0x40), 0);
      await controlCall(A, "POST", "v1/exports/disk/migrate", { to: X, copy: true }, 30_000);
      await cl.flush(); // c relinks from a to x
      expect(new LeaseFile(img).read()?.handedFrom).toContain("a@1");
      await cl.pwrite(Buffer.alloc(4096, 0x41), MiB);
      await controlCall(X, "POST", "v1/exports/disk/migrate", { to: A, copy: true }, 30_000);
      await pollUntil("a owns the shared image again", async () => new LeaseFile(img).read()?.owner === "a");
      await cl.flush(); // c relinks from x to a: this FLUSH failed with EIO
      await cl.pwrite(Buffer.alloc(4096, 0x42), 2 * MiB);
      await cl.flush();
      const rec = new LeaseFile(img).read()!;
      expect(rec.handedFrom).toEqual(expect.arrayContaining(["a@1", "x@2"]));
      const back = await cl.pread(4096, 2 * MiB);
      expect(back.equals(Buffer.alloc(4096, 0x42))).toBe(true);
      expect(c.stderr()).not.toMatch(/were not flushed when its owner or link went/);
    } finally {
      cl.destroy();
    }
  }, 60_000);
});

const freePort = () =>
  new Promise<number>((resolve) => {
    const srv = net.createServer().listen(0, "127.0.0.1", () => {
      const { port } = srv.address() as net.AddressInfo;
      srv.close(() => resolve(port));
    });
  });

/**
 * Nemesis seed 11 again: a node with its own copy (x) reaches the owner through port B at the
 * address its own record names, and that record names whoever owned the image when the copy
 * left x (a@3) — not the owner now (a restarted: a@4). Port B took the stale name for whom its
 * link reached, so when a copied the image back to x, x's adoption counted the writes a@4 had
 * acknowledged (and flushed before handing over) as lost, and its client's FLUSH failed.
 * The owner now names itself in the export's description, and port B believes that.
 */
describe("port B learns whom it reaches from the owner itself", () => {
  it("a copy's node relinked to a restarted owner loses nothing when that owner copies the image back", async () => {
    const dir = tempDir();
    const img = blankImage(path.join(dir, "disk.img"), 16 * MiB);
    const port = await freePort();
    const aArgs = [img, "--name", "disk", "--node-id", "a", "--lease-ttl", "2s", "--control", "127.0.0.1:0", "--listen", `127.0.0.1:${port}`];
    let a = await serve(aArgs, 2);
    const xPort = await freePort();
    const x = await serve(["--data-dir", tempDir(), "--node-id", "x", "--lease-ttl", "2s", "--control", "127.0.0.1:0", "--listen", `127.0.0.1:${xPort}`], 1);
    nodes.push(a, x);
    const X = controlUrl(x);
    await controlCall(controlUrl(a), "POST", "v1/exports/disk/migrate", { to: X, copy: true }, 30_000); // a@1 → x@2
    await controlCall(X, "POST", "v1/exports/disk/migrate", { to: controlUrl(a), copy: true }, 30_000); // x@2 → a@3
    await a.stop("SIGKILL");
    a = await serve(aArgs, 2); // a@4: a new process of a, at the same address
    nodes.push(a);
    expect(new LeaseFile(img).read()).toMatchObject({ owner: "a", epoch: 4 });
    const cl = await NbdClient.connect({ host: "127.0.0.1", port: xPort }, { exportName: "disk" });
    try {
      await cl.pwrite(Buffer.alloc(4096, 0x51), 0); // through x's port B, acknowledged by a@4, not flushed
      await controlCall(controlUrl(a), "POST", "v1/exports/disk/migrate", { to: X, copy: true }, 30_000); // a@4 flushes, → x@5
      await cl.flush(); // failed with EIO: x's link was named a@3
      expect((await cl.pread(4096, 0)).equals(Buffer.alloc(4096, 0x51))).toBe(true);
      expect(x.stderr()).not.toMatch(/were not flushed when its owner or link went/);
    } finally {
      cl.destroy();
    }
  }, 60_000);
});

/**
 * Nemesis seed 11, third finding: node x, which holds its own copy, finds the owner through its
 * own record, which changes only when a copy comes or goes. When the nodes that share the image
 * moved it among themselves (a → c), x kept asking a, which answers ESHUTDOWN (it forwards
 * nothing), and x's requests waited until a copy happened to rewrite x's record. A node that does
 * not own the export now names the owner and its address in the export's description, and port B
 * follows that name when it is newer than what its record said.
 */
describe("port B follows a newer owner that a non-owner names", () => {
  it("a copy's node reaches the owner after the nodes sharing the image moved it among themselves", async () => {
    const dir = tempDir();
    const img = blankImage(path.join(dir, "disk.img"), 16 * MiB);
    const shared = (id: string) => [img, "--name", "disk", "--node-id", id, "--lease-ttl", "2s", "--control", "127.0.0.1:0"];
    const a = await serve(shared("a"), 2);
    const c = await serve(shared("c"), 2);
    const xPort = await freePort();
    const x = await serve(["--data-dir", tempDir(), "--node-id", "x", "--lease-ttl", "2s", "--control", "127.0.0.1:0", "--listen", `127.0.0.1:${xPort}`], 1);
    nodes.push(a, c, x);
    const [A, C, X] = [a, c, x].map(controlUrl);
    await controlCall(A, "POST", "v1/exports/disk/migrate", { to: X, copy: true }, 30_000); // a@1 → x@2
    await controlCall(X, "POST", "v1/exports/disk/migrate", { to: A, copy: true }, 30_000); // x@2 → a@3: x's record names a@3
    const cl = await NbdClient.connect({ host: "127.0.0.1", port: xPort }, { exportName: "disk" });
    try {
      await cl.pwrite(Buffer.alloc(4096, 0x61), 0);
      await controlCall(A, "POST", "v1/exports/disk/migrate", { to: C }, 30_000); // a@3 → c@4, shared storage: x's record still names a
      const within = <T>(p: Promise<T>, what: string) => Promise.race([p, new Promise<T>((_, rej) => setTimeout(() => rej(new Error(`${what}: no answer within 5 s`)), 5000))]);
      await within(cl.pwrite(Buffer.alloc(4096, 0x62), MiB), "a write through x after a → c");
      await within(cl.flush(), "a flush through x"); // a@3 handed over (flushed): nothing lost
      expect((await cl.pread(4096, MiB)).equals(Buffer.alloc(4096, 0x62))).toBe(true);
    } finally {
      cl.destroy();
    }
  }, 60_000);
});
