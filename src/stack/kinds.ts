import fs from "node:fs";
import { faultKind } from "./fault/fault-kind.js";
import { fsFileKind } from "./fs/fs-file-kind.js";
import type { LayerKind } from "./layer-kind.js";
import { partitionKind } from "./partition/partition-kind.js";
import { fileKind } from "./port/file-kind.js";
import { memoryKind } from "./port/memory-kind.js";
import { qcow2Kind } from "./qcow2/qcow2-kind.js";
import { concatKind } from "./volume/concat-kind.js";
import { cowKind } from "./volume/cow-kind.js";
import { mirrorKind } from "./volume/mirror-kind.js";
import { stripeKind } from "./volume/stripe-kind.js";

/**
 * Every layer kind a stack declaration can name, in the order errors and help list them. A new
 * kind is one file beside its layer (see layer-kind.ts) and one entry here.
 */
const KINDS = [fileKind, memoryKind, concatKind, stripeKind, mirrorKind, qcow2Kind, cowKind, partitionKind, faultKind, fsFileKind] as const;

/** One parsed stack item: the union of what the kinds' `parse` return. */
export type LayerSpec = ReturnType<(typeof KINDS)[number]["parse"]>;

/**
 * The declaration of an export's stack, bottom-up: the first item is the device at the bottom
 * (an image file or memory, or a volume joining several stacks), each later item wraps the one
 * before it. The disk layer on top is implicit. Written in a config file as a list of one-key
 * maps, or in one line: "file:base.img → cow:overlay.img → partition:2 → fault".
 */
export type StackSpec = LayerSpec[];

/**
 * A kind seen through the registry. Its methods take any LayerSpec (method parameters are
 * bivariant); the registry hands a kind only the items it parsed, found by `kind` name.
 */
export type AnyLayerKind = LayerKind<LayerSpec, unknown, string>;

export const LAYER_KINDS: readonly AnyLayerKind[] = KINDS;

/** The kind called `name`, whatever its position. */
export function kindNamed(name: string): AnyLayerKind | undefined {
  return LAYER_KINDS.find((k) => k.name === name);
}

/** The kind that `name` means first in a stack, if it may stand there. */
export function bottomKind(name: string): AnyLayerKind | undefined {
  return LAYER_KINDS.find((k) => k.name === name && k.bottom);
}

/** The kind that `name` means above another layer, if any may stand there. */
export function aboveKind(name: string): AnyLayerKind | undefined {
  return LAYER_KINDS.find((k) => k.name === name && k.above) ?? LAYER_KINDS.find((k) => k.above && k.writtenAbove?.includes(name));
}

/** The kind of a parsed item. */
export function kindOf(spec: LayerSpec): AnyLayerKind {
  const k = kindNamed(spec.kind);
  if (!k) throw new Error(`no layer kind "${spec.kind}"`);
  return k;
}

/** Bytes of an image's head a kind's `claims` sees. */
const HEAD_BYTES = 512;

/**
 * The kind of the image file at `path` by its contents: the first kind that claims its head (a
 * qcow2 magic, say), else `file` (raw). A file that cannot be read is `file`, whose open then says why.
 */
export function imageKind(path: string): AnyLayerKind {
  const raw = kindNamed("file")!;
  let head: Buffer;
  try {
    const fd = fs.openSync(path, "r");
    try {
      head = Buffer.alloc(HEAD_BYTES);
      head = head.subarray(0, fs.readSync(fd, head, 0, HEAD_BYTES, 0));
    } finally {
      fs.closeSync(fd);
    }
  } catch {
    return raw;
  }
  return LAYER_KINDS.find((k) => k.bottom && k.claims?.(head)) ?? raw;
}

/**
 * Whether every layer of `stack`, the stacks inside volumes included, is coherent across
 * processes (LayerKind.coherentAcrossProcesses): then any event loop of `serve --threads` may
 * build and serve it.
 */
export function coherentAcrossProcesses(stack: StackSpec): boolean {
  return stack.every((l) => kindOf(l).coherentAcrossProcesses === true && (!("devices" in l) || l.devices.every(coherentAcrossProcesses)));
}
