import fs from "node:fs";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { NbdClient } from "../../src/client/nbd-client.js";
import { getStatus } from "../../src/control/control-client.js";
import { blankImage, controlUrl, nbdAddress as addr, serve, tempDir, type Served } from "../helpers/serve.js";
import { pollUntil } from "../helpers/wait.js";

const MiB = 1024 * 1024;
let nodes: Served[] = [];
afterEach(async () => {
  for (const n of nodes) if (n.proc.exitCode === null) n.proc.kill("SIGCONT");
  await Promise.all(nodes.map((n) => n.stop("SIGKILL")));
  nodes = [];
});

/**
 * `--lease-ttl`'s promise with real processes and a real lease record: an owner that is paused
 * (SIGSTOP) past its lease loses the image to the other node, and when it wakes up it does not
 * write the image again; its late writes go to the new owner.
 *
 * Both nodes keep unflushed writes in a power-loss cache above the image. The new owner's cache
 * then holds the latest data, and the image file still holds the last flushed data, so a write the
 * old owner makes straight into the file shows up twice over: in the file, and as a read through
 * the new owner that no longer returns the latest write.
 */
describe("fencing a paused owner with a real lease", () => {
  it("an owner paused past its lease is replaced, and its late writes go to the new owner, never into the image", async () => {
    const dir = tempDir();
    const img = blankImage(path.join(dir, "disk.img"), 16 * MiB);
    const args = (id: string) => [img, "--name", "disk", "--node-id", id, "--lease-ttl", "1s", "--fault-powerloss"];
    const a = await serve(args("a"), 2);
    nodes.push(a);
    const b = await serve(args("b"), 2);
    nodes.push(b);
    expect((await getStatus(controlUrl(a))).exports[0]).toMatchObject({ owner: "a", epoch: 1, state: "LOCAL" });
    const ca = await NbdClient.connect(addr(a.uris[0]!), { exportName: "disk" });
    const cb = await NbdClient.connect(addr(b.uris[0]!), { exportName: "disk" });
    const block = (byte: number) => Buffer.alloc(64 * 1024, byte);
    await ca.pwrite(block(0x10), MiB);
    await ca.flush();

    a.proc.kill("SIGSTOP");
    // b sees a's lease expire and takes the image over (epoch 2).
    await pollUntil("b to take over", async () => {
      const e = (await getStatus(controlUrl(b))).exports[0]!;
      return e.state === "LOCAL" && e.owner === "b" && e.epoch === 2;
    });
    await cb.pwrite(block(0x20), MiB); // acknowledged by b, held in b's cache (not flushed)
    // A write sent to the paused a: it waits in a's socket until a runs again.
    const late = ca.pwrite(block(0x30), MiB);
    a.proc.kill("SIGCONT");
    await late; // not failed: a found its lease gone and sent the write to b

    const fd = fs.openSync(img, "r");
    const onDisk = Buffer.alloc(64 * 1024);
    fs.readSync(fd, onDisk, 0, onDisk.length, MiB);
    // Neither b's write nor a's late one is in the file: b holds both unflushed; a wrote nothing itself.
    expect(onDisk.equals(block(0x10))).toBe(true);
    expect((await cb.pread(64 * 1024, MiB)).equals(block(0x30))).toBe(true);
    expect((await ca.pread(64 * 1024, MiB)).equals(block(0x30))).toBe(true);
    const st = (await getStatus(controlUrl(a))).exports[0]!;
    expect(st).toMatchObject({ owner: "b", epoch: 2, state: "REMOTE" });
    await pollUntil("a's log line", () => /lease lost/.test(a.stderr()));
    await cb.flush();
    fs.readSync(fd, onDisk, 0, onDisk.length, MiB);
    fs.closeSync(fd);
    expect(onDisk.equals(block(0x30))).toBe(true);
    await ca.disconnect();
    await cb.disconnect();
    expect(JSON.parse(fs.readFileSync(`${img}.lease`, "utf8"))).toMatchObject({ owner: "b", epoch: 2 });
  });
});
