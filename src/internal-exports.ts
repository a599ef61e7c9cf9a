import crypto from "node:crypto";

/**
 * Names of the exports that nodes use among themselves, defined here and nowhere else. They all
 * start with "@" and are never listed to clients (NBD_OPT_LIST, nbdinfo --list).
 * - `@peer/NAME`: export NAME as another node's port B asks for it. The same export; the server
 *   marks the connection as a peer's (its requests are forwarded ones).
 * - `@peer:SESSION/NAME`: the same, from a port B that tags its writes with sequence numbers in
 *   the cookie's high word; SESSION (128 bits, hex) outlives its links, so the owner applies each
 *   tagged write of a session once, however often it is sent (see server/peer-writes.ts).
 * - `@copy-target/SECRET/NAME`: on the destination of a live copy of NAME, the image the copy
 *   writes into. The 128-bit SECRET is handed out only through the token-protected control API, so
 *   no other client can reach the incomplete image; metrics label it `@copy-target/NAME`.
 */
const PEER = "@peer/";
const PEER_SESSION = /^@peer:([0-9a-f]{32})\//;
const COPY_TARGET = "@copy-target/";

/** Whether `name` is one of the names above (never listed, never declared by users). */
export function isInternalExport(name: string): boolean {
  return name.startsWith("@");
}

/** The name another node's port B asks for to reach export `name` (with its session, if it has one). */
export function peerExportName(name: string, session?: string): string {
  return session ? `@peer:${session}/${name}` : PEER + name;
}

/** A fresh session for a port B. */
export function newPeerSession(): string {
  return crypto.randomBytes(16).toString("hex");
}

/** The export a peer's port B asked for, or null if `name` is not a peer name. */
export function exportOfPeerName(name: string): string | null {
  if (name.startsWith(PEER)) return name.slice(PEER.length);
  const m = PEER_SESSION.exec(name);
  return m ? name.slice(m[0].length) : null;
}

/** The session of a peer name, or null. */
export function sessionOfPeerName(name: string): string | null {
  return PEER_SESSION.exec(name)?.[1] ?? null;
}

/** A fresh secret name for the export a live copy of `name` writes into. */
export function newCopyTargetName(name: string): string {
  return `${COPY_TARGET}${crypto.randomBytes(16).toString("hex")}/${name}`;
}

/** How an export may be named where anyone can read it (metrics): internal names lose their secret. */
export function publicExportLabel(name: string): string {
  return name.startsWith(COPY_TARGET) ? COPY_TARGET + name.slice(COPY_TARGET.length).replace(/^[^/]*\//, "") : name;
}
