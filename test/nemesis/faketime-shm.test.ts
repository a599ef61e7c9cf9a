// What the nemesis removes of libfaketime's files after killing nodes (see removeDeadFaketimeShm).
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { describe, expect, it } from "vitest";
// @ts-expect-error -- a plain ES module without types, shared with scripts run by node
import { removeDeadFaketimeShm } from "./harness.mjs";

describe("removeDeadFaketimeShm", () => {
  it("removes the shared memory and semaphore of processes that are gone, and keeps those of live ones and every other file", () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdstack-shm-"));
    try {
      const dead = spawnSync("true").pid!; // exited and reaped: its pid names no process now
      const live = process.pid;
      const files = [`faketime_shm_${dead}`, `sem.faketime_sem_${dead}`, `faketime_shm_${live}`, `sem.faketime_sem_${live}`, `faketime_shm_x${dead}`, "other"];
      for (const f of files) fs.writeFileSync(path.join(dir, f), "");
      expect(removeDeadFaketimeShm(dir)).toBe(2);
      expect(fs.readdirSync(dir).sort()).toEqual([`faketime_shm_${live}`, `faketime_shm_x${dead}`, "other", `sem.faketime_sem_${live}`].sort());
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
