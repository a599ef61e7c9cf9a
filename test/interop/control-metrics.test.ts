import { describe, expect, it } from "vitest";
import { NbdClient } from "../../src/client/nbd-client.js";
import { serve, controlUrl } from "../helpers/serve.js";

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
