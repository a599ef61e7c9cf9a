import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { NbdClient } from "../../src/client/nbd-client.js";
import { controlCall } from "../../src/control/control-client.js";
import { LeaseFile } from "../../src/migration/lease.js";
import { exportStatus } from "../helpers/migration.js";
import { blankImage, controlUrl, nbdAddress as addr, serve, tempDir, type Served } from "../helpers/serve.js";

const MiB = 1024 * 1024;
let nodes: Served[] = [];
afterEach(async () => {
  await Promise.all(nodes.map((n) => n.stop("SIGKILL")));
  nodes = [];
});

const within = <T>(p: Promise<T>, ms: number, what: string): Promise<T> =>
  Promise.race([p, new Promise<T>((_, rej) => setTimeout(() => rej(new Error(`${what}: no answer within ${ms} ms`)), ms))]);

/**
 * Two migrate calls on one owner at once (the nemesis' "storm", seed 7): the first fails because
 * its destination cannot open port A, so the owner takes the lease back at a new epoch. The second
 * must not then hand over, or take back, the epoch the owner had when the call came: that failed,
 * left the owner serving through port B while the record named itself, and every request to the
 * export waited on itself until the node was stopped long enough to lose the lease.
 */
describe("concurrent migrate calls on one owner", () => {
  it("leave exactly one owner, named by the record, and requests through every node are answered", async () => {
    const dir = tempDir();
    const img = blankImage(path.join(dir, "disk.img"), 16 * MiB);
    const args = (id: string) => [img, "--name", "disk", "--node-id", id, "--lease-ttl", "2s", "--fault"];
    const a = await serve(args("a"), 2);
    const b = await serve(args("b"), 2);
    const c = await serve(args("c"), 2);
    nodes.push(a, b, c);
    const [A, B, C] = [a, b, c].map(controlUrl);
    await controlCall(C, "POST", "v1/exports/disk/faults", { add: "op=open,errno=EIO,once" }); // c's adopt fails once

    const calls = await Promise.all(
      [C, B].map((to) =>
        controlCall(A, "POST", "v1/exports/disk/migrate", { to }, 30_000).then(
          () => "moved",
          (e: Error) => e.message,
        ),
      ),
    );
    expect(calls[0]).toMatch(/EIO/); // the move to c failed and rolled back

    const states = await Promise.all([A, B, C].map(async (u) => (await exportStatus(u, "disk"))!.state));
    const record = new LeaseFile(img).read()!;
    const owner = ["a", "b", "c"][states.indexOf("LOCAL")];
    expect(states.filter((s) => s === "LOCAL")).toHaveLength(1);
    expect(record.owner).toBe(owner);
    expect(calls[1]).toMatch(/^moved$|under way/); // refused while the first move ran, or done after it
    if (calls[1] === "moved") expect(owner).toBe("b");

    // Every node answers a write and reads it back, whoever owns the export.
    for (const [i, s] of [a, b, c].entries()) {
      const cl = await NbdClient.connect(addr(s.uris[0]!), { exportName: "disk" });
      const data = Buffer.alloc(4096, 0x30 + i);
      await within(cl.pwrite(data, i * MiB), 5000, `write through ${"abc"[i]}`);
      expect((await within(cl.pread(4096, i * MiB), 5000, `read through ${"abc"[i]}`)).equals(data)).toBe(true);
      cl.destroy();
    }
  }, 60_000);
});
