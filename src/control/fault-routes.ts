import { HttpError, type ControlServer } from "./control-server.js";
import type { FaultLayer } from "../stack/fault/fault-layer.js";
import { RuleSyntaxError } from "../stack/fault/rules.js";

/**
 * Run-time control of fault layers: GET /v1/exports/NAME/faults lists rules and counters;
 * POST /v1/exports/NAME/faults with one of {"add": RULE}, {"clear": true}, {"release": true},
 * {"powercut": {"keep": 0.5, "torn": true}}, {"poweron": true}.
 */
export function attachFaultRoutes(c: ControlServer, faults: Map<string, FaultLayer>): void {
  const find = (name: string) => {
    const f = faults.get(name);
    if (!f) throw new HttpError(404, `export "${name}" has no fault layer (serve it with --fault)`);
    return f;
  };
  const view = (f: FaultLayer) => ({ rules: f.listRules(), counts: f.counts });
  c.route("GET", "/v1/exports/:name/faults", async (p) => ({ body: view(find(p.name!)) }));
  c.route("POST", "/v1/exports/:name/faults", async (p, body) => {
    const f = find(p.name!);
    const b = (body ?? {}) as Record<string, unknown>;
    if (typeof b.add === "string") {
      try {
        return { body: { added: f.addRule(b.add), ...view(f) } };
      } catch (err) {
        if (err instanceof RuleSyntaxError) throw new HttpError(400, `bad rule: ${err.message}`);
        throw err;
      }
    }
    if (b.clear) {
      f.clearRules();
      return { body: view(f) };
    }
    if (b.release) return { body: { released: f.releaseStalled(), ...view(f) } };
    if (b.powercut) {
      const o = typeof b.powercut === "object" ? (b.powercut as { keep?: number; torn?: boolean }) : {};
      try {
        return { body: { ...(await f.powerCut(o)), ...view(f) } };
      } catch (err) {
        throw new HttpError(409, (err as Error).message);
      }
    }
    if (b.poweron) {
      f.powerOn();
      return { body: view(f) };
    }
    throw new HttpError(400, 'body must have one of "add", "clear", "release", "powercut", "poweron"');
  });
}
