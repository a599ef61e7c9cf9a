import { execFileSync, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { blankImage, serve, tempDir } from "../helpers/serve.js";
import { debianEnv, nbdsh, needTools } from "../helpers/tools.js";

const MiB = 1024 * 1024;

/** A read-only export refuses every write with EPERM, whatever layers with state of their own sit in its stack. */
describe.skipIf(!needTools("nbdsh", "qemu-io", "sgdisk"))("read-only exports", () => {
  it("--read-only over an --overlay, and read-only: true over a cow layer, advertise and enforce read-only; so do their partitions", async () => {
    const dir = tempDir();
    const base = blankImage(path.join(dir, "base.img"), 8 * MiB);
    execFileSync("sgdisk", ["-n", "1:2048:+2M", base], { stdio: "ignore" });
    fs.writeFileSync(path.join(dir, "c.yaml"), "exports:\n  - name: cfg\n    read-only: true\n    stack: file:base.img → cow:c.cow\n");
    const srv = await serve([base, "--overlay", path.join(dir, "v.cow"), "--name", "v", "--read-only", "--config", path.join(dir, "c.yaml")], 4);
    try {
      const uris = srv.uris.filter((u) => u.startsWith("nbd://"));
      expect(uris.map((u) => new URL(u).pathname).sort()).toEqual(["/cfg", "/cfg/p1", "/v", "/v/p1"]);
      const files = () => ["base.img", "v.cow", "c.cow"].map((f) => (fs.existsSync(path.join(dir, f)) ? fs.readFileSync(path.join(dir, f)).toString("hex") : ""));
      const before = files();
      for (const uri of uris) {
        const out = nbdsh(
          uri,
          [
            "print(h.is_read_only())",
            "try:\n  h.pwrite(b'\\xaa' * 4096, 0)\n  print('written')\nexcept nbd.Error as e:\n  print(e.errno)",
          ].join("\n"),
        );
        expect(out.trim().split("\n"), uri).toEqual(["True", "EPERM"]);
        const q = spawnSync("qemu-io", ["-f", "raw", "-c", "write -P 0xab 0 4k", uri], { encoding: "utf8", env: debianEnv });
        expect(q.status, uri).not.toBe(0);
      }
      expect(files()).toEqual(before); // neither the image nor an overlay changed
    } finally {
      await srv.stop();
    }
  });
});
