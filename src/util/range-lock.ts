interface Held {
  start: number;
  end: number;
  done: Promise<void>;
}

/** Serialises operations on overlapping byte ranges [start, end); disjoint ranges run in parallel. */
export class RangeLock {
  private held: Held[] = [];

  async acquire(start: number, end: number): Promise<() => void> {
    for (;;) {
      const clash = this.held.find((h) => h.start < end && start < h.end);
      if (!clash) break;
      await clash.done;
    }
    let release!: () => void;
    const entry: Held = { start, end, done: new Promise<void>((r) => (release = r)) };
    this.held.push(entry);
    return () => {
      this.held.splice(this.held.indexOf(entry), 1);
      release();
    };
  }
}
