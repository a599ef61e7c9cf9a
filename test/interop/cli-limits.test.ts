import net from "node:net";
import { describe, expect, it } from "vitest";
import { NbdClient } from "../../src/client/nbd-client.js";
import { serve } from "../helpers/serve.js";

const addrOf = (uri: string) => {
  const u = new URL(uri);
  return { host: u.hostname, port: Number(u.port) };
};
const logs = (stderr: string) =>
  stderr
    .trim()
    .split("\n")
    .map((l) => JSON.parse(l));

describe("connection limits", () => {
  it("refuses connections over the total and per-client limits, with a log line, and serves the others", async () => {
    const srv = await serve(["memory:1M", "--max-connections", "3", "--max-connections-per-client", "2"]);
    const addr = addrOf(srv.uri);
    const a = await NbdClient.connect(addr, { exportName: "memory" });
    const b = await NbdClient.connect(addr, { exportName: "memory" });
    await expect(NbdClient.connect(addr, { exportName: "memory" })).rejects.toThrow(); // third from 127.0.0.1
    await a.pwrite(Buffer.from("ok"), 0);
    expect((await b.pread(2, 0)).toString()).toBe("ok");
    await a.disconnect();
    // A slot is free again once the server has seen a's socket close.
    let c: NbdClient | null = null;
    for (let i = 0; i < 50 && !c; i++) {
      c = await NbdClient.connect(addr, { exportName: "memory" }).catch(() => null);
      if (!c) await new Promise((r) => setTimeout(r, 20));
    }
    expect(c).not.toBeNull();
    await c!.disconnect();
    await b.disconnect();
    await srv.stop();
    expect(logs(srv.stderr()).some((l) => l.msg === "refusing connection: limit reached" && /2 connections from 127\.0\.0\.1 \(max 2\)/.test(l.reason))).toBe(true);
  });

  it("closes a client that does not finish the handshake in time, and an idle connection", async () => {
    const srv = await serve(["memory:1M", "--handshake-timeout", "300ms", "--idle-timeout", "400ms"]);
    const addr = addrOf(srv.uri);
    const slow = net.connect(addr.port, addr.host);
    slow.resume();
    const t0 = Date.now();
    await new Promise((r) => slow.once("close", r));
    expect(Date.now() - t0).toBeGreaterThanOrEqual(250);
    expect(Date.now() - t0).toBeLessThan(5000);
    const idle = await NbdClient.connect(addr, { exportName: "memory" });
    await idle.pwrite(Buffer.alloc(512), 0); // activity, then nothing
    const t1 = Date.now();
    await idle.closed;
    expect(Date.now() - t1).toBeGreaterThanOrEqual(300);
    await srv.stop();
    const l = logs(srv.stderr());
    expect(l.some((x) => x.msg === "closing connection: handshake failed" && x.reason === "handshake not finished within 300 ms")).toBe(true);
    expect(l.some((x) => x.msg === "closing idle connection")).toBe(true);
  });
});
