import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { execFileSync } from "node:child_process";
import { afterAll, describe, expect, it } from "vitest";
import { serve, tempDir } from "../helpers/serve.js";
import { needTools } from "../helpers/tools.js";

// A client that comes after others have gone is served by code V8 has already optimized: the
// request path is not deoptimized because the last requests are gone (see KEEPS_REQUEST_MAPS in
// protocol/request-parser.ts). Checked with V8's own trace (--trace-deopt): code dropped because
// hidden classes it was compiled against were collected is marked "reason: weak objects".

const dir = tempDir("nbdstack-warm-");
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

/** Functions of the request path (request-parser.ts, connection.ts, guard.ts). */
const REQUEST_PATH = ["Request", "<instance_members_initializer>", "feed", "start", "onRequest", "run", "execute", "reject", "checkRequest", "finalSend"];

describe.skipIf(!needTools("nbdcopy", "fio"))("code stays optimized from one client to the next", () => {
  it("nbdcopy, 1 MiB reads with fio, nbdcopy again: no function of the request path is deoptimized for collected hidden classes", async () => {
    const img = path.join(dir, "random.img");
    const fd = fs.openSync(img, "w");
    const chunk = Buffer.alloc(8 << 20);
    for (let i = 0; i < 16; i++) fs.writeSync(fd, crypto.randomFillSync(chunk));
    fs.closeSync(fd);
    // As the nbdstack command starts (its shebang), plus V8's trace of deoptimizations.
    const s = await serve([img, "--name", ""], 1, { MALLOC_MMAP_THRESHOLD_: "131072" }, ["--max-semi-space-size=1", "--trace-deopt"]);
    let trace: string;
    try {
      const copy = () => execFileSync("nbdcopy", [s.uri, "null:"], { stdio: "pipe" });
      copy();
      copy();
      execFileSync("fio", ["--name=r", "--ioengine=nbd", `--uri=${s.uri}`, "--rw=read", "--bs=1m", "--iodepth=8", "--runtime=1", "--time_based"], { stdio: "pipe" });
      copy();
    } finally {
      await s.stop();
      trace = s.stdout();
    }
    // The trace works: V8 printed deoptimizations (Node's own functions have some).
    expect(trace).toMatch(/\[bailout|\[marking dependent code/);
    const dropped = [...trace.matchAll(/\[marking dependent code \S+ <Code TURBOFAN> \(\S+ <SharedFunctionInfo ([^>]*)>\).*reason: weak objects\]/g)].map((m) => m[1]!);
    expect(dropped.filter((f) => REQUEST_PATH.includes(f))).toEqual([]);
  }, 60_000);
});
