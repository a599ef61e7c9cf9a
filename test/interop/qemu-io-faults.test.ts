import { execFileSync, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CLI, serve, tempDir, type Served, controlUrl } from "../helpers/serve.js";
import { nbdsh, needTools } from "../helpers/tools.js";

const MiB = 1024 * 1024;
const qemuIo = (uri: string, ...cmds: string[]) => spawnSync("qemu-io", ["-f", "raw", ...cmds.flatMap((c) => ["-c", c]), uri], { encoding: "utf8" });
const fault = (ctl: string, ...args: string[]) => execFileSync(process.execPath, [CLI, "fault", "disk", "--control", ctl, ...args], { encoding: "utf8" });

describe.skipIf(!needTools("qemu-io", "nbdsh"))("fault layer through qemu-io and the fault CLI", () => {
  let srv: Served;
  let ctl: string;
  let img: string;
  beforeAll(async () => {
    const dir = tempDir();
    img = path.join(dir, "disk.img");
    fs.writeFileSync(img, "");
    fs.truncateSync(img, 8 * MiB);
    srv = await serve([img, "--fault-powerloss", "--fault-seed", "7"], 2);
    ctl = controlUrl(srv);
  });
  afterAll(() => srv?.stop());

  it("fails reads of a bad range with EIO and serves the rest", async () => {
    const added = fault(ctl, "--add", "op=pread,errno=EIO,range=1048576-2097152");
    expect(added).toMatch(/rule 1: op=pread,errno=EIO,range=1048576-2097152/);
    const bad = qemuIo(srv.uri, "read 1M 4k");
    expect(bad.stdout + bad.stderr).toMatch(/read failed: Input\/output error/);
    const good = qemuIo(srv.uri, "read 0 4k", "read 2M 4k", "write -P 0x11 1M 4k");
    expect(good.stdout).not.toMatch(/failed/);
    expect(fault(ctl, "--list")).toMatch(/fired 1\)[\s\S]*injected 1/);
    for (let i = 0; i < 40 && !/injecting EIO/.test(srv.stderr()); i++) await new Promise((r) => setTimeout(r, 50)); // the log pipe is async
    expect(srv.stderr()).toMatch(/injecting EIO into pread at 0x100000/);
    fault(ctl, "--clear");
    expect(qemuIo(srv.uri, "read -P 0x11 1M 4k").stdout).not.toMatch(/failed|verification/);
  });

  it("refuses a bad rule with a clear message", () => {
    const r = spawnSync(process.execPath, [CLI, "fault", "disk", "--control", ctl, "--add", "op=pread,errno=EWHAT"], { encoding: "utf8" });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/400 bad rule: errno=EWHAT/);
  });

  it("loses exactly the unflushed writes on a power cut; flushed and FUA writes survive", () => {
    // nbdsh, unlike qemu-io, does not flush when it disconnects.
    nbdsh(srv.uri, 'h.pwrite(b"\\x21" * 65536, 0); h.flush(); h.pwrite(b"\\x22" * 65536, 65536, nbd.CMD_FLAG_FUA); h.pwrite(b"\\x23" * 65536, 131072)');
    expect(fault(ctl, "--powercut")).toMatch(/power cut: 1 unflushed writes lost, 0 kept/);
    expect(qemuIo(srv.uri, "read 0 4k").stdout + qemuIo(srv.uri, "read 0 4k").stderr).toMatch(/failed/);
    fault(ctl, "--poweron");
    const after = qemuIo(srv.uri, "read -P 0x21 0 64k", "read -P 0x22 64k 64k", "read -P 0 128k 64k");
    expect(after.stdout).not.toMatch(/failed|verification/);
    const file = fs.readFileSync(img);
    expect(file.subarray(0, 65536).every((b) => b === 0x21)).toBe(true);
    expect(file.subarray(131072, 196608).every((b) => b === 0)).toBe(true);
  });
});

describe("fault layer on cluster nodes", () => {
  it("sits above port A, keeps its rules across moves, and sends its errors through port B to any client", async () => {
    const { NbdClient } = await import("../../src/client/nbd-client.js");
    const { controlCall } = await import("../../src/control/control-client.js");
    const dir = tempDir();
    const img = path.join(dir, "disk.img");
    fs.writeFileSync(img, "");
    fs.truncateSync(img, 8 * MiB);
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
