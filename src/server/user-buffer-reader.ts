import type { Socket } from "node:net";

/**
 * Makes a socket read straight into buffers we choose, the way `net.connect({ onread })` does for
 * client sockets (Node.js offers no such option for accepted sockets, so this uses the same
 * internal hooks: the kBuffer/kBufferGen/kBufferCb fields and the handle's useUserBuffer).
 * `next()` gives the buffer for the next read; `onRead(buf, n)` gets the bytes read into it.
 * Returns a function that asks `next()` again for the buffer of the coming read (say, after the
 * socket was paused for a while), or null, leaving the socket untouched, if this Node.js lacks the
 * hooks; callers then keep using 'data' events.
 */
export function readIntoUserBuffers(socket: Socket, next: () => Buffer, onRead: (buf: Buffer, n: number) => void): (() => void) | null {
  const syms = Object.getOwnPropertySymbols(socket);
  const find = (name: string) => syms.find((s) => s.description === name);
  const kBuffer = find("kBuffer");
  const kBufferGen = find("kBufferGen");
  const kBufferCb = find("kBufferCb");
  const handle = (socket as unknown as { _handle?: { useUserBuffer?: (b: Buffer) => void } })._handle;
  if (!kBuffer || !kBufferGen || !kBufferCb || typeof handle?.useUserBuffer !== "function") return null;
  const s = socket as unknown as Record<symbol, unknown>;
  const first = next();
  s[kBuffer] = first;
  s[kBufferGen] = next;
  s[kBufferCb] = (n: number, buf: Buffer) => {
    onRead(buf, n);
  };
  handle.useUserBuffer(first);
  return () => {
    const b = next();
    if (b === s[kBuffer] || socket.destroyed) return;
    s[kBuffer] = b;
    handle.useUserBuffer!(b);
  };
}
