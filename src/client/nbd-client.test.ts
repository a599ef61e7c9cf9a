import net from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import { silentLogger } from "../log.js";
import { Export } from "../stack/export.js";
import { NbdServer } from "../server/server.js";
import { DiskLayer } from "../stack/disk/disk-layer.js";
import { plainIo } from "../stack/layer.js";
import { MemoryPort } from "../stack/port/memory-port.js";
import { NbdClient } from "./nbd-client.js";

const MiB = 1024 * 1024;
let closers: Array<() => Promise<void>> = [];
afterEach(async () => {
  await Promise.all(closers.map((c) => c()));
  closers = [];
});

/** A memory export with a known pattern and a hole, behind a proxy that cuts the server's bytes into small random pieces. */
async function start(seed: number) {
  const port = new MemoryPort({ size: 8 * MiB });
  await port.open();
  const pattern = Buffer.alloc(6 * MiB);
  for (let i = 0; i < pattern.length; i += 4) pattern.writeUInt32LE((i * 2654435761 + seed) >>> 0, i);
  await port.pwrite(pattern, 0, plainIo); // the last 2 MiB stay a hole (structured replies send it as OFFSET_HOLE)
  const server = new NbdServer({ exports: [new Export("mem", new DiskLayer(port))], tcp: [{ host: "127.0.0.1", port: 0 }], log: silentLogger() });
  await server.start();
  const target = server.addresses()[0] as { host: string; port: number };
  let x = seed;
  const rnd = () => ((x = (x * 1103515245 + 12345) >>> 0) / 2 ** 32);
  const proxy = net.createServer((down) => {
    const up = net.connect(target.port, target.host);
    down.pipe(up);
    up.on("data", (d: Buffer) => {
      up.pause();
      // Re-send the server's bytes in pieces of 1 byte to 70 KiB, each in its own write.
      const pieces: Buffer[] = [];
      for (let at = 0; at < d.length; ) {
        const n = Math.min(d.length - at, rnd() < 0.3 ? 1 + Math.floor(rnd() * 40) : 1 + Math.floor(rnd() * 70000));
        pieces.push(d.subarray(at, at + n));
        at += n;
      }
      const next = () => {
        const p = pieces.shift();
        if (!p) return up.resume();
        down.write(p, () => setImmediate(next));
      };
      next();
    });
    up.on("close", () => down.destroy());
    down.on("close", () => up.destroy());
    down.on("error", () => undefined);
    up.on("error", () => undefined);
  });
  await new Promise<void>((r) => proxy.listen(0, "127.0.0.1", r));
  closers.push(async () => {
    proxy.close();
    await server.close();
  });
  const a = proxy.address() as net.AddressInfo;
  return { addr: { host: "127.0.0.1", port: a.port }, pattern };
}

describe("NbdClient reply parsing", () => {
  for (const structured of [true, false]) {
    it(`reassembles ${structured ? "structured" : "simple"} replies cut anywhere, big reads streamed into the caller's buffer`, async () => {
      const { addr, pattern } = await start(structured ? 3 : 4);
      const c = await NbdClient.connect(addr, { exportName: "mem", structured });
      const want = Buffer.concat([pattern, Buffer.alloc(2 * MiB)]);
      const sizes = [1, 512, 4096, 65536, 70001, MiB, 3 * MiB];
      const jobs: Array<Promise<void>> = [];
      for (let i = 0; i < 40; i++) {
        const len = sizes[i % sizes.length]!;
        const off = (i * 987_659) % (8 * MiB - len);
        jobs.push(
          (async () => {
            const into = Buffer.alloc(len, 0xee);
            if (i % 2) await c.preadInto(into, off);
            else into.set(await c.pread(len, off));
            expect(into.equals(want.subarray(off, off + len))).toBe(true);
          })(),
        );
        if (i % 5 === 0) jobs.push(c.pwrite(Buffer.alloc(512, i), 7 * MiB + i * 512).then(() => void want.fill(i, 7 * MiB + i * 512, 7 * MiB + i * 512 + 512)));
      }
      await Promise.all(jobs);
      if (structured) expect((await c.blockStatus(MiB, 0)).length).toBeGreaterThan(0);
      await c.disconnect();
    });
  }
});

/**
 * bench:cluster (issue 17): `nbdstack` runs with MALLOC_MMAP_THRESHOLD_=131072 (its shebang), so any
 * buffer of 128 KiB or more is an mmap, page faults and an munmap. The client packed requests into
 * fresh 256 KiB chunks, one every ~60 small writes: a forwarding node's CPU per write doubled.
 */
describe("NbdClient allocations per request", () => {
  it("small writes allocate no buffer of 128 KiB or more", async () => {
    const port = new MemoryPort({ size: 8 * MiB });
    const server = new NbdServer({ exports: [new Export("mem", new DiskLayer(port))], tcp: [{ host: "127.0.0.1", port: 0 }], log: silentLogger() });
    await server.start();
    const at = server.addresses()[0] as { host: string; port: number };
    const c = await NbdClient.connect(at, { exportName: "mem" });
    closers.push(async () => {
      c.destroy();
      await server.close();
    });
    const sizes: number[] = [];
    const allocUnsafe = Buffer.allocUnsafe;
    Buffer.allocUnsafe = ((n: number) => (sizes.push(n), allocUnsafe(n))) as typeof Buffer.allocUnsafe;
    try {
      const block = Buffer.alloc(4096, 7);
      for (let round = 0; round < 20; round++) await Promise.all(Array.from({ length: 64 }, (_, i) => c.pwrite(block, (round * 64 + i) * 4096)));
    } finally {
      Buffer.allocUnsafe = allocUnsafe;
    }
    expect(sizes.length).toBeGreaterThan(0); // the chunks were made, and seen
    expect(Math.max(...sizes)).toBeLessThan(128 * 1024);
  });
});
