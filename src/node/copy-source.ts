import { NbdClient } from "../client/nbd-client.js";
import { ControlError, controlCall, getStatus } from "../control/control-client.js";
import { HttpError } from "../control/control-server.js";
import type { CopyTarget } from "../copy/copier.js";
import { freeRanges } from "../migration/free-space.js";
import { LiveCopy, type CopyMode } from "../migration/live-copy.js";
import { fileIdentity } from "./copy-target.js";
import { parseHostPort, type CopyMigrateOptions, type MoveResult, type NodeContext } from "./node-context.js";

/*
 * The source's side of a live copy (migrate --copy): the destination makes a copy target, the
 * dirty tracker above port A records writes while the copier brings the target up to date, and
 * the port redirector's hand-over (with the final copy made while requests are held) moves the
 * export, as with shared storage. Anything failing before the hand-over leaves this node the owner.
 */

/**
 * Moves export `name` to a node that does not share its storage: the destination gets an image
 * of its own, a live copy brings it up to date while clients keep writing, and the port
 * redirector hands over as for shared storage, with the final copy made while requests are held.
 */
export async function migrateByCopy(node: NodeContext, name: string, to: string, o: CopyMigrateOptions): Promise<MoveResult & { copied: number; mode: CopyMode }> {
  const m = node.find(name);
  if (m.epoch === null || m.redirector.state !== "LOCAL") throw new HttpError(409, `${name} is not owned here (state ${m.redirector.state}); migrate it on its owner`);
  if (m.copy && ["starting", "copying", "final"].includes(m.copy.progress().phase)) throw new HttpError(409, `${name}: a live copy is running already`);
  const peer = await getStatus(to).catch((err: Error) => {
    throw new HttpError(502, `peer ${to} unreachable: ${err.message}`);
  });
  const t0 = performance.now();
  const log = node.opts.log.child({ export: name, to: peer.nodeId });
  const t = await controlCall<{ target: string; nbd: string; fresh: boolean }>(to, "POST", "v1/copy-targets", { name, size: m.exp.size(), owner: node.identity, epoch: m.epoch, image: fileIdentity(m.image) ?? undefined, handedFrom: m.lease.read()?.handedFrom }).catch((err: Error) => {
    // A refusal (409: the same image, another size, owned there) is the caller's conflict, not a bad gateway.
    throw new HttpError(err instanceof ControlError && err.status === 409 ? 409 : 502, `peer ${peer.nodeId} cannot receive ${name}: ${err.message}`);
  });
  // Tidying only (the target stays marked incomplete either way): a stopped peer must not hold the answer long.
  const abandon = () => controlCall(to, "POST", `v1/copy-targets/${encodeURIComponent(name)}/abandon`, {}, 5000).catch(() => undefined);
  let client: NbdClient;
  try {
    client = await NbdClient.connect(parseHostPort(t.nbd), { exportName: t.target, tls: node.opts.peerTls });
  } catch (err) {
    await abandon();
    throw new HttpError(502, `cannot reach ${peer.nodeId}'s copy target: ${(err as Error).message}`);
  }
  const target: CopyTarget = {
    pwrite: (buf, offset) => client.pwrite(buf, offset),
    zero: (length, offset) => client.zero(length, offset),
    flush: () => client.flush(),
  };
  // Copies read the image below the tracker, so they are not tracked as writes themselves. The
  // free map is read once tracking runs (see LiveCopyOptions.skip); an abort cuts the link, so a
  // stopped destination holds neither the copy nor, in write-blocking mode, the clients.
  const skip = o.skipFree ? () => freeRanges(m.tracker.below(), log) : undefined;
  const copy = new LiveCopy(m.tracker, m.tracker.below(), target, { mode: o.mode, skip, destIsZero: t.fresh, maxRate: o.maxRate, log, onAbort: () => client.destroy() });
  m.copy = copy;
  log.info({ mode: o.mode ?? "background", fresh: t.fresh, skipFree: !!o.skipFree }, "live copy: mirror phase");
  try {
    await copy.converge();
    const r = await node.migrate(name, to, () => copy.finish(), true);
    m.private = true;
    const p = copy.progress();
    log.info({ copied: p.copied, passes: p.passes, mode: p.mode, ms: Math.round(performance.now() - t0) }, "live copy: done");
    return { ...r, ms: performance.now() - t0, copied: p.copied, mode: p.mode };
  } catch (err) {
    log.warn({ err: (err as Error).message }, "live copy aborted: this node stays the owner");
    await abandon();
    throw err instanceof HttpError ? err : new HttpError(502, `live copy of ${name} aborted: ${(err as Error).message}`);
  } finally {
    m.tracker.stop();
    client.destroy();
  }
}
