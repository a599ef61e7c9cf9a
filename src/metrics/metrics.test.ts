import { describe, expect, it } from "vitest";
import { newCopyTargetName, publicExportLabel as exportLabel } from "../internal-exports.js";
import { idleProgress } from "../copy/progress.js";
import { Metrics, type CopyJobView } from "./metrics.js";

describe("Metrics", () => {
  it("turns the data path's plain counts into Prometheus series when scraped", async () => {
    const metrics = new Metrics();
    const m = metrics.forExport("disk");
    m.read.record(false, 4096, 40e-6);
    m.read.record(false, 4096, 300e-6);
    m.read.record(true, 4096, 2);
    m.write.record(false, 512, 1e-3); // exactly on a bound: counted in that bucket
    expect(metrics.forExport("disk")).toBe(m);
    const text = await metrics.text();
    const line = (series: string) => text.split("\n").find((l) => l.startsWith(`${series} `))?.split(" ")[1];
    expect(line('nbdstack_requests_total{export="disk",op="read",result="ok"}')).toBe("2");
    expect(line('nbdstack_requests_total{export="disk",op="read",result="error"}')).toBe("1");
    expect(line('nbdstack_bytes_total{export="disk",op="read"}')).toBe("8192");
    expect(line('nbdstack_bytes_total{export="disk",op="write"}')).toBe("512");
    expect(line('nbdstack_request_duration_seconds_bucket{le="0.00005",export="disk",op="read"}')).toBe("1");
    expect(line('nbdstack_request_duration_seconds_bucket{le="0.0005",export="disk",op="read"}')).toBe("2");
    expect(line('nbdstack_request_duration_seconds_bucket{le="1",export="disk",op="read"}')).toBe("2");
    expect(line('nbdstack_request_duration_seconds_bucket{le="+Inf",export="disk",op="read"}')).toBe("3");
    expect(line('nbdstack_request_duration_seconds_count{export="disk",op="read"}')).toBe("3");
    expect(Number(line('nbdstack_request_duration_seconds_sum{export="disk",op="read"}'))).toBeCloseTo(2.00034, 6);
    expect(line('nbdstack_request_duration_seconds_bucket{le="0.001",export="disk",op="write"}')).toBe("1");
    expect(line('nbdstack_request_duration_seconds_bucket{le="0.0005",export="disk",op="write"}')).toBe("0");
    expect(text).toMatch(/^# TYPE nbdstack_request_duration_seconds histogram$/m);
    expect(text).not.toMatch(/op="flush"/); // nothing recorded, no series
  });

  it("labels a hidden export without its secret: GET /metrics needs no token", async () => {
    expect(exportLabel(newCopyTargetName("vm/disk"))).toBe("@copy-target/vm/disk");
    expect(exportLabel("disk/p1")).toBe("disk/p1");
    const metrics = new Metrics();
    metrics.forExport(newCopyTargetName("disk")).write.record(false, 512, 1e-3);
    const text = await metrics.text();
    expect(text).not.toMatch(/0123456789abcdef/);
    expect(text).toMatch(/^nbdstack_requests_total\{export="@copy-target\/disk",op="write",result="ok"\} 1$/m);
  });

  it("exports every copy as one family, nbdstack_copy_*{export, job}, read once per scrape", async () => {
    const metrics = new Metrics();
    let reads = 0;
    const jobs: CopyJobView[] = [
      { export: "vm", job: "resync", leg: 1, progress: { ...idleProgress(), state: "running", doneBytes: 3 << 20, totalBytes: 8 << 20, dirtyBytes: 5 << 20, rate: 1 << 20, etaSeconds: 5, failures: 2 } },
      { export: "db", job: "merge", progress: { ...idleProgress(), state: "done", doneBytes: 65536, totalBytes: 65536, etaSeconds: 0 } },
      { export: newCopyTargetName("disk"), job: "live-copy", progress: { ...idleProgress(), state: "failed", error: "cancelled" } },
    ];
    metrics.copyJobs(() => (reads++, jobs));
    const text = await metrics.text();
    const line = (series: string) => text.split("\n").find((l) => l.startsWith(`${series} `))?.split(" ")[1];
    expect(reads).toBe(1);
    expect(line('nbdstack_copy_done_bytes{export="vm",job="resync",leg="1"}')).toBe(String(3 << 20));
    expect(line('nbdstack_copy_total_bytes{export="vm",job="resync",leg="1"}')).toBe(String(8 << 20));
    expect(line('nbdstack_copy_dirty_bytes{export="vm",job="resync",leg="1"}')).toBe(String(5 << 20));
    expect(line('nbdstack_copy_rate_bytes_per_second{export="vm",job="resync",leg="1"}')).toBe(String(1 << 20));
    expect(line('nbdstack_copy_eta_seconds{export="vm",job="resync",leg="1"}')).toBe("5");
    expect(line('nbdstack_copy_failures{export="vm",job="resync",leg="1"}')).toBe("2");
    expect(line('nbdstack_copy_state{export="vm",job="resync",leg="1",state="running"}')).toBe("1");
    expect(line('nbdstack_copy_state{export="vm",job="resync",leg="1",state="done"}')).toBe("0");
    expect(line('nbdstack_copy_done_bytes{export="db",job="merge"}')).toBe("65536");
    expect(line('nbdstack_copy_state{export="db",job="merge",state="done"}')).toBe("1");
    expect(line('nbdstack_copy_state{export="@copy-target/disk",job="live-copy",state="failed"}')).toBe("1");
    expect(line('nbdstack_copy_eta_seconds{export="@copy-target/disk",job="live-copy"}')).toBeUndefined(); // unknown: no series
    await new Promise((r) => setImmediate(r));
    await metrics.text();
    expect(reads).toBe(2);
  });

  it("exports the memory budget: limit, bytes held now and at most, reservations waiting now and in all", async () => {
    const metrics = new Metrics();
    metrics.memoryBudget(() => ({ limit: 32 << 20, used: 5 << 20, buffered: 1 << 20, cached: 3 << 20, peak: 31 << 20, waiting: 2, waits: 17 }));
    const text = await metrics.text();
    const line = (series: string) => text.split("\n").find((l) => l.startsWith(`${series} `))?.split(" ")[1];
    expect(line("nbdstack_memory_budget_limit_bytes")).toBe(String(32 << 20));
    expect(line("nbdstack_memory_budget_used_bytes")).toBe(String(5 << 20));
    expect(line("nbdstack_memory_budget_buffered_bytes")).toBe(String(1 << 20));
    expect(line("nbdstack_memory_budget_cached_bytes")).toBe(String(3 << 20));
    expect(line("nbdstack_memory_budget_peak_bytes")).toBe(String(31 << 20));
    expect(line("nbdstack_memory_budget_waiting")).toBe("2");
    expect(line("nbdstack_memory_budget_waits_total")).toBe("17");
    expect(text).toMatch(/^# TYPE nbdstack_memory_budget_waits_total counter$/m);
  });
});
