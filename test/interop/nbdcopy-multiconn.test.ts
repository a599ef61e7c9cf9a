import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { randomImage, serve, sha256, tempDir, type Served } from "../helpers/serve.js";
import { needTools } from "../helpers/tools.js";

const MiB = 1024 * 1024;

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

  it("copies out of an export with 4 connections, checksums equal", () => {
    const out = path.join(dir, "out.img");
    execFileSync("nbdcopy", ["-C", "4", "--requests", "16", srv.uris[0]!, out]);
    expect(sha256(out)).toBe(sha256(path.join(dir, "src.img")));
  });

  it("copies into an export with 4 connections, checksums equal", () => {
    execFileSync("nbdcopy", ["-C", "4", "--flush", path.join(dir, "src.img"), srv.uris[1]!]);
    expect(sha256(path.join(dir, "dst.img"))).toBe(sha256(path.join(dir, "src.img")));
  });

  it("copies export to export without extents", () => {
    fs.truncateSync(path.join(dir, "dst.img"), 0);
    fs.truncateSync(path.join(dir, "dst.img"), 48 * MiB);
    execFileSync("nbdcopy", ["-C", "4", "--no-extents", srv.uris[0]!, srv.uris[1]!]);
    expect(sha256(path.join(dir, "dst.img"))).toBe(sha256(path.join(dir, "src.img")));
  });
});
