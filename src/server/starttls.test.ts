import net from "node:net";
import tls from "node:tls";
import { afterEach, describe, expect, it } from "vitest";
import { NbdClient } from "../client/nbd-client.js";
import { silentLogger } from "../log.js";
import { ClientFlag, NBD_IHAVEOPT, NBD_OPT_REPLY_MAGIC, Opt, Rep } from "../protocol/constants.js";
import { DiskLayer } from "../stack/disk/disk-layer.js";
import { MemoryPort } from "../stack/port/memory-port.js";
import { clientOptions, handshakeTls, type TlsConfig } from "../tls/tls-config.js";
import { Export } from "../stack/export.js";
import { PassthroughLayer, type Io, type Layer } from "../stack/layer.js";
import { NbdServer } from "./server.js";

const MiB = 1024 * 1024;
const KEY = Buffer.alloc(32, 0x5a);
const psk = (mode: "on" | "require"): TlsConfig => ({ mode, verifyPeer: false, psk: [{ identity: "alice", key: KEY }] });

let servers: NbdServer[] = [];
afterEach(async () => {
  await Promise.all(servers.map((s) => s.close()));
  servers = [];
});

/** Every write and read waits `ms` first. */
class Slow extends PassthroughLayer {
  constructor(
    next: Layer,
    private readonly ms: number,
  ) {
    super(next);
  }
  override async pwrite(b: Buffer, o: number, io: Io) {
    await new Promise((r) => setTimeout(r, this.ms));
    return super.pwrite(b, o, io);
  }
  override async pread(b: Buffer, o: number, io: Io) {
    await new Promise((r) => setTimeout(r, this.ms));
    return super.pread(b, o, io);
  }
}

async function start(cfg: TlsConfig | null, handshakeTimeoutMs?: number, slowMs = 0) {
  const disk = new DiskLayer(new MemoryPort({ size: 4 * MiB }));
  const server = new NbdServer({
    limits: handshakeTimeoutMs ? { handshakeTimeoutMs } : undefined,
    exports: [new Export("mem", slowMs ? new Slow(disk, slowMs) : disk)],
    tcp: [{ host: "127.0.0.1", port: 0 }],
    log: silentLogger(),
    tls: cfg ? handshakeTls(cfg) : null,
  });
  await server.start();
  servers.push(server);
  const a = server.addresses()[0] as { host: string; port: number };
  return { host: a.host, port: a.port };
}

/** A hand-driven client: reads exact byte counts, sends options, collects replies. */
async function raw(addr: { host: string; port: number }) {
  const s = net.connect(addr.port, addr.host);
  let buf = Buffer.alloc(0);
  let closed = false;
  let wake: (() => void) | null = null;
  s.on("data", (d: Buffer) => {
    buf = Buffer.concat([buf, d]);
    wake?.();
  });
  s.on("close", () => {
    closed = true;
    wake?.();
  });
  s.on("error", () => undefined);
  const read = async (n: number): Promise<Buffer | null> => {
    while (buf.length < n) {
      if (closed) return null;
      await new Promise<void>((r) => (wake = r));
      wake = null;
    }
    const out = buf.subarray(0, n);
    buf = buf.subarray(n);
    return out;
  };
  await read(18);
  const cf = Buffer.alloc(4);
  cf.writeUInt32BE(ClientFlag.NBD_FLAG_C_FIXED_NEWSTYLE | ClientFlag.NBD_FLAG_C_NO_ZEROES);
  s.write(cf);
  const option = async (opt: number, data: Buffer = Buffer.alloc(0)): Promise<number[] | null> => {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(NBD_IHAVEOPT, 0);
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(data.length, 12);
    s.write(Buffer.concat([h, data]));
    const types: number[] = [];
    for (;;) {
      const r = await read(20);
      if (!r) return null;
      expect(r.readBigUInt64BE(0)).toBe(NBD_OPT_REPLY_MAGIC);
      const type = r.readUInt32BE(12);
      const len = r.readUInt32BE(16);
      if (len) await read(len);
      types.push(type);
      if (type === Rep.NBD_REP_ACK || type >= 0x80000000) return types;
    }
  };
  return { s, option, read, closedSoon: () => new Promise<boolean>((r) => (closed ? r(true) : s.once("close", () => r(true)))) };
}

function infoRequest(name: string): Buffer {
  const n = Buffer.from(name);
  const d = Buffer.alloc(4 + n.length + 2);
  d.writeUInt32BE(n.length, 0);
  n.copy(d, 4);
  return d;
}

describe("NBD_OPT_STARTTLS", () => {
  it("is refused with NBD_REP_ERR_POLICY when TLS is off", async () => {
    const c = await raw(await start(null));
    expect(await c.option(Opt.NBD_OPT_STARTTLS)).toEqual([Rep.NBD_REP_ERR_POLICY]);
    expect(await c.option(Opt.NBD_OPT_LIST)).toEqual([Rep.NBD_REP_SERVER, Rep.NBD_REP_ACK]);
    c.s.destroy();
  });

  it("in require mode answers every option but STARTTLS and ABORT with NBD_REP_ERR_TLS_REQD", async () => {
    const addr = await start(psk("require"));
    const c = await raw(addr);
    for (const opt of [Opt.NBD_OPT_LIST, Opt.NBD_OPT_STRUCTURED_REPLY, Opt.NBD_OPT_INFO, Opt.NBD_OPT_GO, 42]) {
      const data = opt === Opt.NBD_OPT_INFO || opt === Opt.NBD_OPT_GO ? infoRequest("mem") : Buffer.alloc(0);
      expect(await c.option(opt, data)).toEqual([Rep.NBD_REP_ERR_TLS_REQD]);
    }
    expect(await c.option(Opt.NBD_OPT_ABORT)).toEqual([Rep.NBD_REP_ACK]);
    expect(await c.closedSoon()).toBe(true);
  });

  it("in require mode closes the session on NBD_OPT_EXPORT_NAME before TLS", async () => {
    const c = await raw(await start(psk("require")));
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(NBD_IHAVEOPT, 0);
    h.writeUInt32BE(Opt.NBD_OPT_EXPORT_NAME, 8);
    h.writeUInt32BE(3, 12);
    c.s.write(Buffer.concat([h, Buffer.from("mem")]));
    expect(await c.read(1)).toBeNull();
  });

  it("in on mode serves plain clients too", async () => {
    const addr = await start(psk("on"));
    const c = await NbdClient.connect(addr, { exportName: "mem" });
    await c.pwrite(Buffer.alloc(4096, 1), 0);
    await c.disconnect();
  });

  it("a plain client of a require-mode server is refused", async () => {
    const addr = await start(psk("require"));
    await expect(NbdClient.connect(addr, { exportName: "mem" })).rejects.toThrow(/refused NBD_OPT_GO/);
  });

  it("upgrades to TLS 1.3 and 1.2 with PSK; data goes through; a second STARTTLS is invalid", async () => {
    const addr = await start(psk("require"));
    for (const maxVersion of ["TLSv1.3", "TLSv1.2"] as const) {
      const c = await NbdClient.connect(addr, { exportName: "mem", tls: { ...clientOptions(psk("require")), maxVersion } });
      expect((c.socket as tls.TLSSocket).getProtocol()).toBe(maxVersion);
      const data = Buffer.alloc(256 * 1024);
      for (let i = 0; i < data.length; i++) data[i] = (i * 7 + maxVersion.length) & 0xff;
      await c.pwrite(data, MiB);
      await c.flush();
      expect((await c.pread(data.length, MiB)).equals(data)).toBe(true);
      await c.disconnect();
    }

    // A second STARTTLS, by hand over a TLS socket.
    const c = await raw(addr);
    expect(await c.option(Opt.NBD_OPT_STARTTLS)).toEqual([Rep.NBD_REP_ACK]);
    c.s.removeAllListeners("data");
    const t = tls.connect({ socket: c.s, ...clientOptions(psk("require")) });
    await new Promise((r) => t.once("secureConnect", r));
    let got = Buffer.alloc(0);
    t.on("data", (d: Buffer) => (got = Buffer.concat([got, d])));
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(NBD_IHAVEOPT, 0);
    h.writeUInt32BE(Opt.NBD_OPT_STARTTLS, 8);
    t.write(h);
    while (got.length < 20) await new Promise((r) => setTimeout(r, 5));
    expect(got.readUInt32BE(12)).toBe(Rep.NBD_REP_ERR_INVALID);
    t.destroy();
  });

  it("answers the requests in flight when the client half-closes its TLS session", async () => {
    const addr = await start(psk("require"), undefined, 50);
    const c = await NbdClient.connect(addr, { exportName: "mem", tls: clientOptions(psk("require")) });
    const w = c.pwrite(Buffer.alloc(4096, 9), 0);
    const r = c.pread(4096, 0);
    c.end(); // close_notify and FIN, with both requests still in the slow layer
    await w;
    expect((await r).equals(Buffer.alloc(4096, 9))).toBe(true);
  });

  it("refuses a wrong PSK key or identity; the server stays up", async () => {
    const addr = await start(psk("require"));
    const wrongKey: TlsConfig = { mode: "require", verifyPeer: false, psk: [{ identity: "alice", key: Buffer.alloc(32, 1) }] };
    const wrongId: TlsConfig = { mode: "require", verifyPeer: false, psk: [{ identity: "mallory", key: KEY }] };
    await expect(NbdClient.connect(addr, { exportName: "mem", tls: clientOptions(wrongKey) })).rejects.toThrow();
    await expect(NbdClient.connect(addr, { exportName: "mem", tls: clientOptions(wrongId) })).rejects.toThrow();
    const c = await NbdClient.connect(addr, { exportName: "mem", tls: clientOptions(psk("require")) });
    await c.disconnect();
  });

  it("a TLS client of a server without TLS fails rather than going on in plain text", async () => {
    const addr = await start(null);
    await expect(NbdClient.connect(addr, { exportName: "mem", tls: clientOptions(psk("on")) })).rejects.toThrow(/refused NBD_OPT_STARTTLS/);
  });

  it("the handshake timeout also covers a client that stalls inside the TLS handshake", async () => {
    const c = await raw(await start(psk("require"), 300));
    expect(await c.option(Opt.NBD_OPT_STARTTLS)).toEqual([Rep.NBD_REP_ACK]);
    const t0 = Date.now();
    expect(await c.closedSoon()).toBe(true); // never starts TLS
    expect(Date.now() - t0).toBeLessThan(3000);
  });
});
