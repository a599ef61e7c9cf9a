import { NbdError } from "../errors.js";
import { HttpError, type ControlServer } from "./control-server.js";
import type { CowLayer } from "../stack/volume/cow-layer.js";

/**
 * Run-time control of copy-on-write layers: GET /v1/exports/NAME/cow shows the chain (overlay,
 * snapshots, base), the bytes the overlay holds and the progress of the running or last merge.
 * POST /v1/exports/NAME/cow with one of:
 * - {"snapshot": true} or {"snapshot": "FILE"}: freeze the overlay (as FILE beside it, default
 *   OVERLAY.snap-N) and start a new one; answers {"snapshot": PATH, ...status} when done;
 * - {"merge": true, "mergeIntoBase"?: bool}: start folding the overlay into the layer below;
 *   answers 202 with the status at once (poll GET for progress), or 200 at the end with "wait": true.
 */
export function attachCowRoutes(c: ControlServer, cows: Map<string, CowLayer>): void {
  const find = (name: string) => {
    const cow = cows.get(name);
    if (!cow) throw new HttpError(404, `export "${name}" has no copy-on-write layer (serve it with --overlay)`);
    return cow;
  };
  const refused = (err: unknown) => (err instanceof NbdError ? new HttpError(409, err.message) : err);
  c.route("GET", "/v1/exports/:name/cow", async (p) => ({ body: find(p.name!).info() }));
  c.route("POST", "/v1/exports/:name/cow", async (p, body) => {
    const cow = find(p.name!);
    const b = (body ?? {}) as Record<string, unknown>;
    if (b.snapshot !== undefined && b.snapshot !== false) {
      if (b.snapshot !== true && typeof b.snapshot !== "string") throw new HttpError(400, '"snapshot" must be true or a file name');
      try {
        const frozen = await cow.snapshot(typeof b.snapshot === "string" ? b.snapshot : undefined);
        return { body: { snapshot: frozen, ...cow.info() } };
      } catch (err) {
        throw refused(err);
      }
    }
    if (b.merge) {
      let done: Promise<void>;
      try {
        done = cow.startMerge({ mergeIntoBase: b.mergeIntoBase === true }).done;
      } catch (err) {
        throw refused(err);
      }
      if (!b.wait) return { status: 202, body: cow.info() };
      try {
        await done;
      } catch (err) {
        throw new HttpError(500, `merge failed: ${(err as Error).message}`);
      }
      return { body: cow.info() };
    }
    throw new HttpError(400, 'body must have one of "snapshot", "merge"');
  });
}
