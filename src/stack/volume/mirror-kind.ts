import type { StackSpec } from "../kinds.js";
import { lazyCode, type LayerKind } from "../layer-kind.js";

const code = lazyCode("mirror", () => import("./mirror-layer.js"));

export interface MirrorSpec {
  kind: "mirror";
  devices: StackSpec[];
}

/** `mirror: [A, B …]`: RAID-1 over devices; steered by `nbdstack mirror`. */
export const mirrorKind: LayerKind<MirrorSpec> = {
  name: "mirror",
  summary: "the same data on every device (RAID-1), with resync",
  argument: "[DEVICE, …]: images like file:a.img, or stacks of their own",
  options: {},
  parse: (arg, _opts, at) => ({ kind: "mirror", devices: at.devices(arg, 1) }),
  format: (s, stack) => `mirror(${s.devices.map(stack).join(", ")})`,
  load: code.load,
  bottom(s, ctx, stack) {
    const m = code.get().createMirrorLayer(s.devices.map((d) => stack(d)), { log: ctx.log?.child({ export: ctx.exportName, layer: "mirror" }) });
    ctx.handles.add(ctx.handles.mirrors, ctx.exportName, m, "mirror");
    return m;
  },
};
