import { execFile, execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { NbdClient } from "../../src/client/nbd-client.js";
import { ControlError, controlCall, getStatus } from "../../src/control/control-client.js";
import { exportStatus, pollUntil, scrape } from "../helpers/migration.js";
import { CLI, serve, tempDir, type Served, controlUrl } from "../helpers/serve.js";
import { needTools } from "../helpers/tools.js";

const MiB = 1024 * 1024;
const run = promisify(execFile);

function addr(uri: string) {
  const u = new URL(uri);
  return { host: u.hostname, port: Number(u.port) };
}

/** Waits until a node has answered `n` more writes to export disk than now: the load is really running. */
async function moreWrites(control: string, n: number): Promise<void> {
  const count = async () => (await scrape(control)).get('nbdstack_requests_total{export="disk",op="write",result="ok"}') ?? 0;
  const from = await count();
  await pollUntil(`${n} more writes answered by ${control}`, async () => (await count()) >= from + n);
}

/** fio random writes with crc32c verification against `uri` until stopped. */
function fio(uri: string) {
  const p = spawn(
    "fio",
    ["--name=copy", "--ioengine=nbd", `--uri=${uri}`, "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=24m", "--time_based", "--runtime=120", "--verify=crc32c", "--verify_state_save=0", "--verify_backlog=256", "--verify_fatal=1", "--output-format=json"],
    { stdio: ["ignore", "pipe", "pipe"] },
  );
  let out = "";
  p.stdout.on("data", (d) => (out += d));
  const done = new Promise<number | null>((r) => p.once("exit", r));
  return {
    async stop() {
      p.kill("SIGINT");
      const code = await done;
      expect([0, 128]).toContain(code);
      return JSON.parse(out.slice(out.indexOf("{"))).jobs[0] as { error: number; write: { io_bytes: number }; read: { io_bytes: number } };
    },
  };
}

/** Two nodes without shared storage: node a serves an image from its directory, node b has only a data directory. */
describe.skipIf(!needTools("fio", "qemu-img"))("migration without shared storage (live copy)", () => {
  let dirA: string;
  let dirB: string;
  let img: string;
  let a: Served;
  let b: Served;
  beforeAll(async () => {
    dirA = tempDir();
    dirB = tempDir();
    img = path.join(dirA, "disk.img");
    const head = Buffer.alloc(8 * MiB);
    for (let i = 0; i < head.length; i += 4) head.writeUInt32LE((i * 2654435761) >>> 0, i);
    fs.writeFileSync(img, head);
    fs.truncateSync(img, 64 * MiB); // the rest is a hole
    a = await serve([img, "--name", "disk", "--node-id", "a", "--control", "127.0.0.1:0"], 2);
    b = await serve(["--data-dir", dirB, "--node-id", "b", "--control", "127.0.0.1:0", "--listen", "127.0.0.1:0"], 1);
  });
  afterAll(async () => {
    await b?.stop();
    await a?.stop();
  });

  it("copies the image to the other node while fio writes, then hands over: fio verifies clean through the new owner", async () => {
    const load = fio(a.uris[0]!);
    await moreWrites(controlUrl(a), 200);
    const { stdout } = await run(process.execPath, [CLI, "migrate", "disk", "--from", controlUrl(a), "--to", controlUrl(b), "--copy"]);
    expect(stdout).toMatch(/moved disk from a to b \(epoch 2\) by live copy in [\d.]+ s: [\d.]+ MiB copied/);
    await moreWrites(controlUrl(b), 200); // fio goes on through a's port B to the new owner, reading back what it wrote
    const job = await load.stop();
    expect(job.error).toBe(0);
    expect(job.read.io_bytes).toBeGreaterThan(0);
    const sa = await getStatus(controlUrl(a));
    const sb = await getStatus(controlUrl(b));
    expect(sa.exports[0]).toMatchObject({ name: "disk", owner: "b", state: "REMOTE" });
    expect(sb.exports[0]).toMatchObject({ name: "disk", owner: "b", epoch: 2, state: "LOCAL", image: path.join(dirB, "disk.img") });
    expect(fs.existsSync(path.join(dirB, "disk.img.incomplete"))).toBe(false);
    // The hole was not written on the destination: its copy stays sparse.
    expect(fs.statSync(path.join(dirB, "disk.img")).blocks * 512).toBeLessThan(48 * MiB);
  });

  it("comes back in write-blocking mode under load, and a copy with no load leaves both images identical", async () => {
    const load = fio(a.uris[0]!);
    await moreWrites(controlUrl(b), 200);
    const r = await controlCall<{ mode: string; epoch: number }>(controlUrl(b), "POST", "v1/exports/disk/migrate", { to: controlUrl(a), copy: true, mode: "write-blocking" }, 120_000);
    expect(r).toMatchObject({ mode: "write-blocking", epoch: 3 });
    await moreWrites(controlUrl(a), 200);
    const job = await load.stop();
    expect(job.error).toBe(0);
    expect((await getStatus(controlUrl(a))).exports[0]).toMatchObject({ owner: "a", epoch: 3, state: "LOCAL" });
    // One more move with nothing writing: both images must then be byte-identical.
    await controlCall(controlUrl(a), "POST", "v1/exports/disk/migrate", { to: controlUrl(b), copy: true }, 120_000);
    execFileSync("qemu-img", ["compare", "-f", "raw", "-F", "raw", img, path.join(dirB, "disk.img")]);
    await controlCall(controlUrl(b), "POST", "v1/exports/disk/migrate", { to: controlUrl(a), copy: true }, 120_000);
  });

  it("switches to write-blocking when writes outpace the copy, and still converges", async () => {
    const load = fio(a.uris[0]!);
    await moreWrites(controlUrl(a), 200);
    const r = await controlCall<{ mode: string }>(controlUrl(a), "POST", "v1/exports/disk/migrate", { to: controlUrl(b), copy: true, maxRate: 16 * MiB }, 120_000);
    expect(r.mode).toBe("write-blocking");
    const job = await load.stop();
    expect(job.error).toBe(0);
    await controlCall(controlUrl(b), "POST", "v1/exports/disk/migrate", { to: controlUrl(a), copy: true }, 120_000);
    expect((await getStatus(controlUrl(a))).exports[0]).toMatchObject({ owner: "a", state: "LOCAL" });
  });

  it("aborts cleanly when the destination dies mid-copy: the source stays owner and no request fails", async () => {
    const c = await NbdClient.connect(addr(a.uris[0]!), { exportName: "disk" });
    let stop = false;
    let writes = 0;
    const writer = (async () => {
      for (let i = 0; !stop; i++) {
        await c.pwrite(Buffer.alloc(4096, (i % 250) + 1), (i % 2048) * 4096);
        writes++;
      }
    })();
    const moving = controlCall(controlUrl(a), "POST", "v1/exports/disk/migrate", { to: controlUrl(b), copy: true, maxRate: 2 * MiB }, 120_000);
    // At 2 MiB/s the copy has sent its first MiB after half a second at the earliest.
    await pollUntil("the copy to send its first MiB", async () => {
      const c = (await exportStatus(controlUrl(a), "disk"))?.copy;
      return c?.phase === "copying" && c.copied >= MiB;
    });
    await b.stop("SIGKILL");
    await expect(moving).rejects.toThrow(/502.*live copy of disk aborted/);
    const after = writes;
    await pollUntil("50 more writes after the abort", () => writes >= after + 50);
    stop = true;
    await writer; // a failed write would have thrown here
    expect(writes).toBeGreaterThan(50);
    expect((await getStatus(controlUrl(a))).exports[0]).toMatchObject({ owner: "a", state: "LOCAL", held: 0 });
    expect(fs.existsSync(path.join(dirB, "disk.img.incomplete"))).toBe(true);
    await c.disconnect();
    // A restarted destination does not serve the incomplete image.
    b = await serve(["--data-dir", dirB, "--node-id", "b", "--control", "127.0.0.1:0", "--listen", "127.0.0.1:0"], 1);
    expect((await getStatus(controlUrl(b))).exports).toEqual([]);
    expect(b.stderr()).toMatch(/not serving an image whose live copy never finished/);
  });
  it("copes with a slow link (a delay rule on the destination's port) and still hands over with fio verifying clean", async () => {
    await b.stop();
    fs.rmSync(path.join(dirB, "disk.img.incomplete"), { force: true });
    fs.rmSync(path.join(dirB, "disk.img"), { force: true });
    b = await serve(["--data-dir", dirB, "--node-id", "b", "--control", "127.0.0.1:0", "--listen", "127.0.0.1:0", "--fault", "--fault-seed", "5"], 1);
    const load = fio(a.uris[0]!);
    await moreWrites(controlUrl(a), 200);
    const moving = controlCall<{ mode: string; epoch: number }>(controlUrl(a), "POST", "v1/exports/disk/migrate", { to: controlUrl(b), copy: true, maxRate: 32 * MiB }, 120_000);
    await pollUntil("b to become the copy target", async () => (await exportStatus(controlUrl(b), "disk"))?.copyTarget);
    await controlCall(controlUrl(b), "POST", "v1/exports/disk/faults", { add: "op=pwrite,delay=2ms..6ms" });
    const r = await moving;
    const job = await load.stop();
    expect(job.error).toBe(0);
    const faults = await controlCall<{ rules: Array<{ fired: number }> }>(controlUrl(b), "GET", "v1/exports/disk/faults");
    expect(faults.rules[0]!.fired).toBeGreaterThan(10);
    expect((await getStatus(controlUrl(b))).exports[0]).toMatchObject({ owner: "b", state: "LOCAL", epoch: r.epoch });
    await controlCall(controlUrl(b), "POST", "v1/exports/disk/migrate", { to: controlUrl(a), copy: true }, 120_000);
  });
  it("restarts while its peer is down: a node holding a copy starts, waits for the owner, and never takes the copy over", async () => {
    // Now a owns the export and b holds a copy (its lease record says so: private).
    expect(JSON.parse(fs.readFileSync(path.join(dirB, "disk.img.lease"), "utf8"))).toMatchObject({ owner: "a", private: true });
    const aArgs = [img, "--name", "disk", "--node-id", "a", "--control", "127.0.0.1:0", "--listen", new URL(a.uris[0]!).host];
    await a.stop("SIGKILL");
    await b.stop();
    b = await serve(["--data-dir", dirB, "--node-id", "b", "--control", "127.0.0.1:0", "--listen", "127.0.0.1:0", "--lease-ttl", "1s"], 2);
    expect((await getStatus(controlUrl(b))).exports[0]).toMatchObject({ name: "disk", owner: "a", state: "REMOTE" });
    const c = await NbdClient.connect(addr(b.uris[0]!), { exportName: "disk" });
    const write = c.pwrite(Buffer.alloc(4096, 0x42), 0); // waits for the owner
    await new Promise((r) => setTimeout(r, 2500)); // well past b's lease time: b must not take its copy over
    expect((await getStatus(controlUrl(b))).exports[0]).toMatchObject({ owner: "a", state: "REMOTE" });
    a = await serve(aArgs, 2);
    await write;
    expect((await c.pread(4096, 0)).every((x) => x === 0x42)).toBe(true);
    await c.disconnect();
    expect((await getStatus(controlUrl(a))).exports[0]).toMatchObject({ owner: "a", state: "LOCAL" });
  });
});

describe.skipIf(!needTools("mkfs.ext4", "e2fsck", "debugfs"))("live copy with --skip-free", () => {
  it("sends only what the file system uses; the copy passes e2fsck and holds every file", async () => {
    const dirA = tempDir();
    const dirB = tempDir();
    const img = path.join(dirA, "fs.img");
    const garbage = Buffer.alloc(32 * MiB);
    for (let i = 0; i < garbage.length; i += 4) garbage.writeUInt32LE((i * 2246822519) >>> 0, i);
    fs.writeFileSync(img, garbage); // free space full of old data, which must not travel
    fs.mkdirSync(path.join(dirA, "root"));
    const file = Buffer.alloc(3 * MiB, 0x5c);
    fs.writeFileSync(path.join(dirA, "root/data.bin"), file);
    execFileSync("mkfs.ext4", ["-q", "-F", "-E", "nodiscard", "-d", path.join(dirA, "root"), img]);
    const a = await serve([img, "--name", "fs", "--node-id", "a", "--control", "127.0.0.1:0", "--no-partitions"], 2);
    const b = await serve(["--data-dir", dirB, "--node-id", "b", "--control", "127.0.0.1:0", "--listen", "127.0.0.1:0"], 1);
    try {
      const { stdout } = await run(process.execPath, [CLI, "migrate", "fs", "--from", controlUrl(a), "--to", controlUrl(b), "--copy", "--skip-free", "--json"]);
      const r = JSON.parse(stdout);
      expect(r.copied).toBeLessThan(12 * MiB); // of 32 MiB, most of it free
      const copy = path.join(dirB, "fs.img");
      execFileSync("e2fsck", ["-fn", copy], { stdio: "ignore" });
      const got = execFileSync("debugfs", ["-R", "cat /data.bin", copy], { maxBuffer: 16 * MiB, stdio: ["ignore", "pipe", "ignore"] });
      expect(got.equals(file)).toBe(true);
    } finally {
      await b.stop();
      await a.stop();
    }
  });
});

describe("live copy to a node that shares the image", () => {
  /** Asks a to live-copy "disk" to b; returns the refusal (or null when it was not refused). */
  async function refusal(A: string, B: string): Promise<ControlError | null> {
    return controlCall(A, "POST", "v1/exports/disk/migrate", { to: B, copy: true }).then(
      () => null,
      (e: ControlError) => e,
    );
  }
  async function stillA(a: Served): Promise<void> {
    expect((await exportStatus(controlUrl(a), "disk"))?.state).toBe("LOCAL");
    const c = await NbdClient.connect(addr(a.uris[0]!), { exportName: "disk" });
    expect((await c.pread(4096, 0)).every((x) => x === 0x33)).toBe(true);
    await c.disconnect();
  }
  function image(): string {
    const img = path.join(tempDir(), "disk.img");
    fs.writeFileSync(img, Buffer.alloc(MiB, 0x33));
    fs.truncateSync(img, 4 * MiB);
    return img;
  }

  it("same image: --copy to a node serving the very file is refused with 409 naming the image; a keeps the export", async () => {
    const img = image();
    const a = await serve([img, "--name", "disk", "--node-id", "a", "--control", "127.0.0.1:0"], 2);
    const b = await serve([img, "--name", "disk", "--node-id", "b", "--control", "127.0.0.1:0"], 2);
    try {
      const err = await refusal(controlUrl(a), controlUrl(b));
      expect(err, "the copy was not refused").toBeInstanceOf(ControlError);
      expect(err!.status, err!.message).toBe(409);
      expect(err!.message).toContain(img);
      expect((await exportStatus(controlUrl(b), "disk"))?.copyTarget).toBeUndefined();
      await stillA(a);
    } finally {
      await b.stop();
      await a.stop();
    }
  });

  it("same image: --copy into a --data-dir whose image is a hard link to the source's is refused with 409 naming the image", async () => {
    const img = image();
    const dirB = tempDir();
    fs.linkSync(img, path.join(dirB, "disk.img")); // another path, the same file (device and inode)
    fs.writeFileSync(path.join(dirB, "disk.img.incomplete"), "an earlier copy that never finished\n"); // b does not serve it
    const a = await serve([img, "--name", "disk", "--node-id", "a", "--control", "127.0.0.1:0"], 2);
    const b = await serve(["--data-dir", dirB, "--node-id", "b", "--control", "127.0.0.1:0", "--listen", "127.0.0.1:0"], 1);
    try {
      const err = await refusal(controlUrl(a), controlUrl(b));
      expect(err, "the copy was not refused").toBeInstanceOf(ControlError);
      expect(err!.status, err!.message).toBe(409);
      expect(err!.message).toContain(path.join(dirB, "disk.img"));
      await stillA(a);
    } finally {
      await b.stop();
      await a.stop();
    }
  });
});
