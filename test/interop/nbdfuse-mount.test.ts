import { execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { serve, tempDir, type Served } from "../helpers/serve.js";
import { needPath, needRoot, needTools } from "../helpers/tools.js";

/** The kernel mounts the demo disk's ext4 partition through nbdfuse and a loop device. */
describe.skipIf(!(needTools("nbdfuse", "fusermount3", "losetup", "mount", "sfdisk", "e2fsck") && needPath("/dev/fuse", "FUSE device") && needPath("/dev/loop-control", "loop devices") && needRoot("mounting through a loop device")))(
  "nbdfuse + loop mount",
  () => {
    let dir: string;
    let srv: Served;
    let fuse: ReturnType<typeof spawn> | null = null;
    let loop = "";
    let mounted = false;
    beforeAll(async () => {
      dir = tempDir();
      srv = await serve(["--demo", "--read-only"], 3);
      fs.mkdirSync(path.join(dir, "fuse"));
      fs.mkdirSync(path.join(dir, "mnt"));
      fuse = spawn("nbdfuse", ["-r", path.join(dir, "fuse", "disk"), srv.uri], { stdio: "ignore" });
      for (let i = 0; i < 100 && !fs.existsSync(path.join(dir, "fuse", "disk")); i++) await new Promise((r) => setTimeout(r, 100));
    });
    afterAll(async () => {
      if (mounted) execFileSync("umount", [path.join(dir, "mnt")]);
      if (loop) execFileSync("losetup", ["-d", loop]);
      if (fuse) {
        try {
          execFileSync("fusermount3", ["-u", path.join(dir, "fuse")]);
        } catch {
          fuse.kill();
        }
      }
      await srv?.stop();
    });

    it("exposes the export as a file whose GPT lists both partitions", () => {
      const disk = path.join(dir, "fuse", "disk");
      expect(fs.statSync(disk).size).toBe(64 * 1024 * 1024);
      const table = JSON.parse(execFileSync("sfdisk", ["--json", disk], { encoding: "utf8" })).partitiontable;
      expect(table.label).toBe("gpt");
      expect(table.partitions.map((p: { name: string }) => p.name)).toEqual(["demo-ext4", "demo-fat"]);
    });

    it("mounts the ext4 partition read-only and lists a known file", () => {
      const disk = path.join(dir, "fuse", "disk");
      const p1 = JSON.parse(execFileSync("sfdisk", ["--json", disk], { encoding: "utf8" })).partitiontable.partitions[0];
      loop = execFileSync("losetup", ["-f", "--show", "-r", "-o", String(p1.start * 512), "--sizelimit", String(p1.size * 512), disk], {
        encoding: "utf8",
      }).trim();
      execFileSync("mount", ["-o", "ro", "-t", "ext4", loop, path.join(dir, "mnt")]);
      mounted = true;
      expect(fs.readdirSync(path.join(dir, "mnt")).sort()).toEqual(["docs", "hello.txt", "lost+found"]);
      expect(fs.readFileSync(path.join(dir, "mnt", "hello.txt"), "utf8")).toBe("Hello from the nbdstack demo disk!\n");
    });

    it("mounts the partition export demo/p1 itself, with no offset", async () => {
      fs.mkdirSync(path.join(dir, "fuse1"));
      fs.mkdirSync(path.join(dir, "mnt1"));
      const p1 = spawn("nbdfuse", ["-r", path.join(dir, "fuse1", "p1"), srv.uris.find((u) => u.endsWith("/demo/p1"))!], { stdio: "ignore" });
      let loop1 = "";
      try {
        for (let i = 0; i < 100 && !fs.existsSync(path.join(dir, "fuse1", "p1")); i++) await new Promise((r) => setTimeout(r, 100));
        loop1 = execFileSync("losetup", ["-f", "--show", "-r", path.join(dir, "fuse1", "p1")], { encoding: "utf8" }).trim();
        execFileSync("mount", ["-o", "ro", "-t", "ext4", loop1, path.join(dir, "mnt1")]);
        expect(fs.readFileSync(path.join(dir, "mnt1", "docs", "README.txt"), "utf8")).toMatch(/made by fixtures\/make-demo\.sh/);
        execFileSync("umount", [path.join(dir, "mnt1")]);
        execFileSync("e2fsck", ["-fn", path.join(dir, "fuse1", "p1")], { stdio: "ignore" }); // exit 0: clean, read through the export
      } finally {
        if (loop1) execFileSync("losetup", ["-d", loop1]);
        try {
          execFileSync("fusermount3", ["-u", path.join(dir, "fuse1")]);
        } catch {
          p1.kill();
        }
      }
    });
  },
);
