import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { DEFAULT_TTL_MS, LeaseError, LeaseFile, type LeaseFileOptions } from "./lease.js";

const a = { nodeId: "a", nbd: "127.0.0.1:1", control: "http://127.0.0.1:11" };
const b = { nodeId: "b", nbd: "127.0.0.1:2", control: "http://127.0.0.1:12" };

const dirs: string[] = [];
afterAll(() => {
  for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
});

/**
 * One image and a fake monotonic clock; `node(pid)` is one process's LeaseFile on it (each node
 * keeps one per image: it remembers what it observed). Processes listed in `dead` are gone.
 */
function setup() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "lease-"));
  dirs.push(dir);
  let mono = 1_000;
  const dead = new Set<number>();
  const clock = { advance: (ms: number) => (mono += ms) };
  const img = path.join(dir, "disk.img");
  const node = (pid: number, o: LeaseFileOptions = {}) => new LeaseFile(img, { monotonic: () => mono, alive: (p) => !dead.has(p), pid, host: "h", ...o });
  return { img, clock, dead, node };
}

describe("LeaseFile", () => {
  it("takeOver: nothing while the owner renews or the record is a private copy; the image, at epoch + 1, once it went unrenewed for the lease time", () => {
    const { node, clock } = setup();
    const la = node(1);
    const lb = node(2);
    la.acquire(a, 1000);
    expect(lb.takeOver(b, 1000)).toBeNull(); // first sight of the record: b starts counting
    clock.advance(999);
    expect(lb.takeOver(b, 1000)).toBeNull();
    la.renew(a, 1); // renewed: b counts again from its next look
    clock.advance(1);
    expect(lb.takeOver(b, 1000)).toBeNull();
    clock.advance(999);
    expect(lb.takeOver(b, 1000)).toBeNull();
    clock.advance(1);
    expect(lb.takeOver(b, 1000)).toMatchObject({ owner: "b", epoch: 2 });
    expect(() => la.renew(a, 1)).toThrow(LeaseError); // a is fenced
    la.assign(a, 5, 1000); // a private copy
    expect(lb.takeOver(b, 1000)).toBeNull();
    clock.advance(60_000);
    expect(lb.takeOver(b, 1000)).toBeNull();
  });

  it("clock skew: a node whose wall clock runs an hour ahead still waits a whole lease time of its own (wall clocks are never compared)", () => {
    const { node, clock } = setup();
    const la = node(1, { wall: () => 1_000_000 });
    const lb = node(2, { wall: () => 1_000_000 + 3_600_000 });
    la.acquire(a, 1000);
    expect(() => lb.acquire(b, 1000)).toThrow(/owned by a/);
    expect(lb.takeOver(b, 1000)).toBeNull();
    clock.advance(999);
    expect(lb.takeOver(b, 1000)).toBeNull();
    expect(la.renew(a, 1)).toMatchObject({ owner: "a", epoch: 1 });
    clock.advance(1000);
    expect(lb.takeOver(b, 1000)).toBeNull(); // renewed since b last looked
  });

  it("frees the lease at once when the owner's process on this host is gone", () => {
    const { node, dead } = setup();
    node(1).acquire(a, 60_000);
    const lb = node(2);
    expect(() => lb.acquire(b, 60_000)).toThrow(/owned by a/);
    dead.add(1);
    expect(lb.acquire(b, 60_000)).toMatchObject({ owner: "b", epoch: 2 });
  });

  it("a restarted node (same id, new process) gets a new epoch, and waits while the old process may still be alive (frozen)", () => {
    const { node, dead, clock } = setup();
    node(1).acquire(a, 1000);
    const restarted = node(7);
    expect(() => restarted.acquire(a, 1000)).toThrow(/owned by a \(epoch 1, an earlier process 1\)/);
    clock.advance(1000);
    expect(restarted.acquire(a, 1000)).toMatchObject({ owner: "a", epoch: 2, pid: 7 }); // unrenewed for a lease time
    expect(() => node(1).renew(a, 2)).toThrow(/lease lost/); // the old process, resumed, is fenced
    dead.add(7);
    expect(node(8).acquire(a, 1000)).toMatchObject({ owner: "a", epoch: 3 });
  });

  it("never lets another node take a private record (an image that is a live copy), even long after expiry; its owner keeps it private", () => {
    const { node, clock } = setup();
    const la = node(1);
    la.assign(a, 7, 1000); // b's copy of a's image names a as owner
    clock.advance(60_000);
    expect(() => node(2).acquire(b, 1000)).toThrow(/image is a copy; its data is owned by a/);
    expect(la.acquire(a, 1000)).toMatchObject({ owner: "a", epoch: 7, private: true });
    expect(la.handOver(a, 7, b, 1000, true)).toMatchObject({ owner: "b", epoch: 8, private: true });
  });

  it("lets the first node take the lease; the second sees the owner and cannot take it before it went unrenewed for the lease time", () => {
    const { node, clock } = setup();
    const la = node(1);
    const lb = node(2);
    const r = la.acquire(a, 1000);
    expect(r).toMatchObject({ owner: "a", epoch: 1, nbd: a.nbd, control: a.control, ttlMs: 1000 });
    expect(() => lb.acquire(b, 1000)).toThrow(LeaseError);
    expect(lb.read()!.owner).toBe("a");
    clock.advance(999);
    expect(() => lb.acquire(b, 1000)).toThrow(/owned by a \(epoch 1\)/);
    clock.advance(1);
    expect(lb.acquire(b, 1000)).toMatchObject({ owner: "b", epoch: 2 }); // broken only after expiry
    expect(() => la.renew(a, 1)).toThrow(/lease lost/);
  });

  it("hands over with epoch + 1; reclaims an unclaimed hand-over with a higher epoch, never one the peer claimed by renewing it", () => {
    const { node } = setup();
    const la = node(1);
    const lb = node(2);
    la.acquire(a);
    const handed = la.handOver(a, 1, b);
    expect(handed).toMatchObject({ owner: "b", epoch: 2, nbd: b.nbd });
    expect(() => la.handOver(a, 1, b)).toThrow(/cannot hand over/);
    expect(la.reclaim(a, handed)).toMatchObject({ owner: "a", epoch: 3 });
    expect(() => lb.renew(b, 2)).toThrow(/lease lost/); // the late adopter is fenced

    const again = la.handOver(a, 3, b);
    lb.renew(b, 4); // b adopted: its claim
    expect(() => la.reclaim(a, again)).toThrow(/cannot reclaim: record is b@4, renewed by it/);
    expect(lb.read()).toMatchObject({ owner: "b", epoch: 4, pid: 2 });
  });

  it("names the owners that handed the image on since the last take-over (each flushed first); a take-over or a new process starts afresh", () => {
    const { node, clock, dead } = setup();
    const la = node(1);
    const lb = node(2);
    la.acquire(a);
    expect(la.read()?.handedFrom).toBeUndefined();
    lb.renew(b, la.handOver(a, 1, b).epoch); // b claims a's hand-over
    expect(lb.read()).toMatchObject({ owner: "b", epoch: 2, handedFrom: ["a@1"] });
    const back = lb.handOver(b, 2, a);
    expect(lb.reclaim(b, back)).toMatchObject({ owner: "b", epoch: 4, handedFrom: ["a@1", "b@2"] }); // unclaimed: nothing was written since
    la.renew(a, lb.handOver(b, 4, a).epoch);
    expect(la.read()).toMatchObject({ owner: "a", epoch: 5, handedFrom: ["a@1", "b@2", "b@4"] });
    dead.add(1); // a dies: b takes over, and what a acknowledged unflushed is gone
    clock.advance(1);
    expect(lb.takeOver(b)).toMatchObject({ owner: "b", epoch: 6 });
    expect(lb.read()?.handedFrom).toBeUndefined();
    // A claimed hand-over that expired is taken back with nothing vouched for: the peer wrote meanwhile.
    const gone = lb.handOver(b, 6, a);
    la.renew(a, 7);
    dead.add(1);
    expect(lb.reclaim(b, gone).handedFrom).toBeUndefined();
  });

  it("a released lease vouches like a hand-over: whoever takes it next keeps the list, with the releaser on it", () => {
    // Nemesis seed 7 at 435 s: c handed the image to a, whose port A would not open; a claimed and
    // released it, c took it back. a wrote nothing, so c@146's flushed writes still stood.
    const { node, clock } = setup();
    const la = node(1);
    const lb = node(2);
    la.acquire(a);
    const handed = la.handOver(a, 1, b);
    lb.renew(b, 2); // claimed …
    lb.release(b, 2, true); // … and given up: port A did not open
    expect(la.reclaim(a, handed)).toMatchObject({ owner: "a", epoch: 3, handedFrom: ["a@1", "b@2"] });
    la.release(a, 3, true);
    clock.advance(1);
    expect(lb.takeOver(b)).toMatchObject({ owner: "b", epoch: 4, handedFrom: ["a@1", "b@2", "a@3"] });
    lb.release(b, 4); // a shutdown: its last flush may have failed, so it vouches for nothing
    expect(la.acquire(a).handedFrom).toBeUndefined();
  });

  // Nemesis seed 9 (3 nodes, at 733 s): a node's lock was created while the disk was full; its
  // token could not be written, and the empty file stayed. Every renewal then found the lock held
  // by "another process ()" until the empty lock was old enough to break, and a node whose wall
  // clock ran a day ahead found it old at once: the owner lost its lease to a full disk of 1 s.
  it("a lock whose token cannot be written (a full disk) leaves no lock behind: the next renewal takes it at once", () => {
    if (process.getuid?.() !== 0) return expect(process.env.CI).not.toBe("true"); // mounts a tmpfs: root only
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "lease-full-"));
    execFileSync("mount", ["-t", "tmpfs", "-o", "size=64k", "tmpfs", dir]);
    try {
      const img = path.join(dir, "disk.img");
      fs.writeFileSync(img, "");
      const la = new LeaseFile(img, { pid: 1, host: "h", alive: () => true });
      la.acquire(a);
      const filler = path.join(dir, "filler");
      try {
        fs.writeFileSync(filler, Buffer.alloc(128 * 1024)); // fills the tmpfs (ENOSPC part way)
      } catch {
        /* full */
      }
      expect(() => la.renew(a, 1)).toThrow(/ENOSPC/);
      fs.rmSync(filler);
      expect(la.renew(a, 1)).toMatchObject({ owner: "a", epoch: 1 }); // no lock left by the failed attempt
    } finally {
      execFileSync("umount", [dir]);
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it("an empty lock file (its writer died before writing) is broken after 5 s of this process's own clock, whatever its mtime says", () => {
    const { img, node, clock } = setup();
    const la = node(1);
    la.acquire(a);
    fs.writeFileSync(`${img}.lease.lock`, "");
    const dayAgo = new Date(Date.now() - 86_400_000);
    fs.utimesSync(`${img}.lease.lock`, dayAgo, dayAgo); // as a node whose wall clock runs a day ahead sees it
    expect(() => la.renew(a, 1)).toThrow(/lock held/);
    clock.advance(5001);
    expect(la.renew(a, 1)).toMatchObject({ owner: "a", epoch: 1 });
  });

  // Nemesis seed 9 (3 nodes, at 294 s): an owner frozen past its lease continued while the disk
  // was full; its renewals could not take the lock (ENOSPC), failed with that, and never learnt
  // that another node held the record: it stayed LOCAL, reading from port A, for 2 s.
  it("renew finds a lost lease without the lock: a full disk or a held lock cannot hide it", () => {
    const { img, node, clock } = setup();
    const la = node(1);
    const lb = node(2);
    la.acquire(a);
    clock.advance(DEFAULT_TTL_MS + 1);
    lb.takeOver(b); // first sight
    clock.advance(DEFAULT_TTL_MS + 1);
    expect(lb.takeOver(b)).toMatchObject({ owner: "b", epoch: 2 });
    fs.writeFileSync(`${img}.lease.lock`, "h 2 held"); // b holds the lock (alive), as a full disk would keep a from taking it
    expect(() => la.renew(a, 1)).toThrow(LeaseError);
  });

  it("releases so the next owner can take it at once with a new epoch", () => {
    const { node } = setup();
    const la = node(1);
    la.acquire(a);
    la.release(a, 1);
    expect(node(2).acquire(b)).toMatchObject({ owner: "b", epoch: 2 });
  });

  it("writes the record atomically beside the image", () => {
    const { img, node } = setup();
    node(1).acquire(a);
    const files = fs.readdirSync(path.dirname(img));
    expect(files).toEqual(["disk.img.lease"]);
    expect(JSON.parse(fs.readFileSync(`${img}.lease`, "utf8")).owner).toBe("a");
  });

  it("never breaks the lock of a live holder, however old (a paused holder's rename cannot overwrite a newer record); breaks a dead holder's at once", () => {
    const { img, node, dead } = setup();
    node(1).acquire(a);
    fs.writeFileSync(`${img}.lease.lock`, "h 5 token");
    fs.utimesSync(`${img}.lease.lock`, new Date(0), new Date(0)); // an hour-old lock
    const t0 = Date.now();
    expect(() => node(2).acquire(b)).toThrow(/lock held by another process \(h pid 5\); try again later/);
    expect(Date.now() - t0).toBeLessThan(1000); // the event loop is not held for long
    expect(() => node(2).acquire(b)).toThrow(/lock held by another process/);
    expect(fs.readFileSync(`${img}.lease.lock`, "utf8")).toBe("h 5 token"); // still the holder's
    dead.add(5);
    expect(() => node(2).acquire(b)).toThrow(/owned by a/); // got the lock; the lease is a's
    expect(fs.existsSync(`${img}.lease.lock`)).toBe(false);
  });

  it("removes only its own lock: a holder whose lock was replaced leaves the new one alone", () => {
    const { img, node } = setup();
    const la = node(1);
    la.acquire(a);
    const lockFile = `${img}.lease.lock`;
    // Another process takes the lock while a renews (as after a wrongly broken lock): a's unlock must not remove it.
    const orig = fs.renameSync;
    try {
      (fs as { renameSync: typeof fs.renameSync }).renameSync = (from, to) => {
        orig(from, to);
        fs.writeFileSync(lockFile, "h 9 other");
      };
      la.renew(a, 1);
    } finally {
      (fs as { renameSync: typeof fs.renameSync }).renameSync = orig;
    }
    expect(fs.readFileSync(lockFile, "utf8")).toBe("h 9 other");
  });

  it("keeps one record per image file: a symlink to the image leads to the same record", () => {
    const { img, node } = setup();
    fs.writeFileSync(img, "");
    const link = path.join(path.dirname(img), "other-name.img");
    fs.symlinkSync(img, link);
    node(1).acquire(a);
    expect(() => new LeaseFile(link, { pid: 2, host: "h", alive: () => true }).acquire(b)).toThrow(/owned by a/);
  });

  it("a private copy's record: a new process of its node waits while the old one may still run, then takes it at a new epoch; no other node ever does", () => {
    const { node, clock, dead } = setup();
    node(1).assign(a, 4, 1000); // x's own copy (a live copy's destination), owned by process 1
    const fresh = node(2);
    expect(() => fresh.acquire(a, 1000)).toThrow(/an earlier process 1/);
    expect(fresh.takeOver(a, 1000)).toBeNull(); // starts watching the record
    expect(node(3).takeOver(b, 1000)).toBeNull();
    clock.advance(1000);
    expect(node(3).takeOver(b, 1000)).toBeNull(); // another node: never
    expect(fresh.takeOver(a, 1000)).toMatchObject({ owner: "a", epoch: 5, private: true, pid: 2 });
    expect(() => node(1).renew(a, 4)).toThrow(/lease lost/); // the old process, resumed, is fenced
    dead.add(2);
    expect(node(7).acquire(a, 1000)).toMatchObject({ epoch: 6, private: true }); // its process is gone: at once
  });
});
