import fs from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { controlUrl, serve, tempDir, type Served } from "../helpers/serve.js";
import { nbdsh, needTools } from "../helpers/tools.js";

const MiB = 1024 * 1024;

/** Python helper: runs f and prints the errno name of the nbd.Error it raised, or "ok". */
const PRELUDE = `
import errno
def err(f, *a, **k):
    try:
        f(*a, **k)
        return "ok"
    except nbd.Error as e:
        return errno.errorcode.get(e.errno, str(e.errno))
`;

describe.skipIf(!needTools("nbdsh"))("nbdsh edge cases", () => {
  let dir: string;
  let srv: Served;
  let ro: Served;
  beforeAll(async () => {
    dir = tempDir();
    fs.writeFileSync(path.join(dir, "disk.img"), Buffer.alloc(4 * MiB, 0x61));
    srv = await serve([path.join(dir, "disk.img"), "memory:4M", "--name", "file", "--name", "mem"], 2);
    // With a fault layer (no rules but while a test adds one): the control URL is the second line.
    ro = await serve([path.join(dir, "disk.img"), "--read-only", "--name", "ro", "--fault", "--token-file", path.join(dir, "token")], 2);
  });
  afterAll(async () => {
    await srv?.stop();
    await ro?.stop();
  });

  const run = (uri: string, body: string) => nbdsh(uri, PRELUDE + body).trim().split("\n");

  // Issue 21: a client that does not set NBD_FLAG_C_FIXED_NEWSTYLE speaks plain newstyle; it was
  // refused, as the spec allows but nbdkit and qemu-nbd do not. libnbd speaks it on request.
  it("serves a plain-newstyle client (no fixed-newstyle flag) through NBD_OPT_EXPORT_NAME, with and without NO_ZEROES", () => {
    const uri = srv.uris[1]!;
    const out = nbdsh(
      null,
      `
for flags in (0, nbd.HANDSHAKE_FLAG_NO_ZEROES):
    h = nbd.NBD()
    h.set_handshake_flags(flags)
    h.connect_uri(${JSON.stringify(uri)})
    h.pwrite(b"plain%d" % flags, 8192)
    print(h.get_protocol(), h.get_handshake_flags(), h.get_size(), bytes(h.pread(6, 8192)))
    h.shutdown()
`,
    )
      .trim()
      .split("\n");
    expect(out).toEqual([`newstyle 0 ${4 * MiB} b'plain0'`, `newstyle 2 ${4 * MiB} b'plain2'`]);
  });

  it("answers requests beyond the end with ENOSPC for writes and EINVAL otherwise, and stays usable", () => {
    const out = run(
      srv.uris[0]!,
      `
h.set_strict_mode(0)
print(err(h.pwrite, b"x" * 512, 4 * 1024 * 1024 - 256))
print(err(h.zero, 4096, 4 * 1024 * 1024))
print(err(h.pread, 512, 4 * 1024 * 1024 - 256))
print(err(h.cache, 512, 4 * 1024 * 1024))
print(err(h.block_status, 512, 4 * 1024 * 1024, lambda *a: 0))
print(err(h.pread, 512, 2**62))
print(bytes(h.pread(3, 0)))
`,
    );
    expect(out).toEqual(["ENOSPC", "ENOSPC", "EINVAL", "EINVAL", "EINVAL", "EINVAL", "b'aaa'"]);
  });

  // Issue 21, finding 2: flags on commands they do not apply to were accepted; the spec says
  // clients MUST NOT send them and the server SHOULD answer EINVAL. FUA is valid on every command.
  it("answers EINVAL to flags on commands they do not apply to; FUA is accepted everywhere", () => {
    const out = run(
      srv.uris[0]!,
      `
h.set_strict_mode(0)
M = 1024 * 1024  # away from the bytes other cases read
print(err(h.pread, 512, M, nbd.CMD_FLAG_NO_HOLE))
print(err(h.pwrite, b"x" * 512, M, nbd.CMD_FLAG_NO_HOLE))
print(err(h.trim, 4096, M, nbd.CMD_FLAG_NO_HOLE))
print(err(h.zero, 4096, M, nbd.CMD_FLAG_REQ_ONE))
print(err(h.pread, 512, M, nbd.CMD_FLAG_REQ_ONE))
print(err(h.cache, 4096, M, nbd.CMD_FLAG_NO_HOLE))
print(err(h.flush, nbd.CMD_FLAG_REQ_ONE))
print(err(h.block_status, 4096, 0, lambda *a: 0, nbd.CMD_FLAG_NO_HOLE))
print(err(h.pwrite, b"x" * 512, M, nbd.CMD_FLAG_FUA))
print(err(h.zero, 4096, M, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA))
print(err(h.block_status, 4096, 0, lambda *a: 0, nbd.CMD_FLAG_REQ_ONE))
print(err(h.flush, nbd.CMD_FLAG_FUA))
print(err(h.pread, 512, M, nbd.CMD_FLAG_FUA))
print(bytes(h.pread(3, M + 8192)))
`,
    );
    expect(out).toEqual(["EINVAL", "EINVAL", "EINVAL", "EINVAL", "EINVAL", "EINVAL", "EINVAL", "EINVAL", "ok", "ok", "ok", "ok", "ok", "b'aaa'"]);
  });

  it("refuses writes on a read-only export with EPERM", () => {
    const out = run(
      ro.uri,
      `
h.set_strict_mode(0)
print(h.is_read_only())
print(err(h.pwrite, b"x" * 512, 0))
print(err(h.zero, 512, 0))
print(err(h.trim, 512, 0))
print(bytes(h.pread(2, 0)))
`,
    );
    expect(out).toEqual(["True", "EPERM", "EPERM", "EPERM", "b'aa'"]);
  });

  it("answers FAST_ZERO with ENOTSUP on the file port and does it on the memory port", () => {
    const file = run(srv.uris[0]!, `print(h.can_fast_zero()); print(err(h.zero, 65536, 0, nbd.CMD_FLAG_FAST_ZERO)); print(bytes(h.pread(2, 0)))`);
    expect(file).toEqual(["True", "ENOTSUP", "b'aa'"]);
    const mem = run(srv.uris[1]!, `h.pwrite(b"z" * 65536, 0); print(err(h.zero, 65536, 0, nbd.CMD_FLAG_FAST_ZERO)); print(bytes(h.pread(2, 0)))`);
    expect(mem).toEqual(["ok", "b'\\x00\\x00'"]);
  });

  // Issue 21: requests over 1 MiB are served in 1 MiB pieces (README, "Requests in pieces"); libnbd
  // checks every chunk against its request.
  it("serves 32 MiB reads and writes in pieces: a chunk per MiB, holes, DF as one chunk, simple replies with small reads beside them", async () => {
    const big = await serve(["memory:96M", "--name", "big"], 1);
    try {
      const out = nbdsh(
        null,
        `
import os
M = 1024 * 1024
data = bytearray(os.urandom(32 * M))
data[5 * M:7 * M] = bytes(2 * M)
for structured in (True, False):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.connect_uri(${JSON.stringify(big.uris[0])})
    h.pwrite(bytes(data), 64 * M)
    small = [nbd.Buffer(4096) for i in range(40)]
    for i, b in enumerate(small): h.aio_pread(b, 64 * M + i * 65536 + 512)
    whole = nbd.Buffer(32 * M)
    h.aio_pread(whole, 64 * M)
    while h.aio_in_flight() > 0: h.poll(-1)
    ok = whole.to_bytearray() == data and all(b.to_bytearray() == data[i * 65536 + 512:i * 65536 + 4608] for i, b in enumerate(small))
    line = [str(structured), str(ok)]
    if structured:
        for flags in (0, nbd.CMD_FLAG_DF):
            chunks = []
            got = h.pread_structured(32 * M, 64 * M, lambda buf, off, status, err: chunks.append((len(buf), status)) or 0, flags=flags)
            line += [str(got == data), str(len(chunks)), str(sum(1 for c in chunks if c[1] == nbd.READ_HOLE))]
    print(" ".join(line))
    h.shutdown()
`,
      )
        .trim()
        .split("\n");
      // Structured: 32 pieces, the two zero MiB as holes; with DF one data chunk.
      expect(out).toEqual(["True True True 32 2 True 1 0", "False True"]);
    } finally {
      await big.stop();
    }
  });

  it("reads with DF as one chunk, answers block status with REQ_ONE as one extent", () => {
    const out = run(
      srv.uris[1]!,
      `
h.pwrite(b"d" * 65536, 65536)
print(h.can_df())
chunks = []
h.pread_structured(256 * 1024, 0, lambda sub, off, st, e: chunks.append((off, len(sub), st)) or 0, nbd.CMD_FLAG_DF)
print(chunks)
chunks = []
h.pread_structured(256 * 1024, 0, lambda sub, off, st, e: chunks.append((off, len(sub), st)) or 0)
print(chunks)
seen = []
h.block_status(4 * 1024 * 1024, 0, lambda meta, off, ents, e: seen.append(ents) or 0, nbd.CMD_FLAG_REQ_ONE)
print(seen)
seen = []
h.block_status(4 * 1024 * 1024, 0, lambda meta, off, ents, e: seen.append(ents) or 0)
print(seen)
`,
    );
    expect(out[0]).toBe("True");
    expect(out[1]).toBe("[(0, 262144, 1)]"); // one OFFSET_DATA chunk
    expect(out[2]).toBe("[(0, 65536, 2), (65536, 65536, 1), (131072, 131072, 2)]"); // hole, data, hole
    expect(out[3]).toBe("[[65536, 3]]");
    expect(out[4]).toBe("[[65536, 3, 65536, 0, 4063232, 3]]");
  });

  it("passes FUA, flush and cache through, and the file holds the data", () => {
    const out = run(
      srv.uris[0]!,
      `
h.pwrite(b"F" * 4096, 8192, nbd.CMD_FLAG_FUA)
h.flush()
h.cache(1024 * 1024, 0)
h.zero(4096, 12288, nbd.CMD_FLAG_NO_HOLE)
print(h.can_fua(), h.can_flush(), h.can_cache(), h.can_multi_conn(), h.can_trim())
`,
    );
    expect(out).toEqual(["True True True True True"]); // trim: holes punched (file port, see README "TRIM")
    const img = fs.readFileSync(path.join(dir, "disk.img"));
    expect(img.subarray(8192, 12288).every((b) => b === 0x46)).toBe(true);
    expect(img.subarray(12288, 16384).every((b) => b === 0)).toBe(true);
  });

  it("negotiates options: list with descriptions, info, unknown export, meta contexts", () => {
    const base = srv.uris[0]!.replace(/\/file$/, "/");
    const out = nbdsh(
      null,
      PRELUDE +
        `
h.set_opt_mode(True)
h.connect_uri("${base}")
h.opt_list(lambda name, desc: print("export", name, desc))
h.set_export_name("none")
print(err(h.opt_info))
h.set_export_name("mem")
h.opt_info()
print(h.get_size(), h.get_block_size(nbd.SIZE_MAXIMUM))
print(h.opt_list_meta_context(lambda name: print("context", name)))
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:dirty-bitmap:x")
h.opt_go()
print(h.can_meta_context("base:allocation"), h.can_meta_context("qemu:dirty-bitmap:x"))
h.shutdown()
`,
    )
      .trim()
      .split("\n");
    expect(out).toEqual([
      expect.stringMatching(/^export file disk → file:.*disk\.img$/),
      "export mem disk → memory:4194304",
      "ENOENT",
      "4194304 33554432",
      "context base:allocation",
      "context qemu:allocation-depth", // a memory disk answers it: depth 1 everywhere, like a raw file
      "2",
      "True False",
    ]);
  });

  it("sends a read error with its offset on the wire (NBD_REPLY_TYPE_ERROR_OFFSET), from a fault rule with a range", async () => {
    const faults = async (body: object) => {
      const r = await fetch(`${controlUrl(ro)}/v1/exports/ro/faults`, {
        method: "POST",
        headers: { authorization: `Bearer ${fs.readFileSync(path.join(dir, "token"), "utf8").trim()}`, "content-type": "application/json" },
        body: JSON.stringify(body),
      });
      expect(r.status).toBe(200);
    };
    await faults({ add: "op=pread,errno=EIO,range=1048576-2097152" });
    try {
      // libnbd hands an ERROR_OFFSET chunk to the chunk callback as READ_ERROR at the failing offset
      // (a plain ERROR chunk has no offset and never reaches it).
      const out = run(
        ro.uri,
        `
seen = []
def chunk(sub, off, status, error):
    seen.append((off, len(sub), status, error.value))
    return 0
for off in (1048576 - 8192, 1048576 + 12345, 2097152):
    del seen[:]
    print(err(h.pread_structured, 65536, off, chunk), seen)
print(nbd.READ_DATA, nbd.READ_ERROR)
`,
      );
      expect(out).toEqual([
        "EIO [(1048576, 0, 3, 5)]", // starts before the bad range: fails where it begins
        "EIO [(1060921, 0, 3, 5)]", // starts inside it: fails at its own offset
        "ok [(2097152, 65536, 1, 0)]", // past it: data
        "1 3",
      ]);
    } finally {
      await faults({ clear: true });
    }
  });
});
