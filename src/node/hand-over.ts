import { controlCall, getStatus } from "../control/control-client.js";
import { HttpError } from "../control/control-server.js";
import { completeCopyTarget } from "./copy-target.js";
import { parseHostPort, type MoveResult, type NodeContext } from "./node-context.js";

/*
 * A move with shared storage (MISSION.md, "Sequence of a move"): the owner's redirector holds new
 * requests, drains and flushes port A, hands the lease to the peer (the commit point) and asks it
 * to adopt; then forwards the held requests through port B. A failed hand-over rolls back.
 */

/** Moves export `name` from this node (its owner) to the node whose control API is at `to`. */
export async function moveOut(node: NodeContext, name: string, to: string, beforeRelease?: () => Promise<void>, privateCopy = false): Promise<MoveResult> {
  const m = node.find(name);
  if (m.epoch === null || m.redirector.state !== "LOCAL") throw new HttpError(409, `${name} is not owned here (state ${m.redirector.state}); migrate it on its owner`);
  const peer = await getStatus(to).catch((err: Error) => {
    throw new HttpError(502, `peer ${to} unreachable: ${err.message}`);
  });
  if (!beforeRelease && !peer.exports.some((e) => e.name === name)) throw new HttpError(409, `peer ${peer.nodeId} does not serve "${name}"`);
  const t0 = performance.now();
  const myEpoch = m.epoch;
  let handed = 0;
  const { held } = await m.redirector.moveOut({
    beforeRelease,
    // Port B to the peer, opened before the hold so its connection costs no stall.
    prepare: () => m.pair.openRemote(parseHostPort(peer.nbd)),
    assign: async () => {
      handed = m.lease.handOver(node.identity, myEpoch, { nodeId: peer.nodeId, nbd: peer.nbd, control: peer.control }, node.ttlMs, privateCopy).epoch;
      m.epoch = null;
      await controlCall(to, "POST", `v1/exports/${encodeURIComponent(name)}/adopt`, { epoch: handed }, 10_000);
    },
    reclaim: async () => {
      m.epoch = m.lease.reclaim(node.identity, peer.nodeId, handed || myEpoch + 1, node.ttlMs).epoch;
    },
  });
  const ms = performance.now() - t0;
  node.opts.log.info({ export: name, to: peer.nodeId, epoch: handed, ms: Math.round(ms) }, "export moved");
  return { export: name, from: node.identity.nodeId, to: peer.nodeId, epoch: handed, ms, held };
}

/** Takes ownership of `name` after its owner handed the lease to this node at `epoch`. */
export async function adopt(node: NodeContext, name: string, epoch: number): Promise<void> {
  const m = node.find(name);
  await completeCopyTarget(node, m, epoch);
  const r = m.lease.read();
  if (!r || r.owner !== node.identity.nodeId || r.epoch !== epoch)
    throw new HttpError(409, `lease of ${name} is ${r ? `${r.owner}@${r.epoch}` : "absent"}, not ${node.identity.nodeId}@${epoch}`);
  m.epoch = epoch;
  try {
    await m.redirector.adopt();
  } catch (err) {
    m.epoch = null;
    throw err;
  }
  m.lease.renew(node.identity, epoch);
  node.opts.log.info({ export: name, epoch }, "export adopted");
}
