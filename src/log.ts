import { createRequire } from "node:module";
import pino, { type Logger } from "pino";
import type Pretty from "pino-pretty";

export type { Logger };

export interface LogOptions {
  level?: string;
  /** Human-readable lines; default: when stdout is a terminal (the logs themselves go to stderr). */
  pretty?: boolean;
}

export const LOG_LEVELS = ["trace", "debug", "info", "warn", "error", "fatal", "silent"] as const;

/**
 * The process logger: JSON lines on stderr, or readable lines when stdout is a TTY. The level is
 * `opts.level`, else $NBDSTACK_LOG, else info; a level that does not exist is an error.
 */
export function createLogger(opts: LogOptions = {}): Logger {
  const level = opts.level ?? (process.env.NBDSTACK_LOG || "info");
  if (!(LOG_LEVELS as readonly string[]).includes(level)) {
    throw new Error(`log level "${level}"${opts.level === undefined ? " (from NBDSTACK_LOG)" : ""} does not exist; expected one of ${LOG_LEVELS.join(", ")}`);
  }
  const human = opts.pretty ?? process.stdout.isTTY === true;
  if (human) {
    // Loaded only for a terminal: a server logging JSON never needs it.
    const pretty = createRequire(import.meta.url)("pino-pretty") as typeof Pretty;
    return pino({ level }, pretty({ destination: 2, sync: true, colorize: true, ignore: "pid,hostname", translateTime: "HH:MM:ss.l" }));
  }
  return pino({ level }, pino.destination({ dest: 2, sync: true }));
}

/** A logger that drops everything (tests, library use). */
export function silentLogger(): Logger {
  return pino({ level: "silent" });
}
