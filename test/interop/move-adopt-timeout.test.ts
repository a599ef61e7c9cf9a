import fs from "node:fs";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { NbdClient } from "../../src/client/nbd-client.js";
import { controlCall, getStatus } from "../../src/control/control-client.js";
import { exportStatus, nbdBase, pollUntil } from "../helpers/migration.js";
import { controlUrl, nbdAddress as addr, serve, tempDir, type Served } from "../helpers/serve.js";

const MiB = 1024 * 1024;
let nodes: Served[] = [];
afterEach(async () => {
  await Promise.all(nodes.map((n) => n.stop("SIGKILL")));
  nodes = [];
});

const block = (seed: number) => Buffer.alloc(64 * 1024, seed);

/**
 * Issue 16, item 3: the owner's adopt call times out (10 s) while the destination goes on adopting.
 * A live copy's destination keeps a record of its own, so only its answer tells whether it adopted:
 * the owner must not take the export back once the destination adopted, or both serve diverged
 * copies. The destination's port A is made to take 13 s to open by a fault rule (op=open).
 */
describe("a live copy whose adopt call times out while the destination adopts", () => {
  it("ends with one owner: the source follows the destination, and every acknowledged write is there", async () => {
    const dirA = tempDir();
    const dirB = tempDir();
    const img = path.join(dirA, "disk.img");
    fs.writeFileSync(img, Buffer.alloc(0));
    fs.truncateSync(img, 16 * MiB);
    const a = await serve([img, "--name", "disk", "--node-id", "a", "--control", "127.0.0.1:0", "--fault"], 2);
    const b = await serve(["--data-dir", dirB, "--node-id", "b", "--control", "127.0.0.1:0", "--listen", "127.0.0.1:0", "--fault"], 1);
    nodes.push(a, b);
    const A = controlUrl(a);
    const B = controlUrl(b);
    const c = await NbdClient.connect(addr(a.uris[0]!), { exportName: "disk" });
    await c.pwrite(block(1), 0);

    const moving = controlCall(A, "POST", "v1/exports/disk/migrate", { to: B, copy: true, maxRate: 4 * MiB }, 60_000).then(
      () => "moved",
      (e: Error) => e.message,
    );
    await pollUntil("b's copy target", async () => (await exportStatus(B, "disk"))?.copyTarget === true);
    await controlCall(B, "POST", "v1/exports/disk/faults", { add: "op=open,delay=13s" });
    // A write made while the copy runs, and one made while a holds requests for the hand-over.
    await c.pwrite(block(2), 1 * MiB);
    await pollUntil("a holding requests for the hand-over", async () => (await exportStatus(A, "disk"))?.state === "HANDOVER", 30_000);
    const held = c.pwrite(block(3), 2 * MiB);
    const outcome = await moving;
    expect(outcome).toMatch(/adopt|timeout|abort/i);
    await held; // acknowledged, wherever it went

    // Once b's port A opened: exactly one node owns the export, and it is b.
    await pollUntil("b serving through port A", async () => (await exportStatus(B, "disk"))?.state === "LOCAL", 20_000);
    const sa = (await getStatus(A)).exports[0]!;
    expect(sa.state).toBe("REMOTE");
    // Every acknowledged write is on b, read through a's client (port B) and through b.
    const cb = await NbdClient.connect(addr(`${await nbdBase(B)}/disk`), { exportName: "disk" });
    for (const [seed, off] of [[1, 0], [2, MiB], [3, 2 * MiB]] as const) {
      expect((await cb.pread(64 * 1024, off)).equals(block(seed))).toBe(true);
      expect((await c.pread(64 * 1024, off)).equals(block(seed))).toBe(true);
    }
    // A write through a goes to b too: no second writer.
    await c.pwrite(block(4), 3 * MiB);
    expect((await cb.pread(64 * 1024, 3 * MiB)).equals(block(4))).toBe(true);
    expect(fs.readFileSync(img).subarray(3 * MiB, 3 * MiB + 65536).equals(Buffer.alloc(65536))).toBe(true);
    c.destroy();
    cb.destroy();
  }, 60_000);
});
