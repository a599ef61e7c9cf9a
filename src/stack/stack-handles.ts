import { ConfigError } from "../config/values.js";
import type { FaultLayer } from "./fault/fault-layer.js";
import type { CowLayer } from "./volume/cow-layer.js";
import type { Qcow2Online } from "./qcow2/qcow2-online.js";
import type { MirrorLayer } from "./volume/mirror-layer.js";

/**
 * Layers of running exports that can be steered at run time (control API), by export name or,
 * for fault layers, by their `id`.
 */
export class StackHandles {
  readonly faults = new Map<string, FaultLayer>();
  readonly mirrors = new Map<string, MirrorLayer>();
  readonly cows = new Map<string, CowLayer>();
  /** The qcow2 image an export serves, for online snapshot and merge; or why there is none to steer. */
  readonly qcow2s = new Map<string, Qcow2Online | { refused: string }>();
  addQcow2(exportName: string, online: Qcow2Online | { refused: string }): void {
    const several = { refused: `export "${exportName}" has several qcow2 images: snapshot and merge need one` };
    this.qcow2s.set(exportName, this.qcow2s.has(exportName) ? several : online);
  }
  add<T>(map: Map<string, T>, key: string, layer: T, what: string): void {
    if (map.has(key)) throw new ConfigError(key, `two ${what} layers answer to "${key}": give them distinct ids`);
    map.set(key, layer);
  }
}
