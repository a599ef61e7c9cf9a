/** What a copy is for: a live copy to a peer, a mirror leg's resync, or a cow overlay's merge. */
export type CopyJob = "live-copy" | "resync" | "merge";

/**
 * The progress of one copy, as its Copier reports it (`Copier.progress()`); every user shows this
 * one shape (control API, CLI progress bar, metrics) with its own fields beside it.
 */
export interface CopyProgress {
  /** "idle": no copy has run yet; "running" until the copy's owner says it is done or it failed. */
  state: "idle" | "running" | "done" | "failed";
  /** Bytes copied by copies that completed (a failed copy adds nothing; a range copied twice counts twice). */
  doneBytes: number;
  /** Bytes the copy was given to copy (ranges dirtied again by writes meanwhile are not added). */
  totalBytes: number;
  /** Bytes still to copy: dirty, or taken by a copy that has not completed. */
  dirtyBytes: number;
  /** Bytes per second over the last two seconds or so. */
  rate: number;
  /** Seconds until nothing is dirty at the current rate (0 when nothing is; null when nothing moves). */
  etaSeconds: number | null;
  /** Copies that failed (their ranges were marked dirty again). */
  failures: number;
  /** Date.now() at the start and the end of the copy. */
  startedAt: number | null;
  finishedAt: number | null;
  error?: string;
}

/** The progress of a copy that never ran. */
export const idleProgress = (): CopyProgress => ({ state: "idle", doneBytes: 0, totalBytes: 0, dirtyBytes: 0, rate: 0, etaSeconds: null, failures: 0, startedAt: null, finishedAt: null });
