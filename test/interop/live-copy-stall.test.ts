import fs from "node:fs";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { NbdClient } from "../../src/client/nbd-client.js";
import { controlCall, getStatus } from "../../src/control/control-client.js";
import { exportStatus, pollUntil } from "../helpers/migration.js";
import { controlUrl, serve, tempDir, type Served } from "../helpers/serve.js";

/*
 * A live copy whose destination stops answering (issue 16, live copy item 3): the source's clients
 * go on, and the move rolls back — by itself, or when cancelled in the final copy.
 */

const MiB = 1024 * 1024;

function addr(uri: string) {
  const u = new URL(uri);
  return { host: u.hostname, port: Number(u.port) };
}

/** Writes 4 KiB blocks to `uri` until stopped, keeping the longest time one write took. */
function writer(uri: string) {
  let stop = false;
  let writes = 0;
  let longest = 0;
  const done = (async () => {
    const c = await NbdClient.connect(addr(uri), { exportName: "disk" });
    for (let i = 0; !stop; i++) {
      const t0 = performance.now();
      await c.pwrite(Buffer.alloc(4096, (i % 250) + 1), (i % 2048) * 4096);
      longest = Math.max(longest, performance.now() - t0);
      writes++;
    }
    await c.disconnect();
  })();
  done.catch(() => undefined); // awaited in stop(); a test that fails earlier leaves no unhandled rejection
  return {
    count: () => writes,
    longest: () => longest,
    async stop() {
      stop = true;
      await done; // a failed write would throw here
    },
  };
}

function image(): string {
  const img = path.join(tempDir(), "disk.img");
  const data = Buffer.alloc(8 * MiB);
  for (let i = 0; i < data.length; i += 4) data.writeUInt32LE((i * 2654435761) >>> 0, i);
  fs.writeFileSync(img, data);
  fs.truncateSync(img, 16 * MiB);
  return img;
}

describe("live copy into a destination that stops answering", () => {
  const started: Served[] = [];
  afterEach(async () => {
    for (const s of started.splice(0).reverse()) {
      s.proc.kill("SIGCONT");
      await s.stop("SIGKILL");
    }
  });

  it("write-blocking: a stopped (SIGSTOP) destination does not freeze the source's clients; the copy aborts and a keeps the export", async () => {
    const a = await serve([image(), "--name", "disk", "--node-id", "a", "--control", "127.0.0.1:0"], 2);
    started.push(a);
    const b = await serve(["--data-dir", tempDir(), "--node-id", "b", "--control", "127.0.0.1:0", "--listen", "127.0.0.1:0"], 1);
    started.push(b);
    const A = controlUrl(a);
    const w = writer(a.uris[0]!);
    const moving = controlCall(A, "POST", "v1/exports/disk/migrate", { to: controlUrl(b), copy: true, mode: "write-blocking", maxRate: 2 * MiB }, 120_000);
    moving.catch(() => undefined);
    await pollUntil("the copy to send its first MiB", async () => {
      const c = (await exportStatus(A, "disk"))?.copy;
      return c?.phase === "copying" && c.copied >= MiB;
    });
    b.proc.kill("SIGSTOP");
    const stoppedAt = w.count();
    await expect(moving).rejects.toThrow(/502.*live copy of disk aborted/);
    await pollUntil("50 more writes with the destination stopped", () => w.count() >= stoppedAt + 50);
    await w.stop();
    expect(w.longest(), "the longest write (ms)").toBeLessThan(5000);
    expect((await getStatus(A)).exports[0]).toMatchObject({ owner: "a", state: "LOCAL", held: 0 });
    expect((await exportStatus(A, "disk"))?.copy?.phase).toBe("aborted");
  });

  it("cancel during the final copy: the move rolls back, the held writes complete through port A, none fails", async () => {
    const a = await serve([image(), "--name", "disk", "--node-id", "a", "--control", "127.0.0.1:0"], 2);
    started.push(a);
    const b = await serve(["--data-dir", tempDir(), "--node-id", "b", "--control", "127.0.0.1:0", "--listen", "127.0.0.1:0", "--fault"], 1);
    started.push(b);
    const A = controlUrl(a);
    const B = controlUrl(b);
    const moving = controlCall(A, "POST", "v1/exports/disk/migrate", { to: B, copy: true, maxRate: 4 * MiB }, 120_000);
    moving.catch(() => undefined);
    await pollUntil("b to be the copy target", async () => (await exportStatus(B, "disk"))?.copyTarget === true);
    // The copy flushes b once before the hand-over, then once more in the final copy: that one hangs.
    await controlCall(B, "POST", "v1/exports/disk/faults", { add: "op=flush,stall,after=1" });
    await pollUntil("the final copy", async () => (await exportStatus(A, "disk"))?.copy?.phase === "final", 30_000);
    const w = writer(a.uris[0]!); // held while the final copy runs
    await new Promise((r) => setTimeout(r, 300));
    expect(w.count()).toBe(0);
    const t0 = performance.now();
    await controlCall(A, "POST", "v1/exports/disk/migrate/cancel", {});
    await expect(moving).rejects.toThrow(/502.*live copy of disk aborted: cancelled by request/);
    expect(performance.now() - t0).toBeLessThan(3000);
    await pollUntil("20 writes through a's port A", () => w.count() >= 20);
    await w.stop();
    expect((await getStatus(A)).exports[0]).toMatchObject({ owner: "a", state: "LOCAL", held: 0 });
    await controlCall(B, "POST", "v1/exports/disk/faults", { release: true }).catch(() => undefined);
  });
});
