import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { HttpError } from "../control/control-server.js";
import { newCopyTargetName } from "../internal-exports.js";
import type { NodeIdentity } from "../migration/lease.js";
import { composeCopyTarget } from "../stack/compose-node.js";
import type { Managed, NodeContext } from "./node-context.js";

/*
 * The destination's side of a live copy (migrate --copy). The source asks for a target
 * (POST /v1/copy-targets), writes the image through it over NBD while its clients keep writing,
 * and then hands the lease over (adopt, which completes the target) or gives up (abandon, which
 * leaves the image marked incomplete: a restarted node does not serve it).
 */

/** Which file an image is, on which machine: a live copy compares the source's with the target's. */
export interface FileIdentity {
  /** The real path (symlinks resolved). */
  path: string;
  dev: number;
  ino: number;
  /** The running kernel (its boot id) or, without one, the host name: device and inode numbers mean something only there. */
  host: string;
}

let hostId: string | null = null;
function thisHost(): string {
  if (hostId === null) {
    try {
      hostId = `boot:${fs.readFileSync("/proc/sys/kernel/random/boot_id", "utf8").trim()}`;
    } catch {
      hostId = `host:${os.hostname()}`;
    }
  }
  return hostId;
}

/** The identity of the file at `file`, or null when there is none. */
export function fileIdentity(file: string): FileIdentity | null {
  try {
    const real = fs.realpathSync(file);
    const st = fs.statSync(real);
    return { path: real, dev: st.dev, ino: st.ino, host: thisHost() };
  } catch {
    return null;
  }
}

/**
 * Refuses (409) to make `image` the target of a copy from `source` when they are one file: the
 * same device and inode on the same running kernel (a hard link, a symlink, a bind mount or the
 * very path), or the same real path there. The copy would write the image onto itself.
 */
function refuseSameImage(name: string, image: string, source: FileIdentity | undefined): void {
  if (!source) return;
  const mine = fileIdentity(image);
  if (!mine || mine.host !== source.host) return;
  if ((mine.dev === source.dev && mine.ino === source.ino) || mine.path === source.path)
    throw new HttpError(409, `${name}: ${image} here is the source's image ${source.path} (one file: device ${mine.dev}, inode ${mine.ino}); a live copy would copy it onto itself — with shared storage, migrate without --copy`);
}

/**
 * Destination side of a live copy: an image for export `name` — the one this node serves
 * already (as a non-owner, same size), or a new one in --data-dir — marked incomplete until the
 * copy hands over, and an export only the source knows the name of, that it writes into.
 * Clients of this node reach the export through port B (the source owns it) meanwhile.
 */
export async function createCopyTarget(node: NodeContext, name: string, size: number, owner: NodeIdentity, epoch: number, sourceImage?: FileIdentity, handedFrom?: string[]): Promise<{ target: string; nbd: string; fresh: boolean }> {
  if (!node.publisher) throw new HttpError(409, `node ${node.identity.nodeId} cannot publish exports`);
  let m = node.lookup(name);
  let fresh = false;
  if (m) {
    if (m.epoch !== null || m.redirector.state !== "REMOTE") throw new HttpError(409, `${name} is owned here (${m.redirector.state}); it cannot be a copy target`);
    if (m.exp.size() !== size) throw new HttpError(409, `${name} here is ${m.exp.size()} bytes, the source's is ${size}`);
    refuseSameImage(name, m.image, sourceImage);
    if (m.target) await abandonCopyTarget(node, name);
    m.record = await m.lease.assign(owner, epoch, node.ttlMs, handedFrom);
  } else {
    if (!node.opts.dataDir) throw new HttpError(409, `node ${node.identity.nodeId} has no --data-dir to create "${name}" in`);
    const image = path.join(node.opts.dataDir, `${encodeURIComponent(name)}.img`);
    if (fs.existsSync(image)) {
      refuseSameImage(name, image, sourceImage);
      if (fs.statSync(image).size !== size) throw new HttpError(409, `${image} exists with another size (${fs.statSync(image).size}, not ${size})`);
    } else {
      fs.writeFileSync(image, "");
      fs.truncateSync(image, size);
      fresh = true;
    }
    await node.ownershipOf(image, name).assign(owner, epoch, node.ttlMs, handedFrom);
    // Its own fault layer (with --fault) above port A, as for exports served from the start.
    const exp = await node.createExport({ name, source: image, io: node.opts.io, fault: node.opts.fault }, node.opts.handles);
    m = node.lookup(name)!;
    await node.publisher.add(exp);
  }
  const marker = `${m.image}.incomplete`;
  fs.writeFileSync(marker, `live copy from ${owner.nodeId} in progress since ${new Date().toISOString()}\n`);
  const targetName = newCopyTargetName(name);
  // The copy writes into the resource of the export here (the image with its fault layers, which
  // `fault NAME` steers all along), while port A is closed: this node does not own the image yet.
  const exp = composeCopyTarget(targetName, m.pair, `live-copy target of ${name}`);
  await node.publisher.add(exp);
  m.target = { exp, marker };
  m.private = true;
  node.opts.log.info({ export: name, from: owner.nodeId, image: m.image, fresh }, "live copy target ready");
  return { target: targetName, nbd: node.identity.nbd, fresh };
}

/** The source gave up a live copy into this node: the target export goes, the image stays marked incomplete. */
export async function abandonCopyTarget(node: NodeContext, name: string): Promise<void> {
  const m = node.find(name);
  const t = m.target;
  if (!t) return;
  m.target = null;
  await node.publisher?.remove(t.exp.name);
  await t.exp.close();
  node.opts.log.warn({ export: name, marker: t.marker }, "live copy abandoned: image left incomplete");
}


/**
 * The end of a live copy into this node (the source hands the lease over): the image here is
 * complete and becomes the one port A opens. Its lease record is this node's own (nodes sharing
 * this image follow it through port B); `handedFrom` is the source's hand-over list.
 */
export async function completeCopyTarget(node: NodeContext, m: Managed, epoch: number, handedFrom?: string[]): Promise<void> {
  const t = m.target;
  if (!t) return;
  m.record = await m.lease.assign(node.identity, epoch, node.ttlMs, handedFrom);
  m.target = null;
  m.private = true;
  await node.publisher?.remove(t.exp.name);
  await t.exp.close();
  fs.rmSync(t.marker, { force: true });
}
