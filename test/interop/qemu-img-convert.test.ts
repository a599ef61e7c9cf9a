import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { randomImage, serve, sha256, tempDir, type Served } from "../helpers/serve.js";
import { needTools } from "../helpers/tools.js";

const MiB = 1024 * 1024;
const qemuImg = (...args: string[]) => execFileSync("qemu-img", args, { encoding: "utf8" });

describe.skipIf(!needTools("qemu-img"))("qemu-img", () => {
  let dir: string;
  let srv: Served;
  beforeAll(async () => {
    dir = tempDir();
    randomImage(path.join(dir, "src.img"), 24 * MiB, 7);
    // A source with holes too: zero the middle 8 MiB.
    const fd = fs.openSync(path.join(dir, "src.img"), "r+");
    fs.writeSync(fd, Buffer.alloc(8 * MiB), 0, 8 * MiB, 8 * MiB);
    fs.closeSync(fd);
    fs.writeFileSync(path.join(dir, "target.img"), Buffer.alloc(0));
    fs.truncateSync(path.join(dir, "target.img"), 24 * MiB);
    srv = await serve([path.join(dir, "src.img"), path.join(dir, "target.img"), "--name", "src", "--name", "target"], 2);
  });
  afterAll(() => srv?.stop());

  it("reads image info", () => {
    const info = JSON.parse(qemuImg("info", "--output=json", srv.uris[0]!));
    expect(info["virtual-size"]).toBe(24 * MiB);
    expect(info.format).toBe("raw");
  });

  it("converts out of an export (to raw and qcow2) and compares equal", () => {
    const out = path.join(dir, "out.raw");
    qemuImg("convert", "-O", "raw", srv.uris[0]!, out);
    expect(sha256(out)).toBe(sha256(path.join(dir, "src.img")));
    const q = path.join(dir, "out.qcow2");
    qemuImg("convert", "-O", "qcow2", srv.uris[0]!, q);
    qemuImg("compare", "-f", "raw", "-F", "qcow2", path.join(dir, "src.img"), q);
    qemuImg("compare", "-F", "raw", srv.uris[0]!, path.join(dir, "src.img"));
  });

  it("converts into an export and the file on disk matches", () => {
    qemuImg("convert", "-n", "-f", "raw", "-O", "raw", path.join(dir, "src.img"), srv.uris[1]!);
    qemuImg("compare", "-f", "raw", "-F", "raw", path.join(dir, "src.img"), srv.uris[1]!);
    expect(sha256(path.join(dir, "target.img"))).toBe(sha256(path.join(dir, "src.img")));
  });

  it("notices a difference", () => {
    const fd = fs.openSync(path.join(dir, "src.img"), "r+");
    fs.writeSync(fd, Buffer.from("changed"), 0, 7, 20 * MiB + 3);
    fs.closeSync(fd);
    let code = 0;
    try {
      qemuImg("compare", "-f", "raw", "-F", "raw", path.join(dir, "src.img"), srv.uris[1]!);
    } catch (e) {
      code = (e as { status: number }).status;
    }
    expect(code).toBe(1);
  });
});
