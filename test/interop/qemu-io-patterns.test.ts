import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { serve, tempDir, type Served } from "../helpers/serve.js";
import { needTools } from "../helpers/tools.js";

const MiB = 1024 * 1024;

/** Runs qemu-io commands; fails the test if any command reports a failure or a pattern mismatch. */
function qemuIo(uri: string, ...cmds: string[]): string {
  const out = execFileSync("qemu-io", ["-f", "raw", ...cmds.flatMap((c) => ["-c", c]), uri], { encoding: "utf8" });
  if (/Pattern verification failed|failed:|error/i.test(out)) throw new Error(`qemu-io reported a failure:\n${out}`);
  return out;
}

describe.skipIf(!needTools("qemu-io"))("qemu-io", () => {
  let dir: string;
  let srv: Served;
  beforeAll(async () => {
    dir = tempDir();
    fs.writeFileSync(path.join(dir, "disk.img"), Buffer.alloc(0));
    fs.truncateSync(path.join(dir, "disk.img"), 16 * MiB);
    srv = await serve([path.join(dir, "disk.img"), "memory:16M", "--name", "file", "--name", "mem"], 2);
  });
  afterAll(() => srv?.stop());

  for (const which of [0, 1]) {
    const label = which === 0 ? "file port" : "memory port";
    it(`writes and verifies patterns at unaligned offsets with FUA, zero and discard (${label})`, () => {
      const uri = srv.uris[which]!;
      qemuIo(uri, "write -P 0x11 1 511", "write -P 0x22 513 1000", "write -f -P 0x33 1234567 77777", "write -P 0x44 8191 2");
      qemuIo(uri, "read -P 0x11 1 511", "read -P 0x22 513 1000", "read -P 0x33 1234567 77777", "read -P 0x44 8191 2", "read -P 0 0 1");
      qemuIo(uri, "write -z 1234600 1000", "read -P 0 1234600 1000", "read -P 0x33 1234567 33", "read -P 0x33 1235600 76744");
      qemuIo(uri, "write -z -f 4M 1M", "read -P 0 4M 1M");
      qemuIo(uri, "write -P 0x55 6M 1M", "discard 6M 1M", "flush");
      qemuIo(uri, "aio_write -P 0x66 10M 64k", "aio_write -P 0x77 11M 64k", "aio_flush", "read -P 0x66 10M 64k", "read -P 0x77 11M 64k");
    });
  }

  it("reaches the image file itself through the file port", () => {
    const img = fs.readFileSync(path.join(dir, "disk.img"));
    expect(img.subarray(1, 512).every((b) => b === 0x11)).toBe(true);
    expect(img[0]).toBe(0);
    expect(img.subarray(1234567, 1234600).every((b) => b === 0x33)).toBe(true);
    expect(img.subarray(1234600, 1235600).every((b) => b === 0)).toBe(true);
    expect(img.subarray(10 * MiB, 10 * MiB + 65536).every((b) => b === 0x66)).toBe(true);
  });
});
