import { execFileSync } from "node:child_process";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { randomImage, serve, tempDir, type Served } from "../helpers/serve.js";
import { nbdsh, needTools } from "../helpers/tools.js";

const nbdinfo = (...args: string[]) => execFileSync("nbdinfo", args, { encoding: "utf8" });

describe.skipIf(!needTools("nbdinfo", "nbdsh"))("nbdinfo", () => {
  let srv: Served;
  let ro: Served;
  let dir: string;
  beforeAll(async () => {
    dir = tempDir();
    randomImage(path.join(dir, "disk.img"), 4 * 1024 * 1024);
    srv = await serve([path.join(dir, "disk.img"), "memory:64M", "--name", "disk", "--name", "scratch"], 2);
    ro = await serve([path.join(dir, "disk.img"), "--read-only"]);
  });
  afterAll(async () => {
    await srv?.stop();
    await ro?.stop();
  });

  it("sees truthful flags, block sizes and base:allocation on a file export", () => {
    const info = JSON.parse(nbdinfo("--json", srv.uris[0]!));
    expect(info.protocol).toBe("newstyle-fixed");
    expect(info.structured).toBe(true);
    const e = info.exports[0];
    expect(e["export-name"]).toBe("disk");
    expect(e["export-size"]).toBe(4 * 1024 * 1024);
    expect(e.contexts).toEqual(["base:allocation", "qemu:allocation-depth"]);
    expect(e).toMatchObject({
      is_rotational: false,
      is_read_only: false,
      can_flush: true,
      can_fua: true,
      can_multi_conn: true,
      can_cache: true,
      can_df: true,
      can_zero: true,
      can_fast_zero: true,
      can_trim: true, // holes punched with util-linux fallocate (file port)
      block_size_minimum: 1,
      block_size_preferred: 4096,
      block_size_maximum: 32 * 1024 * 1024,
    });
  });

  it("sees a read-only export as read-only", () => {
    const e = JSON.parse(nbdinfo("--json", ro.uri)).exports[0];
    expect(e).toMatchObject({ is_read_only: true, can_zero: false, can_trim: false, can_fua: false, can_flush: false });
  });

  it("lists every export with a description of its stack", () => {
    const info = JSON.parse(nbdinfo("--json", "--list", srv.uris[0]!));
    const names = info.exports.map((e: { "export-name": string }) => e["export-name"]);
    expect(names).toEqual(["disk", "scratch"]);
    expect(info.exports[0].description).toMatch(/^disk → file:.*disk\.img$/);
    expect(info.exports[1].description).toBe("disk → memory:67108864");
    expect(info.exports[1]).toMatchObject({ can_trim: true, "export-size": 64 * 1024 * 1024 });
  });

  it("maps allocation: holes of a memory export, zero blocks of a file export", () => {
    nbdsh(srv.uris[1]!, "h.pwrite(b'x' * 4096, 1048576)");
    const mem = nbdinfo("--map", srv.uris[1]!).trim().split("\n").map((l) => l.trim().split(/\s+/).slice(0, 3).map(Number));
    expect(mem).toEqual([
      [0, 1048576, 3],
      [1048576, 65536, 0],
      [1048576 + 65536, 64 * 1048576 - 1048576 - 65536, 3],
    ]);
    // Zero a region of the file: its blocks read as zero and the map says so.
    nbdsh(srv.uris[0]!, "h.zero(65536, 131072)");
    const file = nbdinfo("--map", srv.uris[0]!).trim().split("\n").map((l) => l.trim().split(/\s+/).slice(0, 3).map(Number));
    expect(file).toEqual([
      [0, 131072, 0],
      [131072, 65536, 2],
      [196608, 4 * 1048576 - 196608, 0],
    ]);
  });
});
