import { percentile } from "./stats.js";
import type { BenchResult } from "./run.js";

const f1 = (n: number) => (Number.isFinite(n) ? n.toFixed(1) : "-");

/** The numbers of a run, as printed and as written to --json. */
export function summarize(r: BenchResult) {
  const lat = r.samples.sortedLatencies();
  const sec = r.durationMs / 1000;
  return {
    uri: r.options.uri,
    workload: `${r.options.rw}${r.options.rw === "randrw" ? ` ${r.options.mix}% reads` : ""}, bs ${r.options.bs}, QD ${r.options.qd} x ${r.options.conns} conn`,
    seconds: Number(sec.toFixed(2)),
    ops: r.ops,
    iops: Math.round(r.ops / sec),
    mibPerSec: Number((r.bytes / 1048576 / sec).toFixed(1)),
    latencyUs: {
      p50: percentile(lat, 50),
      p90: percentile(lat, 90),
      p99: percentile(lat, 99),
      p999: percentile(lat, 99.9),
      max: lat.length ? lat[lat.length - 1]! : NaN,
    },
    errors: r.errors,
    verify: r.verify ? (r.verify.failures.length ? "FAILED" : "ok") : "off",
    verifyDetail: r.verify,
    baselineGapMs: Number(r.baselineGapMs.toFixed(1)),
    handovers: r.handovers.map((h) => ({ ...h, startMs: Math.round(h.startMs), endMs: Math.round(h.endMs), ms: Number(h.ms.toFixed(1)), longestStallMs: Number(h.longestStallMs.toFixed(1)) })),
    faults: r.faults,
  };
}

export function summaryText(r: BenchResult): string {
  const s = summarize(r);
  const L = s.latencyUs;
  const lines = [
    `nbdstack bench ${s.uri}: ${s.workload}, ${s.seconds} s`,
    `  IOPS ${s.iops}   MiB/s ${s.mibPerSec}   requests ${s.ops}   errors ${s.errors}   verify ${s.verify}`,
    `  latency µs: p50 ${f1(L.p50)}  p90 ${f1(L.p90)}  p99 ${f1(L.p99)}  p99.9 ${f1(L.p999)}  max ${f1(L.max)}`,
  ];
  if (r.verify?.failures.length) for (const f of r.verify.failures.slice(0, 10)) lines.push(`  VERIFY FAILED at offset ${f.offset}: ${f.reason}`);
  for (const e of r.errorSamples.slice(0, 5)) lines.push(`  error: ${e}`);
  if (s.handovers.length) {
    lines.push(`  hand-overs (longest gap between completions away from them: ${s.baselineGapMs} ms):`);
    lines.push("    #   at s    from → to                                    move ms  longest stall ms  held");
    for (const h of s.handovers) {
      lines.push(
        `    ${String(h.index).padEnd(3)} ${(h.startMs / 1000).toFixed(2).padStart(6)}  ${`${h.from} → ${h.to}`.padEnd(44)} ${f1(h.ms).padStart(7)}  ${f1(h.longestStallMs).padStart(16)}  ${String(h.held).padStart(4)}${h.error ? `  FAILED: ${h.error}` : ""}`,
      );
    }
  }
  for (const f of s.faults) lines.push(`  fault at ${(f.atMs / 1000).toFixed(2)} s: ${f.rule}${f.error ? `  (not applied: ${f.error})` : ""}`);
  return lines.join("\n");
}

/** The raw series for --json: summary, 100 ms buckets, hand-overs, faults. */
export function jsonReport(r: BenchResult): string {
  return JSON.stringify({ summary: summarize(r), timeline: r.samples.timeline(100, r.durationMs) }, null, 2);
}

const esc = (s: string) => s.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]!);

/** One SVG line chart of a series over time, with hand-overs and faults marked. */
function chart(title: string, unit: string, points: Array<{ t: number; v: number }>, r: BenchResult, id: string): string {
  const W = 900;
  const H = 240;
  const pad = { l: 70, r: 20, t: 30, b: 40 };
  const max = Math.max(1, ...points.map((p) => p.v)) * 1.1;
  const x = (t: number) => pad.l + (t / Math.max(1, r.durationMs)) * (W - pad.l - pad.r);
  const y = (v: number) => H - pad.b - (v / max) * (H - pad.t - pad.b);
  const path = points.map((p, i) => `${i ? "L" : "M"}${x(p.t + 50).toFixed(1)},${y(p.v).toFixed(1)}`).join(" ");
  const ticks = [0, 0.25, 0.5, 0.75, 1].map((k) => {
    const v = max * k;
    return `<line x1="${pad.l}" x2="${W - pad.r}" y1="${y(v)}" y2="${y(v)}" stroke="#ddd"/><text x="${pad.l - 6}" y="${y(v) + 4}" text-anchor="end" font-size="11">${Math.round(v)}</text>`;
  });
  const seconds = Math.floor(r.durationMs / 1000);
  const xt = Array.from({ length: seconds + 1 }, (_, s) => `<text x="${x(s * 1000)}" y="${H - pad.b + 16}" text-anchor="middle" font-size="11">${s}s</text>`);
  const marks = r.handovers.map(
    (h) =>
      `<g class="handover" data-index="${h.index}" data-start-ms="${h.startMs.toFixed(0)}" data-stall-ms="${h.longestStallMs.toFixed(1)}"><rect x="${x(h.startMs)}" y="${pad.t}" width="${Math.max(2, x(h.endMs) - x(h.startMs))}" height="${H - pad.t - pad.b}" fill="#f80" opacity="0.35"/><text x="${x(h.startMs) + 3}" y="${pad.t + 12}" font-size="10" fill="#a50">→${esc(h.to.replace(/^https?:\/\//, ""))}</text></g>`,
  );
  const faults = r.faults.filter((f) => !f.error).map(
    (f) => `<g class="fault"><line x1="${x(f.atMs)}" x2="${x(f.atMs)}" y1="${pad.t}" y2="${H - pad.b}" stroke="#c00" stroke-dasharray="4 3"/><title>${esc(f.rule)}</title></g>`,
  );
  return `<svg id="${id}" xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}">
<text x="${pad.l}" y="18" font-size="14" font-weight="bold">${esc(title)} (${unit}, 100 ms buckets)</text>
${ticks.join("\n")}
${xt.join("\n")}
${marks.join("\n")}
${faults.join("\n")}
<path d="${path}" fill="none" stroke="#1565c0" stroke-width="1.5"/>
</svg>`;
}

/** A self-contained HTML page: summary, IOPS and p99 charts; no network needed to view it. */
export function htmlReport(r: BenchResult): string {
  const tl = r.samples.timeline(100, r.durationMs);
  const iops = chart("IOPS", "requests/s", tl.map((b) => ({ t: b.t, v: b.iops })), r, "iops");
  const p99 = chart("p99 latency", "µs", tl.map((b) => ({ t: b.t, v: b.p99 })), r, "p99");
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>nbdstack bench</title>
<style>body{font-family:system-ui,sans-serif;margin:24px;color:#222}pre{background:#f6f6f6;padding:12px;font-size:13px}svg{display:block;margin:16px 0;background:#fff;border:1px solid #eee}</style>
</head><body>
<h1>nbdstack bench</h1>
<pre>${esc(summaryText(r))}</pre>
${iops}
${p99}
<p>Orange bands: hand-overs (the export moving between nodes). Dashed red lines: faults applied.</p>
</body></html>
`;
}
