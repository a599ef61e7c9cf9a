import { execFileSync, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { CLI, controlUrl, randomImage, serve, sha256, tempDir } from "../helpers/serve.js";
import { needTools } from "../helpers/tools.js";
import { nbdstack } from "../helpers/volumes.js";

const MiB = 1024 * 1024;
const run = (cmd: string, ...args: string[]) => execFileSync(cmd, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
const rows = (map: string) => map.trim().split("\n").map((l) => l.trim().split(/\s+/).slice(0, 3).map(Number));

/** `qcow2: IMAGE` with `backing: STACK`: unallocated clusters read from another declared stack, which is only read. */
describe.skipIf(!needTools("qemu-img", "qemu-io", "nbdcopy", "nbdinfo", "sgdisk", "sfdisk"))("qcow2 with backing: STACK", () => {
  it("reads unallocated clusters from a partition of a disk image, writes into the qcow2 image only; snapshot and merge online", async () => {
    const dir = tempDir();
    const disk = path.join(dir, "disk.img");
    randomImage(disk, 16 * MiB, 4);
    run("sgdisk", "-Z", disk);
    run("sgdisk", "-n", "1:1M:+4M", "-n", "2:0:+6M", disk);
    const p = JSON.parse(run("sfdisk", "--json", disk)).partitiontable.partitions[1];
    const part = fs.readFileSync(disk).subarray(p.start * 512, (p.start + p.size) * 512);
    const before = sha256(disk);
    const vm = path.join(dir, "vm.qcow2");
    run("qemu-img", "create", "-q", "-f", "qcow2", vm, `${part.length}`);
    const cfg = path.join(dir, "c.yaml");
    fs.writeFileSync(cfg, ["exports:", "  - name: vm", "    stack:", "      - qcow2: vm.qcow2", "        backing: file:disk.img → partition:2"].join("\n") + "\n");
    const token = path.join(dir, "token");
    const srv = await serve(["--config", cfg, "--control", "127.0.0.1:0", "--token-file", token], 2);
    try {
      expect(run("nbdinfo", "--list", srv.uri)).toMatch(/description: disk → qcow2:.*vm\.qcow2 → disk → partition 2 .* → file:.*disk\.img/);
      run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 100k 3k", "-c", "write -z 1M 64k", "-c", "flush", srv.uri);
      const want = Buffer.from(part);
      want.fill(0x5a, 100 * 1024, 103 * 1024);
      want.fill(0, MiB, MiB + 64 * 1024);
      const out = path.join(dir, "out.raw");
      run("nbdcopy", srv.uri, out);
      expect(fs.readFileSync(out).equals(want)).toBe(true);
      // The image holds its two clusters; the rest is the stack's (depth 2).
      expect(rows(run("nbdinfo", "--map=qemu:allocation-depth", srv.uri))).toEqual([
        [0, 65536, 2],
        [65536, 65536, 1],
        [131072, 917504, 2],
        [1048576, 65536, 1],
        [1114112, part.length - 1114112, 2],
      ]);
      // Online snapshot: the new vm.qcow2 names vm.snap-1.qcow2, which names nothing and has the stack below.
      const c = ["vm", "--control", controlUrl(srv), "--token-file", token];
      const snap = await nbdstack("snapshot", ...c);
      expect(snap.status, snap.stderr).toBe(0);
      run("qemu-io", "-f", "raw", "-c", "write -P 0x6b 2M 100k", "-c", "flush", srv.uri);
      want.fill(0x6b, 2 * MiB, 2 * MiB + 100 * 1024);
      expect(rows(run("nbdinfo", "--map=qemu:allocation-depth", srv.uri))[0]).toEqual([0, 65536, 3]); // the stack is below both
      const status = JSON.parse((await nbdstack("cow", ...c, "--json")).stdout);
      expect(status.chain.map((e: { path: string }) => path.basename(e.path))).toEqual(["vm.qcow2", "vm.snap-1.qcow2"]);
      expect(status.base).toMatch(/^disk → partition 2 /);
      // Merged back: vm.snap-1.qcow2 takes the name; a merge into the stack itself is refused (it is only read).
      const merged = await nbdstack("merge", ...c, "--wait");
      expect(merged.status, merged.stderr).toBe(0);
      expect(fs.existsSync(path.join(dir, "vm.snap-1.qcow2"))).toBe(false);
      const r = await nbdstack("merge", ...c, "--into-base");
      expect(r.stderr).toContain("has no backing file to merge into (its backing stack is only read)");
      run("nbdcopy", srv.uri, out);
      expect(fs.readFileSync(out).equals(want)).toBe(true);
    } finally {
      await srv.stop();
    }
    expect(sha256(disk)).toBe(before); // the backing stack is only read
    expect(run("qemu-img", "check", vm)).toMatch(/No errors were found/);
    // Served again, the stack below it.
    const again = await serve(["--config", cfg]);
    try {
      const out = path.join(dir, "again.raw");
      run("nbdcopy", again.uri, out);
      const want = Buffer.from(part);
      want.fill(0x5a, 100 * 1024, 103 * 1024);
      want.fill(0, MiB, MiB + 64 * 1024);
      want.fill(0x6b, 2 * MiB, 2 * MiB + 100 * 1024);
      expect(fs.readFileSync(out).equals(want)).toBe(true);
    } finally {
      await again.stop();
    }
  });

  it("refuses a backing value that is neither auto, none nor a stack", () => {
    const dir = tempDir();
    run("qemu-img", "create", "-q", "-f", "qcow2", path.join(dir, "vm.qcow2"), "1M");
    fs.writeFileSync(path.join(dir, "c.yaml"), "exports:\n  - name: vm\n    stack:\n      - qcow2: vm.qcow2\n        backing: sometimes\n");
    const r = spawnSync(process.execPath, [CLI, "serve", "--config", path.join(dir, "c.yaml"), "--listen", "127.0.0.1:0"], { encoding: "utf8", timeout: 15_000 });
    expect(r.status).not.toBe(0);
    expect(r.stderr).toContain('expected auto, none or a stack (e.g. file:base.img → partition:2), got "sometimes"');
  });
});
