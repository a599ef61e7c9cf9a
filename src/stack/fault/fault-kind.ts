import { bool, ConfigError, str, typeName } from "../../config/values.js";
import { lazyCode, type LayerKind } from "../layer-kind.js";

const code = lazyCode("fault", () => import("./fault-layer.js"));

export interface FaultSpec {
  kind: "fault";
  rules: string[];
  seed?: number;
  powerloss?: boolean;
  id?: string;
}

/** `fault[:RULE]`: injected errors, delays and power loss anywhere in a stack; steered by `nbdstack fault`. */
export const faultKind: LayerKind<FaultSpec, void, "seed" | "powerloss" | "id"> = {
  name: "fault",
  summary: "injects errors, delays, stalls, corruption and power loss",
  argument: "[RULE | [RULE, …]]: rules to start with, e.g. op=pread,errno=EIO (none: add them at run time)",
  options: {
    seed: "an integer: the seed of the layer's random choices (default 1)",
    powerloss: "true: keep unflushed writes in a volatile cache that a power cut loses",
    id: "the name 'nbdstack fault' steers the layer by (default: the export's name)",
  },
  parse(arg, opts, at) {
    let rules: string[];
    if (arg === null || arg === undefined || arg === "" || arg === true) rules = [];
    else if (typeof arg === "string") rules = [arg];
    else if (Array.isArray(arg) && arg.every((r): r is string => typeof r === "string")) rules = arg;
    else throw new ConfigError(at.key, `expected a rule, a list of rules or nothing, got ${typeName(arg)}`);
    const spec: FaultSpec = { kind: "fault", rules };
    if (opts.seed !== undefined) {
      if (typeof opts.seed !== "number" || !Number.isInteger(opts.seed)) throw new ConfigError(at.option("seed"), `expected an integer, got ${typeName(opts.seed)}`);
      spec.seed = opts.seed;
    }
    if (opts.powerloss !== undefined) spec.powerloss = bool(opts.powerloss, at.option("powerloss"));
    if (opts.id !== undefined) spec.id = str(opts.id, at.option("id"), "a name for this fault layer");
    return spec;
  },
  format: (s) => (s.rules.length ? `fault:${s.rules.join(";")}` : "fault"),
  load: code.load,
  above(s, below, ctx) {
    const f = new (code.get().FaultLayer)(below, { seed: s.seed, powerloss: s.powerloss, log: ctx.log });
    for (const r of s.rules) f.addRule(r);
    ctx.handles.add(ctx.handles.faults, s.id ?? ctx.exportName, f, "fault");
    return f;
  },
};
