import { execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CLI, serve, tempDir, type Served, controlUrl } from "../helpers/serve.js";
import { nbdsh, needPath, needTools } from "../helpers/tools.js";

const MiB = 1024 * 1024;
const sh = (cmd: string, args: string[]) => execFileSync(cmd, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });

/**
 * A crash-consistency test with real tools and no kernel mount: mkfs.ext4 and debugfs write an
 * ext4 file system through nbdfuse (each ends with fsync → NBD FLUSH); then writes that are never
 * flushed arrive; the power is cut. Every flushed byte must be there, the unflushed writes must be
 * the only difference (they are gone), and e2fsck -fn must find the file system clean.
 */
describe.skipIf(!(needTools("nbdfuse", "fusermount3", "mkfs.ext4", "debugfs", "e2fsck", "nbdsh") && needPath("/dev/fuse", "FUSE device")))("power cut under ext4", () => {
  let dir: string;
  let img: string;
  let srv: Served;
  let ctl: string;
  beforeAll(async () => {
    dir = tempDir();
    img = path.join(dir, "disk.img");
    fs.writeFileSync(img, "");
    fs.truncateSync(img, 32 * MiB);
    srv = await serve([img, "--fault-powerloss", "--fault-seed", "3"], 2);
    ctl = controlUrl(srv);
  });
  afterAll(() => srv?.stop());

  it("keeps every flushed byte, loses only unflushed writes, and leaves a clean file system", async () => {
    fs.mkdirSync(path.join(dir, "fuse"));
    const fuseFile = path.join(dir, "fuse", "disk");
    const fuse = spawn("nbdfuse", [fuseFile, srv.uri], { stdio: "ignore" });
    const payload = path.join(dir, "payload.bin");
    const data = Buffer.alloc(300 * 1024);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7 + (i >> 10)) & 0xff;
    fs.writeFileSync(payload, data);
    try {
      for (let i = 0; i < 100 && !fs.existsSync(fuseFile); i++) await new Promise((r) => setTimeout(r, 100));
      sh("mkfs.ext4", ["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", fuseFile]);
      sh("debugfs", ["-w", "-R", `write ${payload} payload.bin`, fuseFile]);
      sh("debugfs", ["-w", "-R", "mkdir dir", fuseFile]);
    } finally {
      execFileSync("fusermount3", ["-u", path.join(dir, "fuse")]);
      await new Promise((r) => fuse.once("exit", r));
    }
    const flushed = fs.readFileSync(img); // what the disk holds after the last flush

    // Writes that nobody flushes (libnbd does not flush when it disconnects).
    nbdsh(srv.uri, 'h.pwrite(b"\\\\xee" * 65536, 4 * 1048576); h.pwrite(b"\\\\xdd" * 4096, 0); h.pwrite(b"\\\\xcc" * 8192, 20 * 1048576)');
    const cut = execFileSync(process.execPath, [CLI, "fault", "disk", "--control", ctl, "--powercut"], { encoding: "utf8" });
    expect(cut).toMatch(/power cut: 3 unflushed writes lost, 0 kept/);
    execFileSync(process.execPath, [CLI, "fault", "disk", "--control", ctl, "--poweron"]);

    const after = fs.readFileSync(img);
    expect(after.equals(flushed)).toBe(true); // the unflushed writes were the only difference
    sh("e2fsck", ["-fn", img]); // exit 0: clean
    const out = path.join(dir, "out.bin");
    sh("debugfs", ["-R", `dump payload.bin ${out}`, img]);
    expect(fs.readFileSync(out).equals(data)).toBe(true);
    expect(sh("debugfs", ["-R", "ls -l /", img])).toMatch(/\bdir\b/);
  });
});
