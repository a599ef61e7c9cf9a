import net from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { NbdClient } from "../../src/client/nbd-client.js";
import { silentLogger } from "../../src/log.js";
import { Export } from "../../src/server/export.js";
import { NbdServer } from "../../src/server/server.js";
import { DiskLayer } from "../../src/stack/disk/disk-layer.js";
import { MemoryPort } from "../../src/stack/port/memory-port.js";

/**
 * Seeded protocol fuzzing against a live server: malformed handshakes, options and requests,
 * truncated frames, huge lengths, wrong magics, out-of-order options. The server must stay up,
 * a well-behaved client must see no error, and memory must stay bounded.
 * Short pass in CI; FUZZ_ITERATIONS=20000 FUZZ_SEED=… for a long one.
 */
const ITERATIONS = Number(process.env.FUZZ_ITERATIONS ?? 400);
const SEED = Number(process.env.FUZZ_SEED ?? 20261122);
const MiB = 1024 * 1024;

let x = SEED >>> 0 || 1;
const rnd = () => (x = (Math.imul(x, 1103515245) + 12345) >>> 0) / 4294967296;
const int = (n: number) => Math.floor(rnd() * n);
const bytes = (n: number) => Buffer.from(Array.from({ length: n }, () => int(256)));

function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
}
function option(opt: number, data: Buffer, len = data.length): Buffer {
  const h = Buffer.alloc(16);
  h.write("IHAVEOPT", 0, "latin1");
  h.writeUInt32BE(opt >>> 0, 8);
  h.writeUInt32BE(len >>> 0, 12);
  return Buffer.concat([h, data]);
}
function request(type: number, flags: number, offset: bigint, length: number, magic = 0x25609513): Buffer {
  const b = Buffer.alloc(28);
  b.writeUInt32BE(magic >>> 0, 0);
  b.writeUInt16BE(flags & 0xffff, 4);
  b.writeUInt16BE(type & 0xffff, 6);
  b.writeBigUInt64BE(BigInt(int(2 ** 31)), 8);
  b.writeBigUInt64BE(offset, 16);
  b.writeUInt32BE(length >>> 0, 24);
  return b;
}
const goNamed = (name: string) => {
  const n = Buffer.from(name);
  return option(7, Buffer.concat([u32(n.length), n, Buffer.from([0, 0])]));
};

/** One hostile conversation, chosen by the PRNG. */
function hostile(): Buffer[] {
  const flags = u32(int(4) === 0 ? int(2 ** 32) : 3);
  switch (int(6)) {
    case 0:
      return [bytes(1 + int(200))]; // noise instead of client flags
    case 1: // random options, some with huge or lying lengths
      return [flags, ...Array.from({ length: 1 + int(5) }, () => option(int(20), bytes(int(64)), int(3) === 0 ? int(2 ** 32) : undefined))];
    case 2: // structured replies, meta contexts and info in odd orders with broken payloads
      return [flags, option(10, bytes(int(40))), option(8, Buffer.alloc(0)), option(9, bytes(int(40))), option(6, bytes(int(20))), option(3, bytes(int(3)))];
    case 3: // a valid GO, then random request frames
      return [
        u32(3),
        option(8, Buffer.alloc(0)),
        goNamed("mem"),
        ...Array.from({ length: 1 + int(20) }, () =>
          request(int(10), int(2 ** 16), BigInt(int(4) === 0 ? 2 ** 62 : int(20 * MiB)), int(3) === 0 ? int(2 ** 32) : int(70_000), int(8) === 0 ? int(2 ** 32) : 0x25609513),
        ),
      ];
    case 4: // a valid GO and a write whose payload never fully arrives
      return [u32(3), goNamed("mem"), request(1, 0, 0n, 1 + int(MiB)), bytes(int(1000))];
    default: // a truncated frame in the middle of the handshake
      return [u32(3), option(7, bytes(30)).subarray(0, 5 + int(20))];
  }
}

describe("protocol fuzzing", () => {
  let server: NbdServer;
  let addr: { host: string; port: number };
  beforeAll(async () => {
    server = new NbdServer({
      exports: [new Export("mem", new DiskLayer(new MemoryPort({ size: 16 * MiB })))],
      tcp: [{ host: "127.0.0.1", port: 0 }],
      log: silentLogger(),
      limits: { handshakeTimeoutMs: 2000 },
    });
    await server.start();
    addr = server.addresses()[0] as { host: string; port: number };
  });
  afterAll(() => server.close(1000));

  it(`survives ${ITERATIONS} hostile conversations (seed ${SEED}) while a good client works`, async () => {
    const good = await NbdClient.connect(addr, { exportName: "mem" });
    const rss0 = process.memoryUsage().rss;
    let goodOps = 0;
    let stop = false;
    const goodLoop = (async () => {
      for (let i = 0; !stop; i++) {
        const data = Buffer.alloc(4096, (i % 250) + 1);
        await good.pwrite(data, (i % 64) * 4096);
        expect((await good.pread(4096, (i % 64) * 4096)).equals(data)).toBe(true);
        goodOps++;
      }
    })();
    const deadline = Date.now() + 60_000;
    for (let done = 0; done < ITERATIONS && Date.now() < deadline; ) {
      const batch = Array.from({ length: Math.min(16, ITERATIONS - done) }, async () => {
        const parts = hostile();
        const s = net.connect(addr.port, addr.host);
        s.on("error", () => undefined);
        s.resume();
        await new Promise((r) => s.once("connect", r));
        for (const p of parts) {
          if (s.destroyed) break;
          s.write(p);
          if (int(3) === 0) await new Promise((r) => setTimeout(r, int(5)));
        }
        if (int(2) === 0) s.end();
        await Promise.race([new Promise((r) => s.once("close", r)), new Promise((r) => setTimeout(r, 50))]);
        s.destroy();
      });
      await Promise.all(batch);
      done += batch.length;
    }
    stop = true;
    await goodLoop;
    expect(goodOps).toBeGreaterThan(10);
    // The server still accepts and serves new clients.
    const after = await NbdClient.connect(addr, { exportName: "mem" });
    expect(after.size).toBe(16 * MiB);
    await after.disconnect();
    await good.disconnect();
    await new Promise((r) => setTimeout(r, 200));
    expect(server.connectionCount).toBe(0); // every hostile connection was closed
    expect(process.memoryUsage().rss - rss0).toBeLessThan(256 * MiB);
  });
});
