import { execFileSync, spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { blankImage, controlUrl, randomImage, serve, sha256, tempDir, type Served } from "../helpers/serve.js";
import { debianEnv, nbdsh, needTools } from "../helpers/tools.js";
import { logLines, pollUntil } from "../helpers/wait.js";
import { DEFAULT_MAX_MEMORY } from "../../src/server/server.js";

const MiB = 1024 * 1024;

interface Loop {
  loop: number;
  pid: number | null;
  ready: boolean;
  connections: number;
  restarts: number;
}

async function loops(srv: Served): Promise<Loop[]> {
  const res = await fetch(`${controlUrl(srv)}/v1/status`);
  return ((await res.json()) as { loops: Loop[] }).loops;
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/**
 * Python for nbdsh: `connect()` opens a handle on URI; `loops()` the connections each event loop
 * serves (GET /v1/status); `on_worker(h)`, after connecting h alone, whether it went to loop 1.
 */
function prelude(uri: string, ctrl: string): string {
  return [
    "import json, urllib.request",
    `URI = ${JSON.stringify(uri)}`,
    `CTRL = ${JSON.stringify(ctrl)}`,
    "def loops(): return [l['connections'] for l in json.load(urllib.request.urlopen(CTRL + '/v1/status'))['loops']]",
    "def connect():",
    "    h = nbd.NBD()",
    "    h.set_uri_allow_local_file(True)", // tls-psk-file
    "    h.connect_uri(URI)",
    "    return h",
    "",
  ].join("\n");
}

/** A server of `args` with --threads 2 and a control API; `exports` URIs printed besides the control line. */
function threaded(args: string[], exports = 1): Promise<Served> {
  return serve([...args, "--threads", "2", "--control", "127.0.0.1:0"], exports + 1);
}

describe.skipIf(!needTools("nbdsh", "nbdcopy", "fio", "strace"))("serve --threads 2", () => {
  it("spreads connections over the event loops, whose writes and reads of one image are coherent", async () => {
    const img = blankImage(path.join(tempDir(), "disk.img"), 16 * MiB);
    const srv = await threaded([img, "--name", "disk"]);
    try {
      const worker = (await loops(srv))[1]!;
      expect(worker.pid).toBeGreaterThan(0);
      expect(worker.pid).not.toBe(srv.proc.pid);
      const fds = () => fs.readdirSync(`/proc/${srv.proc.pid}/fd`).length;
      const fdsBefore = fds();
      // The least busy loop takes each connection: two open at once are on different loops.
      const out = nbdsh(
        null,
        prelude(srv.uri, controlUrl(srv)) +
          [
            "h1 = connect(); a = loops()",
            "h2 = connect(); b = loops()",
            "h3 = connect(); h4 = connect(); c = loops()",
            "h1.pwrite(b'\\x11' * 65536, 0)",
            "assert h2.pread(65536, 0) == b'\\x11' * 65536",
            "h2.pwrite(b'\\x22' * 65536, 65536)",
            "assert h1.pread(65536, 65536) == b'\\x22' * 65536",
            "h3.pwrite(b'\\x33' * 4096, 4096)",
            "assert h4.pread(4096, 4096) == b'\\x33' * 4096",
            "print(json.dumps([a, b, c]))",
          ].join("\n"),
      );
      const [a, b, c] = JSON.parse(out.trim()) as number[][];
      expect([...a!].sort()).toEqual([0, 1]);
      expect(b).toEqual([1, 1]);
      expect(c).toEqual([2, 2]);
      // The worker says so itself.
      // (nbdsh ran synchronously: the server's log lines are read now.)
      const started = await pollUntil("four connections in the logs", () => {
        const lines = logLines(srv.stderr()).filter((l) => l.msg === "transmission started");
        return lines.length >= 4 && lines;
      });
      expect(started.filter((l) => l.loop === 1).length).toBe(2);
      expect(started.filter((l) => l.loop === undefined).length).toBe(2);
      await pollUntil("the connections to close", async () => (await loops(srv)).every((l) => l.connections === 0));
      // Metrics add up the requests of both loops: 3 writes, 3 reads.
      const metrics = await (await fetch(`${controlUrl(srv)}/metrics`)).text();
      expect(metrics).toMatch(/nbdstack_requests_total\{export="disk",op="write",result="ok"\} 3\n/);
      expect(metrics).toMatch(/nbdstack_requests_total\{export="disk",op="read",result="ok"\} 3\n/);
      expect(metrics).toMatch(/nbdstack_loop_connections\{loop="1"\} 0/);
      // The memory budget is every loop's: each has half of the default, and they add up to it.
      expect(metrics).toMatch(new RegExp(`nbdstack_memory_budget_limit_bytes ${DEFAULT_MAX_MEMORY}\n`));
      // The primary keeps no descriptor of the sockets it handed over.
      expect(fds()).toBeLessThanOrEqual(fdsBefore + 1);
    } finally {
      expect(await srv.stop()).toBe(0);
    }
  });

  it("fio over four connections: what one loop wrote, the other verifies", async () => {
    const img = blankImage(path.join(tempDir(), "disk.img"), 32 * MiB);
    const srv = await threaded([img, "--name", "disk"]);
    const fio = (...extra: string[]) => {
      const out = execFileSync("fio", ["--name=t", "--ioengine=nbd", `--uri=${srv.uri}`, "--numjobs=4", "--size=4m", "--offset_increment=4m", "--bs=4k", "--iodepth=16", "--verify=crc32c", "--verify_state_save=0", "--verify_fatal=1", "--output-format=json", ...extra], { encoding: "utf8" });
      return JSON.parse(out.slice(out.indexOf("{"))).jobs as Array<{ error: number; read: { io_bytes: number }; write: { io_bytes: number } }>;
    };
    try {
      // Writes only (their verify headers), then a second run that only reads and checks them over
      // four new connections, placed on the loops anew (the test above pins the cross-loop case).
      const w = fio("--rw=randwrite", "--do_verify=0");
      expect(w.every((j) => j.error === 0 && j.write.io_bytes === 4 * MiB)).toBe(true);
      const r = fio("--rw=randwrite", "--verify_only=1");
      expect(r.every((j) => j.error === 0 && j.read.io_bytes === 4 * MiB)).toBe(true);
      const started = await pollUntil("eight connections in the logs", () => {
        const lines = logLines(srv.stderr()).filter((l) => l.msg === "transmission started");
        return lines.length >= 8 && lines;
      });
      expect(started.filter((l) => l.loop === 1).length).toBeGreaterThanOrEqual(2);
      expect(started.filter((l) => l.loop === undefined).length).toBeGreaterThanOrEqual(2);
    } finally {
      expect(await srv.stop()).toBe(0);
    }
  });

  it("nbdcopy with multi-conn writes an image in over both loops and copies it out again, byte for byte", async () => {
    const dir = tempDir();
    const src = path.join(dir, "src.img");
    randomImage(src, 16 * MiB, 7);
    const img = blankImage(path.join(dir, "disk.img"), 16 * MiB);
    const srv = await threaded([img, "--name", "disk"]);
    try {
      execFileSync("nbdcopy", ["--connections=4", "--threads=4", src, srv.uri], { env: debianEnv });
      const out = path.join(dir, "out.img");
      execFileSync("nbdcopy", ["--connections=4", "--threads=4", srv.uri, out], { env: debianEnv });
      expect(sha256(out)).toBe(sha256(src));
      expect(sha256(img)).toBe(sha256(src));
      const started = await pollUntil("eight connections in the logs", () => {
        const lines = logLines(srv.stderr()).filter((l) => l.msg === "transmission started");
        return lines.length >= 8 && lines;
      });
      expect(started.filter((l) => l.loop === 1).length).toBeGreaterThanOrEqual(2);
    } finally {
      expect(await srv.stop()).toBe(0);
    }
  });

  it("a FLUSH on one loop makes the writes of the other durable: fdatasync of the shared image", async () => {
    const dir = tempDir();
    const img = blankImage(path.join(dir, "disk.img"), 16 * MiB);
    const srv = await threaded([img, "--name", "disk"]);
    const pids = (await loops(srv)).map((l) => l.pid!);
    // One tracer per process (-f: a FLUSH may run on a thread-pool thread).
    const tracers = pids.map((pid, i) => {
      const log = path.join(dir, `strace-${i}.log`);
      const p = spawn("strace", ["-f", "-e", "trace=fdatasync,fsync", "-o", log, "-p", String(pid)], { stdio: ["ignore", "ignore", "pipe"] });
      let err = "";
      p.stderr!.on("data", (d) => (err += d));
      return { p, log, err: () => err, exited: new Promise((r) => p.once("exit", r)) };
    });
    const syncs = (i: number) => (fs.existsSync(tracers[i]!.log) ? fs.readFileSync(tracers[i]!.log, "utf8").split("\n").filter((l) => /\b(fdatasync|fsync)\(\d+/.test(l) && !/resumed/.test(l)).length : 0);
    try {
      await pollUntil("strace to attach", () => tracers.every((t) => /attached/.test(t.err())), 10_000);
      const base = [syncs(0), syncs(1)];
      // h1 alone, then h2: one on each loop. Whichever loop writes, the other flushes.
      const out = nbdsh(
        null,
        prelude(srv.uri, controlUrl(srv)) +
          [
            "h1 = connect(); first = loops()",
            "h2 = connect()",
            "(hw, hp) = (h1, h2) if first[0] == 1 else (h2, h1)", // hw: on loop 0 (the primary), hp: on loop 1
            "hw.pwrite(b'\\x05' * 65536, 0)",
            "hp.pwrite(b'\\x06' * 65536, 65536)",
            "import time; time.sleep(0.3)",
            "print('before', flush=True)",
            "hp.flush()", // loop 1 syncs the primary's write
            "time.sleep(0.3)",
            "hw.flush()",
            "assert hw.pread(65536, 65536) == b'\\x06' * 65536",
          ].join("\n"),
      );
      expect(out).toContain("before");
      await pollUntil("both FLUSHes", () => syncs(0) >= base[0]! + 1 && syncs(1) >= base[1]! + 1, 10_000);
      // One fdatasync in each process, one per FLUSH; the writes made none.
      expect(syncs(0) - base[0]!).toBe(1);
      expect(syncs(1) - base[1]!).toBe(1);
      const lines = fs.readFileSync(tracers[1]!.log, "utf8");
      expect(lines).toMatch(/fdatasync\(\d+/);
    } finally {
      for (const t of tracers) t.p.kill("SIGINT");
      await Promise.all(tracers.map((t) => t.exited));
      expect(await srv.stop()).toBe(0);
    }
  });

  it("serves stateful exports (memory, cow overlay) from the primary alone, coherent over every connection", async () => {
    const dir = tempDir();
    const base = blankImage(path.join(dir, "base.img"), 8 * MiB);
    const before = sha256(base);
    const plain = blankImage(path.join(dir, "plain.img"), 8 * MiB);
    const srv = await threaded([base, "memory:8M", plain, "--name", "cow", "--name", "mem", "--name", "plain", "--overlay", path.join(dir, "ov.cow")], 3);
    try {
      const memUri = srv.uris.find((u) => u.endsWith("/mem"))!;
      const cowUri = srv.uris.find((u) => u.endsWith("/cow"))!;
      // A memory port lives in one process: were its connections spread, a write on one would
      // not be seen on another.
      for (const uri of [memUri, cowUri]) {
        const out = nbdsh(
          null,
          prelude(uri, controlUrl(srv)) +
            [
              "hs = [connect() for i in range(4)]",
              "print(json.dumps(loops()))",
              "for i, h in enumerate(hs): h.pwrite(bytes([i + 1]) * 4096, i * 4096)",
              "for h in hs:",
              "    for i in range(4): assert h.pread(4096, i * 4096) == bytes([i + 1]) * 4096",
              "hs[3].flush()",
            ].join("\n"),
        );
        expect(JSON.parse(out.trim())).toEqual([4, 0]);
      }
      expect(sha256(base)).toBe(before); // the cow export wrote into its overlay
      const status = (await (await fetch(`${controlUrl(srv)}/v1/status`)).json()) as { exports: Array<{ name: string }> };
      expect(status.exports.map((e) => e.name).sort()).toEqual(["cow", "mem", "plain"]);
      const started = logLines(srv.stderr()).find((l) => l.msg === "event loops");
      expect(started?.everyLoop).toEqual(["plain"]);
      expect([...started!.primaryOnly].sort()).toEqual(["cow", "mem"]);
    } finally {
      expect(await srv.stop()).toBe(0);
    }
  });

  it.skipIf(!needTools("psktool"))("keeps TLS sessions with the primary (a session cannot move between processes)", async () => {
    const dir = tempDir();
    const img = blankImage(path.join(dir, "disk.img"), 4 * MiB);
    const keys = path.join(dir, "keys.psk");
    execFileSync("psktool", ["-u", "alice", "-p", keys], { stdio: "ignore", env: debianEnv });
    const srv = await threaded([img, "--name", "disk", "--tls", "require", "--tls-psk", keys]);
    try {
      const port = new URL(srv.uri).port;
      const uri = `nbds://alice@127.0.0.1:${port}/disk?tls-psk-file=${keys}`;
      const out = nbdsh(null, prelude(uri, controlUrl(srv)) + ["hs = [connect() for i in range(3)]", "hs[0].pwrite(b'\\x0a' * 4096, 0)", "assert hs[2].pread(4096, 0) == b'\\x0a' * 4096", "print(json.dumps(loops()))"].join("\n"));
      expect(JSON.parse(out.trim())).toEqual([3, 0]);
    } finally {
      expect(await srv.stop()).toBe(0);
    }
  });

  it("stops every worker loop on SIGTERM, and a worker stops by itself when the primary is killed", async () => {
    const img = blankImage(path.join(tempDir(), "disk.img"), 4 * MiB);
    const a = await threaded([img, "--name", "disk"]);
    const workerA = (await loops(a))[1]!.pid!;
    expect(alive(workerA)).toBe(true);
    expect(await a.stop("SIGTERM")).toBe(0);
    expect(alive(workerA)).toBe(false);
    expect(logLines(a.stderr()).some((l) => l.loop === 1 && l.msg === "event loop stopping: finishing requests in flight")).toBe(true);

    const b = await threaded([img, "--name", "disk"]);
    const workerB = (await loops(b))[1]!.pid!;
    await b.stop("SIGKILL");
    // Its IPC channel closes with the primary: it finishes what it has and exits (no orphan).
    await pollUntil("the orphaned worker to exit", () => !alive(workerB), 10_000);
  });

  it("a worker that dies: its clients see the connection close, the data they had written stays, a new worker takes its place", async () => {
    const img = blankImage(path.join(tempDir(), "disk.img"), 8 * MiB);
    const srv = await threaded([img, "--name", "disk"]);
    try {
      const old = (await loops(srv))[1]!;
      const script = (body: string[]) => nbdsh(null, prelude(srv.uri, controlUrl(srv)) + body.join("\n"));
      const out = script([
        "h1 = connect(); first = loops()",
        "h2 = connect()",
        "hw = h1 if first[1] == 1 else h2", // the connection on the worker
        "hw.pwrite(b'\\x07' * 4096, 0)",
        `import os, signal; os.kill(${old.pid}, signal.SIGKILL)`,
        "import time; time.sleep(0.5)",
        "try:",
        "    hw.pread(4096, 0); print('still served')",
        "except nbd.Error as e:",
        "    print('closed')",
      ]);
      expect(out.trim()).toBe("closed");
      const now = await pollUntil("a new worker", async () => {
        const w = (await loops(srv))[1]!;
        return w.ready && w.pid !== old.pid && w.restarts === 1 ? w : undefined;
      });
      expect(alive(now.pid!)).toBe(true);
      await pollUntil("the death in the log", () => logLines(srv.stderr()).some((l) => l.msg === "event loop died: its connections are closed; starting another" && l.signal === "SIGKILL" && l.connectionsLost === 1));
      // The write it acknowledged is in the image (the kernel has it; the process held nothing),
      // and the new worker serves again.
      const after = script(["hs = [connect(), connect()]", "print(json.dumps(loops()))", "for h in hs: assert h.pread(4096, 0) == b'\\x07' * 4096"]);
      expect(JSON.parse(after.trim())).toEqual([1, 1]);
    } finally {
      expect(await srv.stop()).toBe(0);
    }
  });

  it("takes threads from the config file, spreads Unix-socket connections too; --threads 1 (the default) starts no worker", async () => {
    const dir = tempDir();
    const img = blankImage(path.join(dir, "disk.img"), 4 * MiB);
    const cfg = path.join(dir, "c.yaml");
    fs.writeFileSync(cfg, `threads: 2\nsocket: nbd.sock\nexports:\n  - name: disk\n    stack: "file:${img}"\n`);
    const a = await serve(["--config", cfg, "--control", "127.0.0.1:0"], 3); // the helper adds a TCP listener
    try {
      const unix = `nbd+unix:///disk?socket=${path.join(dir, "nbd.sock")}`;
      expect(a.uris).toContain(unix);
      const out = nbdsh(null, prelude(unix, controlUrl(a)) + ["h1 = connect(); h2 = connect()", "h1.pwrite(b'\\x09' * 4096, 0)", "assert h2.pread(4096, 0) == b'\\x09' * 4096", "print(json.dumps(loops()))"].join("\n"));
      expect(JSON.parse(out.trim())).toEqual([1, 1]);
    } finally {
      expect(await a.stop()).toBe(0);
    }
    const b = await serve([img, "--name", "disk", "--control", "127.0.0.1:0"], 2);
    try {
      const children = spawnSync("ps", ["--ppid", String(b.proc.pid), "-o", "pid="], { encoding: "utf8", env: debianEnv }).stdout.trim();
      expect(children).toBe("");
      const status = (await (await fetch(`${controlUrl(b)}/v1/status`)).json()) as { loops?: unknown };
      expect(status.loops).toBeUndefined();
    } finally {
      expect(await b.stop()).toBe(0);
    }
  });
});
