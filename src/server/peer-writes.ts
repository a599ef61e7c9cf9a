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
 * running going first (256 KiB each: rings of WINDOW slots; port B's sessions are few and long-lived).
 * A session lives in this process only: a new owner applies what it is sent.
 */
const WINDOW = 16384;
/** Sessions kept at most; beyond it, those with nothing running and unused longest are dropped. */
const SESSIONS = 1024;

/**
 * One session's tags, in rings indexed by tag % WINDOW (a port B numbers its writes in order, so a
 * slot's next tag is WINDOW later): no hashing, no allocation per write.
 */
class SessionLog {
  /** Slot t % WINDOW holds t once write t was applied; a later tag in that slot forgets it. */
  private readonly doneTags = new Uint32Array(WINDOW);
  private readonly runningTags = new Uint32Array(WINDOW);
  private readonly runningRuns: (Promise<void> | undefined)[] = new Array(WINDOW).fill(undefined);
  /** Running writes whose slot was taken by another running write (not expected: far fewer run at once). */
  private readonly overflow = new Map<number, Promise<void>>();
  runningCount = 0;
  /** When it was last used (a counter, for dropping the least recently used session). */
  used = 0;

  isDone(tag: number): boolean {
    return this.doneTags[tag % WINDOW] === tag;
  }
  remember(tag: number): void {
    this.doneTags[tag % WINDOW] = tag;
  }
  running(tag: number): Promise<void> | undefined {
    const i = tag % WINDOW;
    return this.runningTags[i] === tag ? this.runningRuns[i] : this.overflow.get(tag);
  }
  setRunning(tag: number, p: Promise<void>): void {
    const i = tag % WINDOW;
    this.runningCount++;
    if (this.runningRuns[i] === undefined) {
      this.runningTags[i] = tag;
      this.runningRuns[i] = p;
    } else this.overflow.set(tag, p);
  }
  /** Write `tag`'s run `p` ended. */
  ended(tag: number, p: Promise<void>): void {
    const i = tag % WINDOW;
    if (this.runningTags[i] === tag && this.runningRuns[i] === p) {
      this.runningRuns[i] = undefined;
      this.runningTags[i] = 0;
    } else if (this.overflow.get(tag) === p) this.overflow.delete(tag);
    else return;
    this.runningCount--;
  }
}

const sessions = new Map<string, SessionLog>();
let uses = 0;

function logOf(session: string): SessionLog {
  let s = sessions.get(session);
  if (!s) {
    s = new SessionLog();
    if (sessions.size >= SESSIONS) {
      // The least recently used session with nothing running (one with a write running keeps its log).
      let victim: string | undefined;
      let oldest = Infinity;
      for (const [k, v] of sessions) {
        if (v.runningCount === 0 && v.used < oldest) {
          oldest = v.used;
          victim = k;
        }
      }
      if (victim !== undefined) sessions.delete(victim);
    }
    sessions.set(session, s);
  }
  s.used = ++uses;
  return s;
}

const succeeded = (p: Promise<void>) => p.then(() => true, () => false);

/** Runs write `tag` of `session` unless it ran already (or waits for it, if it is running). */
export function applyOnce(session: string, tag: number, run: () => Promise<void>): Promise<void> {
  const s = logOf(session);
  if (s.running(tag)) return waitThenApply(s, session, tag, run);
  if (s.isDone(tag)) return Promise.resolve();
  return start(s, tag, run);
}

/** The common case, without extra turns: nothing of this tag ran or runs. */
function start(s: SessionLog, tag: number, run: () => Promise<void>): Promise<void> {
  const p = run();
  s.setRunning(tag, p);
  return p.then(
    () => {
      s.remember(tag);
      s.ended(tag, p);
    },
    (err: unknown) => {
      s.ended(tag, p);
      throw err;
    },
  );
}

/** An earlier copy is running: wait for it; if it failed, the next one to get here runs it again. */
async function waitThenApply(s: SessionLog, session: string, tag: number, run: () => Promise<void>): Promise<void> {
  for (let r = s.running(tag); r; r = s.running(tag)) if (await succeeded(r)) return;
  return applyOnce(session, tag, run);
}

/** For tests: the window of tags a session remembers. */
export const PEER_WRITE_WINDOW = WINDOW;
