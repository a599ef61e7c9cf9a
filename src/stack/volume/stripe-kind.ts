import { size } from "../../config/values.js";
import type { StackSpec } from "../kinds.js";
import { lazyCode, type LayerKind } from "../layer-kind.js";

const code = lazyCode("stripe", () => import("./stripe-layer.js"));

export interface StripeSpec {
  kind: "stripe";
  devices: StackSpec[];
  chunk: number;
}

/** `stripe: [A, B …]`: RAID-0 over devices, chunk by chunk. */
export const stripeKind: LayerKind<StripeSpec, void, "chunk"> = {
  name: "stripe",
  coherentAcrossProcesses: true,
  summary: "devices striped chunk by chunk (RAID-0)",
  argument: "[DEVICE, …]: images like file:a.img, or stacks of their own",
  options: { chunk: "the stripe chunk, e.g. 64k (the default)" },
  parse: (arg, opts, at) => ({ kind: "stripe", devices: at.devices(arg, 1), chunk: opts.chunk === undefined ? 65536 : size(opts.chunk, at.option("chunk")) }),
  format: (s, stack) => `stripe[${s.chunk}](${s.devices.map(stack).join(", ")})`,
  load: code.load,
  bottom: (s, _ctx, stack) => code.get().createStripeLayer(s.devices.map((d) => stack(d)), s.chunk),
};
