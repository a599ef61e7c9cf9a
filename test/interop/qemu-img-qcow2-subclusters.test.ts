import path from "node:path";
import { describe, expect, it } from "vitest";
import { randomImage, serve, tempDir } from "../helpers/serve.js";
import { copyStopAndJudge, createQcow2, qimg, qio, run, servedImage, writeBoth } from "../helpers/qemu.js";
import { needTools } from "../helpers/tools.js";

/**
 * qcow2 images with extended L2 entries (`qemu-img create -o extended_l2=on`: 32 subclusters a
 * cluster, each allocated, zero or unallocated on its own) made and written by QEMU's tools, then
 * served by nbdstack: read, mapped, written (whole and partial subclusters, zeroes, trims), and
 * judged by `qemu-img check`, `compare` and `map`.
 */

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;


/** [start, length, value] rows, neighbours of one value merged. */
type Rows = Array<[number, number, number]>;
function merged(rows: Rows): Rows {
  const out: Rows = [];
  for (const [s, l, v] of rows) {
    const last = out[out.length - 1];
    if (last && last[2] === v && last[0] + last[1] === s) last[1] += l;
    else out.push([s, l, v]);
  }
  return out;
}

interface QemuMapRow {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
}
/**
 * `qemu-img map --output=json` of an image as base:allocation says it: 0 data, 3 reads as zeroes,
 * 1 a hole of other bytes (data the host file reads as zeroes is still data).
 */
function qemuImgMap(image: string): Rows {
  const rows = JSON.parse(qimg("map", "--output=json", "-f", "qcow2", image)) as QemuMapRow[];
  return merged(rows.map((r) => [r.start, r.length, r.data ? 0 : r.zero ? 3 : 1]));
}
/** nbdinfo's map of one context of an NBD server (`target`: a URI, or `[ qemu-nbd … ]`), as rows. */
function nbdinfoMap(ctx: string, ...target: string[]): Rows {
  const rows = JSON.parse(run("nbdinfo", [`--map=${ctx}`, "--json", ...target])) as Array<{ offset: number; length: number; type: number }>;
  return merged(rows.map((e): [number, number, number] => [e.offset, e.length, e.type]));
}
/**
 * The maps of a served image against QEMU's: base:allocation against `qemu-img map` (and qemu-nbd),
 * qemu:allocation-depth against `qemu-nbd -A` (qemu-img map's "depth" says "not present" past the
 * end of a short backing file, where qemu-nbd counts the backing file's depth: see README).
 */
function expectMapsOf(uri: string, image: string): void {
  const qemuNbd = ["--", "[", "qemu-nbd", "-r", "-A", "-f", "qcow2", image, "]"];
  const alloc = nbdinfoMap("base:allocation", uri);
  expect(alloc).toEqual(qemuImgMap(image));
  expect(alloc).toEqual(nbdinfoMap("base:allocation", ...qemuNbd));
  expect(nbdinfoMap("qemu:allocation-depth", uri)).toEqual(nbdinfoMap("qemu:allocation-depth", ...qemuNbd));
}

interface Case {
  name: string;
  /** Makes the image (and its chain) in `dir` with QEMU's tools; returns the image to serve. */
  build(dir: string): string;
  /** Checked after the writes and the server stopped. */
  after?(dir: string, image: string): void;
}

/** Subcluster-sized, partial and zeroing writes by QEMU itself; `sc` is the subcluster size. */
const seedWrites = (sc: number): string[] => [
  `write -P 0x11 0 ${sc}`,
  `write -P 0x12 ${3 * sc} ${2 * sc}`,
  `write -P 0x13 ${5 * sc + 100} 300`, // partial subcluster
  `write -P 0x14 1M 300k`,
  `write -z ${1 * MiB + 4 * sc} ${3 * sc}`, // whole subclusters zeroed in a cluster of data
  `write -z ${1 * MiB + 40 * sc + 7} 1000`, // partial: written as zeroes
  "write -z 2M 1M", // whole clusters
  `write -P 0x15 ${3 * MiB + sc} ${sc}`,
  `write -z ${3 * MiB + 8 * sc} ${2 * sc}`, // zero subclusters of an otherwise unallocated cluster
  `write -P 0x16 ${SIZE - sc} ${sc}`,
];

const CASES: Case[] = [
  {
    name: "16 KiB clusters (512-byte subclusters) over a raw backing file shorter than the image",
    build: (dir) => {
      randomImage(path.join(dir, "base.raw"), SIZE - 5 * MiB - 1536, 5);
      const f = createQcow2(dir, "x16.qcow2", ["-o", "extended_l2=on,cluster_size=16k", "-b", "base.raw", "-F", "raw"], "32M");
      qio("qcow2", f, ...seedWrites(512));
      return f;
    },
  },
  {
    name: "64 KiB clusters (2 KiB subclusters), no backing file",
    build: (dir) => {
      const f = createQcow2(dir, "x64.qcow2", ["-o", "extended_l2=on"]);
      qio("qcow2", f, ...seedWrites(2048));
      return f;
    },
  },
  {
    name: "2 MiB clusters (64 KiB subclusters) over an extended qcow2 over raw",
    build: (dir) => {
      randomImage(path.join(dir, "cbase.raw"), SIZE, 6);
      const mid = createQcow2(dir, "cmid.qcow2", ["-o", "extended_l2=on,cluster_size=32k", "-b", "cbase.raw", "-F", "raw"], "");
      qio("qcow2", mid, ...seedWrites(1024));
      const top = createQcow2(dir, "ctop.qcow2", ["-o", "extended_l2=on,cluster_size=2M", "-b", "cmid.qcow2", "-F", "qcow2"], "");
      qio("qcow2", top, `write -P 0x21 ${64 * 1024} 64k`, `write -z ${4 * MiB + 128 * 1024} 192k`, "write -P 0x22 7M 100k");
      return top;
    },
  },
  {
    name: "compressed clusters and an internal snapshot (shared clusters are copied whole)",
    build: (dir) => {
      const src = path.join(dir, "zsrc.raw");
      randomImage(src, SIZE, 13);
      qio("raw", src, "write -z 4M 4M");
      const f = path.join(dir, "xc.qcow2");
      qimg("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", "extended_l2=on,cluster_size=32k", src, f);
      qio("qcow2", f, "write -P 0x31 16M 1M", `write -z ${16 * MiB + 64 * 1024} 4k`, "write -P 0x32 20M 3k");
      qimg("snapshot", "-c", "s1", f);
      qimg("convert", "-q", "-O", "raw", "-l", "snapshot.name=s1", f, path.join(dir, "s1.raw"));
      return f;
    },
    after: (dir, image) => {
      const now = path.join(dir, "s1-after.raw");
      qimg("convert", "-q", "-O", "raw", "-l", "snapshot.name=s1", image, now);
      qimg("compare", "-q", "-f", "raw", "-F", "raw", path.join(dir, "s1.raw"), now);
    },
  },
];

/** What the tests write through nbdstack (and into the raw reference): every size of a subcluster and cluster. */
const WRITES = [
  "write -P 0x5a 0 512",
  "write -P 0x5b 700 100",
  "write -P 0x5c 3M 2k",
  "write -P 0x5d 3093504 70000", // unaligned, across clusters
  `write -P 0x5e ${16 * MiB + 1000} 9000`,
  `write -P 0x5f ${20 * MiB + 512} 1k`,
  "write -z 5M 4k",
  "write -z 5252880 3000", // partial subclusters
  "write -z 6M 1M",
  "write -z -u 7M 128k",
  `write -z ${4 * MiB + 128 * 1024 + 512} 1024`,
  "write -P 0x60 9M 64k",
  `write -P 0x61 ${SIZE - 700} 700`,
];
/** Trims of whole clusters read as zeroes (v3); a trim inside a cluster changes nothing (QEMU's discard is by clusters). */
const TRIMS = ["discard 10M 2M"];
const PARTIAL_TRIM = "discard 12583424 1024";

describe.skipIf(!needTools("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo", "nbdcopy"))("qcow2 images with extended L2 entries (subclusters)", () => {
  for (const c of CASES) {
    describe(c.name, () => {
      const s = servedImage("nbdstack-qcow2-xl2-", c.build);

      it("serves what QEMU reads, and maps it as qemu-img map does", () => {
        qimg("compare", "-q", "-f", "raw", "-F", "raw", s.srv!.uri, s.ref);
        expectMapsOf(s.srv!.uri, s.image);
      });

      it("takes writes, zeroes and trims of whole and partial subclusters; qemu-img check, compare and map agree", async () => {
        writeBoth(s, ...WRITES, ...TRIMS);
        qio("raw", s.srv!.uri, PARTIAL_TRIM);
        await copyStopAndJudge(s);
        c.after?.(s.dir, s.image);
        const again = await serve(["--read-only", s.image]);
        try {
          expectMapsOf(again.uri, s.image);
        } finally {
          await again.stop();
        }
      });
    });
  }

  it("advertises its unit of copy-on-write, the subcluster, as the preferred block size (a standard image's is its cluster)", async () => {
    const dir = tempDir("nbdstack-qcow2-xl2-");
    const images: [string[], number][] = [
      [["-o", "extended_l2=on,cluster_size=128k"], 4096], // 4 KiB subclusters
      [["-o", "extended_l2=on,cluster_size=2M"], 65536], // 64 KiB subclusters
      [["-o", "extended_l2=on,cluster_size=16k"], 4096], // 512-byte subclusters: never below 4 KiB
      [["-o", "cluster_size=64k"], 65536],
    ];
    for (const [i, [opts, preferred]] of images.entries()) {
      const srv = await serve([createQcow2(dir, `i${i}.qcow2`, opts)]);
      try {
        const info = JSON.parse(run("nbdinfo", ["--json", srv.uri])) as { exports: { block_size_preferred: number }[] };
        expect([opts.join(" "), info.exports[0]!.block_size_preferred]).toEqual([opts.join(" "), preferred]);
      } finally {
        await srv.stop();
      }
    }
  });

  it("a whole-subcluster write allocates that subcluster only: the backing file's other subclusters are not copied", async () => {
    const dir = tempDir("nbdstack-qcow2-xl2-");
    const base = path.join(dir, "base.raw");
    randomImage(base, 8 * MiB, 9);
    const f = createQcow2(dir, "top.qcow2", ["-o", "extended_l2=on,cluster_size=64k", "-b", "base.raw", "-F", "raw"], "");
    const srv = await serve([f]);
    try {
      qio("raw", srv.uri, `write -P 0x66 ${MiB + 5 * 2048} 2048`); // subcluster 5 of the cluster at 1 MiB
      qio("raw", srv.uri, `write -P 0x67 ${2 * MiB + 9 * 2048 + 100} 200`); // partial: subcluster 9 only is copied
    } finally {
      expect(await srv.stop("SIGTERM")).toBe(0);
    }
    qimg("check", "-q", f);
    const own = (JSON.parse(qimg("map", "--output=json", f)) as QemuMapRow[]).filter((r) => r.depth === 0).map((r) => [r.start, r.length, r.data]);
    expect(own).toEqual([
      [MiB + 5 * 2048, 2048, true],
      [2 * MiB + 9 * 2048, 2048, true],
    ]);
    // The backing file changes beside the written subcluster: the image shows it there.
    qio("raw", base, `write -P 0x77 ${MiB} ${5 * 2048}`, `write -P 0x78 ${MiB + 6 * 2048} 2048`);
    const out = qio("qcow2", f, `read -P 0x77 ${MiB} ${5 * 2048}`, `read -P 0x66 ${MiB + 5 * 2048} 2048`, `read -P 0x78 ${MiB + 6 * 2048} 2048`);
    expect(out).not.toMatch(/Pattern verification failed/);
  });
});
