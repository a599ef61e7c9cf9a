import { bool, size, str } from "../../config/values.js";
import { ConfigError } from "../../config/values.js";
import type { StackSpec } from "../../config/stack-spec.js";
import { createDiskLayer } from "../disk/disk-layer.js";
import { lazyCode, type LayerKind } from "../layer-kind.js";
import { isQcow2 } from "./qcow2-format.js";

const code = lazyCode("qcow2", async () => ({ ...(await import("./qcow2-layer.js")), ...(await import("./qcow2-online.js")) }));

export interface Qcow2Spec {
  kind: "qcow2";
  path: string;
  /** `auto`, `none`, or a stack whose device stands in for the backing file. */
  backing?: "auto" | "none" | StackSpec;
  readOnly?: boolean;
  l2Cache?: number;
  refcountCache?: number;
  /** Set by `serve IMAGE --overlay FILE.qcow2` (not a config key): see Qcow2LayerOptions.overlayOf. */
  overlayOf?: { image: string; format: "raw" | "qcow2" };
}

type Qcow2Option = "backing" | "read-only" | "l2-cache" | "refcount-cache";

/** `qcow2:IMAGE` at the bottom of a stack; `nbdstack serve IMAGE` picks it by the image's magic. */
export const qcow2Kind: LayerKind<Qcow2Spec, void, Qcow2Option> = {
  name: "qcow2",
  summary: "a qcow2 image (v2/v3) with its backing chain, read and written",
  argument: "IMAGE: the qcow2 image's path, relative to the config file",
  options: {
    backing:
      "auto (default): read unallocated clusters from the backing chain the image names; none: read them as zeroes; a stack (file:disk.img → partition:2, or a list): read them from that device, only read",
    "read-only": "true: open the image read-only whatever the export allows",
    "l2-cache": "bytes of L2 tables kept in memory per image of the chain (default 32M)",
    "refcount-cache": "bytes of refcount blocks kept in memory (default 1M)",
  },
  claims: isQcow2,
  load: code.load,
  parse(arg, opts, at) {
    const p = str(arg, at.key, "a qcow2 image path");
    const spec: Qcow2Spec = { kind: "qcow2", path: at.resolve(p) };
    if (opts.backing !== undefined) {
      const b = opts.backing;
      if (b === "auto" || b === "none") spec.backing = b;
      else if (typeof b === "string" && !b.includes(":")) throw new ConfigError(at.option("backing"), `expected auto, none or a stack (e.g. file:base.img → partition:2), got "${b}"`);
      else if (typeof b !== "string" && (typeof b !== "object" || b === null)) throw new ConfigError(at.option("backing"), `expected auto, none or a stack, got ${b === null ? "null" : typeof b}`);
      else spec.backing = at.devices([b], 1)[0]!;
    }
    if (opts["read-only"] !== undefined) spec.readOnly = bool(opts["read-only"], at.option("read-only"));
    if (opts["l2-cache"] !== undefined) spec.l2Cache = size(opts["l2-cache"], at.option("l2-cache"));
    if (opts["refcount-cache"] !== undefined) spec.refcountCache = size(opts["refcount-cache"], at.option("refcount-cache"));
    return spec;
  },
  format: (s, stack) => `qcow2:${s.path}${s.backing === "none" ? " (backing: none)" : typeof s.backing === "object" ? ` (backing: ${stack(s.backing)})` : ""}`,
  bottom: (s, ctx, stack) => {
    // A backing stack is only read, through a disk layer (any byte range: alignment, splitting).
    const backing = typeof s.backing === "object" ? createDiskLayer(stack(s.backing, true), { readOnly: true }) : s.backing;
    const { createQcow2Layer, Qcow2Online } = code.get();
    const l = createQcow2Layer({ path: s.path, readOnly: ctx.readOnly || !!s.readOnly, backing, io: ctx.io, discard: ctx.discard !== "ignore", l2Cache: s.l2Cache, refcountCache: s.refcountCache, log: ctx.log, overlayOf: s.overlayOf });
    // nbdstack snapshot / merge
    if (!ctx.rebuilt) ctx.handles.addQcow2(ctx.exportName, new Qcow2Online(l, ctx.log?.child({ export: ctx.exportName })));
    else if (!ctx.handles.qcow2s.has(ctx.exportName))
      ctx.handles.qcow2s.set(ctx.exportName, { refused: `the qcow2 image of cluster export "${ctx.exportName}" has no online snapshot or merge (port A opens it anew at each hand-over); a cow overlay has them` });
    return l;
  },
};
