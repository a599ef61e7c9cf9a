import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import pino from "pino";
import { afterEach, describe, expect, it, vi } from "vitest";
import { LeaseFile } from "../../migration/lease.js";
import { StorageNode } from "../../node/storage-node.js";
import { plainIo } from "../layer.js";
import { FenceLayer } from "./fence-layer.js";
import { MemoryPort } from "./memory-port.js";
import { AuditLayer, WriteAudit, type AuditedOp } from "./write-audit.js";

const dirs: string[] = [];
afterEach(() => {
  vi.restoreAllMocks();
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});
function tmp(): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), "nbdstack-audit-"));
  dirs.push(d);
  return d;
}
const tick = () => new Promise((r) => setImmediate(r));

describe("AuditLayer", () => {
  it("records every write, zero, trim and flush before it goes below, and nothing for reads", async () => {
    const port = new MemoryPort({ size: 65536 });
    await port.open();
    const seen: Array<[AuditedOp, number, number]> = [];
    const below = vi.spyOn(port, "pwrite");
    const audit = new AuditLayer(port, (op, offset, length) => {
      seen.push([op, offset, length]);
      if (op === "write") expect(below).not.toHaveBeenCalled(); // recorded first
    });
    await audit.pwrite(Buffer.alloc(4096, 1), 8192, plainIo);
    await audit.zero(512, 0, plainIo);
    await audit.trim(1024, 4096, plainIo);
    await audit.flush(plainIo);
    await audit.pread(Buffer.alloc(512), 0, plainIo);
    expect(seen).toEqual([["write", 8192, 4096], ["zero", 0, 512], ["trim", 4096, 1024], ["flush", 0, 0]]);
    expect(below).toHaveBeenCalledTimes(1);
  });

  it("below a fence, records only what the fence let through", async () => {
    const port = new MemoryPort({ size: 65536 });
    await port.open();
    const seen: AuditedOp[] = [];
    let allowed = true;
    const fence = new FenceLayer(new AuditLayer(port, (op) => seen.push(op)), () => allowed, false);
    await fence.pwrite(Buffer.alloc(512, 1), 0, plainIo);
    allowed = false;
    await expect(fence.pwrite(Buffer.alloc(512, 2), 0, plainIo)).rejects.toMatchObject({ code: "EFENCED" });
    await expect(fence.flush(plainIo)).rejects.toMatchObject({ code: "EFENCED" });
    expect(seen).toEqual(["write"]);
  });
});

describe("WriteAudit", () => {
  it("buffers lines and appends them once per event-loop turn; close writes what is left at once", async () => {
    const file = path.join(tmp(), "audit.jsonl");
    const a = new WriteAudit(file);
    const t0 = Date.now();
    a.record({ node: "a", export: "disk", epoch: 3, op: "write", offset: 4096, length: 512 });
    a.record({ node: "a", export: "disk", epoch: 3, op: "flush", offset: 0, length: 0 });
    expect(fs.readFileSync(file, "utf8")).toBe(""); // not yet: one write per turn
    await tick();
    const lines = WriteAudit.read(file);
    expect(lines).toEqual([
      { t: expect.any(Number), mono: expect.any(Number), node: "a", export: "disk", epoch: 3, op: "write", offset: 4096, length: 512 },
      expect.objectContaining({ op: "flush", offset: 0, length: 0 }),
    ]);
    expect(lines[0]!.t).toBeGreaterThanOrEqual(t0);
    expect(lines[1]!.mono).toBeGreaterThanOrEqual(lines[0]!.mono);
    a.record({ node: "a", export: "disk", epoch: 4, op: "trim", offset: 0, length: 1024 });
    a.close();
    expect(WriteAudit.read(file).map((l) => l.op)).toEqual(["write", "flush", "trim"]);
    a.record({ node: "a", export: "disk", epoch: 4, op: "write", offset: 0, length: 1 }); // after close: ignored
    await tick();
    expect(WriteAudit.read(file)).toHaveLength(3);
  });

  it("a node records its writes with its epoch, and none once another node holds the lease", async () => {
    const dir = tmp();
    const img = path.join(dir, "disk.img");
    fs.writeFileSync(img, Buffer.alloc(1024 * 1024));
    const audit = new WriteAudit(path.join(dir, "audit.jsonl"));
    const ttlMs = 60_000;
    const node = new StorageNode({ nodeId: "a", nbd: "127.0.0.1:9", log: pino({ level: "silent" }), ttlMs, audit });
    const exp = await node.createExport({ source: img, name: "disk" });
    await exp.open();
    await exp.layer.pwrite(Buffer.alloc(4096, 0x11), 8192, plainIo);
    await exp.layer.flush(plainIo);
    audit.flush();
    expect(WriteAudit.read(audit.file).map(({ node: n, export: e, epoch, op, offset, length }) => ({ n, e, epoch, op, offset, length }))).toEqual([
      { n: "a", e: "disk", epoch: 1, op: "write", offset: 8192, length: 4096 },
      { n: "a", e: "disk", epoch: 1, op: "flush", offset: 0, length: 0 },
    ]);
    // Another node holds the lease now and a's deadline has passed: the write never reaches the image.
    new LeaseFile(img).handOver({ nodeId: "a", nbd: "", control: "" }, 1, { nodeId: "b", nbd: "127.0.0.1:9", control: "" }, ttlMs);
    const t0 = performance.now();
    vi.spyOn(performance, "now").mockImplementation(() => t0 + 1.8 * ttlMs + 1);
    const late = exp.layer.pwrite(Buffer.alloc(4096, 0x33), 0, plainIo);
    late.catch(() => undefined);
    for (let i = 0; i < 100 && node.statusNow().exports[0]!.state !== "REMOTE"; i++) await new Promise((r) => setTimeout(r, 20));
    expect(node.statusNow().exports[0]!.state).toBe("REMOTE");
    await node.close();
    await exp.close().catch(() => undefined);
    audit.close();
    expect(WriteAudit.read(audit.file)).toHaveLength(2);
  });
});
