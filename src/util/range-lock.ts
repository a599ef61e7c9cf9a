interface Entry {
  start: number;
  end: number;
  shared: boolean;
  granted: boolean;
  grant: (() => void) | null;
}

/**
 * The one lock of the stack: shared/exclusive locks on ranges [start, end) of any unit (bytes,
 * blocks, chunks), used by the disk layer's read-modify-write, the mirror's resync, the cow
 * layer's blocks and the live copy's chunks.
 * - A range is taken whole or not at all, so two lockers never deadlock on each other.
 * - Shared holders of overlapping ranges run together; an exclusive one waits for every overlapping
 *   holder, and runs alone on its range.
 * - First come, first served among overlapping requests: a request waits for every earlier one it
 *   conflicts with, granted or waiting (a stream of readers cannot starve a writer).
 * - An uncontended range is granted at once (the returned promise is already resolved).
 * Cost: taking a range is linear in the ranges held or waiting (at most the requests in flight);
 * a release re-checks the waiting ones.
 */
export class RangeLock {
  private entries: Entry[] = [];

  /** Takes [start, end) (shared or exclusive) and resolves with the function that releases it. */
  acquire(start: number, end: number, shared = false): Promise<() => void> {
    const e: Entry = { start, end, shared, granted: false, grant: null };
    let released = false;
    const release = () => {
      if (released) return;
      released = true;
      this.entries.splice(this.entries.indexOf(e), 1);
      this.wake();
    };
    const free = this.grantable(e, this.entries.length);
    this.entries.push(e);
    if (free) {
      e.granted = true;
      return Promise.resolve(release);
    }
    return new Promise((resolve) => (e.grant = () => resolve(release)));
  }

  /** Ranges held or waited for (for tests). */
  get busy(): number {
    return this.entries.length;
  }

  /** Whether `e` may run beside the `before` entries that came before it. */
  private grantable(e: Entry, before: number): boolean {
    for (let i = 0; i < before; i++) {
      const x = this.entries[i]!;
      if (x.start < e.end && e.start < x.end && !(x.shared && e.shared)) return false;
    }
    return true;
  }

  private wake(): void {
    for (let i = 0; i < this.entries.length; i++) {
      const e = this.entries[i]!;
      if (e.granted || !this.grantable(e, i)) continue;
      e.granted = true;
      e.grant!();
    }
  }
}
