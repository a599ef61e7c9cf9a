import { pino } from "pino";
import { afterEach, describe, expect, it, vi } from "vitest";
import { mirrorCommand } from "../../commands/volume.js";
import { controlCall, ControlError, setControlToken } from "../../control/control-client.js";
import { ControlServer } from "../../control/control-server.js";
import { attachMirrorRoutes } from "../../control/volume-routes.js";
import { FaultLayer } from "../fault/fault-layer.js";
import { plainIo } from "../layer.js";
import { MemoryPort } from "../port/memory-port.js";
import { MirrorLayer, type MirrorStatus } from "./mirror-layer.js";

const TOKEN = "t".repeat(32);
let server: ControlServer | null = null;

afterEach(async () => {
  vi.restoreAllMocks();
  await server?.close();
  server = null;
});

async function setup() {
  const ports = [new MemoryPort({ size: 4 << 20 }), new MemoryPort({ size: 4 << 20 })];
  const faults = ports.map((p) => new FaultLayer(p));
  const m = new MirrorLayer(faults, { resyncChunk: 65536 });
  await m.open();
  await m.pwrite(Buffer.alloc(1 << 20, 7), 0, plainIo);
  faults[1]!.addRule("op=pwrite,errno=EIO,once");
  await m.pwrite(Buffer.alloc(4096, 8), 0, plainIo);
  server = new ControlServer(pino({ level: "silent" }), TOKEN);
  attachMirrorRoutes(server, new Map([["vm", m]]));
  const url = await server.listen("127.0.0.1", 0);
  setControlToken(TOKEN);
  return { m, ports, url };
}

describe("mirror control routes and command", () => {
  it("shows the legs, starts a resync at once and shows it finish", async () => {
    const { m, ports, url } = await setup();
    const s = await controlCall<MirrorStatus>(url, "GET", "v1/exports/vm/mirror");
    expect(s.legs.map((l) => l.state)).toEqual(["ok", "degraded"]);
    const started = await controlCall<MirrorStatus & { started: number }>(url, "POST", "v1/exports/vm/mirror", { resync: 1 });
    expect(started.started).toBe(1);
    expect(started.legs[1]!.state).toBe("resyncing");
    for (;;) {
      const now = await controlCall<MirrorStatus>(url, "GET", "v1/exports/vm/mirror");
      if (now.legs[1]!.state !== "resyncing") break;
      await new Promise((r) => setTimeout(r, 5));
    }
    expect(m.status().legs[1]).toMatchObject({ state: "ok", resync: { done: 4 << 20, total: 4 << 20 } });
    const a = Buffer.alloc(4 << 20);
    const b = Buffer.alloc(4 << 20);
    await ports[0]!.pread(a, 0, plainIo);
    await ports[1]!.pread(b, 0, plainIo);
    expect(a.equals(b)).toBe(true);
  });

  it("answers 404, 400 and 409 for unknown exports, bad bodies and legs that cannot resync", async () => {
    const { url } = await setup();
    const status = (p: Promise<unknown>) => p.then(() => 200, (e: unknown) => (e as ControlError).status);
    expect(await status(controlCall(url, "GET", "v1/exports/nope/mirror"))).toBe(404);
    expect(await status(controlCall(url, "POST", "v1/exports/vm/mirror", {}))).toBe(400);
    expect(await status(controlCall(url, "POST", "v1/exports/vm/mirror", { resync: "1" }))).toBe(400);
    expect(await status(controlCall(url, "POST", "v1/exports/vm/mirror", { resync: 0 }))).toBe(409);
    expect(await status(controlCall(url, "POST", "v1/exports/vm/mirror", { resync: 9 }))).toBe(409);
  });

  it("nbdstack mirror --resync N --wait waits for the resync and prints the final table", async () => {
    const { url } = await setup();
    const out: string[] = [];
    const err: string[] = [];
    vi.spyOn(process.stdout, "write").mockImplementation((s: string | Uint8Array) => (out.push(String(s)), true));
    vi.spyOn(process.stderr, "write").mockImplementation((s: string | Uint8Array) => (err.push(String(s)), true));
    await mirrorCommand("vm", { control: url, resync: 1, wait: true, interval: 5 });
    const text = out.join("");
    expect(text).toMatch(/^resync of leg 1 started\nmirror of 2 legs, 4194304 bytes, 2 healthy\n/);
    expect(text).toMatch(/^1\s+ok\s+1\s+100% \(4\.0\/4\.0 MiB\)/m);
    // The progress bar is on stderr (not a terminal here: a line at a time), and ends at 100%.
    for (const line of err) expect(line).toMatch(/^leg 1 resync \[[█░]{40}\] \d+% \| [\d.]+\/4\.0 MiB \| .* \| ETA \S+\n$/);
    if (err.length) expect(err.at(-1)).toMatch(/^leg 1 resync \[█{40}\] 100% \| 4\.0\/4\.0 MiB/);
    out.length = 0;
    err.length = 0;
    await mirrorCommand("vm", { control: url, json: true, interval: 5 });
    expect(err).toEqual([]);
    expect((JSON.parse(out.join("")) as MirrorStatus).healthy).toBe(2);
  });
});
