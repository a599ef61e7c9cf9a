import { execFileSync, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { controlUrl, randomImage, serve, tempDir } from "../helpers/serve.js";
import { debianEnv, needTools } from "../helpers/tools.js";
import { nbdstack } from "../helpers/volumes.js";

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;
const run = (cmd: string, ...args: string[]) => execFileSync(cmd, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"], env: debianEnv });
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const chainOf = (image: string) => (JSON.parse(run("qemu-img", "info", "-U", "--backing-chain", "--output=json", image)) as Array<{ filename: string }>).map((i) => path.basename(i.filename));

/** `qemu-img check`: no corruption (leaked clusters, which a crash may leave, are allowed: exit 3). */
function checkClean(file: string): void {
  const r = spawnSync("qemu-img", ["check", "--output=json", file], { encoding: "utf8", env: debianEnv });
  expect([0, 3], `${file}: ${r.stdout}${r.stderr}`).toContain(r.status);
  const j = JSON.parse(r.stdout) as { "corruptions"?: number; "check-errors"?: number };
  expect(j.corruptions ?? 0, file).toBe(0);
  expect(j["check-errors"] ?? 0, file).toBe(0);
}

/**
 * SIGKILL while `nbdstack merge` copies an overlay into the snapshot below it: every file checks
 * free of corruption, the chain reads as before the merge, and the merge started again finishes.
 */
describe.skipIf(!needTools("qemu-img", "qemu-io", "nbdcopy"))("online merge of a qcow2 chain, killed midway", () => {
  it("leaves a consistent chain that holds the data, and can be merged again", async () => {
    const dir = tempDir();
    const seed = path.join(dir, "seed");
    fs.mkdirSync(seed);
    randomImage(path.join(seed, "base.raw"), SIZE, 8);
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", path.join(seed, "vm.qcow2"));
    // The chain: base.raw ← vm.snap-1.qcow2 (16 MiB written) ← vm.qcow2 (48 MiB written, partly over it).
    let token = path.join(dir, "token");
    let srv = await serve([path.join(seed, "vm.qcow2"), "--name", "vm", "--control", "127.0.0.1:0", "--token-file", token], 2);
    run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 16M", "-c", "flush", srv.uri);
    expect((await nbdstack("snapshot", "vm", "--control", controlUrl(srv), "--token-file", token)).status).toBe(0);
    const cmds = Array.from({ length: 48 }, (_, i) => ["-c", `write -P ${0x20 + i} ${((i * 7) % 60) * MiB + 4096 * (i % 3)} 1M`]).flat();
    run("qemu-io", "-f", "raw", ...cmds, "-c", "write -z 40M 2M", "-c", "flush", srv.uri);
    const ref = path.join(dir, "ref.raw");
    run("nbdcopy", srv.uri, ref);
    await srv.stop();
    expect(chainOf(path.join(seed, "vm.qcow2"))).toEqual(["vm.qcow2", "vm.snap-1.qcow2", "base.raw"]);

    let interrupted = 0;
    for (const delay of [0, 20, 60, 150, 400]) {
      const d = path.join(dir, `round-${delay}`);
      fs.mkdirSync(d);
      for (const f of ["base.raw", "vm.qcow2", "vm.snap-1.qcow2"]) fs.copyFileSync(path.join(seed, f), path.join(d, f));
      const vm = path.join(d, "vm.qcow2");
      token = path.join(d, "token");
      srv = await serve([vm, "--name", "vm", "--control", "127.0.0.1:0", "--token-file", token], 2);
      const started = await nbdstack("merge", "vm", "--control", controlUrl(srv), "--token-file", token);
      expect(started.status, started.stderr).toBe(0);
      await sleep(delay);
      await srv.stop("SIGKILL");
      const chain = chainOf(vm);
      if (chain.length === 3) interrupted++;
      for (const f of chain.slice(0, -1)) checkClean(path.join(d, f));
      // As it was before the merge, whatever the merge had done.
      srv = await serve([vm, "--name", "vm", "--control", "127.0.0.1:0", "--token-file", token], 2);
      run("qemu-img", "compare", "-f", "raw", "-F", "raw", srv.uri, ref);
      if (chain.length === 3) {
        const again = await nbdstack("merge", "vm", "--control", controlUrl(srv), "--token-file", token, "--wait");
        expect(again.status, again.stderr).toBe(0);
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", srv.uri, ref);
      }
      await srv.stop();
      expect(chainOf(vm)).toEqual(["vm.qcow2", "base.raw"]);
      checkClean(vm);
      run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", vm, ref);
    }
    expect(interrupted).toBeGreaterThan(0); // at least one kill came while the merge ran
  });
});
