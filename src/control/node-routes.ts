import { HttpError, type ControlServer } from "./control-server.js";
import type { LeaseRecord, NodeIdentity } from "../migration/lease.js";
import type { HandedView } from "../migration/ownership.js";
import type { CopyMode } from "../migration/live-copy.js";
import type { FileIdentity } from "../node/copy-target.js";
import type { StorageNode } from "../node/storage-node.js";

/**
 * A cluster node's control routes: GET /v1/status; POST /v1/exports/NAME/migrate {"to", "copy",
 * "mode", "skipFree", "maxRate"} and …/migrate/cancel (for users and the CLI); between nodes,
 * POST /v1/exports/NAME/adopt {"epoch", "handedFrom"?, "record"?, "at"?, "prev"?, "liveAt"?} (the hand-over
 * as the source made it, for the claim to start from: see HandedView), POST /v1/copy-targets {"name", "size", "epoch", "owner", "image"?, "handedFrom"?}
 * ("image": the source's file identity, so that a target that is the same file is refused;
 * "handedFrom": the owners the source's record lists as having handed the image on cleanly)
 * and POST /v1/copy-targets/NAME/abandon {"epoch"?} (409 once this node adopted that epoch). Bodies are checked here; the node does the work.
 */
export function attachNodeRoutes(c: ControlServer, node: StorageNode): void {
  c.route("GET", "/v1/status", async () => ({ body: await node.status() }));
  c.route("POST", "/v1/exports/:name/migrate", async (p, body) => {
    const b = (body ?? {}) as { to?: unknown; copy?: unknown; mode?: unknown; skipFree?: unknown; maxRate?: unknown };
    if (typeof b.to !== "string") throw new HttpError(400, 'body must be {"to": "http://HOST:PORT"} (and "copy": true for a live copy)');
    if (!b.copy) return { body: await node.migrate(p.name!, b.to) };
    if (b.mode !== undefined && b.mode !== "background" && b.mode !== "write-blocking") throw new HttpError(400, 'mode must be "background" or "write-blocking"');
    if (b.maxRate !== undefined && (typeof b.maxRate !== "number" || !(b.maxRate > 0))) throw new HttpError(400, "maxRate must be a positive number of bytes per second");
    return { body: await node.migrateCopy(p.name!, b.to, { mode: b.mode as CopyMode | undefined, skipFree: !!b.skipFree, maxRate: b.maxRate as number | undefined }) };
  });
  c.route("POST", "/v1/exports/:name/migrate/cancel", async (p) => {
    node.cancelCopy(p.name!);
    return { body: { cancelled: p.name } };
  });
  c.route("POST", "/v1/copy-targets", async (_p, body) => {
    const b = (body ?? {}) as { name?: unknown; size?: unknown; owner?: unknown; epoch?: unknown; image?: unknown; handedFrom?: unknown };
    const owner = b.owner as NodeIdentity | undefined;
    if (typeof b.name !== "string" || typeof b.size !== "number" || typeof b.epoch !== "number" || !owner || typeof owner.nodeId !== "string" || typeof owner.nbd !== "string")
      throw new HttpError(400, 'body must be {"name", "size", "epoch", "owner": {nodeId, nbd, control}}');
    const img = b.image as FileIdentity | undefined;
    if (img !== undefined && (typeof img !== "object" || img === null || typeof img.path !== "string" || typeof img.dev !== "number" || typeof img.ino !== "number" || typeof img.host !== "string"))
      throw new HttpError(400, '"image" must be {"path", "dev", "ino", "host"}');
    return { body: await node.createCopyTarget(b.name, b.size, owner, b.epoch, img, handedFromOf(b.handedFrom)) };
  });
  c.route("POST", "/v1/copy-targets/:name/abandon", async (p, body) => {
    const epoch = (body as { epoch?: unknown } | undefined)?.epoch;
    if (epoch !== undefined && typeof epoch !== "number") throw new HttpError(400, 'body must be {} or {"epoch": N}');
    await node.abandonCopyTarget(p.name!, epoch);
    return { body: { abandoned: p.name } };
  });
  c.route("POST", "/v1/exports/:name/adopt", async (p, body) => {
    const b = (body ?? {}) as { epoch?: unknown; handedFrom?: unknown; record?: unknown; at?: unknown; prev?: unknown; liveAt?: unknown };
    const epoch = b.epoch;
    if (typeof epoch !== "number") throw new HttpError(400, 'body must be {"epoch": N}');
    await node.adopt(p.name!, epoch, handedFromOf(b.handedFrom), handedViewOf(b, epoch));
    return { body: { adopted: p.name, epoch } };
  });
}

/**
 * The hand-over as its source made it ("record" and the store's revision "at"; for one it planned
 * and did not write, also its own record "prev" and its liveness key's revision "liveAt"), which
 * the claim may start from; anything that does not look like one is ignored (the claim then
 * reads the record, and a planned hand-over is then refused: nothing in the store names this node).
 */
function handedViewOf(b: { record?: unknown; at?: unknown; prev?: unknown; liveAt?: unknown }, epoch: number): HandedView | undefined {
  const isRecord = (x: unknown): x is LeaseRecord => typeof x === "object" && x !== null && typeof (x as LeaseRecord).owner === "string" && Number.isSafeInteger((x as LeaseRecord).epoch);
  const isRev = (x: unknown): x is number => Number.isSafeInteger(x) && (x as number) > 0;
  if (!isRev(b.at) || !isRecord(b.record) || b.record.epoch !== epoch) return undefined;
  if (b.prev === undefined && b.liveAt === undefined) return { record: b.record, at: b.at };
  if (!isRecord(b.prev) || !isRev(b.liveAt) || b.prev.epoch + 1 !== epoch) return undefined;
  return { record: b.record, at: b.at, prev: b.prev, liveAt: b.liveAt };
}

/** A "handedFrom" list: owner tokens NODE@EPOCH (at most 8 are kept). */
function handedFromOf(v: unknown): string[] | undefined {
  if (v === undefined) return undefined;
  if (!Array.isArray(v) || v.length > 64 || !v.every((t) => typeof t === "string" && /^[^@\s]+@\d+$/.test(t))) throw new HttpError(400, '"handedFrom" must be a list of "NODE@EPOCH" strings');
  return v as string[];
}
