import type { Logger } from "pino";
import type { StackSpec } from "./kinds.js";
import type { Layer } from "./layer.js";
import type { IoMode } from "./port/file-port.js";
import type { StackHandles } from "./stack-handles.js";

/**
 * One kind of layer as a stack declaration names it (`partition:2`, `{fault: …, seed: 3}`), declared
 * once beside the layer and read by the config parser (keys, errors), the stack's one-line form
 * and the stack builder — nbdkit's NBDKIT_REGISTER_FILTER. `S` is the parsed item (its `kind` is
 * the name), `P` what `prepare` reads from the open device below, `O` the option keys.
 *
 * Where a kind may stand is which factories it has: `bottom` (a device of its own, first in a
 * stack) and/or `above` (over the layer before it). Every kind is listed once in `kinds.ts`.
 */
export interface LayerKind<S extends { kind: string }, P = void, O extends string = never> {
  /** The key that names the kind in a stack item. */
  readonly name: S["kind"];
  /** One line for help: what the layer does. */
  readonly summary: string;
  /** Help for the kind's own key: its value, e.g. `N: the partition number (1, 2 … or p1, p2 …)`. */
  readonly argument: string;
  /** Keys the kind accepts beside its own in the list form (`{stripe: […], chunk: 4k}`), with help. */
  readonly options: Readonly<Record<O, string>>;
  /** Other names this kind is written as above the bottom (`file:` above a file system is fs-file). */
  readonly writtenAbove?: readonly string[];
  /**
   * The layer serves a part of the device below (a partition, a file in a file system): an export
   * whose stack has one offers no NAME/pN partition exports unless its config asks for them.
   */
  readonly selectsPart?: boolean;
  /**
   * The layer keeps state of the device in the process that opened it (an overlay's map). On a
   * cluster node such a layer is part of the resource: it sits in port A with the image, so only
   * the owner opens it, and it moves with the image (two nodes opening it would be two writers).
   */
  readonly holdsState?: boolean;
  /**
   * The layer keeps nothing of the device but what the image file holds (a file's fd, offsets
   * computed once at open): stacks of such layers opened by several processes over one image are
   * one coherent device — pread/pwrite on one file are coherent and fdatasync covers every writer.
   * `serve --threads N` lets any event loop serve an export whose every layer says so; the others
   * stay with the primary loop (see server/THREADS.md). Absent: false, the safe answer.
   */
  readonly coherentAcrossProcesses?: boolean;
  /**
   * Recognises an image of this kind by its first bytes (a format's magic). `nbdstack serve IMAGE`
   * puts at the bottom of the stack the first kind that claims the file, `file:` (raw) if none does
   * (see imageKind in kinds.ts). A kind that claims images takes the `read-only` option.
   */
  readonly claims?: (head: Buffer) => boolean;

  /**
   * Imports the layer's code. A kind that only some exports use declares its layer's module here
   * instead of importing it at the top of its file (see `lazyCode`), so a server of plain files
   * does not hold qcow2's or an overlay's code in memory. The stack builder awaits it for every
   * kind a stack names (compose's loadKinds) before `bottom`, `above` or `prepare` run. The kinds
   * every server uses (file, partition) have none.
   */
  load?(): Promise<void>;

  /** Validates the kind's value (`arg`: the text after "kind:", or the YAML value) and its options. */
  parse(arg: unknown, opts: Readonly<Partial<Record<O, unknown>>>, at: ParseAt<O>): S;
  /** The item's one-line form, for logs and errors; `stack` formats nested stacks. */
  format(spec: S, stack: (s: StackSpec) => string): string;

  /**
   * Builds it at the bottom of a stack; `stack` builds nested stacks (a volume's devices; with
   * `readOnly`, a stack that is only read: a qcow2 image's backing stack).
   */
  bottom?(spec: S, ctx: BuildContext, stack: (s: StackSpec, readOnly?: boolean) => Layer): Layer;
  /** Builds it over `below`; with `prepare`, `below` is open and `prepared` is what it read. */
  above?(spec: S, below: Layer, ctx: BuildContext, prepared: P): Layer;
  /**
   * Runs once the layer below is open, before `above` builds the layer: reads what the layer needs
   * from the device (nbdkit's .prepare), e.g. the partition table. Its errors fail the open.
   */
  prepare?(spec: S, below: Layer): Promise<P>;
}

/** Where an item is in the config, and the parser's services for a kind's `parse`. */
export interface ParseAt<O extends string = string> {
  /** The kind's own key, for errors: `exports[0].stack[2].partition`. */
  readonly key: string;
  /** Where option `name` is: `exports[0].stack[2].chunk`. */
  option(name: O): string;
  /** A path resolved against the config file's directory. */
  resolve(path: string): string;
  /** A list of at least `min` devices, each a one-line stack, a list of items or one item. */
  devices(v: unknown, min: number): StackSpec[];
}

/** What building a stack needs besides its declaration. */
export interface BuildContext {
  exportName: string;
  readOnly: boolean;
  io?: IoMode;
  /** serve --discard: `ignore` tells ports not to offer trim (and not to punch holes at all). */
  discard?: "unmap" | "ignore";
  log?: Logger;
  handles: StackHandles;
  /** The bottom of a cluster node's export, built anew at each open of port A (an image is not registered in `handles` then). */
  rebuilt?: boolean;
}

/**
 * A layer's module, imported by its kind's `load` and used by the kind's factories, which the
 * stack builder runs only after `load` (a factory reaching it before says so, naming the kind).
 */
export function lazyCode<M>(kind: string, importer: () => Promise<M>): { load(): Promise<void>; get(): M } {
  let code: M | undefined;
  let loading: Promise<void> | undefined;
  return {
    load: () =>
      (loading ??= importer().then(
        (m) => void (code = m),
        (err) => {
          loading = undefined;
          throw err;
        },
      )),
    get: () => {
      if (code === undefined) throw new Error(`the ${kind} layer's code is not loaded: build stacks after loadKinds()`);
      return code;
    },
  };
}
