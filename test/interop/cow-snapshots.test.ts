import fs from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { controlUrl, randomImage, serve, sha256, tempDir, type Served } from "../helpers/serve.js";
import { scrape } from "../helpers/migration.js";
import { needTools } from "../helpers/tools.js";
import { DeviceModel, nbdstack, qemuIo, readExport, uriOf } from "../helpers/volumes.js";

const MiB = 1024 * 1024;
const K64 = 64 * 1024;

/**
 * src/stack/volume/cow.md through the built CLI and real clients: `nbdstack snapshot` freezes the
 * overlay while the export goes on, a .snap-N read as an overlay over the base is the device at
 * snapshot time, the documented rollback (stop, `mv vm.cow.snap-N vm.cow`, start) gives exactly
 * that device back, and `nbdstack merge --into-base` writes what the overlay holds into the base.
 */
describe.skipIf(!needTools("qemu-io", "nbdcopy"))("copy-on-write snapshots, rollback and merge through the CLI", () => {
  let dir: string;
  let base: string;
  let baseSum: string;
  let rwBase: string;
  let overlay: string;
  let config: string;
  let srv: Served;
  let ctl: string;
  const scratch = () => path.join(dir, "out.img");
  const start = async () => {
    srv = await serve(["--config", config], 3);
    ctl = controlUrl(srv);
  };
  const chain = async (name: string) => {
    const r = await nbdstack("cow", name, "--control", ctl, "--json");
    expect(r.status, r.stderr).toBe(0);
    return JSON.parse(r.stdout) as { allocatedBytes: number; chain: Array<{ path: string; role: string; allocatedBytes: number; zeroedBytes: number; fileBytes: number }>; merge: { state: string; doneBytes: number; totalBytes: number; into: string } };
  };

  // The device at each point: after the writes before snapshot 1, before snapshot 2, and live.
  let atSnap1: DeviceModel;
  let atSnap2: DeviceModel;
  let snap1: string;
  let snap2: string;

  beforeAll(async () => {
    dir = tempDir();
    base = path.join(dir, "base.img");
    rwBase = path.join(dir, "rw.img");
    overlay = path.join(dir, "vm.cow");
    randomImage(base, 8 * MiB, 21);
    randomImage(rwBase, 8 * MiB, 22);
    baseSum = sha256(base);
    config = path.join(dir, "cow.yaml");
    fs.writeFileSync(
      config,
      [
        "exports:",
        "  - name: vm", // the base is opened read-only: only the overlay is ever written
        "    partitions: false",
        "    stack:",
        "      - file: base.img",
        "        read-only: true",
        "      - cow: vm.cow",
        "  - name: rw", // a writable base, so that `merge --into-base` may write it
        "    partitions: false",
        "    stack: file:rw.img → cow:rw.cow",
      ].join("\n"),
    );
    await start();
  });
  afterAll(() => srv?.stop());

  it("a snapshot keeps the data of snapshot time while the live overlay moves on; each .snap-N read as the overlay is exactly that device", async () => {
    const vm = uriOf(srv, "vm");
    const m = new DeviceModel(fs.readFileSync(base));
    // Whole blocks, parts of blocks (read-modify-write from the base), a zero over base data.
    qemuIo(vm, m.write(MiB, K64, 0x11), m.write(100_000, 5000, 0x12), m.zero(3 * MiB, 2 * K64), m.write(5 * MiB + 100, 300, 0x13), "flush");
    atSnap1 = m.copy();
    let r = await nbdstack("snapshot", "vm", "--control", ctl, "--json");
    expect(r.status, r.stderr).toBe(0);
    snap1 = JSON.parse(r.stdout).snapshot;
    expect(snap1).toBe(`${overlay}.snap-1`);
    expect(JSON.parse(r.stdout).chain.map((e: { path: string }) => e.path)).toEqual([overlay, snap1]);
    const snap1Sum = sha256(snap1);

    // Over what snap-1 holds (inside its blocks and across them), into its zeroed blocks, elsewhere.
    qemuIo(vm, m.write(MiB + 4096, 4096, 0x21), m.write(102_000, 10_000, 0x22), m.write(3 * MiB + K64, 100, 0x23), m.zero(6 * MiB, K64), m.write(7 * MiB, K64, 0x24), "flush");
    atSnap2 = m.copy();
    r = await nbdstack("snapshot", "vm", "--control", ctl);
    expect(r.status, r.stderr).toBe(0);
    snap2 = `${overlay}.snap-2`;
    expect(r.stdout).toBe(`froze the overlay of vm as ${snap2}; new writes go to ${overlay}\n`);
    const snap2Sum = sha256(snap2);

    qemuIo(vm, m.write(0, 8192, 0x31), m.zero(MiB, K64), m.write(6 * MiB + 10, 10, 0x32), m.write(100_500, 100, 0x33), "flush");
    // The three states differ where the writes went, so equal reads below mean something.
    expect(atSnap1.data.equals(atSnap2.data) || atSnap2.data.equals(m.data)).toBe(false);
    expect(readExport(vm, scratch()).equals(m.data)).toBe(true);
    expect((await chain("vm")).chain.map((e) => [e.path, e.role])).toEqual([
      [overlay, "overlay"],
      [snap2, "snapshot"],
      [snap1, "snapshot"],
    ]);
    // Frozen files: not one byte changed by the writes after them.
    expect(sha256(snap1)).toBe(snap1Sum);
    expect(sha256(snap2)).toBe(snap2Sum);

    // Read each snapshot as cow.md says the chain is built: the file as the overlay over the
    // base; its header names the snapshot below it (snap-2 → snap-1). Copies, beside their own
    // chain, so that nothing the running export holds is opened twice.
    for (const [sub, files] of [["view1", [snap1]], ["view2", [snap2, snap1]]] as const) {
      fs.mkdirSync(path.join(dir, sub));
      for (const f of files) fs.copyFileSync(f, path.join(dir, sub, path.basename(f)));
    }
    const views = path.join(dir, "views.yaml");
    fs.writeFileSync(
      views,
      [
        "exports:",
        `  - {name: s1, partitions: false, stack: [{file: base.img, read-only: true}, {cow: view1/vm.cow.snap-1}]}`,
        `  - {name: s2, partitions: false, stack: [{file: base.img, read-only: true}, {cow: view2/vm.cow.snap-2}]}`,
      ].join("\n"),
    );
    const v = await serve(["--config", views], 3);
    try {
      expect(readExport(uriOf(v, "s1"), scratch()).equals(atSnap1.data)).toBe(true);
      expect(readExport(uriOf(v, "s2"), scratch()).equals(atSnap2.data)).toBe(true);
    } finally {
      expect(await v.stop()).toBe(0);
    }
    expect(sha256(base)).toBe(baseSum);
  });

  it("rolls back as cow.md documents: stop the server, mv vm.cow.snap-N vm.cow, start it again", async () => {
    expect(await srv.stop()).toBe(0);
    fs.renameSync(snap2, overlay);
    await start();
    expect((await chain("vm")).chain.map((e) => e.path)).toEqual([overlay, snap1]);
    expect(readExport(uriOf(srv, "vm"), scratch()).equals(atSnap2.data)).toBe(true);

    expect(await srv.stop()).toBe(0);
    fs.renameSync(snap1, overlay);
    await start();
    expect((await chain("vm")).chain.map((e) => e.path)).toEqual([overlay]);
    expect(readExport(uriOf(srv, "vm"), scratch()).equals(atSnap1.data)).toBe(true);
    // The rolled-back device takes writes again.
    qemuIo(uriOf(srv, "vm"), atSnap1.write(2 * MiB, 4096, 0x41), "flush");
    expect(readExport(uriOf(srv, "vm"), scratch()).equals(atSnap1.data)).toBe(true);
    expect(sha256(base)).toBe(baseSum);
  });

  it("refuses a merge with no snapshot below, and --into-base of a read-only base, without touching anything", async () => {
    let r = await nbdstack("merge", "vm", "--control", ctl, "--wait");
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^nbdstack: POST .*: 409 .*vm\.cow: there is no snapshot below this overlay; merging it into the base .* ask for it with mergeIntoBase/);
    r = await nbdstack("merge", "vm", "--control", ctl, "--into-base", "--wait");
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/409 .*cannot merge into the base file:.*base\.img: it is read-only/);
    expect(sha256(base)).toBe(baseSum);
    expect(readExport(uriOf(srv, "vm"), scratch()).equals(atSnap1.data)).toBe(true);
  });

  it("merge --into-base writes what the overlay holds into the base and leaves a fresh, empty overlay", async () => {
    const rw = uriOf(srv, "rw");
    const rwOverlay = path.join(dir, "rw.cow");
    const rwSum = sha256(rwBase);
    const m = new DeviceModel(fs.readFileSync(rwBase));
    // 5 blocks of 64 KiB: one whole, two partly written, two zeroed over the base's data.
    qemuIo(rw, m.write(MiB, K64, 0x51), m.write(100_000, 5000, 0x52), m.zero(3 * MiB, 2 * K64), m.write(5 * MiB + 100, 300, 0x53), "flush");
    expect(sha256(rwBase)).toBe(rwSum); // until the merge, the base is only read
    const before = await chain("rw");
    expect(before.chain[0]!.allocatedBytes + before.chain[0]!.zeroedBytes).toBe(5 * K64);

    let r = await nbdstack("merge", "rw", "--control", ctl, "--wait");
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/there is no snapshot below this overlay/);
    expect(sha256(rwBase)).toBe(rwSum);

    r = await nbdstack("merge", "rw", "--control", ctl, "--into-base", "--wait");
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(new RegExp(`^merged 320\\.0 KiB of rw into file:${rwBase.replace(/[.]/g, "\\.")}; overlay is now ${rwOverlay.replace(/[.]/g, "\\.")}\\n$`));
    // The base itself now holds the device, byte for byte.
    expect(fs.readFileSync(rwBase).equals(m.data)).toBe(true);
    const after = await chain("rw");
    expect(after.merge).toMatchObject({ state: "done", doneBytes: 5 * K64, totalBytes: 5 * K64 });
    const metrics = await scrape(ctl);
    expect(metrics.get('nbdstack_copy_done_bytes{export="rw",job="merge"}')).toBe(5 * K64);
    expect(metrics.get('nbdstack_copy_state{export="rw",job="merge",state="done"}')).toBe(1);
    expect(after.chain).toHaveLength(1);
    expect(after.chain[0]).toMatchObject({ path: rwOverlay, role: "overlay", allocatedBytes: 0, zeroedBytes: 0 });
    expect(after.chain[0]!.fileBytes).toBeLessThan(before.chain[0]!.fileBytes);
    expect(readExport(rw, scratch()).equals(m.data)).toBe(true);
    // New writes go to the new overlay again; the base is left as the merge wrote it.
    const merged = sha256(rwBase);
    qemuIo(rw, m.write(7 * MiB, 4096, 0x54), "flush");
    expect(sha256(rwBase)).toBe(merged);
    expect(readExport(rw, scratch()).equals(m.data)).toBe(true);
  });
});
