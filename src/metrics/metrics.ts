import { createRequire } from "node:module";
import type PromClient from "prom-client";
import type { Registry } from "prom-client";
import type { CopyJob, CopyProgress } from "../copy/progress.js";
import { publicExportLabel } from "../internal-exports.js";
import { Cmd } from "../protocol/constants.js";

const OPS = ["read", "write", "flush", "trim", "cache", "zero", "block_status"] as const;
export type MetricOp = (typeof OPS)[number];

const OP_OF_CMD: Readonly<Record<number, MetricOp>> = {
  [Cmd.NBD_CMD_READ]: "read",
  [Cmd.NBD_CMD_WRITE]: "write",
  [Cmd.NBD_CMD_FLUSH]: "flush",
  [Cmd.NBD_CMD_TRIM]: "trim",
  [Cmd.NBD_CMD_CACHE]: "cache",
  [Cmd.NBD_CMD_WRITE_ZEROES]: "zero",
  [Cmd.NBD_CMD_BLOCK_STATUS]: "block_status",
};

/** The op an NBD command is counted under. */
export function metricOpOf(cmd: number): MetricOp {
  return OP_OF_CMD[cmd] ?? "read";
}
const LATENCY_BUCKETS = [50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1];

/**
 * What one export's requests of one op did: plain numbers the data path adds to (prom-client's
 * own inc/observe hash their labels on every call, over a microsecond a request). They are
 * turned into Prometheus series only when scraped.
 */
export class OpMetrics {
  ok = 0;
  error = 0;
  bytes = 0;
  seconds = 0;
  /** Requests per latency bucket (not cumulative); the last slot counts those over 1 s. */
  readonly buckets = new Float64Array(LATENCY_BUCKETS.length + 1);

  /** One answered request: whether it failed, its payload bytes, and how long it took (s). */
  record(failed: boolean, bytes: number, seconds: number): void {
    if (failed) this.error++;
    else {
      this.ok++;
      this.bytes += bytes;
    }
    this.seconds += seconds;
    let i = 0;
    while (i < LATENCY_BUCKETS.length && seconds > LATENCY_BUCKETS[i]!) i++;
    this.buckets[i]!++;
  }
}

/** A copy a server runs or ran (a live copy, a mirror leg's resync, a cow merge), for the nbdstack_copy_* metrics. */
export interface CopyJobView {
  export: string;
  job: CopyJob;
  /** The mirror leg a resync rebuilds. */
  leg?: number;
  progress: CopyProgress;
}

const COPY_STATES = ["running", "done", "failed"] as const;

/** One event loop's request counts per export and op, as `serve --threads` sends them between loops. */
export type OpCounts = Array<{ export: string; op: MetricOp; ok: number; error: number; bytes: number; seconds: number; buckets: number[] }>;

/** What the nbdstack_memory_budget_* gauges show of one memory budget. */
export interface BudgetView {
  limit: number;
  used: number;
  buffered: number;
  cached: number;
  peak: number;
  waiting: number;
  waits: number;
}

/** What a worker loop of `serve --threads` reports at each scrape: its request counts and its memory budget. */
export interface LoopCounts {
  ops: OpCounts;
  budget: BudgetView | null;
}

/**
 * Prometheus metrics of a server (prom-client): requests, errors, bytes and latency per export
 * and op; connections; and, through collectors, migration and fault state.
 */
/**
 * prom-client, loaded when the first Metrics is made: a server without a control API never
 * collects metrics, and the module costs ~5 MiB of resident memory.
 */
let prom: typeof PromClient | null = null;
function promClient(): typeof PromClient {
  return (prom ??= createRequire(import.meta.url)("prom-client") as typeof PromClient);
}

export class Metrics {
  readonly registry = new (promClient().Registry)();
  readonly connections = new (promClient().Gauge)({ name: "nbdstack_connections", help: "Open NBD connections", registers: [this.registry] });
  private readonly cache = new Map<string, Record<MetricOp, OpMetrics>>();
  /** serve --threads: the other event loops' counts, fetched at each scrape. */
  private loops: (() => Promise<LoopCounts[]>) | null = null;
  /** This loop's counts and the other loops' added up, for the scrape under way. */
  private merged: Map<string, Record<MetricOp, OpMetrics>> | null = null;
  /** The other loops' memory budgets, for the scrape under way. */
  private loopBudgets: BudgetView[] = [];
  private budgetRead: (() => BudgetView) | null = null;

  constructor() {
    const all = () => [...(this.merged ?? this.cache)].flatMap(([name, ops]) => OPS.map((op) => [name, op, ops[op]] as const));
    new (promClient().Counter)({
      name: "nbdstack_requests_total",
      help: "NBD requests answered",
      labelNames: ["export", "op", "result"],
      registers: [this.registry],
      collect() {
        this.reset();
        for (const [name, op, m] of all()) {
          if (m.ok) this.inc({ export: name, op, result: "ok" }, m.ok);
          if (m.error) this.inc({ export: name, op, result: "error" }, m.error);
        }
      },
    });
    new (promClient().Counter)({
      name: "nbdstack_bytes_total",
      help: "Payload bytes read and written",
      labelNames: ["export", "op"],
      registers: [this.registry],
      collect() {
        this.reset();
        for (const [name, op, m] of all()) if (m.bytes) this.inc({ export: name, op }, m.bytes);
      },
    });
    // A histogram in the exposition format, built from the buckets at scrape time.
    const latency = {
      name: "nbdstack_request_duration_seconds",
      help: "Time from a request's arrival to its reply being queued",
      type: "histogram",
      aggregator: "sum",
      get: async () => {
        const values: Array<{ labels: Record<string, string | number>; value: number; metricName: string }> = [];
        for (const [name, op, m] of all()) {
          const count = m.ok + m.error;
          if (!count) continue;
          let cumulative = 0;
          LATENCY_BUCKETS.forEach((le, i) => {
            cumulative += m.buckets[i]!;
            values.push({ labels: { le, export: name, op }, value: cumulative, metricName: `${latency.name}_bucket` });
          });
          values.push({ labels: { le: "+Inf", export: name, op }, value: count, metricName: `${latency.name}_bucket` });
          values.push({ labels: { export: name, op }, value: m.seconds, metricName: `${latency.name}_sum` });
          values.push({ labels: { export: name, op }, value: count, metricName: `${latency.name}_count` });
        }
        return { name: latency.name, help: latency.help, type: latency.type, values, aggregator: latency.aggregator };
      },
    };
    this.registry.registerMetric(latency as unknown as Parameters<Registry["registerMetric"]>[0]);
  }

  /** The counts of export `name`, created on first use; internal exports are counted under their public label: GET /metrics needs no token, so no secret name may show. */
  forExport(name: string): Record<MetricOp, OpMetrics> {
    const label = publicExportLabel(name);
    let m = this.cache.get(label);
    if (!m) {
      m = Object.fromEntries(OPS.map((op) => [op, new OpMetrics()])) as Record<MetricOp, OpMetrics>;
      this.cache.set(label, m);
    }
    return m;
  }

  /** A gauge whose values are read when scraped. */
  gauge(name: string, help: string, labelNames: string[], read: (set: (labels: Record<string, string>, v: number) => void) => void): void {
    new (promClient().Gauge)({
      name,
      help,
      labelNames,
      registers: [this.registry],
      collect() {
        this.reset();
        read((labels, v) => this.set(labels, v));
      },
    });
  }

  /**
   * The one family of copy metrics, nbdstack_copy_*{export, job, leg (resyncs only)}, from the
   * CopyProgress of every copy `read` lists: bytes done, total and dirty, rate, ETA, failures, state.
   */
  copyJobs(read: () => CopyJobView[]): void {
    // One read per scrape: the gauges of one scrape are collected before any timer runs.
    let jobs: CopyJobView[] | null = null;
    const each = (f: (j: CopyJobView, labels: Record<string, string>, set: (labels: Record<string, string>, v: number) => void) => void) => (set: (labels: Record<string, string>, v: number) => void) => {
      if (!jobs) {
        jobs = read();
        setImmediate(() => (jobs = null));
      }
      for (const j of jobs) f(j, { export: publicExportLabel(j.export), job: j.job, ...(j.leg !== undefined ? { leg: String(j.leg) } : {}) }, set);
    };
    const names = ["export", "job", "leg"];
    this.gauge("nbdstack_copy_done_bytes", "Bytes copied by the running or last copy", names, each((j, l, set) => set(l, j.progress.doneBytes)));
    this.gauge("nbdstack_copy_total_bytes", "Bytes the running or last copy was given to copy", names, each((j, l, set) => set(l, j.progress.totalBytes)));
    this.gauge("nbdstack_copy_dirty_bytes", "Bytes still to copy (dirty or in flight)", names, each((j, l, set) => set(l, j.progress.dirtyBytes)));
    this.gauge("nbdstack_copy_rate_bytes_per_second", "Copy rate over the last seconds", names, each((j, l, set) => set(l, j.progress.rate)));
    this.gauge("nbdstack_copy_eta_seconds", "Seconds until nothing is dirty at the current rate (absent while nothing moves)", names, each((j, l, set) => j.progress.etaSeconds !== null && set(l, j.progress.etaSeconds)));
    this.gauge("nbdstack_copy_failures", "Copies of the running or last copy that failed and were retried", names, each((j, l, set) => set(l, j.progress.failures)));
    this.gauge("nbdstack_copy_state", "1 for the copy's current state", [...names, "state"], each((j, l, set) => {
      for (const st of COPY_STATES) set({ ...l, state: st }, j.progress.state === st ? 1 : 0);
    }));
  }

  /**
   * The process-wide memory budget (server/memory-budget.ts): its limit, the bytes held now and at
   * most, reservations waiting now, and reservations that had to wait since the start.
   */
  memoryBudget(own: () => BudgetView): void {
    this.budgetRead = own;
    // With serve --threads, every loop's budget added up (the peak: the sum of each loop's peak).
    const read = (): BudgetView => {
      const b = { ...own() };
      for (const l of this.loopBudgets) for (const k of Object.keys(b) as Array<keyof BudgetView>) b[k] += l[k];
      return b;
    };
    this.gauge("nbdstack_memory_budget_limit_bytes", "The memory budget (--max-memory)", [], (set) => set({}, read().limit));
    this.gauge("nbdstack_memory_budget_used_bytes", "Bytes of the memory budget held now: payloads in flight, replies not yet taken by clients, handshake bytes", [], (set) => set({}, read().used));
    this.gauge("nbdstack_memory_budget_buffered_bytes", "Of the bytes held, those read from sockets and not parsed yet (they never hold up a reservation)", [], (set) => set({}, read().buffered));
    this.gauge("nbdstack_memory_budget_cached_bytes", "Free I/O buffers kept for reuse, within what the reservations leave of the budget", [], (set) => set({}, read().cached));
    this.gauge("nbdstack_memory_budget_peak_bytes", "Most bytes of the memory budget ever held at once", [], (set) => set({}, read().peak));
    this.gauge("nbdstack_memory_budget_waiting", "Reservations waiting for memory now (their connections are paused)", [], (set) => set({}, read().waiting));
    new (promClient().Counter)({
      name: "nbdstack_memory_budget_waits_total",
      help: "Reservations that had to wait for memory",
      registers: [this.registry],
      collect() {
        this.reset();
        this.inc(read().waits);
      },
    });
  }

  /** This loop's request counts and memory budget (serve --threads: a worker loop's answer to the primary). */
  snapshot(): LoopCounts {
    const ops = [...this.cache].flatMap(([name, m]) => OPS.map((op) => ({ export: name, op, ok: m[op].ok, error: m[op].error, bytes: m[op].bytes, seconds: m[op].seconds, buckets: [...m[op].buckets] })));
    return { ops, budget: this.budgetRead?.() ?? null };
  }

  /** serve --threads: the counts and budgets of the other event loops, fetched at each scrape and added to this one's. */
  addLoops(fetch: () => Promise<LoopCounts[]>): void {
    this.loops = fetch;
  }

  async text(): Promise<string> {
    if (!this.loops) return this.registry.metrics();
    const merged = new Map<string, Record<MetricOp, OpMetrics>>();
    const add = (c: OpCounts[number]) => {
      let ops = merged.get(c.export);
      if (!ops) merged.set(c.export, (ops = Object.fromEntries(OPS.map((op) => [op, new OpMetrics()])) as Record<MetricOp, OpMetrics>));
      const m = ops[c.op];
      m.ok += c.ok;
      m.error += c.error;
      m.bytes += c.bytes;
      m.seconds += c.seconds;
      c.buckets.forEach((n, i) => (m.buckets[i]! += n));
    };
    for (const c of this.snapshot().ops) add(c);
    const loops = await this.loops();
    for (const loop of loops) for (const c of loop.ops) add(c);
    this.merged = merged;
    this.loopBudgets = loops.flatMap((l) => (l.budget ? [l.budget] : []));
    try {
      return await this.registry.metrics();
    } finally {
      this.merged = null;
      this.loopBudgets = [];
    }
  }
}
