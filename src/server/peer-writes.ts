/**
 * Writes of port B sessions, applied once each. A port B (another node's NBD client to this owner)
 * names a session when it connects and tags each write, zero and trim with a sequence number in
 * the cookie's high word; when its link breaks before a reply came, it sends the same request
 * again, with the same tag, on a new link. If this owner had applied it, applying it again after
 * another client wrote the same block would let a reader see W1, W2, W1. So a tagged write already
 * applied is answered at once without being applied again, and one still running is waited for.
 *
 * Bounded: per session the last WINDOW applied tags (a resend is of a request that was in flight
 * when its link broke, far fewer); at most SESSIONS sessions, the least recently used with nothing
 * running going first (about 0.5 MiB each when full; port B's sessions are few and long-lived).
 * A session lives in this process only: a new owner applies what it is sent.
 */
const WINDOW = 16384;
/** Sessions kept at most; beyond it, those with nothing running and unused longest are dropped. */
const SESSIONS = 1024;

class SessionLog {
  readonly done = new Set<number>();
  private readonly order: number[] = [];
  readonly running = new Map<number, Promise<void>>();

  remember(tag: number): void {
    this.done.add(tag);
    this.order.push(tag);
    if (this.order.length > WINDOW) this.done.delete(this.order.shift()!);
  }
}

const sessions = new Map<string, SessionLog>();

function logOf(session: string): SessionLog {
  let s = sessions.get(session);
  if (s) {
    sessions.delete(session); // to the end: the most recently used
  } else {
    s = new SessionLog();
    if (sessions.size >= SESSIONS) {
      // The least recently used session with nothing running (one with a write running keeps its log).
      for (const [k, v] of sessions) {
        if (v.running.size === 0) {
          sessions.delete(k);
          break;
        }
      }
    }
  }
  sessions.set(session, s);
  return s;
}

const succeeded = (p: Promise<void>) => p.then(() => true, () => false);

/** Runs write `tag` of `session` unless it ran already (or waits for it, if it is running). */
export async function applyOnce(session: string, tag: number, run: () => Promise<void>): Promise<void> {
  const s = logOf(session);
  // An earlier copy running: wait for it; if it failed, the next one to get here runs it again.
  for (let r = s.running.get(tag); r; r = s.running.get(tag)) if (await succeeded(r)) return;
  if (s.done.has(tag)) return;
  const p = run();
  s.running.set(tag, p);
  try {
    await p;
    s.remember(tag);
  } finally {
    if (s.running.get(tag) === p) s.running.delete(tag);
  }
}
