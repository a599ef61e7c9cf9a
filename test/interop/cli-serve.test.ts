import { execFileSync, spawnSync } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { NbdClient } from "../../src/client/nbd-client.js";
import { blankImage, CLI, controlUrl, nbdAddress, ROOT, serve, tempDir } from "../helpers/serve.js";
import { debianEnv, needTools } from "../helpers/tools.js";
import { within } from "../helpers/limits.js";

const MiB = 1024 * 1024;

describe("nbdstack CLI", () => {
  it("documents every serve flag in --help, and every flag of --help in the README", () => {
    const top = execFileSync(process.execPath, [CLI, "--help"], { encoding: "utf8" });
    expect(top).toMatch(/serve \[options\] \[images\.\.\.\]/);
    const help = execFileSync(process.execPath, [CLI, "serve", "--help"], { encoding: "utf8" });
    // Commander puts each option at the start of a line indented by two spaces (wrapped
    // descriptions are indented further): "  -l, --listen <host:port>  …".
    const helpFlags = new Set([...help.matchAll(/^ {2}(?:-\w, )?(--[\w-]+)/gm)].map((m) => m[1]!));
    helpFlags.delete("--help");
    // The README's table under "### `nbdstack serve [options] [images...]`": flags of its first column.
    const readme = fs.readFileSync(path.join(ROOT, "README.md"), "utf8");
    const section = readme.slice(readme.indexOf("### `nbdstack serve [options] [images...]`"));
    const firstCells = (text: string) =>
      text
        .split("\n")
        .filter((l) => l.startsWith("|") && !/^\|\s*-+\s*\|/.test(l))
        .map((l) => l.split("|")[1]!);
    const flagsIn = (cells: string[]) => new Set(cells.flatMap((c) => [...c.matchAll(/--[\w-]+/g)].map((m) => m[0])));
    const table = flagsIn(firstCells(section.slice(0, section.indexOf("\n## "))));
    expect(table.size).toBeGreaterThanOrEqual(28); // the parsing found the table
    for (const flag of table) expect(helpFlags, `README's serve table names ${flag}`).toContain(flag);
    // Every flag serve --help shows is documented in some README table (the cluster ones, such as
    // --node-id and --lease-ttl, are in "Moving a live export to another node").
    const documented = flagsIn(firstCells(readme));
    for (const flag of helpFlags) expect(documented, `serve --help shows ${flag}`).toContain(flag);
    expect(helpFlags.size).toBeGreaterThanOrEqual(32); // and the options
  });

  it("fails with a clear message on a missing image or bad arguments", () => {
    const missing = spawnSync(process.execPath, [CLI, "serve", "/nonexistent/disk.img", "--listen", "127.0.0.1:0"], { encoding: "utf8" });
    expect(missing.status).toBe(1);
    expect(missing.stderr).toMatch(/ENOENT.*\/nonexistent\/disk\.img/);
    const nothing = spawnSync(process.execPath, [CLI, "serve"], { encoding: "utf8" });
    expect(nothing.status).toBe(1);
    expect(nothing.stderr).toMatch(/nothing to serve/);
    const badSize = spawnSync(process.execPath, [CLI, "serve", "memory:lots"], { encoding: "utf8" });
    expect(badSize.stderr).toMatch(/cannot read "lots" as a size/);
  });

  it("nbdstack status shows a plain server (no --node-id): its exports, not a node's fields", async () => {
    const tokenFile = path.join(tempDir(), "token");
    const srv = await serve(["memory:2M", "--name", "m", "--control", "127.0.0.1:0"], 2, { NBDSTACK_TOKEN_FILE: tokenFile }); // the URI, then the control line
    try {
      const r = spawnSync(process.execPath, [CLI, "status", controlUrl(srv)], { encoding: "utf8", env: { ...process.env, NBDSTACK_TOKEN_FILE: tokenFile } });
      expect(r.stderr).toBe("");
      expect(r.status).toBe(0);
      expect(r.stdout).not.toMatch(/undefined/);
      expect(r.stdout).toMatch(/^server \(not a cluster node\)/);
      expect(r.stdout).toMatch(/^m\s+2097152\s+disk → memory:2097152$/m);
    } finally {
      await srv.stop();
    }
  });

  it.skipIf(!needTools("nbdinfo"))("serves on a Unix socket and prints an nbd+unix URI", async () => {
    const sock = path.join(tempDir(), "nbd.sock");
    const srv = await serve(["memory:2M", "--socket", sock, "--name", "u"]);
    try {
      expect(srv.uri).toBe(`nbd+unix:///u?socket=${sock}`);
      expect(execFileSync("nbdinfo", ["--size", srv.uri], { encoding: "utf8", env: debianEnv }).trim()).toBe(String(2 * MiB));
      const c = await NbdClient.connect({ path: sock }, { exportName: "u" });
      expect(c.size).toBe(2 * MiB);
      await c.disconnect();
    } finally {
      expect(await srv.stop()).toBe(0);
    }
  });

  /**
   * A 16 MiB image served with --fault-powerloss, which keeps unflushed writes in the server's
   * memory (the page cache would survive the process and hide a missing flush), and a client.
   */
  async function powerLossServer() {
    const img = blankImage(path.join(tempDir(), "disk.img"), 16 * MiB);
    const srv = await serve([img, "--fault-powerloss"], 2);
    const c = await NbdClient.connect(nbdAddress(srv.uri), { exportName: "disk" });
    return { img, srv, c };
  }

  it("finishes and flushes writes in flight on SIGTERM, then exits 0", async () => {
    // Only the flush at shutdown puts the writes in the file.
    const { img, srv, c } = await powerLossServer();
    const writes = Array.from({ length: 64 }, (_, i) => c.pwrite(Buffer.alloc(128 * 1024, i + 1), i * 128 * 1024));
    await Promise.race(writes); // the server is busy with them
    const stopped = srv.stop("SIGTERM");
    const results = await Promise.allSettled(writes);
    const code = await stopped;
    expect(code).toBe(0);
    expect(srv.stderr()).toMatch(/shutting down/);
    // Every acknowledged write is in the file; anything not acknowledged was refused with ESHUTDOWN.
    const data = fs.readFileSync(img);
    results.forEach((r, i) => {
      if (r.status === "fulfilled") expect(data.subarray(i * 128 * 1024, (i + 1) * 128 * 1024).every((b) => b === i + 1)).toBe(true);
      else expect(r.reason).toMatchObject({ errno: "ESHUTDOWN" });
    });
    expect(results.filter((r) => r.status === "fulfilled").length).toBeGreaterThan(0);
  });

  it("loses unflushed writes on SIGKILL under --fault-powerloss (the control for the test above)", async () => {
    const { img, srv, c } = await powerLossServer();
    await c.pwrite(Buffer.alloc(128 * 1024, 0x77), 0);
    await srv.stop("SIGKILL");
    c.destroy();
    expect(fs.readFileSync(img).subarray(0, 128 * 1024).every((b) => b === 0)).toBe(true);
  });

  it("logs why it closed a connection that broke the protocol, and serves others on", async () => {
    const srv = await serve(["memory:1M"]);
    try {
      const u = new URL(srv.uri);
      const addr = { host: u.hostname, port: Number(u.port) };
      const good = await NbdClient.connect(addr, { exportName: "memory" });
      const bad = await NbdClient.connect(addr, { exportName: "memory" });
      bad.socket.write(Buffer.alloc(28, 0xee));
      await within(bad.closed, 20_000, "the server to close the connection that sent a bad magic");
      await good.pwrite(Buffer.from("fine"), 0);
      expect((await good.pread(4, 0)).toString()).toBe("fine");
      await good.disconnect();
      // A client that hangs up mid-handshake does not disturb the server either.
      const s = net.connect(addr.port, addr.host);
      await new Promise((r) => s.once("connect", r));
      s.resume(); // read the greeting and the server's end
      s.end(Buffer.from([0, 0]));
      await new Promise((r) => s.once("close", r));
    } finally {
      await srv.stop();
    }
    const lines = srv.stderr().trim().split("\n").map((l) => JSON.parse(l));
    expect(lines.some((l) => l.msg === "closing connection: protocol violation" && /bad request magic 0xeeeeeeee/.test(l.reason))).toBe(true);
    expect(lines.some((l) => l.msg === "closing connection: handshake failed")).toBe(true);
  });
});
