import { size } from "../../config/values.js";
import { lazyCode, type LayerKind } from "../layer-kind.js";

const code = lazyCode("memory", () => import("./memory-port.js"));

export interface MemorySpec {
  kind: "memory";
  size: number;
}

/** `memory:SIZE`: a sparse device in memory, at the bottom of a stack. */
export const memoryKind: LayerKind<MemorySpec> = {
  name: "memory",
  summary: "a sparse device in memory, lost when the server stops",
  argument: "SIZE: its size, e.g. 64M or 2G",
  options: {},
  parse: (arg, _opts, at) => ({ kind: "memory", size: size(arg, at.key) }),
  format: (s) => `memory:${s.size}`,
  load: code.load,
  bottom: (s, ctx) => code.get().createMemoryPort({ size: s.size, readOnly: ctx.readOnly }),
};
