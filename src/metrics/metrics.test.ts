import { describe, expect, it } from "vitest";
import { newCopyTargetName, publicExportLabel as exportLabel } from "../internal-exports.js";
import { Metrics } from "./metrics.js";

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
});
