// A QEMU guest made at test time from Debian packages, whose root file system is an nbdstack export.
// See test/vm/README.md. Used by test/vm/qemu-guest.test.ts and scripts/demo-vm.mjs.
import { execFileSync, spawn } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import zlib from "node:zlib";
import { fileURLToPath } from "node:url";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const GUEST_FILES = path.join(HERE, "guest");
/** The Debian packages the guest is made of (qemu-system-x86 and busybox-static installed; the kernel only downloaded). */
export const KERNEL_META = "linux-image-cloud-amd64";
export const TOOLS = ["qemu-system-x86_64", "mkfs.ext4", "e2fsck", "apt-get", "apt-cache", "dpkg"];
const BUSYBOX = "/bin/busybox";
/** The kernel modules the guest loads, with their dependencies found in each module's modinfo. */
const MODULES = ["virtio_pci", "virtio_blk"];
const env = { ...process.env, PATH: `/usr/sbin:/sbin:/usr/bin:/bin:${process.env.PATH ?? ""}`, LC_ALL: "C" };
const run = (cmd, args, o = {}) => execFileSync(cmd, args, { encoding: "utf8", env, stdio: ["ignore", "pipe", "pipe"], ...o });

function have(cmd) {
  try {
    run("sh", ["-c", `command -v ${cmd}`]);
    return true;
  } catch {
    return false;
  }
}

/** True when busybox is a static executable (no program interpreter): the one busybox-static installs. */
function staticBusybox() {
  try {
    const b = fs.readFileSync(BUSYBOX);
    if (b.toString("latin1", 1, 4) !== "ELF" || b[4] !== 2) return false;
    const phoff = Number(b.readBigUInt64LE(0x20));
    const phentsize = b.readUInt16LE(0x36);
    const phnum = b.readUInt16LE(0x38);
    for (let i = 0; i < phnum; i++) if (b.readUInt32LE(phoff + i * phentsize) === 3) return false; // PT_INTERP
    return true;
  } catch {
    return false;
  }
}

/** Why a guest cannot be made here, or null. */
export function guestUnavailable() {
  const missing = TOOLS.filter((t) => !have(t));
  if (missing.length) return `missing ${missing.join(", ")} (apt-get install qemu-system-x86 e2fsprogs)`;
  if (!staticBusybox()) return `${BUSYBOX} is not a static busybox (apt-get install busybox-static)`;
  return null;
}

/** True when a guest can be made; false (skip) locally when not; throws under CI=true, which must never skip it. */
export function needGuest() {
  const why = guestUnavailable();
  if (why === null) return true;
  if (process.env.CI === "true") throw new Error(`the QEMU guest cannot run under CI: ${why} (.ci/run must install it)`);
  console.warn(`skipping: ${why}`);
  return false;
}

/** The kernel package the metapackage points at, and its candidate version. */
function kernelPackage() {
  const deps = run("apt-cache", ["depends", KERNEL_META]);
  const name = /Depends: (linux-image-[^\s<>]+)/.exec(deps)?.[1];
  if (!name) throw new Error(`apt-cache depends ${KERNEL_META}: no linux-image package named:\n${deps}`);
  const show = run("apt-cache", ["show", "--no-all-versions", name]);
  const version = /^Version: (\S+)/m.exec(show)?.[1];
  if (!version) throw new Error(`apt-cache show ${name}: no version`);
  return { name, version };
}

/** A cpio "newc" archive (what the kernel unpacks as an initramfs) of `entries`: {name, mode, data?, target?}. */
export function cpioNewc(entries) {
  const parts = [];
  let ino = 1;
  const pad = (n) => Buffer.alloc((4 - (n % 4)) % 4);
  const put = (name, mode, data) => {
    const nameBuf = Buffer.from(`${name}\0`);
    const f = [ino++, mode, 0, 0, mode & 0o040000 ? 2 : 1, 0, data.length, 0, 0, 0, 0, nameBuf.length, 0];
    const header = Buffer.from(`070701${f.map((x) => x.toString(16).padStart(8, "0")).join("")}`, "latin1");
    parts.push(header, nameBuf, pad(header.length + nameBuf.length), data, pad(data.length));
  };
  for (const e of entries) {
    if (e.target !== undefined) put(e.name, 0o120777, Buffer.from(e.target));
    else if (e.data === undefined) put(e.name, 0o040000 | (e.mode ?? 0o755), Buffer.alloc(0));
    else put(e.name, 0o100000 | (e.mode ?? 0o644), e.data);
  }
  put("TRAILER!!!", 0, Buffer.alloc(0));
  return Buffer.concat(parts);
}

/** The modules (file paths) to load, dependencies first, found under a kernel's lib/modules/VERSION. */
function moduleOrder(modDir) {
  const byName = new Map();
  const walk = (d) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name.endsWith(".ko")) byName.set(e.name.slice(0, -3).replace(/-/g, "_"), p);
    }
  };
  walk(modDir);
  const builtin = new Set(
    fs
      .readFileSync(path.join(modDir, "modules.builtin"), "utf8")
      .split("\n")
      .filter(Boolean)
      .map((l) => path.basename(l, ".ko").replace(/-/g, "_")),
  );
  const order = [];
  const visit = (name) => {
    if (order.includes(name) || builtin.has(name)) return;
    const file = byName.get(name);
    if (!file) throw new Error(`kernel module ${name} neither built in nor in ${modDir}`);
    const info = fs.readFileSync(file).toString("latin1");
    const deps = /\0depends=([^\0]*)\0/.exec(info)?.[1] ?? "";
    for (const d of deps.split(",").filter(Boolean)) visit(d.replace(/-/g, "_"));
    order.push(name);
  };
  for (const m of MODULES) visit(m);
  return order.map((name) => ({ name, file: byName.get(name) }));
}

/**
 * The guest's kernel, initramfs and root file system template, built once per set of package
 * versions (and guest scripts) and cached under os.tmpdir(). Returns their paths.
 * @param {(line: string) => void} [log]
 */
export function buildGuest(log = (_line) => undefined) {
  const kernel = kernelPackage();
  const busybox = run("dpkg-query", ["-W", "-f", "${Version}", "busybox-static"]).trim();
  const h = crypto.createHash("sha256").update(`${kernel.name} ${kernel.version} busybox-static ${busybox}\n`);
  for (const f of fs.readdirSync(GUEST_FILES).sort()) h.update(f).update(fs.readFileSync(path.join(GUEST_FILES, f)));
  const key = h.digest("hex").slice(0, 16);
  const dir = path.join(os.tmpdir(), `nbdstack-guest-${key}`);
  const out = { dir, key, kernel: path.join(dir, "vmlinuz"), initrd: path.join(dir, "initrd.img"), rootfs: path.join(dir, "rootfs"), packages: { ...kernel, busybox } };
  if (fs.existsSync(path.join(dir, "ready"))) return out;

  const t0 = Date.now();
  const tmp = fs.mkdtempSync(`${dir}.build-`);
  try {
    log(`building the guest (${kernel.name} ${kernel.version}, busybox-static ${busybox}) in ${dir}`);
    run("apt-get", ["download", `${kernel.name}=${kernel.version}`], { cwd: tmp });
    const deb = fs.readdirSync(tmp).find((f) => f.endsWith(".deb"));
    if (!deb) throw new Error(`apt-get download ${kernel.name} left no .deb`);
    const x = path.join(tmp, "x");
    run("dpkg", ["-x", path.join(tmp, deb), x]);
    const vmlinuz = fs.readdirSync(path.join(x, "boot")).find((f) => f.startsWith("vmlinuz-"));
    if (!vmlinuz) throw new Error(`${deb} holds no /boot/vmlinuz-*`);
    const release = vmlinuz.slice("vmlinuz-".length);
    const config = fs.readFileSync(path.join(x, "boot", `config-${release}`), "utf8");
    for (const opt of ["CONFIG_EXT4_FS", "CONFIG_JBD2", "CONFIG_DEVTMPFS", "CONFIG_BLK_DEV_INITRD", "CONFIG_SERIAL_8250_CONSOLE"])
      if (!new RegExp(`^${opt}=y$`, "m").test(config)) throw new Error(`${release}: ${opt} is not built in; the initramfs would have to load it`);
    const mods = moduleOrder(path.join(x, "lib", "modules", release));

    const bb = fs.readFileSync(BUSYBOX);
    const script = (f) => fs.readFileSync(path.join(GUEST_FILES, f));
    const initramfs = [
      { name: "bin" }, { name: "dev" }, { name: "proc" }, { name: "sys" }, { name: "newroot" }, { name: "lib" }, { name: "lib/modules" },
      { name: "bin/busybox", data: bb, mode: 0o755 },
      { name: "bin/sh", target: "busybox" },
      { name: "init", data: script("init"), mode: 0o755 },
      { name: "modules.order", data: Buffer.from(mods.map((m) => `${m.name}.ko\n`).join("")) },
      ...mods.map((m) => ({ name: `lib/modules/${m.name}.ko`, data: fs.readFileSync(m.file) })),
    ];
    const stage = path.join(tmp, "out");
    fs.mkdirSync(stage);
    fs.copyFileSync(path.join(x, "boot", vmlinuz), path.join(stage, "vmlinuz"));
    fs.writeFileSync(path.join(stage, "initrd.img"), zlib.gzipSync(cpioNewc(initramfs)));

    // The root file system's content (mkfs.ext4 -d makes the export from it): busybox and a link
    // per applet, /sbin/init and the workload.
    const root = path.join(stage, "rootfs");
    for (const d of ["bin", "sbin", "dev", "proc", "sys", "tmp", "data", "etc"]) fs.mkdirSync(path.join(root, d), { recursive: true });
    fs.copyFileSync(BUSYBOX, path.join(root, "bin/busybox"));
    fs.chmodSync(path.join(root, "bin/busybox"), 0o755);
    for (const applet of run(BUSYBOX, ["--list"]).split("\n").filter(Boolean))
      if (applet !== "busybox") fs.symlinkSync("busybox", path.join(root, "bin", applet));
    fs.copyFileSync(path.join(GUEST_FILES, "rootinit"), path.join(root, "sbin/init"));
    fs.copyFileSync(path.join(GUEST_FILES, "workload"), path.join(root, "bin/workload"));
    fs.chmodSync(path.join(root, "sbin/init"), 0o755);
    fs.chmodSync(path.join(root, "bin/workload"), 0o755);
    fs.writeFileSync(path.join(root, "etc/guest-release"), `${kernel.name} ${kernel.version}\nbusybox-static ${busybox}\n`);
    fs.writeFileSync(path.join(stage, "ready"), `${JSON.stringify({ ...out.packages, release, modules: mods.map((m) => m.name) })}\n`);
    try {
      fs.renameSync(stage, dir);
    } catch (e) {
      if (!fs.existsSync(path.join(dir, "ready"))) throw e; // another process built it meanwhile
    }
    log(`guest built in ${((Date.now() - t0) / 1000).toFixed(1)} s: ${release}, modules ${mods.map((m) => m.name).join(" ")}`);
    return out;
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}

/** A fresh guest disk image: ext4 (with its journal) holding the guest's root file system. */
export function makeGuestDisk(guest, img, sizeMiB = 96) {
  fs.rmSync(img, { force: true });
  run("mkfs.ext4", ["-q", "-F", "-L", "guestroot", "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d", guest.rootfs, img, `${sizeMiB}M`]);
  return img;
}

/** `e2fsck -fn` of an image: { clean, output } (exit status 0 is clean). */
export function fsck(img) {
  try {
    return { clean: true, output: run("e2fsck", ["-fn", img]) };
  } catch (e) {
    return { clean: false, output: `${e.stdout ?? ""}${e.stderr ?? ""}`, status: e.status };
  }
}

/**
 * Boots the guest with its root on the NBD export `nbd://host:port/exportName` (QEMU's nbd
 * driver with `reconnect-delay`, virtio-blk), TCG, serial console captured. `params` go on the
 * kernel command line as guest.KEY=VALUE (mode, seconds, slow, files, rootflags). The guest is
 * SIGKILLed (by pid) after `timeoutMs`, which fails every wait with its console log.
 * `writeCache: false` gives the guest a write-through disk (QEMU sends every write with FUA). `launch`
 * starts QEMU elsewhere (in a lab host: `(cmd, args) => lab.spawn(h, cmd, args, { stdio: "pipe" })`;
 * stdin, stdout and stderr must be pipes).
 */
export function startGuest(guest, o) {
  const params = { mode: "run", ...(o.params ?? {}) };
  const append = [
    "console=ttyS0", "panic=-1", "loglevel=4", "mitigations=off", "random.trust_cpu=on", "8250.nr_uarts=1", "rdinit=/init",
    ...Object.entries(params).map(([k, v]) => `guest.${k}=${v}`),
  ].join(" ");
  const blockdev = [
    "driver=nbd", "server.type=inet", `server.host=${o.host ?? "127.0.0.1"}`, `server.port=${o.port}`, `export=${o.exportName}`,
    "node-name=d0", `reconnect-delay=${o.reconnectDelay ?? 10}`,
  ].join(",");
  const args = [
    "-accel", "tcg", "-M", "pc", "-m", String(o.memMiB ?? 256), "-smp", "1", "-nodefaults", "-no-user-config", "-no-reboot",
    "-display", "none", "-monitor", "none", "-serial", "stdio",
    "-kernel", guest.kernel, "-initrd", guest.initrd, "-append", append,
    "-blockdev", blockdev, "-device", `virtio-blk-pci,drive=d0${o.writeCache === false ? ",write-cache=off" : ""}`,
  ];
  const t0 = Date.now();
  const proc = o.launch ? o.launch("qemu-system-x86_64", args) : spawn("qemu-system-x86_64", args, { stdio: ["pipe", "pipe", "pipe"], env });
  proc.stdin.on("error", () => undefined);
  const lines = [];
  let partial = "";
  let stderr = "";
  const consoleFile = o.consoleFile ? fs.createWriteStream(o.consoleFile) : null;
  proc.stdout.on("data", (d) => {
    consoleFile?.write(d);
    partial += d.toString("latin1");
    const parts = partial.split("\n");
    partial = parts.pop();
    for (const p of parts) {
      const l = { t: Date.now(), text: p.replace(/\r/g, "") };
      lines.push(l);
      o.onLine?.(l);
    }
  });
  proc.stderr.on("data", (d) => (stderr += d));
  let timedOut = false;
  const exited = new Promise((resolve) =>
    proc.once("close", (code, signal) => {
      clearTimeout(timer);
      consoleFile?.end();
      resolve({ code, signal, timedOut, ms: Date.now() - t0 });
    }),
  );
  const timer = setTimeout(() => {
    timedOut = true;
    proc.kill("SIGKILL");
  }, o.timeoutMs ?? 120_000);
  const consoleText = () => [...lines.map((l) => l.text), partial].join("\n");
  const failure = (what) =>
    new Error(`${what}${timedOut ? " (the guest hung and was killed)" : ""}; qemu stderr: ${stderr.trim()}\n--- guest console ---\n${consoleText().slice(-20_000)}`);

  const g = {
    proc,
    args,
    append,
    lines,
    startedAt: t0,
    exited,
    console: consoleText,
    stderr: () => stderr,
    /** Waits for a console line matching `re` (from line index `from`); fails with the console log if QEMU ends or hangs first. */
    async waitFor(re, what = String(re), from = 0) {
      for (;;) {
        const hit = lines.slice(from).find((l) => re.test(l.text));
        if (hit) return hit;
        if (proc.exitCode !== null || proc.signalCode !== null) throw failure(`the guest ended before ${what}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    },
    /** Waits until QEMU exited (the guest powered off); fails with the console log if it hung. */
    async waitExit() {
      const r = await exited;
      if (r.timedOut) throw failure("the guest did not power off in time");
      return r;
    },
    /** Tells the workload to stop (a line on the serial console). */
    stop() {
      proc.stdin.write("stop\n");
    },
    kill() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGKILL");
    },
    failure,
    /**
     * Timed operations the guest reported: { t: host ms the line arrived, guestMs (its uptime when
     * it ended), op, ms, gapMs }. gapMs is the time since the operation before it ended: what the
     * workload waited for in all, the untimed steps between operations included (a stat, or
     * busybox paged in again after the page cache was dropped, waits for the disk too).
     */
    ops() {
      let prev = null;
      return lines.flatMap((l) => {
        const m = /^@ (\d+) (\w+) (\d+)$/.exec(l.text);
        if (!m) return [];
        const guestMs = Number(m[1]);
        const op = { t: l.t, guestMs, op: m[2], ms: Number(m[3]), gapMs: prev === null ? Number(m[3]) : guestMs - prev };
        prev = guestMs;
        return [op];
      });
    },
    /** The GUEST-SUMMARY line's fields (numbers where numeric), or null. */
    summary() {
      const l = lines.find((x) => x.text.startsWith("GUEST-SUMMARY "));
      return l ? parseFields(l.text) : null;
    },
    /** Lines starting with `prefix`. */
    grep(prefix) {
      return lines.filter((l) => l.text.startsWith(prefix)).map((l) => l.text);
    },
  };
  return g;
}

/**
 * "GUEST-X a=1 b=c" → { a: 1, b: "c" }.
 * @param {string} text
 * @returns {Record<string, any>}
 */
export function parseFields(text) {
  /** @type {Record<string, any>} */
  const out = {};
  for (const m of text.matchAll(/(\w+)=(\S+)/g)) out[m[1]] = /^-?\d+(\.\d+)?$/.test(m[2]) ? Number(m[2]) : m[2];
  return out;
}

/** The longest guest operation per window [from, to) of host time: what the guest saw of each event. */
export function longestIn(ops, from, to) {
  let best = null;
  for (const op of ops) if (op.t >= from && op.t < to && (!best || op.ms > best.ms)) best = op;
  return best;
}

/**
 * The longest guest operation in flight during [from, to] of host time (an operation that ended at
 * host time t after ms milliseconds ran over [t - ms, t]; `slackMs` covers the console's delay).
 */
export function longestDuring(ops, from, to, slackMs = 20) {
  let best = null;
  for (const op of ops) if (op.t - op.ms - slackMs <= to && op.t >= from && (!best || op.ms > best.ms)) best = op;
  return best;
}

/** The longest time without a completed guest operation (gapMs) that overlapped [from, to] of host time. */
export function longestGapDuring(ops, from, to, slackMs = 20) {
  let best = null;
  for (const op of ops) if (op.t - op.gapMs - slackMs <= to && op.t >= from && (!best || op.gapMs > best.gapMs)) best = op;
  return best;
}
