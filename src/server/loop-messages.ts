import type { LoopCounts } from "../metrics/metrics.js";
import type { ExportSpec } from "../stack/compose.js";
import type { ConnectionLimits } from "./connection.js";

/**
 * What the primary and its worker loops (serve --threads) tell each other over the IPC channel
 * (advanced serialization). A connection message carries the client's socket handle.
 */

/** An export every loop builds for itself: its spec, and whether its partitions are exports too. */
export interface SharedExport {
  spec: ExportSpec & { name: string };
  partitions: boolean;
}

export interface LoopInit {
  type: "init";
  /** 1 … N-1 (the primary is loop 0). */
  loop: number;
  exports: SharedExport[];
  limits: ConnectionLimits;
  /** This loop's share of --max-memory. */
  maxMemory: number;
  metrics: boolean;
  logLevel?: string;
  logPretty?: boolean;
}

/** A negotiated connection to serve from now on (its handle travels with the message). */
export interface LoopConnection {
  type: "connection";
  id: number;
  export: string;
  structured: boolean;
  allocationContext: number;
  /** Meta context id of qemu:allocation-depth, or 0. */
  depthContext: number;
  /** The client's address, for the logs. */
  peer: string;
}

export type ToWorker = LoopInit | LoopConnection | { type: "metrics"; request: number } | { type: "stop" };

export type FromWorker =
  | { type: "ready"; exports: string[] }
  | { type: "failed"; message: string }
  /** A handed connection arrived (its handle with it). */
  | { type: "adopted"; id: number }
  | { type: "closed"; id: number }
  | { type: "metrics"; request: number; counts: LoopCounts };
