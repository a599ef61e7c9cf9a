import { execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { controlUrl, randomImage, serve, tempDir, type Served } from "../helpers/serve.js";
import { debianEnv, needTools } from "../helpers/tools.js";
import { nbdstack } from "../helpers/volumes.js";

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;
const run = (cmd: string, ...args: string[]) => execFileSync(cmd, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"], env: debianEnv });
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** The files of `qemu-img info --backing-chain`, top first (base names). */
const chainOf = (image: string) => (JSON.parse(run("qemu-img", "info", "-U", "--backing-chain", "--output=json", image)) as Array<{ filename: string }>).map((i) => path.basename(i.filename));

/**
 * An nbdsh writer until `stop` exists: writes of random bytes and zeroes at random 512-byte
 * offsets of [lo, hi) (most not on cluster boundaries: allocating writes copy the rest of the
 * cluster from below), a flush every 16; each also written into the raw reference `ref`. With
 * `trims`, some trims too, the reference getting what the range reads afterwards.
 */
function writer(uri: string, ref: string, stop: string, lo: number, hi: number, seed: number, trims = false): Promise<number> {
  const script = `
import os, random
rnd = random.Random(${seed})
fd = os.open(${JSON.stringify(ref)}, os.O_WRONLY)
n = 0
while not os.path.exists(${JSON.stringify(stop)}):
    off = ${lo} + rnd.randrange(0, (${hi - lo}) // 512) * 512
    ln = min(${hi} - off, rnd.randrange(1, 256) * 512)
    if ${trims ? "True" : "False"} and n % 11 == 5:
        h.trim(ln, off)
        os.pwrite(fd, h.pread(ln, off), off)  # what a trim leaves is the server's to say
    elif n % 7 == 3:
        h.zero(ln, off)
        os.pwrite(fd, bytes(ln), off)
    else:
        b = bytes([rnd.randrange(1, 256)]) * ln
        h.pwrite(b, off)
        os.pwrite(fd, b, off)
    if n % 16 == 0:
        h.flush()
    n += 1
h.flush()
print(n)
`;
  return new Promise((resolve, reject) => {
    const p = spawn("nbdsh", ["-u", uri, "-c", script], { env: debianEnv, stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    p.stdout.on("data", (d) => (out += d));
    p.stderr.on("data", (d) => (err += d));
    p.on("exit", (code) => (code === 0 ? resolve(Number(out.trim())) : reject(new Error(`nbdsh writer exited with ${code}: ${err}`))));
  });
}

/**
 * `nbdstack snapshot` / `merge` on a served qcow2 image (src/stack/qcow2/README.md, "Snapshots and
 * merge online"), while clients write: the files are what qemu-img makes and reads.
 */
describe.skipIf(!needTools("qemu-img", "nbdsh", "fio"))("online snapshot and merge of a qcow2 chain", () => {
  const start = async (dir: string, image: string, ...more: string[]): Promise<{ srv: Served; ctl: string; token: string }> => {
    const token = path.join(dir, "token");
    const srv = await serve([image, "--name", "vm", "--control", "127.0.0.1:0", "--token-file", token, ...more], 2);
    return { srv, ctl: controlUrl(srv), token };
  };
  const cli = async (...args: string[]) => {
    const r = await nbdstack(...args);
    expect(r.status, r.stderr).toBe(0);
    return r.stdout;
  };
  /**
   * Serves `vm`, runs two writers that also trim (seeds `seeds`, one per half) while `steps` runs
   * with the export's snapshot/merge arguments, stops them, and checks the data served, then the
   * stopped image (`qemu-img check`, `compare`), against the raw reference `ref`.
   */
  const underTrimmingWriters = async (dir: string, vm: string, ref: string, seeds: [number, number], steps: (c: string[]) => Promise<void>) => {
    const { srv, ctl, token } = await start(dir, vm);
    const stop = path.join(dir, "stop");
    const writers = [writer(srv.uri, ref, stop, 0, SIZE / 2, seeds[0], true), writer(srv.uri, ref, stop, SIZE / 2, SIZE, seeds[1], true)];
    try {
      await steps(["vm", "--control", ctl, "--token-file", token]);
    } finally {
      fs.writeFileSync(stop, "");
    }
    await Promise.all(writers);
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", srv.uri, ref);
    await srv.stop();
    expect(run("qemu-img", "check", vm)).toMatch(/No errors were found/);
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", vm, ref);
  };

  it("snapshots, merges and merges into the base under two writers: the chain, qemu-img check and the data against a raw reference", async () => {
    const dir = tempDir();
    const base = path.join(dir, "base.raw");
    const ref = path.join(dir, "ref.raw");
    randomImage(base, SIZE, 5);
    fs.copyFileSync(base, ref);
    const vm = path.join(dir, "vm.qcow2");
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", vm);
    const { srv, ctl, token } = await start(dir, vm);
    const stop = path.join(dir, "stop");
    const writers = [writer(srv.uri, ref, stop, 0, SIZE / 2, 1), writer(srv.uri, ref, stop, SIZE / 2, SIZE, 2)];
    const c = ["vm", "--control", ctl, "--token-file", token];
    try {
      await sleep(500);
      expect(await cli("snapshot", ...c)).toContain(`froze the overlay of vm as ${path.join(dir, "vm.snap-1.qcow2")}`);
      await sleep(500);
      await cli("snapshot", ...c, "--as", "before-upgrade.qcow2");
      expect(chainOf(vm)).toEqual(["vm.qcow2", "before-upgrade.qcow2", "vm.snap-1.qcow2", "base.raw"]);
      const status = JSON.parse(await cli("cow", ...c, "--json"));
      expect(status.chain.map((e: { role: string; path: string }) => [e.role, path.basename(e.path)])).toEqual([
        ["overlay", "vm.qcow2"],
        ["snapshot", "before-upgrade.qcow2"],
        ["snapshot", "vm.snap-1.qcow2"],
      ]);
      expect(status.base).toBe(`file:${base}`);
      await sleep(500);
      // vm.qcow2 into before-upgrade.qcow2, which takes its name.
      expect(await cli("merge", ...c, "--wait")).toMatch(/^merged .* of vm into .*before-upgrade\.qcow2; overlay is now .*vm\.qcow2/m);
      expect(chainOf(vm)).toEqual(["vm.qcow2", "vm.snap-1.qcow2", "base.raw"]);
      expect(fs.existsSync(path.join(dir, "before-upgrade.qcow2"))).toBe(false);
      await sleep(300);
      await cli("merge", ...c, "--wait");
      expect(chainOf(vm)).toEqual(["vm.qcow2", "base.raw"]);
      // The base is written only when asked for.
      const r = await nbdstack("merge", ...c);
      expect(r.status).not.toBe(0);
      expect(r.stderr).toContain("is the base of the chain; merging changes it");
      await sleep(300);
      await cli("merge", ...c, "--wait", "--into-base");
      expect(chainOf(vm)).toEqual(["vm.qcow2", "base.raw"]);
      await sleep(300);
      await cli("snapshot", ...c);
      await sleep(300);
    } finally {
      fs.writeFileSync(stop, "");
    }
    const counts = await Promise.all(writers);
    expect(Math.min(...counts)).toBeGreaterThan(20);
    expect(chainOf(vm)).toEqual(["vm.qcow2", "vm.snap-1.qcow2", "base.raw"]);
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", srv.uri, ref);
    await srv.stop();
    for (const f of ["vm.qcow2", "vm.snap-1.qcow2"]) expect(run("qemu-img", "check", path.join(dir, f)), f).toMatch(/No errors were found/);
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", vm, ref);
    // Served again, the chain is what the files say; as --overlay of the base too (a snapshot stands between).
    for (const args of [[vm, "--read-only"], [base, "--overlay", vm, "--read-only"]]) {
      const again = await serve(args);
      run("qemu-img", "compare", "-f", "raw", "-F", "raw", again.uri, ref);
      await again.stop();
    }
  });

  it("merges into a v2 image with 4 KiB clusters made by qemu-img, under writers that also trim", async () => {
    const dir = tempDir();
    const base = path.join(dir, "base.raw");
    const ref = path.join(dir, "ref.raw");
    randomImage(base, SIZE, 6);
    const mid = path.join(dir, "mid.qcow2");
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096", "-b", "base.raw", "-F", "raw", mid);
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 3M 5M", "-c", "write -z 12M 1M", mid);
    const vm = path.join(dir, "vm.qcow2");
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", "-b", "mid.qcow2", "-F", "qcow2", vm);
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", mid, ref);
    await underTrimmingWriters(dir, vm, ref, [3, 4], async (c) => {
      await sleep(700);
      await cli("merge", ...c, "--wait");
      expect(chainOf(vm)).toEqual(["vm.qcow2", "base.raw"]);
      expect(fs.existsSync(mid)).toBe(false);
      await sleep(300);
      await cli("snapshot", ...c);
      await sleep(300);
      await cli("merge", ...c, "--wait");
      await sleep(300);
    });
    expect(chainOf(vm)).toEqual(["vm.qcow2", "base.raw"]);
    expect(JSON.parse(run("qemu-img", "info", "-U", "--output=json", vm))["format-specific"].data.compat).toBe("0.10"); // the v2 image, under the overlay's name
  });

  it("snapshots an image with extended L2 entries and merges back into it, under writers that also trim", async () => {
    const dir = tempDir();
    const base = path.join(dir, "base.raw");
    const ref = path.join(dir, "ref.raw");
    randomImage(base, SIZE, 8);
    const vm = path.join(dir, "vm.qcow2");
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=32k", "-b", "base.raw", "-F", "raw", vm);
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x44 1M 3000", "-c", "write -z 2M 4k", "-c", "write -P 0x45 5M 1M", vm);
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", vm, ref);
    await underTrimmingWriters(dir, vm, ref, [5, 6], async (c) => {
      await sleep(700);
      await cli("snapshot", ...c); // a standard overlay over the frozen image with subclusters
      expect(chainOf(vm)).toEqual(["vm.qcow2", "vm.snap-1.qcow2", "base.raw"]);
      await sleep(500);
      await cli("merge", ...c, "--wait"); // written through the layer into the image with subclusters
      await sleep(300);
    });
    expect(chainOf(vm)).toEqual(["vm.qcow2", "base.raw"]);
    expect(JSON.parse(run("qemu-img", "info", "-U", "--output=json", vm))["format-specific"].data["extended-l2"]).toBe(true);
  });

  it("fio's verified writes survive a snapshot and a merge made while they run", async () => {
    const dir = tempDir();
    const vm = path.join(dir, "vm.qcow2");
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", vm, `${SIZE}`);
    const { srv, ctl, token } = await start(dir, vm);
    const c = ["vm", "--control", ctl, "--token-file", token];
    const fio = new Promise<string>((resolve, reject) => {
      const p = spawn(
        "fio",
        ["--name=verify", "--ioengine=nbd", `--uri=${srv.uri}`, "--rw=randwrite", "--bsrange=4k-64k", "--iodepth=16", `--size=${SIZE}`, "--rate=16m", // 2 s of writes: the snapshot and the merge come during them
         "--verify=crc32c", "--verify_state_save=0", "--verify_fatal=1", "--do_verify=1", "--output-format=json"],
        { stdio: ["ignore", "pipe", "pipe"] },
      );
      let out = "";
      let err = "";
      p.stdout.on("data", (d) => (out += d));
      p.stderr.on("data", (d) => (err += d));
      p.on("exit", (code) => (code === 0 ? resolve(out) : reject(new Error(`fio exited with ${code}: ${err}${out}`))));
    });
    await sleep(300);
    await cli("snapshot", ...c);
    await sleep(300);
    await cli("merge", ...c, "--wait", "--into-base"); // the snapshot has no backing file: it is the base
    const out = await fio;
    const job = JSON.parse(out.slice(out.indexOf("{"))).jobs[0];
    expect(job.error).toBe(0);
    expect(job.read.io_bytes).toBeGreaterThan(0); // the verify pass read it all back
    expect(chainOf(vm)).toEqual(["vm.qcow2", "vm.snap-1.qcow2"]);
    await srv.stop();
    for (const f of ["vm.qcow2", "vm.snap-1.qcow2"]) expect(run("qemu-img", "check", path.join(dir, f)), f).toMatch(/No errors were found/);
  });

  it("refuses what it cannot do, saying why", async () => {
    const dir = tempDir();
    const vm = path.join(dir, "vm.qcow2");
    run("qemu-img", "create", "-q", "-f", "qcow2", vm, "1M");
    const { srv, ctl, token } = await start(dir, vm);
    const c = ["vm", "--control", ctl, "--token-file", token];
    try {
      let r = await nbdstack("merge", ...c);
      expect(r.stderr).toContain(`${vm} has no backing file to merge into`);
      fs.writeFileSync(path.join(dir, "taken.qcow2"), "");
      r = await nbdstack("snapshot", ...c, "--as", "taken.qcow2");
      expect(r.stderr).toContain(`${path.join(dir, "taken.qcow2")} exists already`);
    } finally {
      await srv.stop();
    }
    const ro = await start(dir, vm, "--read-only");
    try {
      const r = await nbdstack("snapshot", "vm", "--control", ro.ctl, "--token-file", ro.token);
      expect(r.stderr).toContain("is served read-only");
    } finally {
      await ro.srv.stop();
    }
    // A cluster node opens its image anew at each hand-over: no online snapshot there (yet).
    const node = await start(dir, vm, "--node-id", "a", "--data-dir", path.join(dir, "data"));
    try {
      const r = await nbdstack("snapshot", "vm", "--control", node.ctl, "--token-file", node.token);
      expect(r.stderr).toContain(`409 the qcow2 image of cluster export "vm" has no online snapshot or merge`);
    } finally {
      await node.srv.stop();
    }
  });
});
