import { execFile } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { randomImage, serve, sha256, tempDir, type Served } from "../helpers/serve.js";
import { debianEnv, needTools } from "../helpers/tools.js";
import { serverLogLines, until } from "../helpers/volumes.js";

const MiB = 1024 * 1024;
const run = promisify(execFile);

/**
 * Runs nbdcopy and counts, per export, the connections the server started transmission on for
 * it (its log: one "transmission started" line per connection). nbdcopy falls back to one
 * connection without a word when the server does not offer multi-conn, and opens no more
 * connections than threads (-T defaults to the number of cores), so the counting is what shows
 * that the copy really ran over 4 connections.
 */
async function copyCountingConnections(srv: Served, args: string[]): Promise<Record<string, number>> {
  const conn = (l: Record<string, unknown>) => (typeof l.conn === "number" ? l.conn : 0);
  const before = Math.max(0, ...serverLogLines(srv).map(conn));
  await run("nbdcopy", args, { env: debianEnv });
  // Every connection of the copy has been accepted (and has started transmission) before
  // nbdcopy could use it; wait until the server has logged the end of each of them too.
  const started = await until("the server to log the close of every connection of the copy", () => {
    const mine = serverLogLines(srv).filter((l) => conn(l) > before);
    const accepted = mine.filter((l) => l.msg === "connection accepted").map(conn);
    const closed = new Set(mine.filter((l) => l.msg === "connection closed").map(conn));
    if (accepted.length === 0 || accepted.some((c) => !closed.has(c))) return undefined;
    return mine.filter((l) => l.msg === "transmission started");
  });
  const perExport: Record<string, number> = {};
  for (const l of started) perExport[String(l.export)] = (perExport[String(l.export)] ?? 0) + 1;
  return perExport;
}

describe.skipIf(!needTools("nbdcopy"))("nbdcopy", () => {
  let dir: string;
  let srv: Served;
  beforeAll(async () => {
    dir = tempDir();
    randomImage(path.join(dir, "src.img"), 48 * MiB, 3);
    fs.writeFileSync(path.join(dir, "dst.img"), "");
    fs.truncateSync(path.join(dir, "dst.img"), 48 * MiB);
    srv = await serve([path.join(dir, "src.img"), path.join(dir, "dst.img"), "--name", "src", "--name", "dst"], 2);
  });
  afterAll(() => srv?.stop());

  it("copies out of an export with 4 connections, checksums equal", async () => {
    const out = path.join(dir, "out.img");
    expect(await copyCountingConnections(srv, ["-C", "4", "-T", "4", "--requests", "16", srv.uris[0]!, out])).toEqual({ src: 4 });
    expect(sha256(out)).toBe(sha256(path.join(dir, "src.img")));
  });

  it("copies into an export with 4 connections, checksums equal", async () => {
    expect(await copyCountingConnections(srv, ["-C", "4", "-T", "4", "--flush", path.join(dir, "src.img"), srv.uris[1]!])).toEqual({ dst: 4 });
    expect(sha256(path.join(dir, "dst.img"))).toBe(sha256(path.join(dir, "src.img")));
  });

  it("copies export to export without extents, 4 connections to each", async () => {
    fs.truncateSync(path.join(dir, "dst.img"), 0);
    fs.truncateSync(path.join(dir, "dst.img"), 48 * MiB);
    expect(await copyCountingConnections(srv, ["-C", "4", "-T", "4", "--no-extents", srv.uris[0]!, srv.uris[1]!])).toEqual({ src: 4, dst: 4 });
    expect(sha256(path.join(dir, "dst.img"))).toBe(sha256(path.join(dir, "src.img")));
  });
});
