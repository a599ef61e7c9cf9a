import { spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { blankImage, serve, tempDir } from "../helpers/serve.js";
import { nbdsh, needTools } from "../helpers/tools.js";
import { pollUntil } from "../helpers/wait.js";

const MiB = 1024 * 1024;

/**
 * The kernel's page cache hides whether a FLUSH reached the disk: the data reads back either way,
 * even after the process died. strace sees the system calls: a FLUSH and a FUA write must each
 * make an fdatasync (or fsync) of the image, and a plain write none.
 */
describe.skipIf(!needTools("strace", "nbdsh"))("FLUSH and FUA at the system-call level", () => {
  it("calls fdatasync on the image for FLUSH, for a FUA write and at shutdown, and not for a plain write", async () => {
    const dir = tempDir();
    const img = blankImage(path.join(dir, "disk.img"), 4 * MiB);
    const srv = await serve([img, "--name", "disk"]);
    const log = path.join(dir, "strace.log");
    const tracer = spawn("strace", ["-f", "-e", "trace=fdatasync,fsync,sync_file_range", "-o", log, "-p", String(srv.proc.pid)], { stdio: ["ignore", "ignore", "pipe"] });
    let tracerErr = "";
    tracer.stderr!.on("data", (d) => (tracerErr += d));
    const tracerExit = new Promise<number | null>((r) => tracer.once("exit", (c) => r(c)));
    try {
      const syncs = () => (fs.existsSync(log) ? fs.readFileSync(log, "utf8").split("\n").filter((l) => /\b(fdatasync|fsync)\(\d+/.test(l) && !/resumed/.test(l)).length : 0);
      const until = (what: string, done: () => boolean) =>
        pollUntil(what, done, 10_000).catch((err: Error) => {
          throw new Error(`${err.message}: strace saw ${syncs()} syncs; strace: ${tracerErr}`);
        });
      // strace says "Process N attached with T threads" once it traces every thread of the server.
      await until("strace to attach", () => /attached/.test(tracerErr));
      const base = syncs();
      // A plain write makes no sync (nbdsh does not flush on disconnect). A sync it made would come
      // before its reply, so before the FLUSH's: the exact counts below would be one too high.
      nbdsh(srv.uri, 'h.pwrite(b"\\x01" * 65536, 0)');
      nbdsh(srv.uri, 'h.pwrite(b"\\x02" * 4096, 65536); h.flush()');
      await until("the FLUSH", () => syncs() >= base + 1);
      expect(syncs()).toBe(base + 1);
      nbdsh(srv.uri, 'h.pwrite(b"\\x03" * 4096, 131072, nbd.CMD_FLAG_FUA)');
      await until("the FUA write", () => syncs() >= base + 2);
      expect(syncs()).toBe(base + 2);
      expect(await srv.stop("SIGTERM")).toBe(0);
      await tracerExit;
      expect(syncs()).toBeGreaterThanOrEqual(base + 3); // the image is synced at shutdown
    } finally {
      tracer.kill("SIGINT");
      await srv.stop("SIGKILL");
    }
  });
});
