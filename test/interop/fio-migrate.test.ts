import { execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { NbdClient } from "../../src/client/nbd-client.js";
import { controlCall, getStatus } from "../../src/control/control-client.js";
import { pollUntil, scrape } from "../helpers/migration.js";
import { CLI, serve, tempDir, type Served, controlUrl } from "../helpers/serve.js";
import { needTools } from "../helpers/tools.js";

const MiB = 1024 * 1024;

function addr(uri: string) {
  const u = new URL(uri);
  return { host: u.hostname, port: Number(u.port) };
}

/** Two nodes serving one image from a shared directory; the export moves while fio writes. */
describe.skipIf(!needTools("fio", "qemu-img", "nbdcopy"))("migration between two nodes under fio load", () => {
  let dir: string;
  let img: string;
  let a: Served;
  let b: Served;
  beforeAll(async () => {
    dir = tempDir();
    img = path.join(dir, "disk.img");
    fs.writeFileSync(img, "");
    fs.truncateSync(img, 64 * MiB);
    a = await serve([img, "--name", "disk", "--node-id", "a", "--control", "127.0.0.1:0"], 2);
    b = await serve([img, "--name", "disk", "--node-id", "b", "--control", "127.0.0.1:0"], 2);
  });
  afterAll(async () => {
    await b?.stop();
    await a?.stop();
  });

  it("starts with the first node as owner and the second proxying through port B", async () => {
    const sa = await getStatus(controlUrl(a));
    const sb = await getStatus(controlUrl(b));
    expect(sa.exports[0]).toMatchObject({ name: "disk", owner: "a", epoch: 1, state: "LOCAL" });
    expect(sb.exports[0]).toMatchObject({ name: "disk", owner: "a", epoch: 1, state: "REMOTE" });
    const lease = JSON.parse(fs.readFileSync(`${img}.lease`, "utf8"));
    expect(lease).toMatchObject({ owner: "a", epoch: 1, control: controlUrl(a) });
    const desc = execFileSync("nbdinfo", ["--json", b.uris[0]!], { encoding: "utf8" });
    expect(JSON.parse(desc).exports[0].description).toMatch(/redirector\(REMOTE\).*\[owner=a epoch=1 at 127\.0\.0\.1:\d+, through port B\]/);
  });

  it("moves the export 20 times while fio writes with crc32c verification: no error, images identical", async () => {
    const fio = spawn(
      "fio",
      [
        "--name=migrate",
        "--ioengine=nbd",
        `--uri=${a.uris[0]}`,
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--size=32m",
        "--time_based",
        "--runtime=120", // stopped with SIGINT once the 20 moves are done
        "--verify=crc32c",
        "--verify_state_save=0",
        "--verify_backlog=256",
        "--verify_fatal=1",
        "--output-format=json",
      ],
      { stdio: ["ignore", "pipe", "pipe"] },
    );
    let out = "";
    fio.stdout.on("data", (d) => (out += d));
    const fioDone = new Promise<number | null>((r) => fio.once("exit", r));

    // Meanwhile: two connections to node a and one to node b check that flush on one is seen by all.
    const c1 = await NbdClient.connect(addr(a.uris[0]!), { exportName: "disk" });
    const c2 = await NbdClient.connect(addr(a.uris[0]!), { exportName: "disk" });
    const c3 = await NbdClient.connect(addr(b.uris[0]!), { exportName: "disk" });
    let stop = false;
    let checks = 0;
    const mc = (async () => {
      for (let i = 0; !stop; i++) {
        const [w, r1, r2] = i % 3 === 0 ? [c1, c2, c3] : i % 3 === 1 ? [c3, c1, c2] : [c2, c3, c1];
        const data = Buffer.alloc(4096, (i % 250) + 1);
        const off = 48 * MiB + (i % 64) * 4096; // outside fio's 32 MiB
        await w.pwrite(data, off);
        await w.flush();
        expect((await r1.pread(4096, off)).equals(data)).toBe(true);
        expect((await r2.pread(4096, off)).equals(data)).toBe(true);
        checks++;
      }
    })();

    // Between two moves, node a (which fio dialled) answers 100 more writes and the multi-connection
    // checker makes one more round: the moves happen under load, polled rather than slept for.
    const aWrites = async () => (await scrape(controlUrl(a))).get('nbdstack_requests_total{export="disk",op="write",result="ok"}') ?? 0;
    const underLoad = async (what: string) => {
      const [w, c] = [await aWrites(), checks];
      await pollUntil(`100 fio writes and a multi-conn check ${what}`, async () => checks > c && (await aWrites()) >= w + 100);
    };
    await underLoad("before the first move");
    const moves: number[] = [];
    let [from, to] = [controlUrl(a), controlUrl(b)];
    for (let i = 0; i < 20; i++) {
      const r = await controlCall<{ ms: number; epoch: number }>(from, "POST", "v1/exports/disk/migrate", { to });
      moves.push(r.ms);
      expect(r.epoch).toBe(i + 2);
      [from, to] = [to, from];
      await underLoad(`after move ${i + 1}`);
    }
    expect(fio.exitCode).toBeNull(); // every move happened under load
    fio.kill("SIGINT"); // fio ends the job, verifies what is pending and reports (exit 128)
    const code = await fioDone;
    stop = true;
    await mc;
    const job = JSON.parse(out.slice(out.indexOf("{"))).jobs[0];
    expect([0, 128]).toContain(code);
    expect(job.error).toBe(0);
    expect(job.write.io_bytes).toBeGreaterThan(0);
    expect(job.read.io_bytes).toBeGreaterThan(0); // verify_backlog read back what was written
    expect(checks).toBeGreaterThanOrEqual(21);
    await Promise.all([c1.disconnect(), c2.disconnect(), c3.disconnect()]);

    const sa = await getStatus(controlUrl(a));
    expect(sa.exports[0]).toMatchObject({ owner: "a", epoch: 21, state: "LOCAL", held: 0 });
    // What clients read through the other node equals the image file itself.
    const copy = path.join(dir, "copy.img");
    execFileSync("nbdcopy", [b.uris[0]!, copy]);
    execFileSync("qemu-img", ["compare", "-f", "raw", "-F", "raw", img, copy]);
    console.log(`20 moves under fio load: ms per move ${moves.map((m) => m.toFixed(0)).join(" ")}`);
  });

  it("migrates and reports through the CLI", () => {
    const moved = execFileSync(process.execPath, [CLI, "migrate", "disk", "--from", controlUrl(a), "--to", controlUrl(b)], { encoding: "utf8" });
    expect(moved).toMatch(/^moved disk from a to b \(epoch 22\) in [\d.]+ ms$/m);
    const st = JSON.parse(execFileSync(process.execPath, [CLI, "status", controlUrl(a), "--json"], { encoding: "utf8" }));
    expect(st.exports[0]).toMatchObject({ name: "disk", owner: "b", epoch: 22, state: "REMOTE" });
    const human = execFileSync(process.execPath, [CLI, "status", controlUrl(b)], { encoding: "utf8" });
    expect(human).toMatch(/disk\s+b\s+22\s+LOCAL/);
  });

  it("exposes the redirector's state, moves and held requests as metrics", async () => {
    const text = await (await fetch(`${controlUrl(a)}/metrics`)).text();
    expect(text).toMatch(/^nbdstack_redirector_state\{export="disk",state="REMOTE"\} 1$/m);
    expect(text).toMatch(/^nbdstack_redirector_state\{export="disk",state="LOCAL"\} 0$/m);
    expect(text).toMatch(/^nbdstack_held_requests\{export="disk"\} 0$/m);
    const moves = Number(/^nbdstack_moves_total\{export="disk"\} (\d+)$/m.exec(text)![1]);
    expect(moves).toBe(21); // every one of the 21 moves was to or from a
    expect(text).toMatch(/^nbdstack_requests_total\{export="disk",op="write",result="ok"\} \d+$/m);
  });

  it("refuses to migrate from a node that does not own the export, or to a dead peer, and changes nothing", async () => {
    await expect(controlCall(controlUrl(a), "POST", "v1/exports/disk/migrate", { to: controlUrl(b) })).rejects.toThrow(/409.*not owned here/);
    await expect(controlCall(controlUrl(b), "POST", "v1/exports/disk/migrate", { to: "http://127.0.0.1:1" })).rejects.toThrow(/502.*unreachable/);
    expect((await getStatus(controlUrl(b))).exports[0]).toMatchObject({ owner: "b", state: "LOCAL" });
  });

  // Requests over 1 MiB are served in pieces (README, "Requests in pieces"): through the node that
  // forwards to the owner, each piece goes its own way while the export moves under it.
  it("moves the export 6 times while fio writes 4 MiB requests with crc32c verification through the forwarding node", async () => {
    const fio = spawn(
      "fio",
      ["--name=big", "--ioengine=nbd", `--uri=${a.uris[0]}`, "--rw=randwrite", "--bs=4m", "--iodepth=4", "--size=32m", "--time_based", "--runtime=120", "--verify=crc32c", "--verify_state_save=0", "--verify_backlog=8", "--verify_fatal=1", "--output-format=json"],
      { stdio: ["ignore", "pipe", "pipe"] },
    );
    let out = "";
    fio.stdout.on("data", (d) => (out += d));
    const fioDone = new Promise<number | null>((r) => fio.once("exit", r));
    const aWrites = async () => (await scrape(controlUrl(a))).get('nbdstack_requests_total{export="disk",op="write",result="ok"}') ?? 0;
    const underLoad = async (what: string) => {
      const w = await aWrites();
      await pollUntil(`10 fio writes ${what}`, async () => (await aWrites()) >= w + 10);
    };
    await underLoad("before the first move");
    let [from, to] = [controlUrl(b), controlUrl(a)];
    for (let i = 0; i < 6; i++) {
      const r = await controlCall<{ epoch: number }>(from, "POST", "v1/exports/disk/migrate", { to });
      expect(r.epoch).toBe(23 + i);
      [from, to] = [to, from];
      await underLoad(`after move ${i + 1}`);
    }
    expect(fio.exitCode).toBeNull();
    fio.kill("SIGINT");
    const code = await fioDone;
    const job = JSON.parse(out.slice(out.indexOf("{"))).jobs[0];
    expect([0, 128]).toContain(code);
    expect(job.error).toBe(0);
    expect(job.read.io_bytes).toBeGreaterThan(0);
    const copy = path.join(dir, "copy2.img");
    execFileSync("nbdcopy", [b.uris[0]!, copy]);
    execFileSync("qemu-img", ["compare", "-f", "raw", "-F", "raw", img, copy]);
  }, 180_000);
});
