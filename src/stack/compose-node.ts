import type { Logger } from "pino";
import { buildBottom, buildLayer, contextOf, exportOver, stackOf, type ExportSpec } from "./compose.js";
import { createDiskLayer } from "./disk/disk-layer.js";
import { Export } from "./export.js";
import { kindOf } from "./kinds.js";
import type { BuildContext } from "./layer-kind.js";
import type { Capabilities, Layer } from "./layer.js";
import { FenceLayer } from "./port/fence-layer.js";
import { buildPortPair, type PortPair, type PortPairOwner } from "./port/port-pair.js";
import { PortSlot } from "./port/port-slot.js";
import { AuditLayer } from "./port/write-audit.js";
import type { StackHandles } from "./stack-handles.js";

// A cluster node's exports, built by the one stack builder (compose.ts) around the node's port
// pair; apart from compose.ts so a server without --node-id does not load the port pair's code.

/**
 * Builds a cluster node's export: the same declared stack, with the node's port pair (port-pair.ts)
 * standing in for the resource. The resource is the bottom device, every layer up to the last
 * one that holds state of its own (a cow overlay), and the fault layers declared directly on top
 * of those (--fault among them): they make port A, so only the owner opens them, they move with
 * the image, and see only the I/O that reaches the image; every later item sits above the port
 * redirector and is the same on every node. The stack's kinds must be loaded (loadKinds).
 */
export function composeNodeExport(spec: ExportSpec & { name: string }, handles: StackHandles, log: Logger, owner: PortPairOwner): { exp: Export; pair: PortPair } {
  const ctx = contextOf(spec, spec.name, handles, log);
  const stack = stackOf(spec);
  let above = 1;
  stack.forEach((l, i) => {
    if (i > 0 && kindOf(l).holdsState) above = i + 1;
  });
  while (stack[above]?.kind === "fault") above++;
  // Built anew at each open of port A: its qcow2 image is not steered online (no snapshot or merge on a node).
  const bottomCtx: BuildContext = { ...ctx, rebuilt: true };
  const bottom = (): Layer => buildBottom(stack[0]!, bottomCtx);
  // The image itself is fenced too: a layer above it that writes back later (a power-loss cache's
  // persist, a cow overlay's map) may do so after the lease was lost (see PortPairOwner.mayWriteImage).
  const mayWriteImage = () => (owner.mayWriteImage ?? owner.mayWrite)();
  // Below that fence, what it let through may be audited (serve --write-audit).
  const audited = (image: Layer): Layer => (owner.auditWrite ? new AuditLayer(image, (op, offset, length) => owner.auditWrite!(op, offset, length)) : image);
  let resource: Layer = new PortSlot(() => new FenceLayer(audited(bottom()), mayWriteImage, false));
  for (const l of stack.slice(1, above)) resource = buildLayer(l, resource, ctx);
  // The owner may be down while this node starts: the image itself gives size and abilities.
  const offline = async (): Promise<{ size: number; caps: Capabilities }> => {
    const dev = bottom();
    await dev.open();
    try {
      return { size: dev.size(), caps: dev.capabilities() };
    } finally {
      await dev.close();
    }
  };
  const pair = buildPortPair(spec.name, resource, offline, owner, log.child({ export: spec.name }));
  let top: Layer = pair.redirector;
  for (const l of stack.slice(above)) top = buildLayer(l, top, ctx);
  const exp: Export = exportOver(spec, spec.name, top, () => [exp.layer.describe(), owner.label?.()].filter(Boolean).join(" "));
  if (owner.epoch) exp.ownerEpoch = () => owner.epoch!();
  return { exp, pair };
}

/**
 * The export a live copy into a node writes through: the disk layer straight over the resource of
 * that node's export (port A's image and its fault layers), under an internal name.
 */
export function composeCopyTarget(name: string, pair: PortPair, description: string): Export {
  return new Export(name, createDiskLayer(pair.resource), description);
}
