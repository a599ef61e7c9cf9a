import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { needTools } from "../../../test/helpers/tools.js";
import { plainIo } from "../layer.js";
import { createQcow2Layer } from "./qcow2-layer.js";
import { Qcow2Online } from "./qcow2-online.js";

const dir = fs.mkdtempSync(path.join(os.tmpdir(), "qcow2-online-"));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

describe.skipIf(!needTools("qemu-img"))("Qcow2Online", () => {
  it("a merge that fails is a failed merge in its progress, never an unhandled rejection", async () => {
    const snap = path.join(dir, "vm.snap-1.qcow2");
    execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", snap, "4M"]);
    const vm = path.join(dir, "vm.qcow2");
    execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "vm.snap-1.qcow2", "-F", "qcow2", vm]);
    const layer = createQcow2Layer({ path: vm });
    await layer.open();
    await layer.pwrite(Buffer.alloc(65536, 7), 0, plainIo);
    const online = new Qcow2Online(layer);
    online.startMerge({ mergeIntoBase: true }); // nobody waits for it (the control API's answer 202 does not)
    fs.rmSync(snap); // the backing file cannot be opened writable now
    for (let i = 0; i < 100 && online.progress.state !== "failed"; i++) await new Promise((r) => setTimeout(r, 10));
    expect(online.progress).toMatchObject({ state: "failed", error: expect.stringContaining("vm.snap-1.qcow2") });
    // Another merge may be asked for: the first one is over.
    expect(() => online.startMerge({ mergeIntoBase: true })).not.toThrow(/is running/);
    await new Promise((r) => setTimeout(r, 50));
  });
});
