import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { NbdClient } from "../../src/client/nbd-client.js";
import { serve, tempDir, type Served } from "../helpers/serve.js";
import { debianEnv, needTools } from "../helpers/tools.js";
import { qemuIo } from "../helpers/volumes.js";

const MiB = 1024 * 1024;

/** What nbdinfo says of an export: its flags, and its allocation map. */
function nbdinfo(uri: string): { canTrim: boolean; map: Array<{ offset: number; length: number; type: number }> } {
  const info = JSON.parse(execFileSync("nbdinfo", ["--json", uri], { encoding: "utf8", env: debianEnv }));
  const map = JSON.parse(execFileSync("nbdinfo", ["--map", "--json", uri], { encoding: "utf8", env: debianEnv }));
  return { canTrim: info.exports[0].can_trim, map };
}

describe.skipIf(!needTools("qemu-io", "nbdinfo"))("qemu-io", () => {
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
    it(`writes and verifies patterns at unaligned offsets with FUA, zero and discard (${label})`, async () => {
      const uri = srv.uris[which]!;
      qemuIo(uri, "write -P 0x11 1 511", "write -P 0x22 513 1000", "write -f -P 0x33 1234567 77777", "write -P 0x44 8191 2");
      qemuIo(uri, "read -P 0x11 1 511", "read -P 0x22 513 1000", "read -P 0x33 1234567 77777", "read -P 0x44 8191 2", "read -P 0 0 1");
      qemuIo(uri, "write -z 1234600 1000", "read -P 0 1234600 1000", "read -P 0x33 1234567 33", "read -P 0x33 1235600 76744");
      qemuIo(uri, "write -z -f 4M 1M", "read -P 0 4M 1M");
      // What a discard does depends on what the export advertises (README, "What the server speaks").
      const { canTrim } = nbdinfo(uri);
      qemuIo(uri, "write -P 0x55 6M 1M", "discard 6M 1M", "flush");
      if (which === 0) {
        // File port: trim is offered and punches a hole (util-linux fallocate): the range reads as
        // zeroes and block status reports it zero; the data around it stays.
        expect(canTrim).toBe(true);
        qemuIo(uri, "read -P 0 6M 1M", "read -P 0x33 1235600 76744");
        const inRange = nbdinfo(uri).map.filter((e) => e.offset < 7 * MiB && e.offset + e.length > 6 * MiB);
        expect(inRange.length).toBeGreaterThan(0);
        for (const e of inRange) expect(e.type & 2).toBe(2); // ZERO
        // And a trim from our own client, acknowledged once punched.
        const u = new URL(uri);
        const c = await NbdClient.connect({ host: u.hostname, port: Number(u.port) }, { exportName: "file" });
        await c.pwrite(Buffer.alloc(MiB, 0x56), 6 * MiB);
        await c.trim(MiB, 6 * MiB);
        expect((await c.pread(4096, 6 * MiB)).every((b) => b === 0)).toBe(true);
        await c.disconnect();
      } else {
        // Memory port: trim is offered and frees the pages: the range reads as zeroes and block
        // status reports it a hole.
        expect(canTrim).toBe(true);
        qemuIo(uri, "read -P 0 6M 1M", "read -P 0x33 1235600 76744");
        const inRange = nbdinfo(uri).map.filter((e) => e.offset < 7 * MiB && e.offset + e.length > 6 * MiB);
        expect(inRange.length).toBeGreaterThan(0);
        for (const e of inRange) expect(e.type).toBe(3); // HOLE|ZERO
      }
      qemuIo(uri, "aio_write -P 0x66 10M 64k", "aio_write -P 0x77 11M 64k", "aio_flush", "read -P 0x66 10M 64k", "read -P 0x77 11M 64k");
    });
  }

  it("reaches the image file itself through the file port", () => {
    const img = fs.readFileSync(path.join(dir, "disk.img"));
    expect(img.subarray(1, 512).every((b) => b === 0x11)).toBe(true);
    expect(img[0]).toBe(0);
    expect(img.subarray(1234567, 1234600).every((b) => b === 0x33)).toBe(true);
    expect(img.subarray(1234600, 1235600).every((b) => b === 0)).toBe(true);
    expect(img.subarray(6 * MiB, 7 * MiB).every((b) => b === 0)).toBe(true); // the trim punched a hole there
    expect(img.subarray(10 * MiB, 10 * MiB + 65536).every((b) => b === 0x66)).toBe(true);
  });
});
