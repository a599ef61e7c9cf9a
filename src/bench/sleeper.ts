/**
 * Waits for moments on the bench's own clock (`now()`, ms since the run began). Node's timers
 * count whole milliseconds on the event loop's cached clock, so a timer may fire a little before
 * its time by `now()`; a sleep here is re-armed until `now()` has reached it, so what the bench
 * records as the start of a planned move or fault is never before the planned time. `wakeAll()`
 * ends every sleep at once (the run is over).
 */
export function sleeper(now: () => number): { sleepUntil(ms: number): Promise<void>; wakeAll(): void } {
  const wakers = new Set<() => void>();
  return {
    sleepUntil: (ms) =>
      new Promise<void>((resolve) => {
        let timer: NodeJS.Timeout | undefined;
        const wake = () => {
          clearTimeout(timer);
          wakers.delete(wake);
          resolve();
        };
        const arm = () => {
          const left = ms - now();
          if (left <= 0) wake();
          else timer = setTimeout(arm, Math.ceil(left));
        };
        wakers.add(wake);
        arm();
      }),
    wakeAll: () => {
      for (const wake of [...wakers]) wake();
    },
  };
}
