import crypto from "node:crypto";
import { execFileSync, spawn, spawnSync, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { getStatus } from "../../src/control/control-client.js";
import { pollUntil } from "../helpers/migration.js";
import { CLI, controlUrl, serve, tempDir, type Served } from "../helpers/serve.js";
import { needTools } from "../helpers/tools.js";

// A command whose reader goes away (`nbdstack status URL | head -1`) must end quietly, as a Unix
// tool does; and the control API must not tell a caller without a token which routes exist.

interface Ended {
  status: number | null;
  signal: NodeJS.Signals | null;
  stderr: string;
}

const started = new Set<ChildProcess>();
afterAll(() => {
  for (const p of started) p.kill("SIGKILL");
});

/**
 * Runs the built CLI with the read end of its stdout (or stderr) closed before it prints anything:
 * the deterministic form of `| head -1` for output smaller than a pipe buffer.
 */
function withClosedPipe(args: string[], closed: "stdout" | "stderr" = "stdout"): Promise<Ended> {
  const p = spawn(process.execPath, [CLI, ...args], { stdio: ["ignore", "pipe", "pipe"] });
  started.add(p);
  p[closed]!.destroy();
  let stderr = "";
  if (closed !== "stderr") p.stderr!.on("data", (d) => (stderr += d));
  if (closed !== "stdout") p.stdout!.resume();
  return new Promise((resolve) =>
    p.once("close", (status, signal) => {
      started.delete(p);
      resolve({ status, signal, stderr });
    }),
  );
}

/** `nbdstack ARGS | READER` in bash: nbdstack's own exit status (not the reader's) and its stderr. */
function piped(args: string[], reader: string): Ended {
  const r = spawnSync("bash", ["-c", `"$@" | ${reader} >/dev/null; exit \${PIPESTATUS[0]}`, "bash", process.execPath, CLI, ...args], {
    encoding: "utf8",
    timeout: 30_000,
  });
  return { status: r.status, signal: r.signal, stderr: r.stderr };
}

/** Ended with exit status 0 and nothing on stderr: no "Unhandled 'error' event", no stack trace. */
function expectQuiet(r: Ended): void {
  expect(r.stderr).toBe("");
  expect(r).toMatchObject({ status: 0, signal: null });
}

describe("a closed pipe ends a command quietly", () => {
  let dir: string;
  let tokenFile: string;
  let img: string;
  let a: Served;
  let ctlA: string;
  beforeAll(async () => {
    dir = tempDir();
    tokenFile = path.join(dir, "token");
    img = path.join(dir, "disk.img");
    fs.writeFileSync(img, "");
    fs.truncateSync(img, 4 * 1024 * 1024);
    a = await serve([img, "--name", "disk", "--node-id", "a", "--fault", "--token-file", tokenFile], 2);
    ctlA = controlUrl(a);
    const token = fs.readFileSync(tokenFile, "utf8").trim();
    const res = await fetch(`${ctlA}/v1/exports/disk/faults`, {
      method: "POST",
      headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
      body: JSON.stringify({ add: "op=pread,errno=EIO,rate=0.0001" }),
    });
    expect(res.status).toBe(200);
  });
  afterAll(async () => {
    await a?.stop();
  });

  it("status URL | head -1", async () => {
    expectQuiet(await withClosedPipe(["status", ctlA]));
    expectQuiet(await withClosedPipe(["status", ctlA, "--json"]));
    expectQuiet(piped(["status", ctlA], "head -1"));
  });

  it("fault NAME --control URL --list | grep -q rule", async () => {
    expectQuiet(await withClosedPipe(["fault", "disk", "--control", ctlA, "--list", "--token-file", tokenFile]));
    expectQuiet(piped(["fault", "disk", "--control", ctlA, "--list", "--token-file", tokenFile], "grep -q rule"));
  });

  it("migrate, whose move still happens", async () => {
    const b = await serve([img, "--name", "disk", "--node-id", "b", "--token-file", tokenFile], 2);
    try {
      const ctlB = controlUrl(b);
      expectQuiet(await withClosedPipe(["migrate", "disk", "--from", ctlA, "--to", ctlB, "--token-file", tokenFile]));
      expect((await getStatus(ctlB)).exports.find((e) => e.name === "disk")).toMatchObject({ owner: "b", epoch: 2 });
      expectQuiet(await withClosedPipe(["migrate", "disk", "--from", ctlB, "--to", ctlA, "--token-file", tokenFile, "--json"]));
      expect((await getStatus(ctlA)).exports.find((e) => e.name === "disk")).toMatchObject({ owner: "a", epoch: 3 });
    } finally {
      await b.stop();
    }
  });

  it("migrate --copy whose progress nobody reads (stderr closed) still completes the move before it exits 0", async () => {
    const dataDir = path.join(dir, "b-data");
    const b = await serve(["--data-dir", dataDir, "--node-id", "b", "--control", "127.0.0.1:0", "--listen", "127.0.0.1:0", "--token-file", tokenFile], 1);
    try {
      const ctlB = controlUrl(b);
      // 4 MiB of data (zero runs would not travel) at 1 MiB/s: the progress bar (every 2 s when
      // stderr is not a terminal) writes to the closed stderr before the copy ends.
      fs.writeFileSync(img, crypto.randomBytes(4 * 1024 * 1024));
      const r = await withClosedPipe(["migrate", "disk", "--from", ctlA, "--to", ctlB, "--copy", "--max-rate", "1M", "--token-file", tokenFile], "stderr");
      expect(r).toMatchObject({ status: 0, signal: null });
      expect((await getStatus(ctlA)).exports.find((e) => e.name === "disk")).toMatchObject({ owner: "b", state: "REMOTE" });
      expect(fs.existsSync(path.join(dataDir, "disk.img.incomplete"))).toBe(false);
      // And back, so the tests after this one find a as the owner.
      const back = await withClosedPipe(["migrate", "disk", "--from", ctlB, "--to", ctlA, "--copy", "--token-file", tokenFile], "stderr");
      expect(back).toMatchObject({ status: 0, signal: null });
      expect((await getStatus(ctlA)).exports.find((e) => e.name === "disk")).toMatchObject({ owner: "a", state: "LOCAL" });
    } finally {
      await b.stop();
    }
  });

  it("bench prints its summary to nobody, and still fails a run that saw errors", async () => {
    const m = await serve(["memory:16M", "--name", "m", "--fault", "--token-file", tokenFile], 2);
    try {
      const bench = ["bench", m.uri, "--rw", "randread", "--qd", "4", "--duration", "200ms"];
      expectQuiet(await withClosedPipe(bench));
      expect(piped(["fault", "m", "--control", controlUrl(m), "--add", "op=pread,errno=EIO", "--token-file", tokenFile], "cat").status).toBe(0);
      const failed = await withClosedPipe(bench);
      expect(failed.stderr).toBe("");
      expect(failed).toMatchObject({ status: 1, signal: null });
    } finally {
      await m.stop();
    }
  });

  it("a failing command still fails when its stderr is closed", async () => {
    const r = await withClosedPipe(["status", "http://127.0.0.1:1"], "stderr");
    expect(r).toMatchObject({ status: 1, signal: null });
  });

  it("serve keeps serving when nobody reads the URIs it prints, and still shuts down cleanly", async () => {
    const sock = path.join(dir, "nbd.sock");
    const p = spawn(process.execPath, [CLI, "serve", "memory:4M", "memory:4M", "--name", "m", "--name", "n", "--socket", sock, "--log-format", "json"], { stdio: ["ignore", "pipe", "pipe"] });
    started.add(p);
    p.stdout!.destroy();
    let stderr = "";
    p.stderr!.on("data", (d) => (stderr += d));
    const exited = new Promise<number | null>((resolve) => p.once("exit", (code) => (started.delete(p), resolve(code))));
    try {
      await pollUntil("the socket", () => fs.existsSync(sock));
      await new Promise((r) => setTimeout(r, 300)); // the URIs are written (and refused) right after listening
      expect(p.exitCode, stderr).toBeNull();
      const magic = await new Promise<string>((resolve, reject) => {
        const s = net.connect(sock);
        let got = Buffer.alloc(0);
        s.on("data", (d) => {
          got = Buffer.concat([got, d]);
          if (got.length >= 8) {
            s.destroy();
            resolve(got.subarray(0, 8).toString("latin1"));
          }
        });
        s.on("error", reject);
      });
      expect(magic).toBe("NBDMAGIC");
      p.kill("SIGTERM");
      expect(await exited).toBe(0);
      expect(stderr).not.toMatch(/EPIPE|Unhandled/);
    } finally {
      if (p.exitCode === null) p.kill("SIGKILL");
    }
  });
});

describe.skipIf(!needTools("mkfs.ext4"))("a closed pipe ends the image commands quietly", () => {
  let img: string;
  beforeAll(() => {
    const dir = tempDir();
    const src = path.join(dir, "src");
    fs.mkdirSync(path.join(src, "etc"), { recursive: true });
    fs.writeFileSync(path.join(src, "etc", "hostname"), "node-1\n");
    fs.writeFileSync(path.join(src, "big.bin"), randomBytes(2 * 1024 * 1024));
    img = path.join(dir, "ext.img");
    fs.writeFileSync(img, "");
    fs.truncateSync(img, 16 * 1024 * 1024);
    execFileSync("mkfs.ext4", ["-q", "-F", "-L", "root", "-d", src, img], { stdio: "ignore" });
  });

  it("cat IMAGE:/file | head -c 100 (more than a pipe buffer: the reader leaves mid-file)", async () => {
    expectQuiet(piped(["cat", `${img}:/big.bin`], "head -c 100"));
    expectQuiet(await withClosedPipe(["cat", `${img}:/etc/hostname`]));
  });

  it("ls and inspect", async () => {
    expectQuiet(await withClosedPipe(["ls", `${img}:/`, "-l"]));
    expectQuiet(await withClosedPipe(["inspect", img]));
    expectQuiet(await withClosedPipe(["inspect", img, "--json"]));
    expectQuiet(await withClosedPipe(["inspect", img, "--free"]));
  });
});

describe("control calls without a token", () => {
  let srv: Served;
  let ctl: string;
  let token: string;
  beforeAll(async () => {
    const dir = tempDir();
    const tokenFile = path.join(dir, "token");
    const img = path.join(dir, "disk.img");
    fs.writeFileSync(img, "");
    fs.truncateSync(img, 4 * 1024 * 1024);
    srv = await serve([img, "--name", "disk", "--node-id", "a", "--fault", "--token-file", tokenFile], 2);
    ctl = controlUrl(srv);
    token = fs.readFileSync(tokenFile, "utf8").trim();
  });
  afterAll(async () => {
    await srv?.stop();
  });

  const call = async (method: string, p: string, auth?: string) => {
    const res = await fetch(`${ctl}${p}`, {
      method,
      headers: { "content-type": "application/json", ...(auth ? { authorization: auth } : {}) },
      body: method === "GET" || method === "HEAD" ? undefined : "{}",
    });
    return { status: res.status, text: await res.text() };
  };

  it("get 401 before anything says whether the route or the export exists", async () => {
    for (const [method, p] of [
      ["POST", "/v1/no-such-route"],
      ["POST", "/v1/exports/disk/no-such-action"],
      ["POST", "/v1/exports/no-such-export/migrate"],
      ["POST", "/v1/exports/no-such-export/faults"],
      ["POST", "/v1/exports/disk/faults"],
      ["PUT", "/v1/status"],
      ["DELETE", "/v1/exports/disk/faults"],
      ["PATCH", "/metrics"],
    ] as const) {
      for (const auth of [undefined, "Bearer wrong-token-wrong-token"]) {
        const r = await call(method, p, auth);
        expect({ method, p, auth, status: r.status }).toEqual({ method, p, auth, status: 401 });
        expect(r.text).not.toMatch(/route|no-such|disk/);
      }
    }
    // With the token, the same calls get their real answers.
    const bearer = `Bearer ${token}`;
    expect((await call("POST", "/v1/no-such-route", bearer)).status).toBe(404);
    expect((await call("PUT", "/v1/status", bearer)).status).toBe(404);
    expect((await call("POST", "/v1/exports/no-such-export/faults", bearer)).status).toBe(404);
    expect((await call("POST", "/v1/exports/disk/faults", bearer)).status).toBe(400);
  });

  it("status and metrics stay open", async () => {
    expect((await call("GET", "/v1/status")).status).toBe(200);
    expect((await call("GET", "/metrics")).status).toBe(200);
  });
});
