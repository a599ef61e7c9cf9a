import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { getStatus } from "../../src/control/control-client.js";
import { blankImage, controlUrl, serve, tempDir } from "../helpers/serve.js";
import { nbdsh, needTools } from "../helpers/tools.js";

const MiB = 1024 * 1024;
/** nbdsh lines that write `byte` × `len` at `off` (optionally with FUA), and that check it reads back. */
const put = (byte: number, len: number, off: number, fua = false) => `h.pwrite(b"\\x${byte.toString(16).padStart(2, "0")}" * ${len}, ${off}${fua ? ", nbd.CMD_FLAG_FUA" : ""})`;
const check = (byte: number, len: number, off: number) => `assert h.pread(${len}, ${off}) == b"\\x${byte.toString(16).padStart(2, "0")}" * ${len}, "0x${byte.toString(16)} at ${off}"`;

describe.skipIf(!needTools("nbdsh"))("restarting a node with the same configuration", () => {
  // The export's stack has a power-loss cache: writes no FLUSH or FUA covered live only in the
  // process, so a SIGKILL loses them as a power cut would, and a test that passes because the
  // kernel's page cache outlived the process cannot happen. nbdsh does not flush on disconnect.
  it("reopens its exports and its lease, after SIGTERM (which flushes) and after SIGKILL (which keeps only flushed and FUA writes)", async () => {
    const dir = tempDir();
    blankImage(path.join(dir, "disk.img"), 16 * MiB);
    fs.writeFileSync(
      path.join(dir, "node.yaml"),
      "node-id: a\ncontrol: 127.0.0.1:0\nexports:\n  - name: disk\n    stack:\n      - file: disk.img\n      - fault: null\n        powerloss: true\n",
    );
    const args = ["--config", path.join(dir, "node.yaml")];
    let srv = await serve(args, 2);
    try {
      nbdsh(srv.uris[0]!, [put(0x11, 65536, 0), "h.flush()", put(0x22, 65536, MiB, true), put(0x44, 65536, 3 * MiB)].join("; "));
      expect(await srv.stop("SIGTERM")).toBe(0); // the flush at shutdown makes 0x44 durable
      srv = await serve(args, 2);
      // Every new process of the node owns the image at a new epoch: a frozen old one could not write.
      expect((await getStatus(controlUrl(srv))).exports[0]).toMatchObject({ name: "disk", owner: "a", epoch: 2, state: "LOCAL" });
      nbdsh(srv.uris[0]!, [check(0x11, 65536, 0), check(0x22, 65536, MiB), check(0x44, 65536, 3 * MiB), put(0x33, 4096, 2 * MiB, true), put(0x55, 4096, 4 * MiB)].join("; "));
      await srv.stop("SIGKILL");
      srv = await serve(args, 2);
      // The killed process is gone (its pid no longer runs on this host): its lease is free at once.
      expect((await getStatus(controlUrl(srv))).exports[0]).toMatchObject({ owner: "a", epoch: 3, state: "LOCAL" });
      // FUA and flushed writes survived the kill; the unflushed 0x55 did not (the control that the kill really loses data).
      nbdsh(srv.uris[0]!, [check(0x33, 4096, 2 * MiB), check(0x11, 65536, 0), check(0x44, 65536, 3 * MiB), check(0, 4096, 4 * MiB)].join("; "));
    } finally {
      await srv.stop("SIGKILL");
    }
  });
});
