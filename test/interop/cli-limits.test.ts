import { execFile } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import { describe, expect, it } from "vitest";
import { NbdClient } from "../../src/client/nbd-client.js";
import { CLI, controlUrl, serve, tempDir, type Served, nbdAddress as addrOf } from "../helpers/serve.js";
import { logLines, optionFrame, rawConnect, until, waitForLog, within, type LogLine } from "../helpers/limits.js";

const run = promisify(execFile);
const MiB = 1024 * 1024;

/** `nbdstack fault NAME --control URL ARGS…`; resolves with its stdout. */
async function fault(srv: Served, tokenFile: string, ...args: string[]): Promise<string> {
  const { stdout } = await run(process.execPath, [CLI, "fault", "memory", "--control", controlUrl(srv), "--token-file", tokenFile, ...args], { encoding: "utf8" });
  return stdout;
}

/** What `nbdstack fault memory --release` does, without starting a process: returns the count released. */
async function release(srv: Served, tokenFile: string): Promise<number> {
  const r = await fetch(`${controlUrl(srv)}/v1/exports/memory/faults`, {
    method: "POST",
    headers: { authorization: `Bearer ${fs.readFileSync(tokenFile, "utf8").trim()}`, "content-type": "application/json" },
    body: JSON.stringify({ release: true }),
  });
  expect(r.status).toBe(200);
  return ((await r.json()) as { released: number }).released;
}

/** Requests a fault layer holds in a stall right now (the control API's counters; GET needs no token). */
async function stalledCount(srv: Served): Promise<number> {
  const r = await fetch(`${controlUrl(srv)}/v1/exports/memory/faults`);
  const v = (await r.json()) as { counts: { stalled: number } };
  return v.counts.stalled;
}

/** The client address the server sees (and logs as `peer`); read while the socket is open. */
const localPeer = (c: { socket: { localAddress?: string; localPort?: number } }) => `${c.socket.localAddress}:${c.socket.localPort}`;
/**
 * Waits for the line `msg` the server logged about the connection from `peer` (stderr may lag the
 * socket's close). Lines are matched by connection id: "transmission started" has a field of its own
 * named `peer` (true for another node's port B) that hides the address in the JSON.
 */
async function logged(srv: Served, peer: string, msg: string): Promise<LogLine> {
  const accepted = await waitForLog(srv.stderr, (l) => l.msg === "connection accepted" && l.peer === peer, `the connection from ${peer}`);
  return waitForLog(srv.stderr, (l) => l.conn === accepted.conn && l.msg === msg, `${msg} (${peer})`);
}

/** A connection refused by a limit: accepted by the kernel, then closed without a greeting. */
async function refused(addr: { host: string; port: number; localAddress?: string }): Promise<boolean> {
  const c = await rawConnect(addr);
  await within(c.closed.then(() => undefined).catch(() => undefined), 20_000, "the server to close a refused connection").catch(() => c.socket.destroy());
  return c.received().length === 0;
}

describe("connection limits", () => {
  it("refuses connections over the total and per-client limits, with a log line, and serves the others", async () => {
    const srv = await serve(["memory:1M", "--max-connections", "3", "--max-connections-per-client", "2"]);
    try {
      const addr = addrOf(srv.uri);
      const a = await NbdClient.connect(addr, { exportName: "memory" });
      const b = await NbdClient.connect(addr, { exportName: "memory" });
      // A third from 127.0.0.1 is over the per-client limit; from 127.0.0.2 it is the third in all.
      expect(await refused(addr)).toBe(true);
      const c = await rawConnect({ ...addr, localAddress: "127.0.0.2" });
      expect((await c.bytes(18)).subarray(0, 8).toString("latin1")).toBe("NBDMAGIC"); // greeted
      // A fourth, from yet another address, is over the total limit.
      expect(await refused({ ...addr, localAddress: "127.0.0.3" })).toBe(true);
      await a.pwrite(Buffer.from("ok"), 0);
      expect((await b.pread(2, 0)).toString()).toBe("ok");
      // A slot is free again once the server has seen a connection close.
      c.socket.destroy();
      let d: Awaited<ReturnType<typeof rawConnect>> | null = null;
      await until(async () => {
        const t = await rawConnect({ ...addr, localAddress: "127.0.0.3" });
        const greeted = await t.bytes(18).then(
          () => true,
          () => false,
        );
        if (greeted) d = t;
        return greeted;
      }, "a free slot after a connection closed");
      d!.socket.destroy();
      await a.disconnect();
      await b.disconnect();
      const refusal = (from: RegExp, reason: string) => waitForLog(srv.stderr, (l) => l.msg === "refusing connection: limit reached" && from.test(l.peer) && l.reason === reason, reason);
      await refusal(/^127\.0\.0\.1:/, "2 connections from 127.0.0.1 (max 2)");
      await refusal(/^127\.0\.0\.3:/, "3 connections open (max 3)");
    } finally {
      await srv.stop();
    }
  });

  it("closes a client that does not finish the handshake in time, and an idle connection, but none with a request in flight", async () => {
    const tokenFile = path.join(tempDir(), "token");
    const srv = await serve(["memory:1M", "--fault", "--handshake-timeout", "300ms", "--idle-timeout", "400ms", "--token-file", tokenFile], 2);
    try {
      const addr = addrOf(srv.uri);
      // Times come from the server's log, so a slow test machine cannot make them look short.
      const slow = await rawConnect(addr);
      const slowPeer = localPeer(slow);
      await within(slow.closed, 20_000, "the server to close a client that never finishes the handshake");
      const accepted = await logged(srv, slowPeer, "connection accepted");
      const gaveUp = await logged(srv, slowPeer, "closing connection: handshake failed");
      expect(gaveUp.reason).toBe("handshake not finished within 300 ms");
      expect(gaveUp.time - accepted.time).toBeGreaterThanOrEqual(297); // Node's timers count whole ms on the loop's clock and fire up to 2 ms early against it; Date.now() truncates both stamps

      // B has a write stalled in the stack; A only reads, then goes idle.
      await fault(srv, tokenFile, "--add", "op=pwrite,stall");
      const b = await NbdClient.connect(addr, { exportName: "memory" });
      const bPeer = localPeer(b);
      const held = b.pwrite(Buffer.alloc(512, 0xb), 0);
      await until(async () => (await stalledCount(srv)) === 1, "the write to stall");
      const a = await NbdClient.connect(addr, { exportName: "memory" });
      const aPeer = localPeer(a);
      await a.pread(512, 0);
      await within(a.closed, 20_000, "the server to close the idle connection");
      const started = await logged(srv, aPeer, "transmission started");
      const idled = await logged(srv, aPeer, "closing idle connection");
      expect(idled.idleMs).toBe(400);
      expect(idled.time - started.time).toBeGreaterThanOrEqual(399);
      // B has been silent longer than A, but its write is in flight: it stays open and gets its answer.
      expect(await fault(srv, tokenFile, "--release")).toMatch(/^released 1 stalled requests$/m);
      await held;
      await within(b.closed, 20_000, "the server to close B once it is idle");
      await logged(srv, bPeer, "closing idle connection");
    } finally {
      await fault(srv, tokenFile, "--clear").catch(() => undefined); // a failed run leaves no write stalled
      await srv.stop();
    }
  });
});

describe("the process-wide memory budget (--max-memory)", () => {
  it("admits only what fits in --max-memory across all connections, pauses the rest, and serves them all once memory is given back", async () => {
    const tokenFile = path.join(tempDir(), "token");
    const srv = await serve(["memory:64M", "--fault", "--max-memory", "4M", "--token-file", tokenFile, "--log-level", "trace"], 2);
    try {
      const addr = addrOf(srv.uri);
      await fault(srv, tokenFile, "--add", "op=pwrite,stall");
      // 4 connections, 4 writes of 1 MiB each: 16 MiB, well inside each connection's own caps.
      const clients = await Promise.all(Array.from({ length: 4 }, () => NbdClient.connect(addr, { exportName: "memory" })));
      const data = (c: number, i: number) => Buffer.alloc(MiB, c * 4 + i + 1);
      const writes = clients.flatMap((c, ci) => Array.from({ length: 4 }, (_, i) => c.pwrite(data(ci, i), (ci * 4 + i) * MiB)));
      // Each write also costs a little besides its payload: 3 of them fit in 4 MiB, not 4.
      await until(async () => (await stalledCount(srv)) === 3, "3 writes to stall");
      await new Promise((r) => setTimeout(r, 300));
      expect(await stalledCount(srv)).toBe(3); // no more came in
      await waitForLog(srv.stderr, (l) => l.msg === "pausing the socket" && l.cap === "memory", "a connection paused for memory");
      // Released wave after wave, every write gets in and is answered.
      let done = 0;
      for (const w of writes) void w.then(() => done++);
      await until(async () => {
        await release(srv, tokenFile);
        return done === 16;
      }, "every write to be answered");
      for (let ci = 0; ci < 4; ci++) for (let i = 0; i < 4; i++) expect((await clients[ci]!.pread(MiB, (ci * 4 + i) * MiB)).equals(data(ci, i))).toBe(true);
      const m = await (await fetch(`${controlUrl(srv)}/metrics`)).text();
      const metric = (name: string) => Number(m.split("\n").find((l) => l.startsWith(`${name} `))?.split(" ")[1]);
      expect(metric("nbdstack_memory_budget_limit_bytes")).toBe(4 * MiB);
      expect(metric("nbdstack_memory_budget_peak_bytes")).toBeLessThanOrEqual(4 * MiB + 4 * 256 * 1024);
      expect(metric("nbdstack_memory_budget_waits_total")).toBeGreaterThan(0);
      await Promise.all(clients.map((c) => c.disconnect()));
    } finally {
      await fault(srv, tokenFile, "--clear").catch(() => undefined);
      await srv.stop();
    }
  });

  it("takes max-memory from the config file, refuses a bad value, and the flag wins", async () => {
    const dir = tempDir();
    const cfg = path.join(dir, "c.yaml");
    fs.writeFileSync(cfg, "max-memory: 3M\nexports:\n  - name: memory\n    stack: memory:1M\n");
    const tokenFile = path.join(dir, "token");
    const limit = async (args: string[]) => {
      const srv = await serve(["--config", cfg, "--control", "127.0.0.1:0", "--token-file", tokenFile, ...args], 2);
      try {
        const m = await (await fetch(`${controlUrl(srv)}/metrics`)).text();
        return Number(m.split("\n").find((l) => l.startsWith("nbdstack_memory_budget_limit_bytes "))?.split(" ")[1]);
      } finally {
        await srv.stop();
      }
    };
    expect(await limit([])).toBe(3 * MiB);
    expect(await limit(["--max-memory", "5M"])).toBe(5 * MiB);
    fs.writeFileSync(cfg, "max-memory: lots\nexports:\n  - name: memory\n    stack: memory:1M\n");
    await expect(run(process.execPath, [CLI, "serve", "--config", cfg], { encoding: "utf8" })).rejects.toMatchObject({ stderr: expect.stringMatching(/max-memory: expected a size/) });
    await expect(run(process.execPath, [CLI, "serve", "memory:1M", "--max-memory", "0"], { encoding: "utf8" })).rejects.toMatchObject({ stderr: expect.stringMatching(/--max-memory must be above zero/) });
  });
});

describe("per-connection caps", () => {
  /**
   * Each write stalls in the fault layer until released, so what the server took off the socket is
   * what the fault layer holds. Wave after wave, the server must take exactly the cap, say why it
   * paused, and take the next ones only once the held ones are released and answered.
   */
  async function waves(srv: Served, tokenFile: string, c: NbdClient, o: { writes: number; size: number; perWave: number; cap: "requests" | "bytes"; from: number }) {
    const acks: number[] = [];
    const data = (i: number) => Buffer.alloc(o.size, (o.from + i) % 251);
    // Sent in one go (corked), so the server reads several requests in one chunk: it must still
    // start no more than the cap of them.
    c.socket.cork();
    const writes = Array.from({ length: o.writes }, (_, i) => c.pwrite(data(i), i * o.size).then(() => void acks.push(i)));
    c.socket.uncork();
    for (let k = 1; k * o.perWave <= o.writes; k++) {
      const stalled = o.from + k * o.perWave; // the fault layer's count since the server started
      await until(async () => (await stalledCount(srv)) === stalled, `wave ${k}: ${o.perWave} writes stalled`);
      expect(acks).toHaveLength((k - 1) * o.perWave); // nothing of this wave answered before its release
      // The release lets go of exactly the cap: the server took no more off the socket.
      expect(await release(srv, tokenFile)).toBe(o.perWave);
      await until(() => acks.length === k * o.perWave, `wave ${k}: the released writes answered`);
    }
    await Promise.all(writes);
    expect(await stalledCount(srv)).toBe(o.from + o.writes);
    for (let i = 0; i < o.writes; i++) expect((await c.pread(o.size, i * o.size)).equals(data(i))).toBe(true);
    // The server says which cap paused the socket, with what it had in flight then.
    const isPause = (l: LogLine) => l.msg === "pausing the socket" && l.cap === o.cap;
    await waitForLog(srv.stderr, (l) => isPause(l) && l.inflightBytes === o.perWave * o.size && l.inflight === o.perWave, `a pause at the ${o.cap} cap`);
    const pauses = logLines(srv.stderr()).filter(isPause);
    expect(pauses.every((l) => l.inflight <= o.perWave && l.inflightBytes <= o.perWave * o.size)).toBe(true);
  }

  it("takes no more than --max-inflight requests and --max-inflight-bytes off the socket, and skips options over 64 KiB", async () => {
    const tokenFile = path.join(tempDir(), "token");
    const srv = await serve(["memory:16M", "--fault", "--max-inflight", "3", "--max-inflight-bytes", "2M", "--token-file", tokenFile, "--log-level", "trace"], 2);
    try {
      const addr = addrOf(srv.uri);
      const c = await NbdClient.connect(addr, { exportName: "memory" });
      await fault(srv, tokenFile, "--add", "op=pwrite,stall");
      // 9 small writes sent at once: 3 at a time (the request cap).
      await waves(srv, tokenFile, c, { writes: 9, size: 4096, perWave: 3, cap: "requests", from: 0 });
      // 6 writes of 1 MiB: 2 at a time (the byte cap, 2 MiB, is reached before the request cap).
      await waves(srv, tokenFile, c, { writes: 6, size: MiB, perWave: 2, cap: "bytes", from: 9 });
      await c.disconnect();

      // Options: 64 KiB is the longest read (an unknown one gets ERR_UNSUP); one byte more is
      // skipped without being held and refused with ERR_TOO_BIG; over 32 MiB closes the connection
      // at once, without waiting for its data.
      const o = await rawConnect(addr);
      const oPeer = localPeer(o);
      await o.bytes(18);
      o.socket.write(Buffer.concat([Buffer.from([0, 0, 0, 3]), optionFrame(4242, Buffer.alloc(64 * 1024, 7))]));
      const reply = (await o.bytes(18 + 20)).subarray(18);
      expect([reply.readUInt32BE(8), reply.readUInt32BE(12)]).toEqual([4242, 0x80000001]); // NBD_REP_ERR_UNSUP
      const at = 18 + 20 + reply.readUInt32BE(16);
      o.socket.write(optionFrame(6, Buffer.alloc(64 * 1024 + 1, 7)));
      const big = (await o.bytes(at + 20)).subarray(at);
      expect([big.readUInt32BE(8), big.readUInt32BE(12)]).toEqual([6, 0x80000009]); // NBD_OPT_INFO, NBD_REP_ERR_TOO_BIG
      o.socket.write(optionFrame(4243, Buffer.alloc(0), 32 * 1024 * 1024 + 1));
      await within(o.closed, 20_000, "the server to close a connection that sent an option over 32 MiB");
      const closing = await logged(srv, oPeer, "closing connection: handshake failed");
      expect(closing.reason).toBe("option 4243 has length 33554433, over the limit of 33554432");
    } finally {
      await srv.stop();
    }
  });
});
