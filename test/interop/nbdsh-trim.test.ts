import { execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { serve, tempDir, type Served } from "../helpers/serve.js";
import { debianEnv, nbdsh, needPath, needRoot, needTools } from "../helpers/tools.js";

const MiB = 1024 * 1024;
/** Bytes the file system holds for a file (what `du` shows). */
const used = (file: string): number => fs.statSync(file).blocks * 512;
const nbdinfoJson = (uri: string) => JSON.parse(execFileSync("nbdinfo", ["--json", uri], { encoding: "utf8", env: debianEnv })).exports[0];

/** TRIM end to end: nbdsh (libnbd) trims, the image's allocated size (du) shrinks. */
describe.skipIf(!needTools("nbdsh", "nbdinfo", "qemu-img", "qemu-io", "fallocate", "sgdisk"))("TRIM through nbdsh", () => {
  const servers: Served[] = [];
  afterAll(async () => {
    for (const s of servers) await s.stop();
  });
  const start = async (args: string[], n = 1, env: NodeJS.ProcessEnv = {}) => {
    const s = await serve(args, n, env);
    servers.push(s);
    return s;
  };

  it("a raw file: trimmed range punched (du shrinks, size kept), data written after the trim reads back", async () => {
    const dir = tempDir();
    const img = path.join(dir, "raw.img");
    fs.writeFileSync(img, Buffer.alloc(16 * MiB, 0x5a));
    const srv = await start([img]);
    expect(nbdinfoJson(srv.uri).can_trim).toBe(true);
    const before = used(img);
    expect(before).toBeGreaterThanOrEqual(16 * MiB);
    const out = nbdsh(
      srv.uri,
      `
h.trim(8 * 1024 * 1024, 4 * 1024 * 1024)
h.pwrite(b"after" * 1000, 6 * 1024 * 1024)
print(h.pread(5000, 6 * 1024 * 1024) == b"after" * 1000, h.pread(4, 0) == b"ZZZZ", h.pread(4, 13 * 1024 * 1024) == b"ZZZZ")
`,
    ).trim();
    expect(out).toBe("True True True");
    expect(fs.statSync(img).size).toBe(16 * MiB);
    expect(used(img)).toBeLessThanOrEqual(before - 7 * MiB);
    await srv.stop();
    const file = fs.readFileSync(img);
    expect(file.toString("latin1", 6 * MiB, 6 * MiB + 5000)).toBe("after".repeat(1000));
  });

  it("a qcow2 image: trimmed clusters freed and punched at the flush, qemu-img check clean, later writes read back", async () => {
    const dir = tempDir();
    const img = path.join(dir, "vm.qcow2");
    execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", img, "32M"]);
    execFileSync("qemu-io", ["-f", "qcow2", "-c", "write -P 0x33 0 24M", img], { stdio: "ignore" });
    const srv = await start([img]);
    expect(nbdinfoJson(srv.uri).can_trim).toBe(true);
    const before = used(img);
    expect(before).toBeGreaterThanOrEqual(24 * MiB);
    const out = nbdsh(
      srv.uri,
      `
h.trim(16 * 1024 * 1024, 0)
h.flush()
h.pwrite(b"new!" * 16384, 1024 * 1024)
h.flush()
print(h.pread(65536, 1024 * 1024) == b"new!" * 16384, h.pread(4, 20 * 1024 * 1024) == b"3333")
`,
    ).trim();
    expect(out).toBe("True True");
    expect(used(img)).toBeLessThanOrEqual(before - 14 * MiB);
    await srv.stop();
    expect(execFileSync("qemu-img", ["check", img], { encoding: "utf8" })).toMatch(/No errors were found/);
    const dump = execFileSync("qemu-io", ["-f", "qcow2", "-c", "read -P 0x33 20M 4M", "-c", "read -P 0 0 1M", "-c", "read -P 0 2M 14M", img], { encoding: "utf8" });
    expect(dump).not.toMatch(/Pattern verification failed/);
  });

  it("a write racing a trim of the same range is never undone by the late punch (fallocate made slow)", async () => {
    const dir = tempDir();
    // A fallocate that takes a second: the punch is still pending when the write arrives.
    const bin = path.join(dir, "bin");
    fs.mkdirSync(bin);
    fs.writeFileSync(path.join(bin, "fallocate"), `#!/bin/sh\nsleep 1\nexec ${execFileSync("sh", ["-c", "command -v fallocate"], { encoding: "utf8" }).trim()} "$@"\n`, { mode: 0o755 });
    const img = path.join(dir, "race.img");
    fs.writeFileSync(img, Buffer.alloc(4 * MiB, 0x41));
    const srv = await start([img], 1, { PATH: `${bin}:${process.env.PATH}` });
    const out = nbdsh(
      srv.uri,
      `
import time
t = h.aio_trim(1024 * 1024, 0)
time.sleep(0.3)
w = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"B" * 65536)), 65536)
t0 = time.monotonic()
while h.aio_in_flight() > 0:
    h.poll(-1)
waited = time.monotonic() - t0
h.aio_command_completed(t)
h.aio_command_completed(w)
print(h.pread(65536, 65536) == b"B" * 65536, h.pread(4, 2 * 1024 * 1024) == b"AAAA", waited > 0.4)
`,
    ).trim();
    // The write read back, untouched data elsewhere, and the client did wait for the slow punch.
    expect(out).toBe("True True True");
    await srv.stop();
    const file = fs.readFileSync(img);
    expect(file.subarray(65536, 131072).every((b) => b === 0x42)).toBe(true);
  });

  it("--discard ignore: no export offers trim (can_trim false), and a trim is refused", async () => {
    const dir = tempDir();
    const img = path.join(dir, "raw.img");
    fs.writeFileSync(img, Buffer.alloc(4 * MiB, 1));
    const q = path.join(dir, "q.qcow2");
    execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", q, "8M"]);
    const srv = await start(["--discard", "ignore", img, q, "memory:8M"], 3);
    for (const uri of srv.uris) expect(nbdinfoJson(uri).can_trim).toBe(false);
    const out = nbdsh(srv.uri, `
try:
    h.trim(65536, 0)
    print("trimmed")
except nbd.Error as e:
    print("refused", e.errno)
`).trim();
    expect(out).toMatch(/^refused/);
    expect(used(img)).toBeGreaterThanOrEqual(4 * MiB);
  });

  it("volumes pass trims to their legs (concat maps the range, mirror trims every leg), a partition at its offset", async () => {
    const dir = tempDir();
    for (const f of ["c1", "c2", "m1", "m2", "p"]) fs.writeFileSync(path.join(dir, `${f}.img`), Buffer.alloc(8 * MiB, 0x11));
    execFileSync("sgdisk", ["-n", "1:2048:+4M", path.join(dir, "p.img")], { stdio: "ignore" });
    fs.writeFileSync(
      path.join(dir, "v.yaml"),
      ["exports:", "  - name: cat", "    stack: [{concat: [file:c1.img, file:c2.img]}]", "  - name: mir", "    stack: [{mirror: [file:m1.img, file:m2.img]}]", "  - name: part", "    stack: file:p.img → partition:1", ""].join("\n"),
    );
    const srv = await start(["--config", path.join(dir, "v.yaml")], 3);
    const uri = (n: string) => srv.uris.find((u) => u.endsWith(`/${n}`))!;
    const before = Object.fromEntries(["c1", "c2", "m1", "m2", "p"].map((f) => [f, used(path.join(dir, `${f}.img`))]));
    for (const n of ["cat", "mir", "part"]) expect(nbdinfoJson(uri(n)).can_trim).toBe(true);
    nbdsh(uri("cat"), "h.trim(4 * 1024 * 1024, 6 * 1024 * 1024)"); // 2 MiB of each leg
    nbdsh(uri("mir"), "h.trim(4 * 1024 * 1024, 0)");
    nbdsh(uri("part"), "h.trim(4 * 1024 * 1024, 0)");
    for (const f of ["c1", "c2"]) expect(used(path.join(dir, `${f}.img`))).toBeLessThanOrEqual(before[f]! - 2 * MiB);
    for (const f of ["m1", "m2", "p"]) expect(used(path.join(dir, `${f}.img`))).toBeLessThanOrEqual(before[f]! - 4 * MiB);
    // The partition's trim landed at its offset (1 MiB): the GPT before it is intact.
    const p = fs.readFileSync(path.join(dir, "p.img"));
    expect(p.toString("latin1", 512, 520)).toBe("EFI PART");
    expect(p.subarray(MiB, 5 * MiB).every((b) => b === 0)).toBe(true);
    expect(p.subarray(5 * MiB, 5 * MiB + 4096).every((b) => b === 0x11)).toBe(true);
  });

  it("the config file's discard key (top level, and per export over it)", async () => {
    const dir = tempDir();
    fs.writeFileSync(path.join(dir, "a.img"), Buffer.alloc(MiB));
    fs.writeFileSync(path.join(dir, "b.img"), Buffer.alloc(MiB));
    fs.writeFileSync(
      path.join(dir, "c.yaml"),
      ["discard: ignore", "exports:", "  - name: a", "    stack: file:a.img", "  - name: b", "    stack: file:b.img", "    discard: unmap", ""].join("\n"),
    );
    const srv = await start(["--config", path.join(dir, "c.yaml")], 2);
    expect(nbdinfoJson(srv.uris.find((u) => u.endsWith("/a"))!).can_trim).toBe(false);
    expect(nbdinfoJson(srv.uris.find((u) => u.endsWith("/b"))!).can_trim).toBe(true);
  });
});

/**
 * Mounts `dev` on `mnt` (options `opts`), runs `script` with $M set to the mount point, unmounts,
 * and returns what the script printed — all in a mount namespace of its own (`unshare --mount`).
 * Mounted in the test's own namespace, the file system was copied into every namespace another test
 * made meanwhile (each `ip netns exec` makes one): umount here then left the file system alive there,
 * still holding the loop device, and mounting it again failed ("already mounted", the kernel: "would
 * change RO state") until that other process exited, seconds later. Here the namespace ends with
 * the shell, and with it the file system, before execFileSync returns.
 */
function mounted(dev: string, mnt: string, opts: string, script: string): string {
  const sh = `set -e; mount ${opts ? `-o ${opts} ` : ""}"$DEV" "$M"; ${script}; umount "$M"`;
  return execFileSync("unshare", ["--mount", "--propagation", "private", "sh", "-c", sh], { encoding: "utf8", env: { ...process.env, DEV: dev, M: mnt } });
}

/** A guest's fstrim: ext4 on a loop device over nbdfuse; the loop driver's discards become NBD trims. */
describe.skipIf(
  !(
    needTools("nbdfuse", "fusermount3", "losetup", "mount", "unshare", "mkfs.ext4", "fstrim", "qemu-img") &&
    needPath("/dev/fuse", "FUSE device") &&
    needPath("/dev/loop-control", "loop devices") &&
    needRoot("mounting through a loop device")
  ),
)("fstrim through nbdfuse + a loop-mounted ext4", () => {
  for (const format of ["raw", "qcow2"] as const) {
    it(`gives the space of deleted files back to the ${format} image`, async () => {
      const dir = tempDir();
      const img = path.join(dir, `disk.${format === "raw" ? "img" : "qcow2"}`);
      if (format === "raw") fs.truncateSync((fs.writeFileSync(img, ""), img), 256 * MiB);
      else execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", img, "256M"]);
      const srv = await serve([img]);
      const fuseDir = path.join(dir, "fuse");
      const mnt = path.join(dir, "mnt");
      fs.mkdirSync(fuseDir);
      fs.mkdirSync(mnt);
      const fuse = spawn("nbdfuse", [path.join(fuseDir, "disk"), srv.uri], { stdio: "ignore", env: debianEnv });
      let loop = "";
      try {
        for (let i = 0; i < 100 && !fs.existsSync(path.join(fuseDir, "disk")); i++) await new Promise((r) => setTimeout(r, 100));
        loop = execFileSync("losetup", ["-f", "--show", path.join(fuseDir, "disk")], { encoding: "utf8" }).trim();
        execFileSync("mkfs.ext4", ["-q", "-E", "nodiscard", loop]);
        mounted(loop, mnt, "", `head -c ${64 * MiB} /dev/zero | tr '\\0' w > "$M/big"; echo kept > "$M/keep"; sync`);
        const full = used(img);
        expect(full).toBeGreaterThanOrEqual(64 * MiB);
        // qcow2 frees (and punches) clusters at the next flush: a sync of the mount sends one.
        mounted(loop, mnt, "", 'rm "$M/big"; sync; fstrim "$M"; sync -f "$M"');
        expect(used(img)).toBeLessThanOrEqual(full - 56 * MiB);
        expect(mounted(loop, mnt, "ro", 'cat "$M/keep"')).toBe("kept\n");
      } finally {
        if (loop) execFileSync("losetup", ["-d", loop]);
        try {
          execFileSync("fusermount3", ["-u", fuseDir]);
        } catch {
          fuse.kill();
        }
        await srv.stop();
      }
      if (format === "qcow2") expect(execFileSync("qemu-img", ["check", img], { encoding: "utf8" })).toMatch(/No errors were found/);
    }, 60_000);
  }
});
