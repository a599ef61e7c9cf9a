import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { NbdClient } from "../../src/client/nbd-client.js";
import { controlCall, getStatus } from "../../src/control/control-client.js";
import { blankImage, controlUrl, nbdAddress as addr, serve, sha256, tempDir, type Served } from "../helpers/serve.js";

const MiB = 1024 * 1024;
let nodes: Served[] = [];
afterEach(async () => {
  await Promise.all(nodes.map((n) => n.stop("SIGKILL")));
  nodes = [];
});

const pattern = (len: number, seed: number) => Buffer.from(Array.from({ length: len }, (_, i) => (i * 7 + seed) & 0xff));

/**
 * Issue 16, item 5: a copy-on-write overlay keeps its map in the process that opened it. On a
 * cluster node it must be owned like the image: only the owner opens it, and it moves with the
 * image. Two nodes each holding the overlay open with their own map are two writers.
 */
describe("a cluster node's --overlay moves with the image (one writer of the overlay)", () => {
  it("reads on the new owner what was written through the old one, both ways, and the base stays untouched", async () => {
    const dir = tempDir();
    const img = blankImage(path.join(dir, "base.img"), 8 * MiB);
    const before = sha256(img);
    const ovl = path.join(dir, "disk.cow");
    const a = await serve([img, "--name", "disk", "--overlay", ovl, "--node-id", "a", "--lease-ttl", "2s"], 2);
    const b = await serve([img, "--name", "disk", "--overlay", ovl, "--node-id", "b", "--lease-ttl", "2s"], 2);
    nodes.push(a, b);

    const one = pattern(128 * 1024, 1);
    const ca = await NbdClient.connect(addr(a.uris[0]!), { exportName: "disk" });
    await ca.pwrite(one, 1 * MiB);
    await ca.flush();
    await controlCall(controlUrl(a), "POST", "v1/exports/disk/migrate", { to: controlUrl(b) });
    expect((await getStatus(controlUrl(b))).exports[0]).toMatchObject({ owner: "b", state: "LOCAL" });

    const cb = await NbdClient.connect(addr(b.uris[0]!), { exportName: "disk" });
    expect((await cb.pread(one.length, 1 * MiB)).equals(one)).toBe(true);
    const two = pattern(128 * 1024, 2);
    await cb.pwrite(two, 3 * MiB);
    await cb.flush();
    await controlCall(controlUrl(b), "POST", "v1/exports/disk/migrate", { to: controlUrl(a) });

    // Back on a, through a's own client and through b's (port B now).
    expect((await ca.pread(two.length, 3 * MiB)).equals(two)).toBe(true);
    expect((await ca.pread(one.length, 1 * MiB)).equals(one)).toBe(true);
    expect((await cb.pread(two.length, 3 * MiB)).equals(two)).toBe(true);
    ca.destroy();
    cb.destroy();
    expect(sha256(img)).toBe(before); // every write went into the overlay
  });
});
