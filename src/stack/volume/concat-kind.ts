import type { StackSpec } from "../kinds.js";
import { lazyCode, type LayerKind } from "../layer-kind.js";

const code = lazyCode("concat", () => import("./concat-layer.js"));

export interface ConcatSpec {
  kind: "concat";
  devices: StackSpec[];
}

/** `concat: [A, B …]`: devices one after another as one device. */
export const concatKind: LayerKind<ConcatSpec> = {
  name: "concat",
  coherentAcrossProcesses: true,
  summary: "devices one after another as one device",
  argument: "[DEVICE, …]: images like file:a.img, or stacks of their own",
  options: {},
  parse: (arg, _opts, at) => ({ kind: "concat", devices: at.devices(arg, 1) }),
  format: (s, stack) => `concat(${s.devices.map(stack).join(", ")})`,
  load: code.load,
  bottom: (s, _ctx, stack) => code.get().createConcatLayer(s.devices.map((d) => stack(d))),
};
