import { ConfigError, typeName } from "../../config/values.js";
import { NbdError } from "../../errors.js";
import { plainIo, type Layer } from "../layer.js";
import type { LayerKind } from "../layer-kind.js";
import { PartitionLayer } from "./partition-layer.js";
import { readPartitionTable, type Partition, type PartitionTable } from "./partition-table.js";

export interface PartitionSpec {
  kind: "partition";
  index: number;
}

/** `partition:N`: partition N of the MBR or GPT on the device below. */
export const partitionKind: LayerKind<PartitionSpec, { part: Partition; scheme: PartitionTable["scheme"] }> = {
  name: "partition",
  coherentAcrossProcesses: true,
  summary: "partition N of an MBR or GPT disk below, as a device of its own",
  argument: "N: the partition number, 1, 2 … (or p1, p2 …)",
  options: {},
  selectsPart: true,
  parse(arg, _opts, at) {
    const n = typeof arg === "string" ? Number(arg.replace(/^p/, "")) : arg;
    if (typeof n !== "number" || !Number.isInteger(n) || n < 1) throw new ConfigError(at.key, `expected a partition number ≥ 1, got ${typeName(arg)}`);
    return { kind: "partition", index: n };
  },
  format: (s) => `partition:${s.index}`,
  async prepare(s, dev) {
    const table = await readPartitionTable(readerOf(dev), dev.size());
    if (!table) throw new NbdError("EINVAL", `partition ${s.index}: no partition table on ${dev.describe()}`);
    const part = table.partitions.find((x) => x.index === s.index);
    if (!part) throw new NbdError("EINVAL", `partition ${s.index}: not in the ${table.scheme} table of ${dev.describe()} (has ${table.partitions.map((x) => x.index).join(", ") || "none"})`);
    return { part, scheme: table.scheme };
  },
  above: (_s, below, _ctx, { part, scheme }) => new PartitionLayer(below, part, scheme),
};

/** Reads of an opened layer, for the partition table reader. */
export function readerOf(dev: Layer): (length: number, offset: number) => Promise<Buffer> {
  return async (length, offset) => {
    const b = Buffer.alloc(length);
    await dev.pread(b, offset, plainIo);
    return b;
  };
}
