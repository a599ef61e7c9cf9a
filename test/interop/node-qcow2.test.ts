import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { controlCall } from "../../src/control/control-client.js";
import { exportStatus, finished, fioLoad, fioOutcome, killLeftovers, pollUntil, scrape, startCli } from "../helpers/migration.js";
import { controlUrl, randomImage, serve, tempDir, type Served } from "../helpers/serve.js";
import { debianEnv, needTools } from "../helpers/tools.js";

const MiB = 1024 * 1024;
const qimg = (...args: string[]) => execFileSync("qemu-img", args, { encoding: "utf8" });

/**
 * Cluster nodes over a qcow2 image (an overlay over a raw base): a and b share the image and move
 * the export between them under fio's verified writes; c has no shared storage and takes the
 * export by live copy (the guest-visible data is copied into a raw image of its own, never the
 * qcow2 file). Afterwards `qemu-img check` finds the image clean and its contents equal what
 * clients read.
 */
describe.skipIf(!needTools("fio", "qemu-img", "nbdcopy"))("cluster nodes over a qcow2 image", () => {
  let dir: string;
  let dirC: string;
  let img: string;
  let a: Served;
  let b: Served;
  let c: Served;
  beforeAll(async () => {
    dir = tempDir();
    dirC = tempDir();
    randomImage(path.join(dir, "base.raw"), 32 * MiB, 7);
    img = path.join(dir, "vm.qcow2");
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", "-b", "base.raw", "-F", "raw", img, "32M");
    a = await serve([img, "--name", "disk", "--node-id", "a", "--control", "127.0.0.1:0"], 2);
    b = await serve([img, "--name", "disk", "--node-id", "b", "--control", "127.0.0.1:0"], 2);
    c = await serve(["--data-dir", dirC, "--node-id", "c", "--control", "127.0.0.1:0", "--listen", "127.0.0.1:0"], 1);
  });
  afterEach(() => killLeftovers());
  afterAll(async () => {
    await c?.stop();
    await b?.stop();
    await a?.stop();
  });

  it("moves between two nodes on shared storage under verified writes; qemu-img check clean, data as clients read it", async () => {
    expect((await exportStatus(controlUrl(a), "disk"))!).toMatchObject({ owner: "a", state: "LOCAL" });
    expect(JSON.parse(execFileSync("nbdinfo", ["--json", b.uris[0]!], { encoding: "utf8", env: debianEnv })).exports[0].description).toMatch(/redirector\(REMOTE\)/);
    const load = fioLoad(b.uris[0]!, { size: "16m", rateIops: 600 });
    const writes = async (s: Served) => (await scrape(controlUrl(s))).get('nbdstack_requests_total{export="disk",op="write",result="ok"}') ?? 0;
    const underLoad = async () => {
      const w = await writes(b);
      await pollUntil("100 more fio writes", async () => (await writes(b)) >= w + 100);
    };
    await underLoad();
    let [from, to] = [controlUrl(a), controlUrl(b)];
    for (let i = 0; i < 6; i++) {
      const r = await controlCall<{ epoch: number }>(from, "POST", "v1/exports/disk/migrate", { to });
      expect(r.epoch).toBe(i + 2);
      [from, to] = [to, from];
      await underLoad();
    }
    const f = await load.stop();
    expect(fioOutcome(f)).toEqual({ exit: "stopped", error: 0, complaints: [] });
    expect(f.job.read.io_bytes).toBeGreaterThan(0);
    // Six moves: a owns it again. What clients see, copied out through b (port B).
    expect((await exportStatus(controlUrl(a), "disk"))!).toMatchObject({ owner: "a", epoch: 7, state: "LOCAL", held: 0 });
    const seen = path.join(dir, "seen.raw");
    execFileSync("nbdcopy", [b.uris[0]!, seen], { env: debianEnv });
    // The image itself, checked while its owner keeps it open (qemu-img -U: no lock is taken): a
    // flush first so that the refcounts of freed clusters are down.
    execFileSync("nbdsh", ["-u", a.uris[0]!, "-c", "h.flush()"], { env: debianEnv });
    expect(qimg("check", "-U", img)).toMatch(/No errors were found/);
    qimg("compare", "-U", "-f", "qcow2", "-F", "raw", img, seen);
    // The writes went into the overlay: the raw base is untouched.
    const base = fs.readFileSync(path.join(dir, "base.raw"));
    randomImage(path.join(dir, "expect.raw"), 32 * MiB, 7);
    expect(base.equals(fs.readFileSync(path.join(dir, "expect.raw")))).toBe(true);
  });

  it("a live copy (migrate --copy) to a node without shared storage copies the guest-visible data into a raw image there", async () => {
    const load = fioLoad(a.uris[0]!, { size: "8m", rateIops: 300 });
    const m = startCli(["migrate", "disk", "--from", controlUrl(a), "--to", controlUrl(c), "--copy", "--no-progress"]);
    const r = await finished(m, "migrate --copy", 60_000);
    expect(r.status, r.stderr).toBe(0);
    const f = await load.stop();
    expect(fioOutcome(f)).toEqual({ exit: "stopped", error: 0, complaints: [] });
    expect((await exportStatus(controlUrl(c), "disk"))!).toMatchObject({ owner: "c", state: "LOCAL" });
    const copied = path.join(dirC, "disk.img");
    expect(fs.readFileSync(copied).subarray(0, 4).toString("latin1")).not.toBe("QFI\xfb"); // raw: the file was not copied
    // c's raw image, a's qcow2 image (a no longer owns it: it was flushed and closed at the hand-over)
    // and what clients of a read now (port B to c) are one disk.
    const seen = path.join(dir, "seen2.raw");
    execFileSync("nbdcopy", [a.uris[0]!, seen], { env: debianEnv });
    execFileSync("nbdsh", ["-u", a.uris[0]!, "-c", "h.flush()"], { env: debianEnv }); // through port B to c
    qimg("compare", "-U", "-f", "raw", "-F", "raw", copied, seen);
    // The qcow2 image holds what it held at the hand-over; writes since went to c. Its metadata is sound.
    expect(qimg("check", "-U", img)).toMatch(/No errors were found/);
  });
});
