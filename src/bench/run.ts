import { NbdClient, type NbdAddress } from "../client/nbd-client.js";
import { controlCall, getStatus } from "../control/control-client.js";
import { makeBlock, verifyBlock, type VerifyError } from "./pattern.js";
import { Samples } from "./stats.js";
import { sleeper } from "./sleeper.js";

export type RwMode = "read" | "write" | "randread" | "randwrite" | "randrw";

export interface BenchOptions {
  uri: string;
  rw: RwMode;
  /** Percentage of reads in randrw. */
  mix: number;
  bs: number;
  qd: number;
  conns: number;
  durationMs: number;
  /** Stop after this many bytes instead (0: run for the duration). */
  bytes: number;
  /** Byte range of the export to use: [start, end). end 0 means the export's end. */
  range: { start: number; end: number };
  verify: boolean;
  seed: number;
  /** Move the export between these nodes' control URLs, round robin, every migrateEveryMs. */
  nodes: string[];
  migrateEveryMs: number;
  /** One move at this time instead of moves every migrateEveryMs (0 or absent: none). */
  migrateAtMs?: number;
  /** Scheduled moves are live copies (migration without shared storage) with these settings. */
  migrateCopy?: { mode?: "background" | "write-blocking"; maxRate?: number };
  /** Requests started per second, all connections together (0 or absent: as fast as possible). */
  rateIops?: number;
  /** Fault rules applied at given times through a control URL. */
  faults: Array<{ rule: string; atMs: number }>;
  faultControl?: string;
  onProgress?: (p: { elapsedMs: number; ops: number; errors: number; moves: number }) => void;
}

export interface HandOver {
  index: number;
  from: string;
  to: string;
  startMs: number;
  endMs: number;
  /** Duration reported by the source node. */
  ms: number;
  held: number;
  /**
   * Longest time with no completion from the move's start to 50 ms after its end; for a live copy,
   * from the hand-over's start (copy.handoverStartMs) to 50 ms after the end.
   */
  longestStallMs: number;
  /** A live copy (migrateCopy): its copy phase and hand-over. */
  copy?: LiveCopyMove;
  error?: string;
}

export interface LiveCopyMove {
  /** The mode the copy ended in (it may switch from background to write-blocking). */
  mode: string;
  /** Bytes copied in all passes, hand-over included. */
  copied: number;
  passes: number;
  /** Bytes the first pass had to copy (the image's allocated data when the copy began). */
  total: number;
  /**
   * When the hand-over began at the latest: the send time of the last status poll (every 100 ms)
   * that still saw the copy phase. The copy phase is [startMs, handoverStartMs].
   */
  handoverStartMs: number;
  /** Completions per second during the copy phase. */
  iops: number;
  /** Longest time without a completion during the copy phase. */
  longestCopyGapMs: number;
}

export interface BenchResult {
  options: Omit<BenchOptions, "onProgress">;
  durationMs: number;
  ops: number;
  reads: number;
  writes: number;
  bytes: number;
  errors: number;
  errorSamples: string[];
  verify: { checkedReads: number; readBack: number; failures: VerifyError[] } | null;
  samples: Samples;
  handovers: HandOver[];
  faults: Array<{ rule: string; atMs: number; error?: string }>;
  /** Longest gap between completions away from any hand-over (the machine's own noise). */
  baselineGapMs: number;
}

/** A result with nothing measured yet. */
export function emptyResult(o: BenchOptions): BenchResult {
  return {
    options: { ...o, onProgress: undefined } as BenchResult["options"],
    durationMs: 0,
    ops: 0,
    reads: 0,
    writes: 0,
    bytes: 0,
    errors: 0,
    errorSamples: [],
    verify: o.verify ? { checkedReads: 0, readBack: 0, failures: [] } : null,
    samples: new Samples(),
    handovers: [],
    faults: [],
    baselineGapMs: 0,
  };
}

export function parseNbdUri(uri: string): { addr: NbdAddress; exportName: string } {
  const u = new URL(uri);
  const exportName = decodeURIComponent(u.pathname.replace(/^\//, ""));
  if (u.protocol === "nbd+unix:") {
    const socket = u.searchParams.get("socket");
    if (!socket) throw new Error(`${uri}: nbd+unix URI needs ?socket=PATH`);
    return { addr: { path: socket }, exportName };
  }
  if (u.protocol !== "nbd:") throw new Error(`${uri}: expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH`);
  return { addr: { host: u.hostname.replace(/^\[|\]$/g, ""), port: u.port ? Number(u.port) : 10809 }, exportName };
}

/** Drives the workload, moves and faults; verifies and returns everything measured. */
export async function runBench(o: BenchOptions): Promise<BenchResult> {
  const { addr, exportName } = parseNbdUri(o.uri);
  const clients: NbdClient[] = [];
  for (let i = 0; i < o.conns; i++) clients.push(await NbdClient.connect(addr, { exportName }));
  const size = clients[0]!.size;
  const start = Math.floor(o.range.start / o.bs) * o.bs;
  const end = Math.min(size, o.range.end || size);
  const blocks = Math.floor((end - start) / o.bs);
  if (blocks < 1) throw new Error(`range ${start}-${end} holds no block of ${o.bs} bytes`);
  if (o.qd * o.conns > blocks) throw new Error(`QD ${o.qd} x ${o.conns} connections is more than the ${blocks} blocks in the range`);

  // One request per block at a time, so "the last acknowledged write" of each block is defined.
  const gen = new Uint32Array(blocks);
  const busy = new Uint8Array(blocks);
  let rnd = o.seed >>> 0 || 1;
  const rand = () => (rnd = (Math.imul(rnd, 1103515245) + 12345) >>> 0) / 4294967296;
  let seqNext = 0;
  const pick = (): number => {
    if (o.rw === "read" || o.rw === "write") {
      for (;;) {
        const b = seqNext++ % blocks;
        if (!busy[b]) return b;
      }
    }
    for (;;) {
      const b = Math.floor(rand() * blocks);
      if (!busy[b]) return b;
    }
  };
  const isRead = () => o.rw === "read" || o.rw === "randread" || (o.rw === "randrw" && rand() * 100 < o.mix);

  const r = emptyResult(o);
  const samples = r.samples;
  const t0 = performance.now();
  const now = () => performance.now() - t0;
  let running = true;
  const stopAt = o.durationMs;

  // --rate-iops: every request gets a start slot 1/rate after the previous one (no catching up).
  let nextSlot = 0;
  const pace = async () => {
    const t = now();
    const slot = Math.max(nextSlot, t);
    nextSlot = slot + 1000 / o.rateIops!;
    if (slot > t + 0.5) await new Promise((res) => setTimeout(res, slot - t));
  };
  const worker = async (c: NbdClient) => {
    while (running) {
      if (o.rateIops) await pace();
      if (!running) break;
      if (o.bytes && r.bytes >= o.bytes) break;
      const b = pick();
      busy[b] = 1;
      const off = start + b * o.bs;
      const read = isRead();
      const began = performance.now();
      try {
        if (read) {
          const data = await c.pread(o.bs, off);
          // Only blocks written in this run have a known content.
          if (r.verify && gen[b]! > 0 && r.verify.failures.length < 100) {
            r.verify.checkedReads++;
            const bad = verifyBlock(data, off, gen[b]!, o.seed);
            if (bad) r.verify.failures.push(bad);
          }
          r.reads++;
        } else {
          const g = gen[b]! + 1;
          await c.pwrite(makeBlock(o.bs, off, g, o.seed), off);
          gen[b] = g;
          r.writes++;
        }
        const done = performance.now();
        samples.add(done - t0, (done - began) * 1000);
        r.ops++;
        r.bytes += o.bs;
      } catch (err) {
        r.errors++;
        if (r.errorSamples.length < 20) r.errorSamples.push(`${read ? "read" : "write"} at ${off}: ${(err as Error).message}`);
      } finally {
        busy[b] = 0;
      }
    }
  };
  const workers = clients.flatMap((c) => Array.from({ length: o.qd }, () => worker(c)));

  const schedule = startSchedule(o, exportName, t0, r, () => running);
  const progress = o.onProgress
    ? setInterval(() => o.onProgress!({ elapsedMs: now(), ops: r.ops, errors: r.errors, moves: r.handovers.length }), 200)
    : null;
  // With --bytes the run may end long before --duration: the timer must not keep the process alive.
  let stopTimer: NodeJS.Timeout | undefined;
  const timeUp = new Promise<void>((res) => (stopTimer = setTimeout(res, Math.max(0, stopAt - now()))));
  if (!o.bytes) await timeUp;
  else await Promise.race([timeUp, Promise.all(workers)]);
  clearTimeout(stopTimer);
  running = false;
  schedule.end();
  await Promise.all(workers);
  r.durationMs = now();
  await schedule.done;
  if (progress) clearInterval(progress);

  // Read back every block written and check it holds its last acknowledged generation.
  if (r.verify) {
    const c = clients[0]!;
    for (let b = 0; b < blocks && r.verify.failures.length < 100; b++) {
      if (gen[b] === 0) continue;
      const off = start + b * o.bs;
      const bad = verifyBlock(await c.pread(o.bs, off), off, gen[b]!, o.seed);
      r.verify.readBack++;
      if (bad) r.verify.failures.push(bad);
    }
  }
  await Promise.all(clients.map((c) => c.disconnect().catch(() => c.destroy())));

  finishStalls(r);
  return r;
}

/** Longest stall per hand-over, and the longest gap away from any (the machine's own noise). */
export function finishStalls(r: BenchResult): void {
  const samples = r.samples;
  for (const h of r.handovers) {
    const end = Math.min(h.endMs + 50, r.durationMs);
    if (h.copy && !h.error) {
      const c = h.copy;
      c.handoverStartMs = Math.min(Math.max(c.handoverStartMs, h.startMs), h.endMs);
      const copyMs = c.handoverStartMs - h.startMs;
      c.iops = copyMs > 0 ? (samples.sortedLatencies(h.startMs, c.handoverStartMs).length * 1000) / copyMs : 0;
      c.longestCopyGapMs = copyMs > 0 ? samples.longestGap(h.startMs, c.handoverStartMs) : 0;
      h.longestStallMs = samples.longestGap(c.handoverStartMs, end);
    } else h.longestStallMs = samples.longestGap(h.startMs, end);
  }
  const quiet = [];
  let from = 500;
  for (const h of [...r.handovers].sort((a, b) => a.startMs - b.startMs)) {
    if (h.startMs - 100 > from + 200) quiet.push(samples.longestGap(from, h.startMs - 100));
    from = h.endMs + 500;
  }
  if (r.durationMs - 100 > from + 200) quiet.push(samples.longestGap(from, r.durationMs - 100));
  r.baselineGapMs = quiet.length ? Math.max(...quiet) : 0;
}

/**
 * Runs the moves (--migrate-every over --nodes) and the faults (--fault RULE@T) of a run,
 * recording them in `r`; `t0` is the run's start (performance.now()). `done` resolves when all
 * are done; `end()` says the run is over (it may end before --duration, with --bytes): what is
 * still waiting for its time is not made (a fault is recorded as not applied).
 */
export function startSchedule(o: BenchOptions, exportName: string, t0: number, r: BenchResult, isRunning: () => boolean): { done: Promise<unknown>; end(): void } {
  const now = () => performance.now() - t0;
  const stopAt = o.durationMs;
  const timers: Promise<void>[] = [];
  const { sleepUntil, wakeAll } = sleeper(now);
  const times = o.migrateAtMs ? [o.migrateAtMs] : [];
  if (!o.migrateAtMs && o.migrateEveryMs > 0) for (let at = o.migrateEveryMs; at < stopAt - 200; at += o.migrateEveryMs) times.push(at);
  if (o.nodes.length >= 2 && times.length) {
    timers.push(
      (async () => {
        let owner = await findOwner(o.nodes, exportName);
        for (const [k, at] of times.entries()) {
          const i = k + 1;
          await sleepUntil(at);
          if (!isRunning()) break;
          const from = o.nodes[owner]!;
          const toIdx = (owner + 1) % o.nodes.length;
          const to = o.nodes[toIdx]!;
          const h: HandOver = { index: i, from, to, startMs: now(), endMs: 0, ms: 0, held: 0, longestStallMs: 0 };
          const body = o.migrateCopy ? { to, copy: true, ...(o.migrateCopy.mode ? { mode: o.migrateCopy.mode } : {}), ...(o.migrateCopy.maxRate ? { maxRate: o.migrateCopy.maxRate } : {}) } : { to };
          const watch = o.migrateCopy ? watchCopy(from, exportName, now, h) : null;
          try {
            // A live copy takes as long as the image takes to travel: allow an hour.
            const res = await controlCall<{ ms: number; held?: number; copied?: number; mode?: string }>(from, "POST", `v1/exports/${encodeURIComponent(exportName)}/migrate`, body, o.migrateCopy ? 3_600_000 : 60_000);
            h.ms = res.ms;
            h.held = res.held ?? 0;
            if (h.copy) Object.assign(h.copy, { copied: res.copied ?? 0, mode: res.mode ?? h.copy.mode });
            owner = toIdx;
          } catch (err) {
            h.error = (err as Error).message;
            owner = await findOwner(o.nodes, exportName).catch(() => owner);
          }
          h.endMs = now();
          await watch?.stop();
          r.handovers.push(h);
        }
      })(),
    );
  }
  for (const f of o.faults) {
    timers.push(
      (async () => {
        await sleepUntil(f.atMs);
        const entry: { rule: string; atMs: number; error?: string } = { rule: f.rule, atMs: now() };
        if (!isRunning()) {
          r.faults.push({ ...entry, atMs: f.atMs, error: "the run ended first" });
          return;
        }
        try {
          if (!o.faultControl) throw new Error("no control URL for faults (--fault-control or --nodes)");
          await controlCall(o.faultControl, "POST", `v1/exports/${encodeURIComponent(exportName)}/faults`, { add: f.rule });
        } catch (err) {
          entry.error = (err as Error).message;
        }
        r.faults.push(entry);
      })(),
    );
  }
  return {
    done: Promise.all(timers),
    end: wakeAll,
  };
}

/**
 * Polls the source's status every 100 ms during a live copy: records in `h.copy` when the copy
 * phase was last seen (the hand-over starts after it) and the copy's mode and passes.
 */
function watchCopy(control: string, exportName: string, now: () => number, h: HandOver): { stop(): Promise<void> } {
  h.copy = { mode: "background", copied: 0, passes: 0, total: 0, handoverStartMs: h.startMs, iops: 0, longestCopyGapMs: 0 };
  const c = h.copy;
  let on = true;
  let seen = false; // a finished copy's figures stay in the status until the next one starts
  const loop = (async () => {
    while (on) {
      const sent = now();
      try {
        const st = await getStatus(control);
        const p = (st.exports.find((x) => x.name === exportName) as { copy?: { phase: string; mode: string; passes: number; total: number } } | undefined)?.copy;
        if (p && (p.phase === "starting" || p.phase === "copying")) {
          seen = true;
          c.handoverStartMs = sent;
        }
        if (p && seen) Object.assign(c, { mode: p.mode, passes: p.passes, total: Math.max(c.total, p.total) });
        if (p && seen && p.phase !== "starting" && p.phase !== "copying") break;
      } catch {
        // the status is only a probe; the move's own result decides
      }
      await new Promise((res) => setTimeout(res, Math.max(0, 100 - (now() - sent))));
    }
  })();
  return {
    async stop() {
      on = false;
      await loop;
    },
  };
}

async function findOwner(nodes: string[], exportName: string): Promise<number> {
  const st = await getStatus(nodes[0]!);
  const e = st.exports.find((x) => x.name === exportName);
  if (!e?.owner) throw new Error(`${nodes[0]} does not know the owner of ${exportName}`);
  for (let i = 0; i < nodes.length; i++) {
    const s = i === 0 ? st : await getStatus(nodes[i]!);
    if (s.nodeId === e.owner) return i;
  }
  throw new Error(`the owner of ${exportName} (${e.owner}) is not among --nodes`);
}
