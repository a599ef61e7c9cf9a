import { execFile, execFileSync, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CLI, controlUrl, randomImage, serve, sha256, tempDir, type Served } from "../helpers/serve.js";
import { debianEnv, needTools } from "../helpers/tools.js";
import { scrape } from "../helpers/migration.js";
import { readExport, nbdstack as runCli } from "../helpers/volumes.js";

const MiB = 1024 * 1024;
const run = promisify(execFile);
const nbdstack = (...args: string[]) => run(process.execPath, [CLI, ...args]).then((r) => r.stdout);
const uriOf = (s: Served, name: string) => s.uris.find((u) => u.startsWith("nbd") && new URL(u).pathname === `/${name}`)!;

describe.skipIf(!needTools("qemu-io", "qemu-img", "nbdcopy", "nbdinfo"))("volume stacks served to real clients", () => {
  let dir: string;
  beforeAll(() => {
    dir = tempDir();
  });

  describe("copy-on-write overlay (--overlay)", () => {
    let base: string;
    let overlay: string;
    let srv: Served;
    let baseSum: string;
    beforeAll(async () => {
      base = path.join(dir, "base.img");
      overlay = path.join(dir, "vm.cow");
      randomImage(base, 8 * MiB, 3);
      baseSum = sha256(base);
      srv = await serve([base, "--overlay", overlay, "--name", "vm", "--no-partitions"], 2);
    });
    afterAll(() => srv?.stop());

    it("keeps the base pristine; writes land in the overlay and survive a restart; snapshot and merge work online", async () => {
      expect(JSON.parse(execFileSync("nbdinfo", ["--json", srv.uris[0]!], { encoding: "utf8", env: debianEnv })).exports[0].description).toMatch(/cow/);
      execFileSync("qemu-io", ["-f", "raw", "-c", "write -P 0xab 1M 64k", "-c", "write -P 0xcd 4000 100", "-c", "flush", srv.uris[0]!]);
      expect(sha256(base)).toBe(baseSum);
      await srv.stop();
      srv = await serve([base, "--overlay", overlay, "--name", "vm", "--no-partitions"], 2);
      execFileSync("qemu-io", ["-f", "raw", "-c", "read -P 0xab 1M 64k", "-c", "read -P 0xcd 4000 100", srv.uris[0]!]);
      const ctl = controlUrl(srv);
      const snap = `${overlay}.snap-1`;
      const ee = Buffer.alloc(4096, 0xee);
      const ab = Buffer.alloc(65536, 0xab);
      expect(await nbdstack("snapshot", "vm", "--control", ctl)).toBe(`froze the overlay of vm as ${snap}; new writes go to ${overlay}\n`);
      const snapIno = fs.statSync(snap).ino;
      const snapSum = sha256(snap);
      expect(fs.statSync(overlay).ino).not.toBe(snapIno); // a new overlay, not a second name of the old one
      execFileSync("qemu-io", ["-f", "raw", "-c", "write -P 0xee 2M 4k", "-c", "flush", srv.uris[0]!]);
      // What was written after the snapshot is in the new overlay, not in the frozen file.
      expect(sha256(snap)).toBe(snapSum);
      expect(fs.readFileSync(snap).includes(ee)).toBe(false);
      expect(fs.readFileSync(snap).includes(ab)).toBe(true);
      expect(fs.readFileSync(overlay).includes(ee)).toBe(true);
      expect(fs.readFileSync(overlay).includes(ab)).toBe(false);
      const chain = async () => JSON.parse(await nbdstack("cow", "vm", "--control", ctl, "--json"));
      expect((await chain()).chain.map((e: { path: string; allocatedBytes: number }) => [e.path, e.allocatedBytes])).toEqual([
        [overlay, 65536],
        [snap, 2 * 65536],
      ]);
      expect(await nbdstack("merge", "vm", "--control", ctl, "--wait")).toBe(`merged 64.0 KiB of vm into ${snap}; overlay is now ${overlay}\n`);
      // cow.md: the overlay is folded into the snapshot, which then takes the overlay's name.
      expect(fs.existsSync(snap)).toBe(false);
      expect(fs.statSync(overlay).ino).toBe(snapIno);
      expect(fs.readFileSync(overlay).includes(ee)).toBe(true);
      expect(fs.readFileSync(overlay).includes(ab)).toBe(true);
      expect((await chain()).chain.map((e: { path: string; allocatedBytes: number }) => [e.path, e.allocatedBytes])).toEqual([[overlay, 3 * 65536]]);
      execFileSync("qemu-io", ["-f", "raw", "-c", "read -P 0xab 1M 64k", "-c", "read -P 0xee 2M 4k", srv.uris[0]!]);
      // Everything but the written ranges still reads as the base, also from the merged overlay
      // alone after a restart.
      const want = fs.readFileSync(base);
      want.fill(0xab, MiB, MiB + 65536);
      want.fill(0xcd, 4000, 4100);
      want.fill(0xee, 2 * MiB, 2 * MiB + 4096);
      expect(readExport(srv.uris[0]!, path.join(dir, "vm-out.img")).equals(want)).toBe(true);
      expect(await srv.stop()).toBe(0);
      srv = await serve([base, "--overlay", overlay, "--name", "vm", "--no-partitions"], 2);
      expect(readExport(srv.uris[0]!, path.join(dir, "vm-out.img")).equals(want)).toBe(true);
      expect(sha256(base)).toBe(baseSum);
    });
  });

  describe("concat, stripe and mirror declared in a config file", () => {
    let srv: Served;
    const img = (n: string) => path.join(dir, n);
    beforeAll(async () => {
      randomImage(img("c1.img"), 3 * MiB, 11);
      randomImage(img("c2.img"), 5 * MiB, 12);
      for (const n of ["s1.img", "s2.img", "m1.img", "m2.img"]) {
        fs.writeFileSync(img(n), "");
        fs.truncateSync(img(n), 4 * MiB);
      }
      fs.writeFileSync(
        img("volumes.yaml"),
        [
          "exports:",
          "  - name: joined",
          "    stack:",
          "      - concat: [file:c1.img, file:c2.img]",
          "  - name: striped",
          "    stack:",
          "      - stripe: [file:s1.img, file:s2.img]",
          "        chunk: 64k",
          "  - name: mirrored",
          "    stack:",
          "      - mirror:",
          "          - file:m1.img",
          "          - [file:m2.img, {fault: null, id: leg1}]",
        ].join("\n"),
      );
      srv = await serve(["--config", img("volumes.yaml")], 4);
    });
    afterAll(() => srv?.stop());

    it("concat: the devices one after the other", () => {
      const out = img("joined-out.img");
      execFileSync("nbdcopy", [uriOf(srv, "joined"), out]);
      expect(fs.readFileSync(out).equals(Buffer.concat([fs.readFileSync(img("c1.img")), fs.readFileSync(img("c2.img"))]))).toBe(true);
    });

    it("stripe: 64 KiB chunks alternate between the devices", () => {
      const src = img("pattern.img");
      randomImage(src, 8 * MiB, 13);
      execFileSync("nbdcopy", [src, uriOf(srv, "striped")]);
      const data = fs.readFileSync(src);
      const s = [fs.readFileSync(img("s1.img")), fs.readFileSync(img("s2.img"))];
      for (let chunk = 0; chunk < 128; chunk++) {
        const on = s[chunk % 2]!.subarray(Math.floor(chunk / 2) * 65536, Math.floor(chunk / 2) * 65536 + 65536);
        expect(on.equals(data.subarray(chunk * 65536, chunk * 65536 + 65536))).toBe(true);
      }
    });

    it("mirror: a failing leg is degraded while clients go on; resync --wait exits 1 while it cannot be done, 0 once done with identical legs", async () => {
      const ctl = controlUrl(srv);
      await nbdstack("fault", "leg1", "--control", ctl, "--add", "op=pwrite,errno=EIO");
      const w = spawnSync("qemu-io", ["-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "flush", uriOf(srv, "mirrored")], { encoding: "utf8" });
      expect(w.status).toBe(0);
      expect(w.stdout + w.stderr).not.toMatch(/error/i);
      const legStates = async () => (JSON.parse(await nbdstack("mirror", "mirrored", "--control", ctl, "--json")).legs as Array<{ state: string }>).map((l) => l.state);
      expect(await legStates()).toEqual(["ok", "degraded"]);
      expect(sha256(img("m1.img"))).not.toBe(sha256(img("m2.img")));
      // The leg still fails every write: the resync fails, and --wait says so with exit status 1.
      const failed = await runCli("mirror", "mirrored", "--control", ctl, "--resync", "1", "--wait");
      expect(failed.status).toBe(1);
      // stderr: the progress bar's lines (not a terminal), then the error.
      expect(failed.stderr).toMatch(/^(leg 1 resync \[[█░]{40}\] \d+% \| .*\n)*nbdstack: resync of leg 1 did not complete: resync write: .*EIO.*\n$/);
      expect(failed.stdout).toMatch(/\n1 +degraded +\d+ +\d+% .*resync write: /);
      expect(await legStates()).toEqual(["ok", "degraded"]);
      await nbdstack("fault", "leg1", "--control", ctl, "--clear");
      const ok = await runCli("mirror", "mirrored", "--control", ctl, "--resync", "1", "--wait");
      expect(ok.status, ok.stderr).toBe(0);
      expect(ok.stderr).toMatch(/^(leg 1 resync \[[█░]{40}\] \d+% \| [\d.]+\/4\.0 MiB \| .*\n)*$/);
      if (ok.stderr) expect(ok.stderr).toMatch(/(^|\n)leg 1 resync \[█{40}\] 100% \| 4\.0\/4\.0 MiB [^\n]*\n$/); // the last line: done
      expect(ok.stdout).toMatch(/^resync of leg 1 started\nmirror of 2 legs, 4194304 bytes, 2 healthy\n/);
      expect(ok.stdout).toMatch(/\n1 +ok +\d+ +100% \(4\.0\/4\.0 MiB\)/);
      expect(await legStates()).toEqual(["ok", "ok"]);
      // The resync in the one family of copy metrics.
      const metrics = await scrape(ctl);
      expect(metrics.get('nbdstack_copy_done_bytes{export="mirrored",job="resync",leg="1"}')).toBe(4194304);
      expect(metrics.get('nbdstack_copy_total_bytes{export="mirrored",job="resync",leg="1"}')).toBe(4194304);
      expect(metrics.get('nbdstack_copy_dirty_bytes{export="mirrored",job="resync",leg="1"}')).toBe(0);
      expect(metrics.get('nbdstack_copy_state{export="mirrored",job="resync",leg="1",state="done"}')).toBe(1);
      expect(sha256(img("m1.img"))).toBe(sha256(img("m2.img")));
      execFileSync("qemu-io", ["-f", "raw", "-c", "read -P 0x5a 0 1M", uriOf(srv, "mirrored")]);
    });
  });
});
