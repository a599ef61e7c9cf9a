import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { serve, tempDir, type Served } from "../helpers/serve.js";
import { needTools } from "../helpers/tools.js";

describe.skipIf(!needTools("fio"))("fio nbd engine", () => {
  let dir: string;
  let srv: Served;
  beforeAll(async () => {
    dir = tempDir();
    fs.writeFileSync(path.join(dir, "disk.img"), "");
    fs.truncateSync(path.join(dir, "disk.img"), 64 * 1024 * 1024);
    srv = await serve([path.join(dir, "disk.img"), "memory:64M", "--name", "file", "--name", "mem"], 2);
  });
  afterAll(() => srv?.stop());

  for (const which of [0, 1]) {
    it(`random writes at QD32 verify with crc32c (${which === 0 ? "file" : "memory"} port)`, () => {
      const out = execFileSync(
        "fio",
        [
          "--name=verify",
          "--ioengine=nbd",
          `--uri=${srv.uris[which]}`,
          "--rw=randwrite",
          "--bsrange=512-64k",
          "--iodepth=32",
          "--size=32m",
          "--verify=crc32c",
          "--verify_state_save=0",
          "--verify_fatal=1",
          "--do_verify=1",
          "--output-format=json",
        ],
        { encoding: "utf8" },
      );
      const job = JSON.parse(out.slice(out.indexOf("{"))).jobs[0];
      expect(job.error).toBe(0);
      expect(job.write.io_bytes).toBeGreaterThanOrEqual(32 * 1024 * 1024);
      expect(job.read.io_bytes).toBeGreaterThan(0); // the verify pass read it all back
    });
  }
});
