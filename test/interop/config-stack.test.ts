import { execFileSync, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CLI, randomImage, serve, tempDir, type Served } from "../helpers/serve.js";
import { debianEnv, needTools } from "../helpers/tools.js";

const MiB = 1024 * 1024;

describe.skipIf(!needTools("nbdinfo", "nbdcopy", "qemu-io", "sgdisk", "sfdisk"))("stacks declared in a config file", () => {
  let dir: string;
  let img: string;
  let srv: Served;
  let p2: { start: number; size: number };
  beforeAll(async () => {
    dir = tempDir();
    img = path.join(dir, "disk.img");
    randomImage(img, 16 * MiB, 9);
    execFileSync("sgdisk", ["-Z", img], { stdio: "ignore" });
    execFileSync("sgdisk", ["-n", "1:1M:+4M", "-n", "2:0:+6M", img], { stdio: "ignore" });
    const p = JSON.parse(execFileSync("sfdisk", ["--json", img], { encoding: "utf8" })).partitiontable.partitions[1];
    p2 = { start: p.start * 512, size: p.size * 512 };
    fs.writeFileSync(
      path.join(dir, "exports.yaml"),
      [
        "exports:",
        "  - name: whole",
        "    stack: file:disk.img",
        "    read-only: true",
        "  - name: second",
        "    description: the second partition, with a bad first sector",
        "    stack:",
        "      - file: disk.img",
        "      - partition: 2",
        "      - fault: op=pread,errno=EIO,range=0-511",
        "        seed: 4",
      ].join("\n"),
    );
    srv = await serve(["--config", path.join(dir, "exports.yaml"), "--fault-seed", "1"], 4);
  });
  afterAll(() => srv?.stop());
  const uriOf = (name: string) => srv.uris.find((u) => u.startsWith("nbd") && new URL(u).pathname === `/${name}`)!;

  it("serves each declared export (and the partitions of an undivided one) with a description of its stack", () => {
    expect(srv.uris.filter((u) => u.startsWith("nbd")).map((u) => new URL(u).pathname)).toEqual(["/whole", "/whole/p1", "/whole/p2", "/second"]);
    const list = JSON.parse(execFileSync("nbdinfo", ["--json", "--list", srv.uris[0]!], { encoding: "utf8", env: debianEnv })).exports;
    const byName = Object.fromEntries(list.map((e: { "export-name": string }) => [e["export-name"], e]));
    expect(byName.whole.description).toMatch(/^disk → file:.*disk\.img/);
    expect(byName.second.description).toBe("the second partition, with a bad first sector");
    expect(byName.second["export-size"]).toBe(p2.size);
    expect(byName["whole/p2"].description).toMatch(/^disk → partition 2 .* → file:/);
  });

  it("puts the fault layer where it was declared: above the partition, with its rules", () => {
    const bad = spawnSync("qemu-io", ["-f", "raw", "-c", "read 0 512", uriOf("second")], { encoding: "utf8" });
    expect(bad.stdout + bad.stderr).toMatch(/Input\/output error/);
    const good = spawnSync("qemu-io", ["-f", "raw", "-c", "read -v 4096 16", uriOf("second")], { encoding: "utf8" });
    expect(good.status).toBe(0);
    const want = Buffer.alloc(16);
    const fd = fs.openSync(img, "r");
    fs.readSync(fd, want, 0, 16, p2.start + 4096);
    fs.closeSync(fd);
    expect(good.stdout).toContain(want.subarray(0, 4).toString("hex").replace(/(..)/g, "$1 ").trim());
  });

  it("refuses writes on an export declared read-only", () => {
    const r = spawnSync("qemu-io", ["-f", "raw", "-c", "write 0 512", srv.uris[0]!], { encoding: "utf8" });
    expect(r.stdout + r.stderr).toMatch(/read-only|Operation not permitted|permission denied/i);
  });

  it("stops at start with an error naming the bad key and the file", () => {
    const f = path.join(dir, "bad.yaml");
    fs.writeFileSync(f, "exports:\n  - name: x\n    stack: file:disk.img → partition:2 → faul\n");
    const r = spawnSync(process.execPath, [CLI, "serve", "--config", f, "--listen", "127.0.0.1:0"], { encoding: "utf8" });
    expect(r.status).toBe(1);
    expect(r.stderr).toContain(`${f}: exports[0].stack[2]: unknown layer "faul"`);
    fs.writeFileSync(f, "exports:\n  - name: x\n    stack: file:disk.img → partition:7\n");
    const r2 = spawnSync(process.execPath, [CLI, "serve", "--config", f, "--listen", "127.0.0.1:0"], { encoding: "utf8" });
    expect(r2.status).toBe(1);
    expect(r2.stderr).toMatch(/partition 7: not in the gpt table .* \(has 1, 2\)/);
  });
});

describe.skipIf(!needTools("mkfs.ext4", "debugfs", "nbdcopy", "qemu-io", "e2fsck"))("a file inside a file system as an export", () => {
  let dir: string;
  let srv: Served;
  let inner: Buffer;
  beforeAll(async () => {
    dir = tempDir();
    fs.mkdirSync(path.join(dir, "root/images"), { recursive: true });
    randomImage(path.join(dir, "root/images/vm.img"), 3 * MiB + 4096, 21);
    inner = fs.readFileSync(path.join(dir, "root/images/vm.img"));
    const img = path.join(dir, "fs.img");
    fs.writeFileSync(img, "");
    fs.truncateSync(img, 32 * MiB);
    execFileSync("mkfs.ext4", ["-q", "-F", "-d", path.join(dir, "root"), img]);
    fs.writeFileSync(path.join(dir, "c.yaml"), "exports:\n  - name: vm\n    stack: file:fs.img → file:/images/vm.img\n");
    srv = await serve(["--config", path.join(dir, "c.yaml")], 1);
  });
  afterAll(() => srv?.stop());

  it("serves the file's bytes, takes writes into its own blocks only, and leaves the file system clean", async () => {
    const out = path.join(dir, "out.img");
    execFileSync("nbdcopy", [srv.uris[0]!, out]);
    expect(fs.readFileSync(out).equals(inner)).toBe(true);
    execFileSync("qemu-io", ["-f", "raw", "-c", "write -P 0x77 1M 8k", "-c", "flush", srv.uris[0]!]);
    await srv.stop();
    const viaFs = execFileSync("debugfs", ["-R", "cat /images/vm.img", path.join(dir, "fs.img")], { maxBuffer: 64 * MiB, stdio: ["ignore", "pipe", "ignore"] });
    const want = Buffer.from(inner);
    want.fill(0x77, MiB, MiB + 8192);
    expect(viaFs.equals(want)).toBe(true);
    execFileSync("e2fsck", ["-fn", path.join(dir, "fs.img")], { stdio: "ignore" });
  });
});
