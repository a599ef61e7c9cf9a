import { NbdError } from "../errors.js";
import { HttpError, type ControlServer } from "./control-server.js";
import type { CowLayer } from "../stack/volume/cow-layer.js";
import type { Qcow2Online } from "../stack/qcow2/qcow2-online.js";

/**
 * Run-time control of copy-on-write layers, and of the qcow2 image an export serves (a chain of
 * qcow2 overlays; see qcow2-online.ts), in the same terms: GET /v1/exports/NAME/cow shows the chain (overlay,
 * snapshots, base), the bytes the overlay holds and the progress of the running or last merge.
 * POST /v1/exports/NAME/cow with one of:
 * - {"snapshot": true} or {"snapshot": "FILE"}: freeze the overlay (as FILE beside it, default
 *   OVERLAY.snap-N) and start a new one; answers {"snapshot": PATH, ...status} when done;
 * - {"merge": true, "mergeIntoBase"?: bool}: start folding the overlay into the layer below;
 *   answers 202 with the status at once (poll GET for progress), or 200 at the end with "wait": true.
 */
export function attachCowRoutes(c: ControlServer, cows: Map<string, CowLayer>, qcow2s: Map<string, Qcow2Online | { refused: string }> = new Map()): void {
  const find = (name: string): CowLayer | Qcow2Online => {
    const cow = cows.get(name) ?? qcow2s.get(name);
    if (cow && "refused" in cow) throw new HttpError(409, cow.refused);
    if (!cow) throw new HttpError(404, `export "${name}" has no copy-on-write layer and no qcow2 image (serve it with --overlay, or serve a qcow2 image)`);
    return cow;
  };
  const refused = (err: unknown) => (err instanceof NbdError ? new HttpError(409, err.message) : err);
  c.route("GET", "/v1/exports/:name/cow", async (p) => ({ body: await find(p.name!).info() }));
  c.route("POST", "/v1/exports/:name/cow", async (p, body) => {
    const cow = find(p.name!);
    const b = (body ?? {}) as Record<string, unknown>;
    if (b.snapshot !== undefined && b.snapshot !== false) {
      if (b.snapshot !== true && typeof b.snapshot !== "string") throw new HttpError(400, '"snapshot" must be true or a file name');
      try {
        const frozen = await cow.snapshot(typeof b.snapshot === "string" ? b.snapshot : undefined);
        return { body: { snapshot: frozen, ...(await cow.info()) } };
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
      if (!b.wait) return { status: 202, body: await cow.info() };
      try {
        await done;
      } catch (err) {
        throw new HttpError(500, `merge failed: ${(err as Error).message}`);
      }
      return { body: await cow.info() };
    }
    throw new HttpError(400, 'body must have one of "snapshot", "merge"');
  });
}
