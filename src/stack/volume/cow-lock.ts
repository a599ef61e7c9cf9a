interface Waiter {
  shared: boolean;
  grant: () => void;
}

interface BlockState {
  readers: number;
  writer: boolean;
  queue: Waiter[];
}

/**
 * Shared/exclusive locks on block numbers. A range of blocks is taken one block at a time in
 * ascending order (so two ranges never deadlock); waiters are served first come, first served.
 * An uncontended block is granted without waiting for a promise.
 */
export class BlockLock {
  private readonly blocks = new Map<number, BlockState>();

  /** Takes blocks [first, last] and returns the function that releases them. */
  async acquire(first: number, last: number, shared: boolean): Promise<() => void> {
    for (let b = first; b <= last; b++) {
      if (!this.tryTake(b, shared)) await new Promise<void>((grant) => this.blocks.get(b)!.queue.push({ shared, grant }));
    }
    let released = false;
    return () => {
      if (released) return;
      released = true;
      for (let b = first; b <= last; b++) this.release(b, shared);
    };
  }

  /** Blocks held or waited for (for tests). */
  get busy(): number {
    return this.blocks.size;
  }

  private tryTake(b: number, shared: boolean): boolean {
    let s = this.blocks.get(b);
    if (!s) {
      s = { readers: 0, writer: false, queue: [] };
      this.blocks.set(b, s);
    }
    if (s.writer || s.queue.length > 0) return false;
    if (shared) {
      s.readers++;
      return true;
    }
    if (s.readers > 0) return false;
    s.writer = true;
    return true;
  }

  private release(b: number, shared: boolean): void {
    const s = this.blocks.get(b)!;
    if (shared) s.readers--;
    else s.writer = false;
    while (s.queue.length > 0 && !s.writer) {
      const head = s.queue[0]!;
      if (head.shared) s.readers++;
      else if (s.readers > 0) break;
      else s.writer = true;
      s.queue.shift();
      head.grant();
    }
    if (!s.writer && s.readers === 0 && s.queue.length === 0) this.blocks.delete(b);
  }
}
