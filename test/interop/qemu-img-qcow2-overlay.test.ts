import { execFileSync, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { CLI, randomImage, serve, sha256, tempDir } from "../helpers/serve.js";
import { needTools } from "../helpers/tools.js";

const MiB = 1024 * 1024;
const run = (cmd: string, ...args: string[]) => execFileSync(cmd, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });

/** `serve IMAGE --overlay FILE.qcow2`: a qcow2 overlay whose backing file is the image, as qemu-img makes it. */
describe.skipIf(!needTools("qemu-img", "qemu-io"))("--overlay FILE.qcow2", () => {
  for (const format of ["raw", "qcow2"] as const) {
    it(`over a ${format} image: created with the image as backing file, written, checked, committed by qemu-img`, async () => {
      const dir = tempDir();
      const raw = path.join(dir, "base.raw");
      randomImage(raw, 16 * MiB, 3);
      let base = raw;
      if (format === "qcow2") {
        base = path.join(dir, "base.qcow2");
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, base);
      }
      const before = sha256(base);
      const ov = path.join(dir, "vm.qcow2");
      let srv = await serve([base, "--name", "vm", "--overlay", ov]);
      const info = JSON.parse(run("qemu-img", "info", "-U", "--output=json", ov));
      expect(info).toMatchObject({ format: "qcow2", "virtual-size": 16 * MiB, "backing-filename": path.basename(base), "backing-filename-format": format, "cluster-size": 65536 });
      run("qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 64k", "-c", "write -P 0xcd 100k 3k", "-c", "write -z 8M 1M", srv.uri);
      await srv.stop();
      expect(sha256(base)).toBe(before); // the image below is only read
      expect(run("qemu-img", "check", ov)).toMatch(/No errors were found/);
      // What the overlay holds over the image: the writes, and the image elsewhere.
      const want = path.join(dir, "want.raw");
      fs.copyFileSync(raw, want);
      run("qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 64k", "-c", "write -P 0xcd 100k 3k", "-c", "write -z 8M 1M", want);
      run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", ov, want);
      // Served again: the existing overlay is opened, not made anew.
      srv = await serve([base, "--name", "vm", "--overlay", ov]);
      expect(run("qemu-io", "-f", "raw", "-c", "read -P 0xab 1M 64k", srv.uri)).not.toMatch(/verification failed/);
      await srv.stop();
      // A real overlay: qemu-img commits it into the image below.
      run("qemu-img", "commit", ov);
      run("qemu-img", "compare", "-f", format, "-F", "raw", base, want);
    });
  }

  it("refuses an existing overlay of another image, saying which", async () => {
    const dir = tempDir();
    randomImage(path.join(dir, "a.raw"), MiB, 1);
    randomImage(path.join(dir, "b.raw"), MiB, 2);
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "a.raw", "-F", "raw", path.join(dir, "ov.qcow2"));
    const r = spawnSync(process.execPath, [CLI, "serve", path.join(dir, "b.raw"), "--overlay", path.join(dir, "ov.qcow2"), "--listen", "127.0.0.1:0"], { encoding: "utf8", timeout: 15_000 });
    expect(r.status).not.toBe(0);
    expect(r.stderr).toContain(`${path.join(dir, "ov.qcow2")} is an overlay of ${path.join(dir, "a.raw")}, not of ${path.join(dir, "b.raw")}`);
  });
});
