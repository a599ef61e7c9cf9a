import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import { CLI, randomImage, serve, tempDir } from "../helpers/serve.js";
import { copyStopAndJudge, createQcow2, qimg, qio, run, servedImage, writeBoth } from "../helpers/qemu.js";
import { needTools } from "../helpers/tools.js";

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;


/** Sets bits in a byte of a file (a header feature bit, say). */
function orByte(file: string, at: number, bits: number): void {
  const fd = fs.openSync(file, "r+");
  const b = Buffer.alloc(1);
  fs.readSync(fd, b, 0, 1, at);
  b[0]! |= bits;
  fs.writeSync(fd, b, 0, 1, at);
  fs.closeSync(fd);
}

interface Case {
  name: string;
  /** Makes the image (and its chain) in `dir` with QEMU's tools; returns the image to serve. */
  build(dir: string): string;
  /** Trim shows the backing file again (v2 over a backing file, as in QEMU) rather than zeroes. */
  trimShowsBacking?: boolean;
  /** Checked after the writes and the server stopped. */
  after?(dir: string, image: string): void;
}

/** Data for an image, written by QEMU itself: two patterns, a zeroed range, the last megabyte. */
const SEED_WRITES = ["write -P 0x01 0 1M", "write -P 0x02 5M 300k", "write -P 0x03 31M 1M"];


const CASES: Case[] = [
  {
    name: "v2 (compat=0.10), 64 KiB clusters",
    build: (dir) => {
      const f = createQcow2(dir, "v2.qcow2", ["-o", "compat=0.10"]);
      qio("qcow2", f, ...SEED_WRITES);
      return f;
    },
  },
  {
    name: "v3, 4 KiB clusters, zero clusters",
    build: (dir) => {
      const f = createQcow2(dir, "v3-4k.qcow2", ["-o", "cluster_size=4k"]);
      qio("qcow2", f, ...SEED_WRITES, "write -z 200k 100k");
      return f;
    },
  },
  {
    name: "v3, 64 KiB clusters, zero clusters over data",
    build: (dir) => {
      const f = createQcow2(dir, "v3-64k.qcow2", []);
      qio("qcow2", f, ...SEED_WRITES, "write -P 0x04 16M 2M", "write -z 16M 1M", "write -z 20M 64k");
      return f;
    },
  },
  {
    name: "v3, 2 MiB clusters",
    build: (dir) => {
      const f = createQcow2(dir, "v3-2m.qcow2", ["-o", "cluster_size=2M"]);
      qio("qcow2", f, ...SEED_WRITES);
      return f;
    },
  },
  {
    name: "v3, 512-byte clusters (the refcount table grows)",
    build: (dir) => {
      const f = createQcow2(dir, "v3-512.qcow2", ["-o", "cluster_size=512"]);
      qio("qcow2", f, ...SEED_WRITES);
      return f;
    },
  },
  {
    name: "compressed (qemu-img convert -c)",
    build: (dir) => {
      const src = path.join(dir, "src.raw");
      randomImage(src, SIZE, 11);
      qio("raw", src, "write -z 4M 4M", "write -P 0x07 10M 1M");
      const f = path.join(dir, "compressed.qcow2");
      qimg("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", src, f);
      return f;
    },
  },
  {
    name: "compressed with zstd (qemu-img convert -c -o compression_type=zstd)",
    build: (dir) => {
      const src = path.join(dir, "zsrc.raw");
      randomImage(src, SIZE, 13);
      qio("raw", src, "write -z 4M 4M", "write -P 0x07 10M 1M", "write -P 0x3c 12M 3M");
      const f = path.join(dir, "zstd.qcow2");
      qimg("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", src, f);
      return f;
    },
  },
  {
    name: "backing chain three deep over a raw base (relative names)",
    build: (dir) => {
      randomImage(path.join(dir, "base.raw"), SIZE, 5);
      const mid1 = createQcow2(dir, "mid1.qcow2", ["-b", "base.raw", "-F", "raw"], "");
      qio("qcow2", mid1, "write -P 0x21 1M 1M", "write -z 2M 64k");
      const mid2 = createQcow2(dir, "mid2.qcow2", ["-b", "mid1.qcow2", "-F", "qcow2", "-o", "cluster_size=4k"], "");
      qio("qcow2", mid2, "write -P 0x22 1536k 1M", "write -z 9M 1M");
      const top = createQcow2(dir, "top.qcow2", ["-b", "mid2.qcow2", "-F", "qcow2"], "");
      qio("qcow2", top, "write -P 0x23 3M 100k");
      return top;
    },
  },
  {
    name: "backing chain over a qcow2 base (v2 in the middle, a probed backing format on top)",
    build: (dir) => {
      const base = createQcow2(dir, "qbase.qcow2", []);
      qio("qcow2", base, ...SEED_WRITES);
      const mid = createQcow2(dir, "qmid.qcow2", ["-b", "qbase.qcow2", "-F", "qcow2", "-o", "compat=0.10"], "");
      qio("qcow2", mid, "write -P 0x31 700k 1M");
      const top = createQcow2(dir, "qtop.qcow2", ["-b", "qmid.qcow2", "-F", "qcow2"], "");
      qio("qcow2", top, "write -P 0x32 2M 4k");
      // Hide the backing format extension (make it one of an unknown type): the format is probed.
      const head = fs.readFileSync(top).subarray(0, 4096);
      const at = head.indexOf(Buffer.from([0xe2, 0x79, 0x2a, 0xca]));
      expect(at).toBeGreaterThan(0);
      orByte(top, at + 3, 0x01);
      return top;
    },
    trimShowsBacking: false,
  },
  {
    name: "v2 over a raw backing file",
    build: (dir) => {
      randomImage(path.join(dir, "v2base.raw"), SIZE, 9);
      const f = createQcow2(dir, "v2top.qcow2", ["-b", "v2base.raw", "-F", "raw", "-o", "compat=0.10"], "");
      qio("qcow2", f, "write -P 0x41 1M 1M");
      return f;
    },
    trimShowsBacking: true,
  },
  {
    name: "internal snapshot (the active layer is served; the snapshot stays intact)",
    build: (dir) => {
      const f = createQcow2(dir, "snap.qcow2", []);
      qio("qcow2", f, ...SEED_WRITES, "write -P 0x51 3M 2M");
      qimg("snapshot", "-c", "s1", f);
      qimg("convert", "-q", "-O", "raw", "-l", "snapshot.name=s1", f, path.join(dir, "s1.raw"));
      qio("qcow2", f, "write -P 0x52 4M 64k");
      return f;
    },
    after: (dir, image) => {
      const now = path.join(dir, "s1-after.raw");
      qimg("convert", "-q", "-O", "raw", "-l", "snapshot.name=s1", image, now);
      qimg("compare", "-q", "-f", "raw", "-F", "raw", path.join(dir, "s1.raw"), now);
    },
  },
];

/** What the tests write through nbdstack (and into the raw reference). */
const WRITES = [
  "write -P 0x5a 4096 4096",
  "write -P 0xa5 1000 70000",
  "write -P 0x3c 3M 2M",
  "write -z 6M 1M",
  "write -z 7340544 5000",
  "write -z 3146240 5000", // over data, unaligned: with 4 KiB clusters it ends in the next one
  "write -P 0x77 12M 64k",
  "write -P 0x78 4100k 8k",
  `write -P 0x79 ${SIZE - 4096} 4096`,
];
const TRIM = "discard 8M 2M";

describe.skipIf(!needTools("qemu-img", "qemu-io", "nbdcopy", "nbdinfo"))("qcow2 images served by nbdstack", () => {
  for (const c of CASES) {
    describe(c.name, () => {
      const s = servedImage("nbdstack-qcow2-", c.build);

      it("serves what QEMU reads", () => {
        qimg("compare", "-q", "-f", "raw", "-F", "qcow2", s.srv!.uri, s.image);
        const info = JSON.parse(qimg("info", "--output=json", "-f", "raw", s.srv!.uri));
        expect(info["virtual-size"]).toBe(SIZE);
      });

      it("takes writes: qemu-io patterns, zeroes, trim and nbdcopy; qemu-img check is clean and the data matches", async () => {
        writeBoth(s, ...WRITES);
        qio("raw", s.srv!.uri, TRIM);
        if (!c.trimShowsBacking) qio("raw", s.ref, TRIM);
        await copyStopAndJudge(s);
        c.after?.(s.dir, s.image);
      });
    });
  }

  it("reports zero clusters, holes, data and the backing file's extents", async () => {
    const dir = tempDir("nbdstack-qcow2-");
    const base = path.join(dir, "base.raw");
    randomImage(base, 8 * MiB, 3);
    const f = createQcow2(dir, "map.qcow2", ["-b", "base.raw", "-F", "raw"], "16M");
    qio("qcow2", f, "write -P 1 0 1M", "write -z 1M 1M");
    const srv = await serve([f]);
    try {
      const map = JSON.parse(run("nbdinfo", ["--map", "--json", srv.uri])) as Array<{ offset: number; length: number; type: number }>;
      const at = (o: number) => map.find((e) => e.offset <= o && o < e.offset + e.length)!.type;
      expect(at(0)).toBe(0); // data of the image
      expect(at(MiB + 1)).toBe(3); // zero cluster: hole, zero
      expect(at(4 * MiB)).toBe(0); // the raw backing file: data
      expect(at(12 * MiB)).toBe(3); // past the backing file's end
    } finally {
      await srv.stop();
    }
  });

  it("is declared in a config file: qcow2: PATH, and with backing: none the backing file is not read", async () => {
    const dir = tempDir("nbdstack-qcow2-");
    randomImage(path.join(dir, "base.raw"), 8 * MiB, 4);
    const top = createQcow2(dir, "top.qcow2", ["-b", "base.raw", "-F", "raw"], "");
    qio("qcow2", top, "write -P 0x23 3M 100k");
    fs.writeFileSync(
      path.join(dir, "exports.yaml"),
      ["exports:", "  - name: chain", "    stack: qcow2:top.qcow2", "  - name: alone", "    stack:", "      - qcow2: top.qcow2", "        backing: none", "        l2-cache: 1M", "        read-only: true", ""].join("\n"),
    );
    const srv = await serve(["--config", path.join(dir, "exports.yaml")], 2);
    try {
      const [chain, alone] = ["chain", "alone"].map((n) => srv.uris.find((u) => u.endsWith(`/${n}`))!);
      qimg("compare", "-q", "-f", "raw", "-F", "qcow2", chain!, top);
      expect(run("qemu-io", ["-r", "-f", "raw", "-c", "read -P 0x23 3M 100k", "-c", "read -P 0 0 3M", "-c", "read -P 0 4M 4M", alone!])).not.toMatch(/Pattern verification failed/);
      expect(run("nbdinfo", ["--list", srv.uri.replace(/\/[^/]*$/, "")])).toMatch(/qcow2:.*top\.qcow2 → file:.*base\.raw/);
    } finally {
      await srv.stop();
    }
  });

  describe("refuses what it cannot serve, naming the feature", () => {
    let dir: string;
    beforeAll(() => {
      dir = tempDir("nbdstack-qcow2-bad-");
    });
    const refusal = (image: string): string => {
      const r = spawnSync(process.execPath, [CLI, "serve", "--listen", "127.0.0.1:0", image], { encoding: "utf8", timeout: 20_000 });
      expect(r.status).not.toBe(0);
      return r.stderr;
    };

    it("encryption", () => {
      const f = path.join(dir, "enc.qcow2");
      // LUKS times its key derivation by the thread's CPU time; on a busy machine qemu-img can read
      // none ("Unable to get accurate CPU usage", seen once in CI): that, and only that, is retried.
      for (let attempt = 1; ; attempt++) {
        const r = spawnSync("qemu-img", ["create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=123456", "-o", "encrypt.format=luks,encrypt.key-secret=s0", f, "1M"], { encoding: "utf8" });
        if (r.status === 0) break;
        if (attempt === 3 || !/Unable to get accurate CPU usage/.test(r.stderr)) throw new Error(`qemu-img create failed: ${r.stderr}`);
      }
      expect(refusal(f)).toMatch(/qcow2 feature "encryption \(LUKS\)" is not supported/);
    });
    it("an external data file", () => {
      const f = createQcow2(dir, "ext.qcow2", ["-o", `data_file=${path.join(dir, "ext.raw")}`], "1M");
      expect(refusal(f)).toMatch(/qcow2 feature "external data file/);
    });
    it("extended L2 entries with clusters below 16 KiB (QEMU refuses them too)", () => {
      const f = createQcow2(dir, "l2x.qcow2", ["-o", "extended_l2=on,cluster_size=16k"], "1M");
      // qemu-img makes none; the header says 8 KiB clusters (the image is only opened).
      const fd = fs.openSync(f, "r+");
      fs.writeSync(fd, Buffer.from([0, 0, 0, 13]), 0, 4, 20);
      fs.closeSync(fd);
      expect(refusal(f)).toMatch(/qcow2 feature "extended L2 entries with 8192-byte clusters" is not supported; subclusters \(1\/32 of a cluster\) must be at least 512 bytes/);
    });
    it("a compression type other than zlib and zstd", () => {
      const f = createQcow2(dir, "ctype.qcow2", ["-o", "compression_type=zstd"], "1M");
      orByte(f, 104, 0x02); // 1 (zstd) becomes 3
      expect(refusal(f)).toMatch(/qcow2 feature "compression type 3" is not supported/);
    });
    it("an image marked corrupt", () => {
      const f = createQcow2(dir, "corrupt.qcow2", [], "1M");
      orByte(f, 79, 0x02);
      expect(refusal(f)).toMatch(/marked corrupt \(qcow2 corrupt bit set\); repair it with: qemu-img check -r all/);
    });
    it("an unknown incompatible feature", () => {
      const f = createQcow2(dir, "future.qcow2", [], "1M");
      orByte(f, 79, 0x20);
      expect(refusal(f)).toMatch(/qcow2 feature "incompatible feature bit 5" is not supported; this layer does not know it/);
    });
    it("a missing backing file, and a backing file that is a QEMU protocol", () => {
      const f = createQcow2(dir, "orphan.qcow2", ["-u", "-b", "gone.raw", "-F", "raw"], "1M");
      expect(refusal(f)).toMatch(/backing file .*gone\.raw not found/);
      const p = createQcow2(dir, "proto.qcow2", ["-u", "-b", "nbd://127.0.0.1:1/x", "-F", "raw"], "1M");
      expect(refusal(p)).toMatch(/qcow2 feature "backing file "nbd:\/\/127\.0\.0\.1:1\/x" \(a QEMU protocol or json: name\)"/);
    });
    it("serves a dirty image (lazy refcounts) read-only, saying how to repair it", async () => {
      const f = createQcow2(dir, "dirty.qcow2", ["-o", "lazy_refcounts=on"], "1M");
      qio("qcow2", f, "write -P 9 0 64k");
      orByte(f, 79, 0x01);
      const srv = await serve([f]);
      try {
        for (let i = 0; i < 50 && !srv.stderr().includes("repair it with"); i++) await new Promise((r) => setTimeout(r, 100));
        expect(srv.stderr()).toContain(`repair it with: qemu-img check -r all ${f}`);
        expect(run("qemu-io", ["-r", "-f", "raw", "-c", "read -P 9 0 64k", srv.uri])).toMatch(/read 65536\/65536/);
        const w = spawnSync("qemu-io", ["-f", "raw", "-c", "write 0 4k", srv.uri], { encoding: "utf8" });
        expect(w.stdout + w.stderr).toMatch(/write failed|read-only|Operation not permitted|Permission denied/i);
      } finally {
        await srv.stop();
      }
    });
  });
});
