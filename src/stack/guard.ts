import { NbdError } from "../errors.js";
import type { Capabilities, Io } from "./layer.js";

export type Op = "pread" | "pwrite" | "zero" | "trim" | "flush" | "cache" | "extents";

/**
 * The one place where a request is checked against the stack's size and capabilities before
 * it enters the stack. Returns null when the request may go down, or the error to answer with.
 * Per the NBD spec: writes past the end get ENOSPC, other ranges past the end EINVAL;
 * write-type requests on a read-only stack get EPERM; a missing capability gets EINVAL.
 */
export function checkRequest(op: Op, offset: number, length: number, io: Io, size: number, caps: Capabilities): NbdError | null {
  const writeOp = op === "pwrite" || op === "zero" || op === "trim";
  if (writeOp && !caps.writable) return new NbdError("EPERM", `${op} on a read-only export`);
  if (op === "flush") return caps.flush ? null : new NbdError("EINVAL", "flush is not supported by this export");
  if (length === 0) return new NbdError("EINVAL", `${op} of zero length`);
  if (length > caps.blockSize.maximum && op !== "trim" && op !== "zero" && op !== "extents" && op !== "cache")
    return new NbdError("EINVAL", `${op} of ${length} bytes exceeds the maximum of ${caps.blockSize.maximum}`);
  if (offset + length > size) {
    return new NbdError(writeOp && op !== "trim" ? "ENOSPC" : "EINVAL", `${op} of ${length} bytes at ${offset} is beyond the end (${size})`);
  }
  if (io.fua && writeOp && !caps.fua) return new NbdError("EINVAL", "FUA is not supported by this export");
  switch (op) {
    case "trim":
      return caps.trim ? null : new NbdError("EINVAL", "trim is not supported by this export");
    case "zero":
      if (!caps.zero) return new NbdError("EINVAL", "write zeroes is not supported by this export");
      return null;
    case "cache":
      return caps.cache ? null : new NbdError("EINVAL", "cache is not supported by this export");
    case "extents":
      return caps.extents ? null : new NbdError("EINVAL", "block status is not supported by this export");
    default:
      return null;
  }
}
