import { execFileSync, spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { blankImage, CLI, controlUrl, serve, tempDir, type Served } from "../helpers/serve.js";
import { nbdsh, needTools } from "../helpers/tools.js";
import { pollUntil } from "../helpers/wait.js";

const MiB = 1024 * 1024;
const qemuIo = (uri: string, ...cmds: string[]) => spawnSync("qemu-io", ["-f", "raw", ...cmds.flatMap((c) => ["-c", c]), uri], { encoding: "utf8" });
/** qemu-io ran every command without an error (it exits 1 when one failed; a failed connect writes to stderr). */
const ok = (r: ReturnType<typeof qemuIo>) => {
  expect(r.stderr + r.stdout).not.toMatch(/failed|verification|error/i);
  expect(r.status).toBe(0);
};
const fault = (ctl: string, ...args: string[]) => execFileSync(process.execPath, [CLI, "fault", "disk", "--control", ctl, ...args], { encoding: "utf8" });

describe.skipIf(!needTools("qemu-io", "nbdsh"))("fault layer through qemu-io and the fault CLI", () => {
  let srv: Served;
  let ctl: string;
  let img: string;
  beforeAll(async () => {
    const dir = tempDir();
    img = blankImage(path.join(dir, "disk.img"), 8 * MiB);
    srv = await serve([img, "--fault-powerloss", "--fault-seed", "7"], 2);
    ctl = controlUrl(srv);
  });
  afterAll(() => srv?.stop());

  it("fails reads of a bad range with EIO and serves the rest", async () => {
    const added = fault(ctl, "--add", "op=pread,errno=EIO,range=1048576-2097152");
    expect(added).toMatch(/rule 1: op=pread,errno=EIO,range=1048576-2097152/);
    const bad = qemuIo(srv.uri, "read 1M 4k");
    expect(bad.stdout + bad.stderr).toMatch(/read failed: Input\/output error/);
    expect(bad.status).toBe(1);
    ok(qemuIo(srv.uri, "read 0 4k", "read 2M 4k", "write -P 0x11 1M 4k", "flush"));
    expect(fault(ctl, "--list")).toMatch(/fired 1\)[\s\S]*injected 1/);
    await pollUntil("the log line", () => /injecting EIO/.test(srv.stderr())); // the log pipe is async
    expect(srv.stderr()).toMatch(/injecting EIO into pread at 0x100000/);
    fault(ctl, "--clear");
    ok(qemuIo(srv.uri, "read -P 0x11 1M 4k"));
  });

  it("refuses a bad rule with a clear message", () => {
    const r = spawnSync(process.execPath, [CLI, "fault", "disk", "--control", ctl, "--add", "op=pread,errno=EWHAT"], { encoding: "utf8" });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/400 bad rule: errno=EWHAT/);
  });

  it("holds a stalled write until --release, then completes it", async () => {
    fault(ctl, "--add", "op=pwrite,stall,range=3145728-3149824");
    const writer = spawn("qemu-io", ["-f", "raw", "-c", "write -P 0x3c 3M 4k", "-c", "flush", srv.uri], { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    writer.stdout!.on("data", (d) => (out += d));
    writer.stderr!.on("data", (d) => (out += d));
    const exited = new Promise<number | null>((r) => writer.once("exit", (code) => r(code)));
    let done = false;
    void exited.then(() => (done = true));
    await pollUntil("the write to stall", () => /stalled 1/.test(fault(ctl, "--list")));
    ok(qemuIo(srv.uri, "read 0 4k", "write -P 0x3d 4M 4k")); // everything else is served meanwhile
    expect(done).toBe(false); // still held: qemu-io has no per-request timeout
    expect(fault(ctl, "--release")).toMatch(/released 1 stalled requests/);
    expect(await exited).toBe(0);
    expect(out).toMatch(/wrote 4096\/4096 bytes at offset 3145728/);
    fault(ctl, "--clear");
    ok(qemuIo(srv.uri, "read -P 0x3c 3M 4k", "read -P 0x3d 4M 4k"));
  });

  it("loses exactly the unflushed writes on a power cut; flushed and FUA writes survive", () => {
    nbdsh(srv.uri, "h.flush()"); // nothing left over from the tests above
    // nbdsh, unlike qemu-io, does not flush when it disconnects. A FUA write makes everything before
    // it durable too, so FUA and FLUSH each get a power cut of their own.
    nbdsh(srv.uri, 'h.pwrite(b"\\x22" * 65536, 65536, nbd.CMD_FLAG_FUA); h.pwrite(b"\\x23" * 65536, 131072)');
    expect(fault(ctl, "--powercut")).toMatch(/power cut: 1 unflushed writes lost, 0 kept/);
    const dark = qemuIo(srv.uri, "read 0 4k");
    expect(dark.status).not.toBe(0);
    expect(dark.stdout + dark.stderr).toMatch(/read failed|Cannot send after transport endpoint shutdown|shutdown/i);
    fault(ctl, "--poweron");
    nbdsh(srv.uri, 'h.pwrite(b"\\x21" * 65536, 0); h.flush(); h.pwrite(b"\\x24" * 65536, 196608)');
    expect(fault(ctl, "--powercut")).toMatch(/power cut: 1 unflushed writes lost, 0 kept/);
    fault(ctl, "--poweron");
    ok(qemuIo(srv.uri, "read -P 0x21 0 64k", "read -P 0x22 64k 64k", "read -P 0 128k 128k"));
    const file = fs.readFileSync(img);
    expect(file.subarray(0, 65536).every((b) => b === 0x21)).toBe(true); // flushed
    expect(file.subarray(65536, 131072).every((b) => b === 0x22)).toBe(true); // FUA
    expect(file.subarray(131072, 262144).every((b) => b === 0)).toBe(true); // neither
  });

  it("--powercut --keep 0.5 --torn lets a seeded part of the unflushed writes reach the disk, some cut at a sector", () => {
    const n = 16;
    const base = 5 * MiB;
    const len = 64 * 1024;
    // Distinct patterns at distinct offsets, none flushed.
    nbdsh(srv.uri, Array.from({ length: n }, (_, i) => `h.pwrite(bytes([${0x41 + i}]) * ${len}, ${base + i * len})`).join("; "));
    const m = fault(ctl, "--powercut", "--keep", "0.5", "--torn").match(/power cut: (\d+) unflushed writes lost, (\d+) kept/);
    expect(m).not.toBeNull();
    const [lost, kept] = [Number(m![1]), Number(m![2])];
    expect(lost + kept).toBe(n);
    fault(ctl, "--poweron");
    const file = fs.readFileSync(img);
    let present = 0;
    let torn = 0;
    for (let i = 0; i < n; i++) {
      const w = file.subarray(base + i * len, base + (i + 1) * len);
      let sectors = 0;
      while (sectors < len / 512 && w.subarray(sectors * 512, (sectors + 1) * 512).every((b) => b === 0x41 + i)) sectors++;
      // What reached the disk is a whole-sector prefix of the write; the rest is untouched.
      expect(w.subarray(sectors * 512).every((b) => b === 0)).toBe(true);
      if (sectors > 0) present++;
      if (sectors > 0 && sectors < len / 512) torn++;
    }
    expect(present).toBe(kept);
    // Seed 7 keeps some and loses some, and tears at least one of those it keeps.
    expect(kept).toBeGreaterThan(0);
    expect(lost).toBeGreaterThan(0);
    expect(torn).toBeGreaterThan(0);
  });
});

describe("fault layer on cluster nodes", () => {
  it("sits above port A, keeps its rules across moves, and sends its errors through port B to any client", async () => {
    const { NbdClient } = await import("../../src/client/nbd-client.js");
    const { controlCall } = await import("../../src/control/control-client.js");
    const dir = tempDir();
    const img = blankImage(path.join(dir, "disk.img"), 8 * MiB);
    const a = await serve([img, "--name", "disk", "--node-id", "a", "--fault"], 2);
    const b = await serve([img, "--name", "disk", "--node-id", "b", "--fault"], 2);
    try {
      fault(controlUrl(a), "--add", "op=pread,errno=EIO,range=0-4096");
      const u = new URL(b.uris[0]!);
      const c = await NbdClient.connect({ host: u.hostname, port: Number(u.port) }, { exportName: "disk" });
      await expect(c.pread(512, 0)).rejects.toMatchObject({ errno: "EIO" }); // b → port B → a's port A
      expect((await c.pread(512, 8192)).length).toBe(512);
      await controlCall(controlUrl(a), "POST", "v1/exports/disk/migrate", { to: controlUrl(b) });
      expect((await c.pread(512, 0)).length).toBe(512); // b owns the image; its fault layer has no rules
      await controlCall(controlUrl(b), "POST", "v1/exports/disk/migrate", { to: controlUrl(a) });
      await expect(c.pread(512, 0)).rejects.toMatchObject({ errno: "EIO" }); // a's rule lived on
      expect(fault(controlUrl(a), "--list")).toMatch(/rule 1: op=pread,errno=EIO,range=0-4096 {2}\(matched 2, fired 2\)/);
      await c.disconnect();
    } finally {
      await b.stop();
      await a.stop();
    }
  });
});
