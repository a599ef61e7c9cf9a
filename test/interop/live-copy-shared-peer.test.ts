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
