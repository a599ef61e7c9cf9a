import { size, str } from "../../config/values.js";
import { lazyCode, type LayerKind } from "../layer-kind.js";

const code = lazyCode("cow", () => import("./cow-layer.js"));

export interface CowSpec {
  kind: "cow";
  overlay: string;
  blockSize?: number;
}

/** `cow:OVERLAY`: a copy-on-write overlay above a device that is then only read. */
export const cowKind: LayerKind<CowSpec, void, "block-size"> = {
  name: "cow",
  summary: "a copy-on-write overlay with snapshots and merge",
  argument: "OVERLAY: the overlay file, created if missing",
  holdsState: true,
  options: { "block-size": "the block size of a new overlay, a power of two from 4k to 16M (default 64k); must match an existing overlay's" },
  parse: (arg, opts, at) => ({
    kind: "cow",
    overlay: at.resolve(str(arg, at.key, "an overlay file path")),
    ...(opts["block-size"] !== undefined ? { blockSize: size(opts["block-size"], at.option("block-size")) } : {}),
  }),
  format: (s) => `cow:${s.overlay}`,
  load: code.load,
  above(s, below, ctx) {
    const c = code.get().createCowLayer(below, s.overlay, { blockSize: s.blockSize, io: ctx.io });
    ctx.handles.add(ctx.handles.cows, ctx.exportName, c, "cow");
    return c;
  },
};
