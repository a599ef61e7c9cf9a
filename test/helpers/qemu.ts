import { execFileSync } from "node:child_process";
import path from "node:path";
import { afterAll, beforeAll, expect } from "vitest";
import { randomImage, serve, tempDir, type Served } from "./serve.js";

// QEMU's tools against images and exports, for the qcow2 interop tests.

const MiB = 1024 * 1024;

/** Runs a command, its output as text (stderr kept apart: in the error when it fails). */
export const run = (cmd: string, args: string[], cwd?: string): string => execFileSync(cmd, args, { encoding: "utf8", cwd, stdio: ["ignore", "pipe", "pipe"] });
export const qimg = (...args: string[]): string => run("qemu-img", args);
/** qemu-io commands against an image (format `fmt`) or an NBD URI (raw). */
export const qio = (fmt: string, target: string, ...cmds: string[]): string => run("qemu-io", ["-f", fmt, ...cmds.flatMap((c) => ["-c", c]), target]);

/** `qemu-img create -f qcow2 OPTS DIR/NAME [SIZE]` (no size: the backing file's). */
export function createQcow2(dir: string, name: string, opts: string[], size = "32M"): string {
  const file = path.join(dir, name);
  qimg("create", "-q", "-f", "qcow2", ...opts, file, ...(size ? [size] : []));
  return file;
}

/** An image `build` made in a fresh directory, its raw reference (`qemu-img convert`) and nbdstack serving it as "disk". */
export interface ServedImage {
  dir: string;
  image: string;
  ref: string;
  /** null once a test stopped it (see stopAndJudge). */
  srv: Served | null;
}

/** Registers beforeAll/afterAll for the describe block it is called in: see ServedImage. */
export function servedImage(prefix: string, build: (dir: string) => string): ServedImage {
  const s: ServedImage = { dir: "", image: "", ref: "", srv: null };
  beforeAll(async () => {
    s.dir = tempDir(prefix);
    s.image = build(s.dir);
    s.ref = path.join(s.dir, "reference.raw");
    qimg("convert", "-q", "-O", "raw", s.image, s.ref);
    s.srv = await serve([s.image, "--name", "disk"]);
  });
  afterAll(async () => {
    await s.srv?.stop("SIGKILL");
  });
  return s;
}

/** The same qemu-io commands against the export and the raw reference. */
export function writeBoth(s: ServedImage, ...cmds: string[]): void {
  for (const c of cmds) {
    qio("raw", s.srv!.uri, c);
    qio("raw", s.ref, c);
  }
}

/**
 * 3 MiB of random bytes copied into the export by nbdcopy (and into the reference); then the
 * export compared with the reference, the server stopped (exit 0), `qemu-img check` run on the
 * image and the image compared with the reference.
 */
export async function copyStopAndJudge(s: ServedImage): Promise<void> {
  const uri = s.srv!.uri;
  const rnd = path.join(s.dir, "random.bin");
  randomImage(rnd, 3 * MiB, 77);
  run("nbdcopy", [rnd, uri]);
  run("dd", [`if=${rnd}`, `of=${s.ref}`, "conv=notrunc", "status=none"]);
  qimg("compare", "-q", "-f", "raw", "-F", "raw", uri, s.ref);
  expect(await s.srv!.stop("SIGTERM")).toBe(0);
  s.srv = null;
  qimg("check", "-q", s.image);
  qimg("compare", "-q", "-f", "qcow2", "-F", "raw", s.image, s.ref);
}
