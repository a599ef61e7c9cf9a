import { execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { randomImage, serve, tempDir } from "../helpers/serve.js";
import { nbdsh, needTools } from "../helpers/tools.js";
import { pollUntil } from "../helpers/wait.js";

const MiB = 1024 * 1024;
const CS = 65536;

interface Event {
  op: "write" | "sync";
  offset: number;
  length: number;
}

/** The image's writes and syncs in the order the server made them, from strace's log. */
function events(log: string): Event[] {
  const out: Event[] = [];
  for (const line of fs.existsSync(log) ? fs.readFileSync(log, "utf8").split("\n") : []) {
    if (/resumed|unfinished/.test(line) && !/= \d+$/.test(line)) continue;
    const w = /pwrite64\(\d+, .*, (\d+), (\d+)\)\s+= \d+/.exec(line);
    if (w) out.push({ op: "write", length: Number(w[1]), offset: Number(w[2]) });
    else if (/\bf(data)?sync\(\d+\)\s+= 0/.test(line)) out.push({ op: "sync", offset: 0, length: 0 });
  }
  return out;
}

/**
 * The update order of the qcow2 layer (src/stack/qcow2/README.md, "Update order"), seen at the
 * system-call level: an allocating write writes its data and nothing else (no metadata, no sync);
 * the flush writes the refcounts, fdatasync, the new L2 table (holding the entry), fdatasync, L1,
 * fdatasync; a freed cluster's count is lowered only after the L2 change is durable.
 */
describe.skipIf(!needTools("strace", "nbdsh", "qemu-img"))("qcow2 metadata update order at the system-call level", () => {
  it("writes data at once, and at the flush refcounts, L2 table and L1 in that order with syncs between; frees after a sync", async () => {
    const dir = tempDir();
    randomImage(path.join(dir, "base.raw"), 8 * MiB, 3);
    const image = path.join(dir, "top.qcow2");
    execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", image]);
    const head = fs.readFileSync(image);
    const l1 = Number(head.readBigUInt64BE(40));
    const rtable = Number(head.readBigUInt64BE(48));
    const rblock = Number(head.readBigUInt64BE(rtable));
    const srv = await serve([image, "--name", "disk"]);
    const log = path.join(dir, "strace.log");
    const tracer = spawn("strace", ["-f", "-e", "trace=pwrite64,fdatasync,fsync", "-o", log, "-p", String(srv.proc.pid)], { stdio: ["ignore", "ignore", "pipe"] });
    let tracerErr = "";
    tracer.stderr!.on("data", (d) => (tracerErr += d));
    const tracerExit = new Promise<number | null>((r) => tracer.once("exit", (c) => r(c)));
    try {
      await pollUntil("strace to attach", () => /attached/.test(tracerErr), 10_000);
      // A partial write into an unallocated cluster over the backing file: its data (the cluster,
      // with the rest copied from the backing file) is written, and no metadata nor sync before a flush.
      nbdsh(srv.uri, 'h.pwrite(b"\\x01" * 4096, 8192)');
      await pollUntil("the data", () => events(log).some((e) => e.op === "write" && e.length === CS && e.offset > rblock && e.offset !== l1), 10_000);
      await new Promise((r) => setTimeout(r, 300));
      const unflushed = events(log);
      expect(unflushed.filter((e) => e.op === "sync"), `no sync before the flush: ${JSON.stringify(unflushed)}`).toEqual([]);
      expect(unflushed.filter((e) => e.op === "write" && e.length !== CS), `no metadata written before the flush: ${JSON.stringify(unflushed)}`).toEqual([]);
      nbdsh(srv.uri, "h.flush()");
      // nbdsh returned after the flush's reply; strace's log may lag a little: wait for the L1 write and a sync after it.
      await pollUntil("the flush", () => {
        const e = events(log);
        const i = e.findIndex((x) => x.op === "write" && x.offset === l1 && x.length === 8);
        return i >= 0 && e.slice(i).some((x) => x.op === "sync");
      }, 10_000);
      const ev = events(log);
      const at = (pred: (e: Event) => boolean, from = 0) => ev.findIndex((e, i) => i >= from && pred(e));
      const syncBetween = (a: number, b: number) => ev.slice(a + 1, b).some((e) => e.op === "sync");
      const isRefcount = (e: Event) => e.op === "write" && e.offset >= rblock && e.offset < rblock + CS && e.length < CS;
      const data = at((e) => e.op === "write" && e.length === CS && e.offset > rblock && e.offset !== l1);
      expect(data, JSON.stringify(ev)).toBeGreaterThanOrEqual(0);
      const dataOffset = ev[data]!.offset;
      const table = at((e) => e.op === "write" && e.length === CS && e.offset !== dataOffset, data + 1);
      const l1Entry = at((e) => e.op === "write" && e.offset === l1 && e.length === 8, table + 1);
      const refcounts = ev.map((e, i) => (isRefcount(e) ? i : -1)).filter((i) => i >= 0);
      const trace = JSON.stringify(ev);
      expect(refcounts.length, trace).toBeGreaterThan(0);
      expect(table, trace).toBeGreaterThan(data);
      // Every refcount write (the clusters reserved, the data's and the table's among them) is durable
      // before the L2 table that maps them; none comes after it.
      expect(refcounts.every((i) => i < table && syncBetween(i, table)), `refcounts durable before the L2 table: ${trace}`).toBe(true);
      expect(syncBetween(data, table), `copied backing data durable before the L2 table: ${trace}`).toBe(true);
      // The new L2 table is written whole, its entry in it: no separate entry write comes before it.
      expect(ev.slice(0, table).some((e) => e.op === "write" && e.length === 8 && e.offset === ev[table]!.offset), trace).toBe(false);
      expect(l1Entry, trace).toBeGreaterThan(table);
      expect(syncBetween(table, l1Entry), `L2 table durable before L1 points to it: ${trace}`).toBe(true);
      expect(ev.slice(l1Entry + 1).some((e) => e.op === "sync"), `the flush's own sync after L1: ${trace}`).toBe(true);

      // Trim that cluster: the L2 entry is written at the flush, the count goes down (in the cache)
      // only after that flush's sync, and is written at the next flush.
      const before = ev.length;
      nbdsh(srv.uri, "h.trim(65536, 0); h.flush(); h.flush()");
      const freed = rblock + (dataOffset / CS) * 2;
      await pollUntil("the free", () => events(log).slice(before).some((e) => e.op === "write" && e.offset === freed), 10_000);
      const ev2 = events(log).slice(before);
      const entry = ev2.findIndex((e) => e.op === "write" && e.length === 8 && e.offset === ev[table]!.offset);
      const free = ev2.findIndex((e) => e.op === "write" && e.offset === freed);
      expect(entry, JSON.stringify(ev2)).toBeGreaterThanOrEqual(0);
      expect(free, JSON.stringify(ev2)).toBeGreaterThan(entry);
      expect(ev2.slice(entry + 1, free).some((e) => e.op === "sync"), `the entry is durable before the count goes down: ${JSON.stringify(ev2)}`).toBe(true);
      expect(await srv.stop("SIGTERM")).toBe(0);
      await tracerExit;
      execFileSync("qemu-img", ["check", "-q", image]);
    } finally {
      tracer.kill("SIGINT");
      await srv.stop("SIGKILL");
    }
  });
});
