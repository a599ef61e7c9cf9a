import { HttpError, type ControlServer } from "./control-server.js";
import type { MirrorLayer } from "../stack/volume/mirror-layer.js";

/**
 * Run-time control of mirror volumes: GET /v1/exports/NAME/mirror gives the legs' states, error
 * counts and resync progress (MirrorStatus); POST /v1/exports/NAME/mirror {"resync": LEG} starts
 * rebuilding a degraded leg online and answers at once (202) with the status; follow the progress
 * with GET. A resync that cannot start (leg in sync, already resyncing, no healthy leg) is 409.
 */
export function attachMirrorRoutes(c: ControlServer, mirrors: Map<string, MirrorLayer>): void {
  const find = (name: string) => {
    const m = mirrors.get(name);
    if (!m) throw new HttpError(404, `export "${name}" has no mirror volume`);
    return m;
  };
  c.route("GET", "/v1/exports/:name/mirror", async (p) => ({ body: find(p.name!).status() }));
  c.route("POST", "/v1/exports/:name/mirror", async (p, body) => {
    const m = find(p.name!);
    const b = (body ?? {}) as Record<string, unknown>;
    if (b.resync === undefined) throw new HttpError(400, 'body must have "resync": LEG (the index of a degraded leg)');
    const leg = b.resync;
    if (typeof leg !== "number" || !Number.isInteger(leg)) throw new HttpError(400, `"resync" must be a leg index, not ${JSON.stringify(leg)}`);
    const why = m.canResync(leg);
    if (why) throw new HttpError(409, `cannot resync: ${why}`);
    // Runs in the background; the mirror logs the outcome and GET shows it.
    m.resync(leg).catch(() => undefined);
    return { status: 202, body: { started: leg, ...m.status() } };
  });
}
