import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { LeaseError, LeaseFile } from "./lease.js";

const a = { nodeId: "a", nbd: "127.0.0.1:1", control: "http://127.0.0.1:11" };
const b = { nodeId: "b", nbd: "127.0.0.1:2", control: "http://127.0.0.1:12" };

const dirs: string[] = [];
afterAll(() => {
  for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
});

function setup() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "lease-"));
  dirs.push(dir);
  let now = 1_000_000;
  const clock = { advance: (ms: number) => (now += ms) };
  const img = path.join(dir, "disk.img");
  return { img, clock, lease: () => new LeaseFile(img, () => now) };
}

describe("LeaseFile", () => {
  it("takeOver: nothing while the owner's lease is valid or the record is a private copy; the image, at epoch + 1, once it expired", () => {
    const { lease, clock } = setup();
    expect(lease().takeOver(b, 1000)).toBeNull(); // no record: nothing to take over (acquire is for that)
    lease().acquire(a, 1000);
    clock.advance(999);
    expect(lease().takeOver(b, 1000)).toBeNull();
    expect(lease().read()).toMatchObject({ owner: "a", epoch: 1 });
    clock.advance(1);
    expect(lease().takeOver(b, 1000)).toMatchObject({ owner: "b", epoch: 2 });
    expect(() => lease().renew(a, 1)).toThrow(LeaseError); // a is fenced
    lease().assign(a, 5, 1000); // a private copy
    clock.advance(60_000);
    expect(lease().takeOver(b, 1000)).toBeNull();
  });

  it("never lets another node take a private record (an image that is a live copy), even long after expiry; its owner keeps it private", () => {
    const { lease, clock } = setup();
    lease().assign(a, 7, 1000); // b's copy of a's image names a as owner
    clock.advance(60_000);
    expect(() => lease().acquire(b, 1000)).toThrow(/image is a copy; its data is owned by a/);
    expect(lease().acquire(a, 1000)).toMatchObject({ owner: "a", epoch: 7, private: true });
    expect(lease().handOver(a, 7, b, 1000, true)).toMatchObject({ owner: "b", epoch: 8, private: true });
  });

  it("lets the first node take the lease; the second sees the owner and cannot take it before expiry", () => {
    const { lease, clock } = setup();
    const r = lease().acquire(a, 1000);
    expect(r).toMatchObject({ owner: "a", epoch: 1, nbd: a.nbd, control: a.control, ttlMs: 1000 });
    expect(() => lease().acquire(b, 1000)).toThrow(LeaseError);
    expect(lease().read()!.owner).toBe("a");
    clock.advance(999);
    expect(() => lease().acquire(b, 1000)).toThrow(/owned by a \(epoch 1\)/);
    clock.advance(1);
    expect(lease().acquire(b, 1000)).toMatchObject({ owner: "b", epoch: 2 }); // broken only after expiry
  });

  it("renews only for the owner at the current epoch (fencing)", () => {
    const { lease, clock } = setup();
    lease().acquire(a, 1000);
    clock.advance(900);
    expect(lease().renew(a, 1).leaseStart).toBe(1_000_900);
    clock.advance(900);
    expect(() => lease().acquire(b, 1000)).toThrow(LeaseError); // renewed: not expired
    clock.advance(200);
    lease().acquire(b, 1000);
    expect(() => lease().renew(a, 1)).toThrow(/lease lost/);
  });

  it("hands over with epoch + 1, and reclaims after a failed hand-over with a higher epoch", () => {
    const { lease } = setup();
    lease().acquire(a);
    expect(lease().handOver(a, 1, b)).toMatchObject({ owner: "b", epoch: 2, nbd: b.nbd });
    expect(() => lease().handOver(a, 1, b)).toThrow(/cannot hand over/);
    expect(lease().reclaim(a, "b", 2)).toMatchObject({ owner: "a", epoch: 3 });
    expect(() => lease().renew(b, 2)).toThrow(/lease lost/); // the late adopter is fenced
  });

  it("releases so the next owner can take it at once with a new epoch", () => {
    const { lease } = setup();
    lease().acquire(a);
    lease().release(a, 1);
    expect(lease().acquire(b)).toMatchObject({ owner: "b", epoch: 2 });
  });

  it("writes the record atomically beside the image", () => {
    const { img, lease } = setup();
    lease().acquire(a);
    const files = fs.readdirSync(path.dirname(img));
    expect(files).toEqual(["disk.img.lease"]);
    expect(JSON.parse(fs.readFileSync(`${img}.lease`, "utf8")).owner).toBe("a");
  });
});
