import { spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { NbdClient } from "../../src/client/nbd-client.js";
import { cli, exportStatus, killLeftovers, pollUntil, scrape } from "../helpers/migration.js";
import { serve, controlUrl, tempDir, type Served } from "../helpers/serve.js";
import { debianEnv, needTools } from "../helpers/tools.js";

/** Parses Prometheus text into "name{labels}" → value. */
function parse(text: string): Map<string, number> {
  const m = new Map<string, number>();
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const i = line.lastIndexOf(" ");
    m.set(line.slice(0, i), Number(line.slice(i + 1)));
  }
  return m;
}

describe("metrics", () => {
  it("counts requests, errors, bytes and latency per export and op, and connections, in Prometheus format", async () => {
    const srv = await serve(["memory:4M", "--control", "127.0.0.1:0"], 2);
    try {
      const ctl = controlUrl(srv);
      const u = new URL(srv.uris[0]!);
      const c = await NbdClient.connect({ host: u.hostname, port: Number(u.port) }, { exportName: "memory" });
      for (let i = 0; i < 10; i++) await c.pwrite(Buffer.alloc(4096, i), i * 4096);
      for (let i = 0; i < 5; i++) await c.pread(8192, i * 8192);
      await expect(c.pread(4096, 4 * 1024 * 1024)).rejects.toMatchObject({ errno: "EINVAL" });
      await c.flush();
      const res = await fetch(`${ctl}/metrics`);
      expect(res.status).toBe(200);
      expect(res.headers.get("content-type")).toMatch(/^text\/plain/);
      const m = parse(await res.text());
      expect(m.get('nbdstack_requests_total{export="memory",op="write",result="ok"}')).toBe(10);
      expect(m.get('nbdstack_requests_total{export="memory",op="read",result="ok"}')).toBe(5);
      expect(m.get('nbdstack_requests_total{export="memory",op="read",result="error"}')).toBe(1);
      expect(m.get('nbdstack_requests_total{export="memory",op="flush",result="ok"}')).toBe(1);
      expect(m.get('nbdstack_bytes_total{export="memory",op="write"}')).toBe(40960);
      expect(m.get('nbdstack_bytes_total{export="memory",op="read"}')).toBe(40960);
      expect(m.get('nbdstack_request_duration_seconds_count{export="memory",op="write"}')).toBe(10);
      expect(m.get('nbdstack_request_duration_seconds_bucket{le="1",export="memory",op="write"}')).toBe(10);
      expect(m.get("nbdstack_connections")).toBe(1);
      await c.disconnect();
    } finally {
      await srv.stop();
    }
  });
});

/** Runs an nbdsh script against `uri` in the background (the python handle is `h`); resolves with its exit and output. */
function nbdshBackground(uri: string, script: string) {
  const p = spawn("nbdsh", ["-u", uri, "-c", script], { stdio: ["ignore", "pipe", "pipe"], env: debianEnv });
  let out = "";
  let err = "";
  p.stdout.on("data", (d) => (out += d));
  p.stderr.on("data", (d) => (err += d));
  return new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => p.on("close", (code) => resolve({ code, stdout: out, stderr: err })));
}

/** Sends `n` writes of 4 KiB (0xab) at once from `at`, waits for all of them, checks each and reads them back. */
const stalledWrites = (n: number, at: number) => `
import nbd
bufs = [nbd.Buffer.from_bytearray(bytearray(b"\\xab" * 4096)) for i in range(${n})]
cs = [h.aio_pwrite(bufs[i], ${at} + i * 4096) for i in range(${n})]
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cs:
    assert h.aio_command_completed(c)
assert h.pread(${n} * 4096, ${at}) == b"\\xab" * (${n} * 4096)
print("ok")
`;

/** Reads 4 KiB at each offset; prints "EIO" or "ok" per read. */
const reads = (offsets: number[]) => `
import errno, nbd
for off in [${offsets.join(", ")}]:
    try:
        h.pread(4096, off)
        print("ok")
    except nbd.Error as e:
        print(e.errno if isinstance(e.errno, str) else errno.errorcode[e.errno])
`;

/**
 * Two nodes on one image (shared storage), a with a fault layer above its port A: what the
 * metrics say about requests in flight through port A and B and about injected faults, as values.
 */
describe.skipIf(!needTools("nbdsh"))("metrics of a node pair: requests in flight per port, faults injected", () => {
  let a: Served;
  let b: Served;
  let A: string;
  let B: string;
  const inflight = (m: Map<string, number>, port: "A" | "B") => m.get(`nbdstack_inflight_requests{export="disk",port="${port}"}`);
  const faults = (m: Map<string, number>, kind: string) => m.get(`nbdstack_faults_injected_total{export="disk",kind="${kind}"}`);
  beforeAll(async () => {
    const dir = tempDir();
    const img = path.join(dir, "disk.img");
    fs.writeFileSync(img, "");
    fs.truncateSync(img, 16 * 1024 * 1024);
    a = await serve([img, "--name", "disk", "--node-id", "a", "--control", "127.0.0.1:0", "--fault"], 2);
    b = await serve([img, "--name", "disk", "--node-id", "b", "--control", "127.0.0.1:0"], 2);
    A = controlUrl(a);
    B = controlUrl(b);
  });
  afterEach(() => killLeftovers());
  afterAll(async () => {
    await b?.stop();
    await a?.stop();
  });

  it("a stall rule holding 5 writes: a's port-A gauge reads 5, b's port-B gauge the 2 it forwarded, all 0 once released", async () => {
    expect((await cli(["fault", "disk", "--control", A, "--add", "op=pwrite,stall"])).status).toBe(0);
    const viaA = nbdshBackground(a.uris[0]!, stalledWrites(3, 0));
    const viaB = nbdshBackground(b.uris[0]!, stalledWrites(2, 65536)); // b forwards them to the owner through its port B
    const ma = await pollUntil("5 writes held at a's port A", async () => {
      const m = await scrape(A);
      return inflight(m, "A") === 5 && m;
    });
    expect(inflight(ma, "B")).toBe(0);
    expect(faults(ma, "stalled")).toBe(5);
    const mb = await pollUntil("2 writes in flight through b's port B", async () => {
      const m = await scrape(B);
      return inflight(m, "B") === 2 && m;
    });
    expect(inflight(mb, "A")).toBe(0);
    // The same numbers in the status.
    expect(await exportStatus(A, "disk")).toMatchObject({ state: "LOCAL", inflightA: 5, inflightB: 0 });
    expect(await exportStatus(B, "disk")).toMatchObject({ state: "REMOTE", inflightA: 0, inflightB: 2 });

    const rel = await cli(["fault", "disk", "--control", A, "--release"]);
    expect(rel.status).toBe(0);
    expect(rel.stdout).toMatch(/^released 5 stalled requests$/m);
    expect((await cli(["fault", "disk", "--control", A, "--clear"])).status).toBe(0);
    for (const r of [await viaA, await viaB]) expect(r).toMatchObject({ code: 0, stdout: "ok\n", stderr: "" });
    const after = await pollUntil("the gauges back at 0", async () => {
      const [m1, m2] = [await scrape(A), await scrape(B)];
      return inflight(m1, "A") === 0 && inflight(m2, "B") === 0 && m1;
    });
    expect(faults(after, "stalled")).toBe(5);
  });

  it("an injected error counts once per failed request: nbdstack_faults_injected_total rises by exactly 3", async () => {
    const before = faults(await scrape(A), "injected") ?? 0;
    expect((await cli(["fault", "disk", "--control", A, "--add", "op=pread,errno=EIO,range=1048576-2097152"])).status).toBe(0);
    // Two reads in the bad range and one outside it on a; one in the bad range through b's port B.
    const ra = await nbdshBackground(a.uris[0]!, reads([1048576, 0, 2093056]));
    const rb = await nbdshBackground(b.uris[0]!, reads([1572864]));
    expect((await cli(["fault", "disk", "--control", A, "--clear"])).status).toBe(0);
    expect(ra).toEqual({ code: 0, stdout: "EIO\nok\nEIO\n", stderr: "" });
    expect(rb).toEqual({ code: 0, stdout: "EIO\n", stderr: "" });
    const m = await scrape(A);
    expect(faults(m, "injected")! - before).toBe(3);
    expect(faults(await scrape(B), "injected")).toBeUndefined(); // b has no fault layer: no series
  });
});
