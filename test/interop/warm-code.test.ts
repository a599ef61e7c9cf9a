import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import { afterAll, describe, expect, it } from "vitest";
import { serve, tempDir } from "../helpers/serve.js";
import { needTools } from "../helpers/tools.js";

// A client that comes after others have gone is served by code V8 has already optimized: the
// request path is not deoptimized because the last requests are gone (see KEEPS_REQUEST_MAPS in
// protocol/request-parser.ts). Checked with V8's own trace (--trace-deopt): code dropped because
// hidden classes it was compiled against were collected is marked "reason: weak objects".

const run = promisify(execFile);
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
    // As the nbdstack command starts (its shebang), plus V8's traces of optimizations and deoptimizations.
    const s = await serve([img, "--name", ""], 1, { MALLOC_MMAP_THRESHOLD_: "131072" }, ["--max-semi-space-size=1", "--trace-deopt", "--trace-opt"]);
    let trace: string;
    try {
      // Run without blocking this process, which must keep reading the server's stdout: Node.js makes
      // that pipe non-blocking, so V8's traces written while it is full would be lost.
      const copy = () => run("nbdcopy", [s.uri, "null:"]);
      await copy();
      await copy();
      await run("fio", ["--name=r", "--ioengine=nbd", `--uri=${s.uri}`, "--rw=read", "--bs=1m", "--iodepth=8", "--loops=24"]);
      await copy();
    } finally {
      await s.stop();
      trace = s.stdout();
    }
    // The trace works and the check below means something: most of the request path was optimized
    // by TurboFan (a fixed count of requests, so that a slow machine compiles as much as a fast one).
    const optimized = [...trace.matchAll(/\[completed optimizing \S+ <JSFunction (.*?) \(sfi/g)].map((m) => m[1]!);
    expect(REQUEST_PATH.filter((f) => optimized.includes(f)).length).toBeGreaterThanOrEqual(5);
    const dropped = [...trace.matchAll(/\[marking dependent code \S+ <Code TURBOFAN> \(\S+ <SharedFunctionInfo ([^>]*)>\).*reason: weak objects\]/g)].map((m) => m[1]!);
    expect(dropped.filter((f) => REQUEST_PATH.includes(f))).toEqual([]);
  }, 60_000);
});
