import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import { controlUrl, randomImage, serve, tempDir } from "../helpers/serve.js";
import { nbdsh, needTools } from "../helpers/tools.js";
import { nbdstack, until } from "../helpers/volumes.js";

const MiB = 1024 * 1024;
const run = (cmd: string, ...args: string[]) => execFileSync(cmd, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
const depthMap = (uri: string) => run("nbdinfo", "--map=qemu:allocation-depth", uri);
/** nbdinfo's map as [offset, length, depth] rows. */
const rows = (map: string) => map.trim().split("\n").map((l) => l.trim().split(/\s+/).slice(0, 3).map(Number));
/** qemu-img's own view of a server's depth map: QEMU's NBD client reads the context as if it were a bitmap (iotest 309). */
const qemuImgMap = (opts: string) => run("qemu-img", "map", "--output=json", "--image-opts", `driver=nbd,${opts},x-dirty-bitmap=qemu:allocation-depth`);
const nbdOpts = (uri: string) => {
  const u = new URL(uri);
  return `server.type=inet,server.host=${u.hostname},server.port=${u.port},export=${decodeURIComponent(u.pathname.slice(1))}`;
};

/** qemu-nbd on a Unix socket, persistent, with the qemu:allocation-depth context (-A). */
async function qemuNbd(dir: string, image: string, format: string): Promise<{ uri: string; opts: string; proc: ChildProcess }> {
  const sock = path.join(dir, `qemu-nbd-${path.basename(image)}.sock`);
  const proc = spawn("qemu-nbd", ["-r", "-A", "-t", "-f", format, "-k", sock, image], { stdio: "ignore" });
  await until("qemu-nbd's socket", () => (fs.existsSync(sock) ? true : undefined));
  return { uri: `nbd+unix:///?socket=${sock}`, opts: `server.type=unix,server.path=${sock}`, proc };
}

/**
 * The qemu:allocation-depth meta context against qemu-nbd's answers for the same images: a chain
 * of a short raw base, a qcow2 over it and a qcow2 on top (data, zero and discarded clusters in
 * each), a qcow2 without backing file, and a raw file.
 */
describe.skipIf(!needTools("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo", "nbdsh"))("qemu:allocation-depth", () => {
  let dir: string;
  const images: Array<{ file: string; format: string }> = [];
  beforeAll(() => {
    dir = tempDir();
    const base = path.join(dir, "base.raw");
    fs.writeFileSync(base, "");
    fs.truncateSync(base, 4 * MiB); // shorter than the images above it
    run("qemu-io", "-f", "raw", "-c", "write -P 1 0 1M", base);
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", path.join(dir, "mid.qcow2"), "8M");
    run("qemu-io", "-f", "qcow2", "-c", "write -P 2 1M 512k", "-c", "write -z 2M 128k", path.join(dir, "mid.qcow2"));
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", path.join(dir, "top.qcow2"));
    run("qemu-io", "-f", "qcow2", "-c", "write -P 3 64k 64k", "-c", "write -z 5M 64k", "-c", "discard 7M 64k", "-c", "write -P 4 7800k 8k", path.join(dir, "top.qcow2"));
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path.join(dir, "alone.qcow2"), "3M");
    run("qemu-io", "-f", "qcow2", "-c", "write -P 5 4k 8k", "-c", "write -z 1M 64k", path.join(dir, "alone.qcow2"));
    randomImage(path.join(dir, "plain.raw"), 2 * MiB, 3);
    images.push({ file: "top.qcow2", format: "qcow2" }, { file: "mid.qcow2", format: "qcow2" }, { file: "alone.qcow2", format: "qcow2" }, { file: "plain.raw", format: "raw" });
  });

  it("answers as qemu-nbd does (nbdinfo --map, qemu-img map), and LIST shows it", async () => {
    for (const { file, format } of images) {
      const image = path.join(dir, file);
      const q = await qemuNbd(dir, image, format);
      let want: string;
      let wantImg: string;
      try {
        want = depthMap(q.uri);
        wantImg = qemuImgMap(q.opts);
      } finally {
        q.proc.kill();
      }
      const srv = await serve(["--read-only", image]);
      try {
        expect(depthMap(srv.uri), file).toBe(want);
        expect(qemuImgMap(nbdOpts(srv.uri)), file).toBe(wantImg);
        expect(run("nbdinfo", "--list", srv.uri)).toMatch(/contexts:\s+base:allocation\s+qemu:allocation-depth/);
      } finally {
        await srv.stop();
      }
    }
  });

  it("is selected with base:allocation through nbdsh: one reply chunk per context, REQ_ONE on each", async () => {
    const srv = await serve(["--read-only", path.join(dir, "top.qcow2")]);
    try {
      const script = `
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:allocation-depth")
h.connect_uri(${JSON.stringify(srv.uri)})
assert h.can_meta_context("base:allocation") and h.can_meta_context("qemu:allocation-depth")
seen = {}
def f(ctx, off, ents, err):
    seen[ctx] = ents
h.block_status(2 * 1048576, 0, f)
print(seen["qemu:allocation-depth"])
print(seen["base:allocation"])
seen.clear()
h.block_status(2 * 1048576, 0, f, nbd.CMD_FLAG_REQ_ONE)
print(seen["qemu:allocation-depth"])
`;
      const out = nbdsh(null, "h = nbd.NBD()\n" + script).trim().split("\n");
      // [length, depth, …] (see the chain in beforeAll): the raw base, the top's write, the base, mid's write, the base.
      expect(out[0]).toBe("[65536, 3, 65536, 1, 917504, 3, 524288, 2, 524288, 3]");
      expect(out[1]).toBe("[1572864, 0, 524288, 2]"); // base:allocation, its own extents in the same reply
      expect(out[2]).toBe("[65536, 3]");
      // LIST of the qemu: namespace alone; SET of an unknown context selects nothing.
      const list = nbdsh(null, `
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(${JSON.stringify(srv.uri)})
names = []
h.add_meta_context("qemu:")
h.opt_list_meta_context(lambda n: names.append(n))
print(names)
h.clear_meta_contexts()
h.add_meta_context("qemu:dirty-bitmap:x")
h.opt_go()
print(h.can_meta_context("qemu:dirty-bitmap:x"), h.can_meta_context("qemu:allocation-depth"))
`);
      expect(list.trim().split("\n")).toEqual(["['qemu:allocation-depth']", "False False"]);
    } finally {
      await srv.stop();
    }
  });

  it("follows a cow overlay's snapshots down to the base", async () => {
    const d = tempDir();
    randomImage(path.join(d, "base.img"), 4 * MiB, 7);
    const token = path.join(d, "token");
    const srv = await serve([path.join(d, "base.img"), "--name", "vm", "--overlay", path.join(d, "vm.cow"), "--control", "127.0.0.1:0", "--token-file", token], 2);
    try {
      const ctl = controlUrl(srv);
      run("qemu-io", "-f", "raw", "-c", "write -P 1 0 64k", "-c", "flush", srv.uri);
      const snap = await nbdstack("snapshot", "vm", "--control", ctl, "--token-file", token);
      expect(snap.status, snap.stderr).toBe(0);
      run("qemu-io", "-f", "raw", "-c", "write -P 2 1M 64k", "-c", "write -z 2M 64k", srv.uri);
      // The overlay (1), the snapshot (2), the base (3).
      expect(rows(depthMap(srv.uri))).toEqual([
        [0, 65536, 2],
        [65536, 983040, 3],
        [1048576, 65536, 1],
        [1114112, 983040, 3],
        [2097152, 65536, 1],
        [2162688, 2031616, 3],
      ]);
    } finally {
      await srv.stop();
    }
  });

  it("is not offered where the stack cannot answer (a file inside a file system)", async () => {
    const d = tempDir();
    fs.mkdirSync(path.join(d, "root"));
    randomImage(path.join(d, "root/vm.img"), MiB, 9);
    const img = path.join(d, "fs.img");
    fs.writeFileSync(img, "");
    fs.truncateSync(img, 16 * MiB);
    execFileSync("mkfs.ext4", ["-q", "-F", "-d", path.join(d, "root"), img]);
    fs.writeFileSync(path.join(d, "c.yaml"), "exports:\n  - name: vm\n    stack: file:fs.img → file:/vm.img\n");
    const srv = await serve(["--config", path.join(d, "c.yaml")]);
    try {
      const list = run("nbdinfo", "--list", srv.uri);
      expect(list).toContain("base:allocation");
      expect(list).not.toContain("qemu:allocation-depth");
    } finally {
      await srv.stop();
    }
  });
});
