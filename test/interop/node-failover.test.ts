import fs from "node:fs";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { NbdClient } from "../../src/client/nbd-client.js";
import { getStatus } from "../../src/control/control-client.js";
import { serve, tempDir, type Served, controlUrl } from "../helpers/serve.js";

const MiB = 1024 * 1024;
const addr = (uri: string) => {
  const u = new URL(uri);
  return { host: u.hostname, port: Number(u.port) };
};

let nodes: Served[] = [];
afterEach(async () => {
  await Promise.all(nodes.map((n) => n.stop("SIGKILL")));
  nodes = [];
});

async function twoNodes(ttl = "1s", envB: NodeJS.ProcessEnv = {}) {
  const dir = tempDir();
  const img = path.join(dir, "disk.img");
  fs.writeFileSync(img, "");
  fs.truncateSync(img, 16 * MiB);
  const a = await serve([img, "--name", "disk", "--node-id", "a", "--lease-ttl", ttl], 2);
  const b = await serve([img, "--name", "disk", "--node-id", "b", "--lease-ttl", ttl], 2, envB);
  nodes.push(a, b);
  return { img, a, b };
}

describe("node failures", () => {
  it("keeps what was flushed when the owner is killed right after the FLUSH reply", async () => {
    const { img, a } = await twoNodes();
    const c = await NbdClient.connect(addr(a.uris[0]!), { exportName: "disk" });
    const data = Buffer.alloc(256 * 1024, 0x5c);
    await c.pwrite(data, 3 * MiB);
    await c.flush();
    await a.stop("SIGKILL");
    c.destroy();
    const fd = fs.openSync(img, "r");
    const back = Buffer.alloc(data.length);
    fs.readSync(fd, back, 0, back.length, 3 * MiB);
    fs.closeSync(fd);
    expect(back.equals(data)).toBe(true);
  });

  it("takes the image over when its owner dies and its lease expires; a client of the survivor sees no failed request", async () => {
    const { img, a, b } = await twoNodes("1s");
    const c = await NbdClient.connect(addr(b.uris[0]!), { exportName: "disk" }); // through port B to a
    const l = load(c);
    await new Promise((r) => setTimeout(r, 300));
    const before = l.done();
    await a.stop("SIGKILL");
    const t0 = Date.now();
    while ((await getStatus(controlUrl(b))).exports[0]!.state !== "LOCAL") {
      expect(Date.now() - t0).toBeLessThan(10_000);
      await new Promise((r) => setTimeout(r, 50));
    }
    const afterTakeover = l.done();
    await new Promise((r) => setTimeout(r, 300));
    await l.stop();
    expect(l.failures).toEqual([]);
    expect(before).toBeGreaterThan(0);
    expect(l.done()).toBeGreaterThan(afterTakeover); // served locally by b now
    const st = await getStatus(controlUrl(b));
    expect(st.exports[0]).toMatchObject({ owner: "b", epoch: 2, state: "LOCAL" });
    await c.flush();
    expect((await c.pread(l.model.length, 0)).equals(l.model)).toBe(true);
    await c.disconnect();
    expect(JSON.parse(fs.readFileSync(`${img}.lease`, "utf8"))).toMatchObject({ owner: "b", epoch: 2 });
  });

  /** Writes from 8 workers on their own blocks through `c` until stopped; records failures. */
  function load(c: NbdClient) {
    const model = Buffer.alloc(8 * 512 * 4096);
    const failures: unknown[] = [];
    let stop = false;
    let done = 0;
    const ws = Array.from({ length: 8 }, async (_, w) => {
      for (let i = 0; !stop; i++) {
        const off = (w * 512 + (i % 512)) * 4096;
        const buf = Buffer.alloc(4096, ((w + i) % 250) + 1);
        try {
          await c.pwrite(buf, off);
          buf.copy(model, off);
          done++;
        } catch (err) {
          failures.push(err);
        }
      }
    });
    return {
      failures,
      model,
      done: () => done,
      stop: async () => {
        stop = true;
        await Promise.all(ws);
      },
    };
  }

  it("rolls back when the peer is killed while it adopts the image: no failed request, the source owns it again", async () => {
    const { a, b, img } = await twoNodes("10s", { NBDSTACK_TEST_ADOPT_DELAY_MS: "1500" });
    const c = await NbdClient.connect(addr(a.uris[0]!), { exportName: "disk" });
    const l = load(c);
    await new Promise((r) => setTimeout(r, 200));
    const { controlCall } = await import("../../src/control/control-client.js");
    const moving = controlCall(controlUrl(a), "POST", "v1/exports/disk/migrate", { to: controlUrl(b) }).then(
      () => "moved",
      (e: Error) => e.message,
    );
    await new Promise((r) => setTimeout(r, 500)); // a holds requests, b is inside adopt
    await b.stop("SIGKILL");
    expect(await moving).toMatch(/502|fetch failed|socket|other side closed|ECONNRESET|terminated/i);
    const during = l.done();
    await new Promise((r) => setTimeout(r, 300));
    await l.stop();
    expect(l.failures).toEqual([]);
    expect(l.done()).toBeGreaterThan(during); // served by a again
    const st = await getStatus(controlUrl(a));
    expect(st.exports[0]).toMatchObject({ owner: "a", epoch: 3, state: "LOCAL", held: 0 });
    await c.flush();
    const all = await c.pread(l.model.length, 0);
    expect(all.equals(l.model)).toBe(true);
    await c.disconnect();
    expect(JSON.parse(fs.readFileSync(`${img}.lease`, "utf8"))).toMatchObject({ owner: "a", epoch: 3 });
  });

  it("takes the image back when the new owner dies right after the hand-over: no failed request", async () => {
    const { a, b } = await twoNodes("1s");
    const c = await NbdClient.connect(addr(a.uris[0]!), { exportName: "disk" });
    const l = load(c);
    await new Promise((r) => setTimeout(r, 200));
    const { controlCall } = await import("../../src/control/control-client.js");
    await controlCall(controlUrl(a), "POST", "v1/exports/disk/migrate", { to: controlUrl(b) });
    await b.stop("SIGKILL"); // a now forwards to a dead owner until b's lease expires
    const t0 = Date.now();
    while ((await getStatus(controlUrl(a))).exports[0]!.state !== "LOCAL") {
      expect(Date.now() - t0).toBeLessThan(10_000);
      await new Promise((r) => setTimeout(r, 50));
    }
    const back = l.done();
    await new Promise((r) => setTimeout(r, 300));
    await l.stop();
    expect(l.failures).toEqual([]);
    expect(l.done()).toBeGreaterThan(back);
    expect((await getStatus(controlUrl(a))).exports[0]).toMatchObject({ owner: "a", epoch: 3, state: "LOCAL" });
    await c.flush();
    expect((await c.pread(l.model.length, 0)).equals(l.model)).toBe(true);
    await c.disconnect();
  });
});
