import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { getStatus } from "../../src/control/control-client.js";
import { controlUrl, serve, tempDir } from "../helpers/serve.js";
import { needTools } from "../helpers/tools.js";

const MiB = 1024 * 1024;

describe.skipIf(!needTools("qemu-io"))("restarting a node with the same configuration", () => {
  it("reopens its exports and its lease, after SIGTERM and after SIGKILL, with every acknowledged write in place", async () => {
    const dir = tempDir();
    const img = path.join(dir, "disk.img");
    fs.writeFileSync(img, "");
    fs.truncateSync(img, 16 * MiB);
    fs.writeFileSync(path.join(dir, "node.yaml"), "node-id: a\ncontrol: 127.0.0.1:0\nexports:\n  - name: disk\n    stack: file:disk.img\n");
    const args = ["--config", path.join(dir, "node.yaml")];
    let srv = await serve(args, 2);
    execFileSync("qemu-io", ["-f", "raw", "-c", "write -P 0x11 0 64k", "-c", "flush", srv.uris[0]!]);
    execFileSync("qemu-io", ["-f", "raw", "-c", "write -f -P 0x22 1M 64k", srv.uris[0]!]); // FUA: no flush needed
    expect(await srv.stop("SIGTERM")).toBe(0);
    srv = await serve(args, 2);
    expect((await getStatus(controlUrl(srv))).exports[0]).toMatchObject({ name: "disk", owner: "a", epoch: 1, state: "LOCAL" });
    execFileSync("qemu-io", ["-f", "raw", "-c", "read -P 0x11 0 64k", "-c", "read -P 0x22 1M 64k", "-c", "write -f -P 0x33 2M 4k", srv.uris[0]!]);
    await srv.stop("SIGKILL");
    srv = await serve(args, 2);
    expect((await getStatus(controlUrl(srv))).exports[0]).toMatchObject({ owner: "a", epoch: 1, state: "LOCAL" });
    execFileSync("qemu-io", ["-f", "raw", "-c", "read -P 0x33 2M 4k", "-c", "read -P 0x11 0 64k", srv.uris[0]!]);
    await srv.stop();
  });
});
