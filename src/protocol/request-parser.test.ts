import { describe, expect, it } from "vitest";
import { ProtocolError } from "../errors.js";
import { Cmd, CmdFlag, NBD_REQUEST_MAGIC } from "./constants.js";
import { Request, RequestParser } from "./request-parser.js";

function header(type: number, flags: number, cookie: bigint, offset: bigint, length: number): Buffer {
  const b = Buffer.alloc(28);
  b.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(cookie, 8);
  b.writeBigUInt64BE(offset, 16);
  b.writeUInt32BE(length, 24);
  return b;
}

function stream(): { bytes: Buffer; expected: Array<{ type: number; flags: number; cookie: bigint; offset: number; length: number; data?: string }> } {
  const payload1 = Buffer.from("hello, world");
  const payload2 = Buffer.alloc(100, 7);
  const parts = [
    header(Cmd.NBD_CMD_READ, 0, 0xfedcba9876543210n, 4096n, 512),
    header(Cmd.NBD_CMD_WRITE, CmdFlag.NBD_CMD_FLAG_FUA, 2n, 12345n, payload1.length),
    payload1,
    header(Cmd.NBD_CMD_WRITE_ZEROES, CmdFlag.NBD_CMD_FLAG_NO_HOLE | CmdFlag.NBD_CMD_FLAG_FAST_ZERO, 3n, 1n << 40n, 65536),
    header(Cmd.NBD_CMD_WRITE, 0, 0xffffffffffffffffn, 0n, payload2.length),
    payload2,
    header(Cmd.NBD_CMD_FLUSH, 0, 5n, 0n, 0),
    header(Cmd.NBD_CMD_DISC, 0, 6n, 0n, 0),
  ];
  return {
    bytes: Buffer.concat(parts),
    expected: [
      { type: Cmd.NBD_CMD_READ, flags: 0, cookie: 0xfedcba9876543210n, offset: 4096, length: 512 },
      { type: Cmd.NBD_CMD_WRITE, flags: 1, cookie: 2n, offset: 12345, length: 12, data: payload1.toString("hex") },
      { type: Cmd.NBD_CMD_WRITE_ZEROES, flags: 18, cookie: 3n, offset: 2 ** 40, length: 65536 },
      { type: Cmd.NBD_CMD_WRITE, flags: 0, cookie: 0xffffffffffffffffn, offset: 0, length: 100, data: payload2.toString("hex") },
      { type: Cmd.NBD_CMD_FLUSH, flags: 0, cookie: 5n, offset: 0, length: 0 },
      { type: Cmd.NBD_CMD_DISC, flags: 0, cookie: 6n, offset: 0, length: 0 },
    ],
  };
}

function summary(r: Request) {
  return {
    type: r.type,
    flags: r.flags,
    cookie: (BigInt(r.cookieHi) << 32n) | BigInt(r.cookieLo),
    offset: r.offset,
    length: r.length,
    ...(r.data ? { data: r.data.toString("hex") } : {}),
  };
}

describe("RequestParser", () => {
  it("parses a whole stream fed at once, with zero-copy payloads", () => {
    const { bytes, expected } = stream();
    const got: Request[] = [];
    new RequestParser((r) => got.push(r), 1 << 20).feed(bytes);
    expect(got.map(summary)).toEqual(expected);
    expect(got[1]!.data!.buffer).toBe(bytes.buffer); // a slice of the received chunk, not a copy
    expect(got[1]!.fua).toBe(true);
    expect(got[2]!.mayTrim).toBe(false);
    expect(got[2]!.fast).toBe(true);
  });

  it("gives the same requests when the stream is split at every byte", () => {
    const { bytes, expected } = stream();
    for (let cut = 1; cut < bytes.length; cut++) {
      const got: Request[] = [];
      const p = new RequestParser((r) => got.push(r), 1 << 20);
      p.feed(bytes.subarray(0, cut));
      p.feed(bytes.subarray(cut));
      expect(got.map(summary)).toEqual(expected);
      expect(p.midFrame).toBe(false);
    }
  });

  it("gives the same requests when fed one byte at a time", () => {
    const { bytes, expected } = stream();
    const got: Request[] = [];
    const p = new RequestParser((r) => got.push(r), 1 << 20);
    for (let i = 0; i < bytes.length; i++) {
      p.feed(bytes.subarray(i, i + 1));
      if (i < bytes.length - 1 && got.length < expected.length) expect(p.midFrame || got.length > 0).toBe(true);
    }
    expect(got.map(summary)).toEqual(expected);
  });

  it("stops right after a request its consumer refuses more after, and goes on from there", () => {
    const { bytes, expected } = stream();
    // At every split point of the stream, stop after every request: the parser must say how many
    // bytes it used, and feeding the rest must give exactly the requests not given yet.
    for (let cut = 0; cut <= bytes.length; cut++) {
      const got: Request[] = [];
      const p = new RequestParser((r) => {
        got.push(r);
        return false;
      }, 1 << 20);
      for (let chunk of [bytes.subarray(0, cut), bytes.subarray(cut)]) {
        while (chunk.length > 0) {
          const before = got.length;
          const used = p.feed(chunk);
          expect(used).toBeGreaterThan(0);
          expect(used).toBeLessThanOrEqual(chunk.length);
          expect(got.length - before).toBeLessThanOrEqual(1); // never more than one request per feed
          if (used < chunk.length) expect(got.length).toBe(before + 1); // stopped only because of a request
          chunk = chunk.subarray(used);
        }
      }
      expect(got.map(summary)).toEqual(expected);
    }
  });

  it("holds a request that admit() refuses, before reading its payload, until resume(); at every split point", () => {
    const { bytes, expected } = stream();
    for (const volatile of [false, true]) {
      for (let cut = 0; cut <= bytes.length; cut++) {
        const got: Request[] = [];
        const asked: Array<[number, number]> = [];
        let refuse = true; // every other request is refused once, then admitted on resume
        const p = new RequestParser((r) => void got.push(r), 1 << 20, volatile, (type, length) => {
          asked.push([type, length]);
          refuse = !refuse;
          return refuse;
        });
        for (let chunk of [bytes.subarray(0, cut), bytes.subarray(cut)]) {
          while (chunk.length > 0) {
            const used = p.feed(chunk);
            chunk = chunk.subarray(used);
            if (p.blocked) {
              expect(p.feed(chunk)).toBe(0); // nothing more until resumed
              const before = got.length;
              p.resume();
              expect(p.blocked).toBe(false);
              // A request without payload comes in at once; a write once its payload is read.
              const last = asked.at(-1)!;
              if (last[0] !== Cmd.NBD_CMD_WRITE) expect(got.length).toBe(before + 1);
            } else expect(used).toBeGreaterThan(0);
          }
        }
        expect(got.map(summary)).toEqual(expected);
        expect(asked).toEqual(expected.map((e) => [e.type, e.length])); // asked once per request, before its payload
        expect(p.midFrame).toBe(false);
      }
    }
  });

  it("streams a write longer than pieceSize: emitted at once, then its payload in pieces, stalling when the consumer says so; at every split point", () => {
    const big = Buffer.alloc(10_000);
    for (let i = 0; i < big.length; i++) big[i] = (i * 7) & 0xff;
    const bytes = Buffer.concat([header(Cmd.NBD_CMD_WRITE, 0, 9n, 4096n, big.length), big, header(Cmd.NBD_CMD_FLUSH, 0, 10n, 0n, 0)]);
    for (const volatile of [false, true]) {
      for (let cut = 0; cut <= bytes.length; cut += 97) {
        const events: string[] = [];
        const pieces: Buffer[] = [];
        let stallNext = true; // every other piece stalls the parser
        const p = new RequestParser(
          (r) => void events.push(`request ${r.type} ${r.length}${r.type !== Cmd.NBD_CMD_WRITE ? "" : r.data === null ? " streamed" : " whole"}`),
          1 << 20,
          volatile,
          () => true,
          4096,
          (r, piece, backing, at, last) => {
            expect(backing.subarray(0, piece.length).equals(piece)).toBe(true); // the piece is its pool buffer's start
            events.push(`piece ${at} ${piece.length}${last ? " last" : ""}`);
            pieces.push(Buffer.from(piece));
            stallNext = !stallNext;
            return last || stallNext;
          },
        );
        for (let chunk of [bytes.subarray(0, cut), bytes.subarray(cut)]) {
          while (chunk.length > 0) {
            const used = p.feed(chunk);
            chunk = chunk.subarray(used);
            if (p.stalled) {
              expect(p.blocked).toBe(true);
              expect(p.streaming).toBe(true);
              expect(p.feed(chunk)).toBe(0); // nothing more until unstalled
              p.unstall();
            }
          }
        }
        // A payload lying whole in a chunk the parser may keep is a slice of it, not streamed.
        if (!volatile && (cut === 0 || cut >= 28 + big.length)) expect(events).toEqual([`request ${Cmd.NBD_CMD_WRITE} 10000 whole`, `request ${Cmd.NBD_CMD_FLUSH} 0`]);
        else {
          expect(events).toEqual([`request ${Cmd.NBD_CMD_WRITE} 10000 streamed`, "piece 0 4096", "piece 4096 4096", "piece 8192 1808 last", `request ${Cmd.NBD_CMD_FLUSH} 0`]);
          expect(Buffer.concat(pieces).equals(big)).toBe(true);
        }
        expect(p.midFrame).toBe(false);
      }
    }
  });

  it("numbers the pieces of each streamed write from its own start", () => {
    const at: number[] = [];
    const p = new RequestParser(() => undefined, 1 << 20, true, () => true, 4096, (_r, _piece, _b, a) => (at.push(a), true));
    p.feed(Buffer.concat([header(Cmd.NBD_CMD_WRITE, 0, 1n, 0n, 5000), Buffer.alloc(5000), header(Cmd.NBD_CMD_WRITE, 0, 2n, 0n, 9000), Buffer.alloc(9000)]));
    expect(at).toEqual([0, 4096, 0, 4096, 8192]);
  });

  it("reads a streamed write's pieces straight from the socket (payloadTarget), and gives the piece being filled back on discard", () => {
    const got: Buffer[] = [];
    const p = new RequestParser(() => undefined, 1 << 20, true, () => true, 4096, (_r, piece) => {
      got.push(Buffer.from(piece));
      return true;
    });
    p.feed(header(Cmd.NBD_CMD_WRITE, 0, 1n, 0n, 6000));
    const t = p.payloadTarget(1)!;
    expect(t.length).toBe(4096); // one piece at a time
    t.fill(1);
    p.payloadFilled(4096);
    const t2 = p.payloadTarget(1)!;
    expect(t2.length).toBe(6000 - 4096);
    t2.fill(2, 0, 100);
    p.payloadFilled(100);
    expect(got).toHaveLength(1);
    expect(p.midFrame).toBe(true);
    p.discard();
    expect(p.midFrame).toBe(false);
    expect(p.payloadTarget(1)).toBe(null);
  });

  it("reports a frame cut short", () => {
    const p = new RequestParser(() => undefined, 1 << 20);
    p.feed(header(Cmd.NBD_CMD_WRITE, 0, 1n, 0n, 10).subarray(0, 20));
    expect(p.midFrame).toBe(true);
    p.feed(header(Cmd.NBD_CMD_WRITE, 0, 1n, 0n, 10).subarray(20));
    expect(p.midFrame).toBe(true); // header done, payload missing
  });

  it("rejects a bad magic", () => {
    const b = header(Cmd.NBD_CMD_READ, 0, 1n, 0n, 1);
    b.writeUInt32BE(0xdeadbeef, 0);
    expect(() => new RequestParser(() => undefined, 1 << 20).feed(b)).toThrow(ProtocolError);
    expect(() => new RequestParser(() => undefined, 1 << 20).feed(b)).toThrow(/bad request magic 0xdeadbeef/);
  });

  it("rejects a write payload over the maximum but not a read of that size", () => {
    expect(() => new RequestParser(() => undefined, 1024).feed(header(Cmd.NBD_CMD_WRITE, 0, 1n, 0n, 1025))).toThrow(/exceeds the maximum/);
    const got: Request[] = [];
    new RequestParser((r) => got.push(r), 1024).feed(header(Cmd.NBD_CMD_READ, 0, 1n, 0n, 1 << 30));
    expect(got).toHaveLength(1);
  });

  it("keeps offsets exact up to 2^53 and marks larger ones as out of range", () => {
    const got: Request[] = [];
    const p = new RequestParser((r) => got.push(r), 1024);
    p.feed(header(Cmd.NBD_CMD_READ, 0, 1n, (1n << 53n) - 1n, 1));
    p.feed(header(Cmd.NBD_CMD_READ, 0, 1n, 1n << 53n, 1));
    p.feed(header(Cmd.NBD_CMD_READ, 0, 1n, 0xffffffffffffffffn, 1));
    expect(got[0]!.offset).toBe(2 ** 53 - 1);
    expect(got[1]!.offset).toBe(Infinity);
    expect(got[2]!.offset).toBe(Infinity);
  });

  it("copies whole payloads out of volatile chunks, and fills big ones in place", () => {
    const { bytes, expected } = stream();
    const got: Request[] = [];
    const p = new RequestParser((r) => got.push(r), 1 << 20, true);
    p.feed(bytes);
    expect(got.map(summary)).toEqual(expected);
    bytes.fill(0); // the caller reuses its buffer: the requests keep their bytes
    expect(got.map(summary)).toEqual(expected);

    const big = Buffer.alloc(200_000, 9);
    const out: Request[] = [];
    const q = new RequestParser((r) => out.push(r), 1 << 20, true);
    q.feed(Buffer.concat([header(Cmd.NBD_CMD_WRITE, 0, 7n, 0n, big.length), big.subarray(0, 1000)]));
    expect(q.payloadTarget(1 << 30)).toBeNull();
    const target = q.payloadTarget(32 * 1024)!;
    expect(target.length).toBe(199_000);
    big.copy(target, 0, 1000, 150_000); // the socket reads straight into place, in two goes
    q.payloadFilled(149_000);
    expect(out).toHaveLength(0);
    big.copy(q.payloadTarget(1)!, 0, 150_000);
    q.payloadFilled(50_000);
    expect(out).toHaveLength(1);
    expect(out[0]!.data!.equals(big)).toBe(true);
    expect(q.midFrame).toBe(false);
  });
});
