import { Counter, Gauge, Histogram, Registry } from "prom-client";

const OPS = ["read", "write", "flush", "trim", "cache", "zero", "block_status"] as const;
export type MetricOp = (typeof OPS)[number];

/** Counters of one export and op, looked up once so the data path only increments. */
export interface OpMetrics {
  ok: Counter.Internal;
  error: Counter.Internal;
  bytes: Counter.Internal;
  seconds: Histogram.Internal<string>;
}

/**
 * Prometheus metrics of a server (prom-client): requests, errors, bytes and latency per export
 * and op; connections; and, through collectors, migration and fault state.
 */
export class Metrics {
  readonly registry = new Registry();
  private readonly requests = new Counter({ name: "nbdstack_requests_total", help: "NBD requests answered", labelNames: ["export", "op", "result"], registers: [this.registry] });
  private readonly bytes = new Counter({ name: "nbdstack_bytes_total", help: "Payload bytes read and written", labelNames: ["export", "op"], registers: [this.registry] });
  private readonly latency = new Histogram({
    name: "nbdstack_request_duration_seconds",
    help: "Time from a request's arrival to its reply being queued",
    labelNames: ["export", "op"],
    buckets: [50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1],
    registers: [this.registry],
  });
  readonly connections = new Gauge({ name: "nbdstack_connections", help: "Open NBD connections", registers: [this.registry] });
  private readonly cache = new Map<string, Record<MetricOp, OpMetrics>>();

  forExport(name: string): Record<MetricOp, OpMetrics> {
    let m = this.cache.get(name);
    if (!m) {
      m = Object.fromEntries(
        OPS.map((op) => [
          op,
          {
            ok: this.requests.labels(name, op, "ok"),
            error: this.requests.labels(name, op, "error"),
            bytes: this.bytes.labels(name, op),
            seconds: this.latency.labels(name, op),
          },
        ]),
      ) as Record<MetricOp, OpMetrics>;
      this.cache.set(name, m);
    }
    return m;
  }

  /** A gauge whose values are read when scraped. */
  gauge(name: string, help: string, labelNames: string[], read: (set: (labels: Record<string, string>, v: number) => void) => void): void {
    new Gauge({
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

  text(): Promise<string> {
    return this.registry.metrics();
  }
}
