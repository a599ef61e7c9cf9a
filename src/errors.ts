import { Errno, type ErrnoName } from "./protocol/constants.js";

/**
 * The one error class layers throw. `errno` is an NBD errno name; `offset`,
 * when set, is the first byte that failed (sent as NBD_REPLY_TYPE_ERROR_OFFSET).
 */
export class NbdError extends Error {
  readonly errno: ErrnoName;
  offset: number | undefined;
  constructor(errno: ErrnoName, message: string, offset?: number) {
    super(message);
    this.name = "NbdError";
    this.errno = errno;
    this.offset = offset;
  }
}

/** A violation of the protocol by the peer: the connection is closed, nothing else is touched. */
export class ProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ProtocolError";
  }
}

const SYSTEM_ERRNO: Record<string, ErrnoName> = {
  EPERM: "EPERM",
  EACCES: "EPERM",
  EROFS: "EPERM",
  EIO: "EIO",
  ENOMEM: "ENOMEM",
  EINVAL: "EINVAL",
  ENOSPC: "ENOSPC",
  EDQUOT: "ENOSPC",
  EFBIG: "ENOSPC",
  EOVERFLOW: "EOVERFLOW",
  ENOTSUP: "ENOTSUP",
  EOPNOTSUPP: "ENOTSUP",
  ESHUTDOWN: "ESHUTDOWN",
};

/** Maps any thrown value to the NBD errno name sent on the wire. */
export function errnoOf(err: unknown): ErrnoName {
  if (err instanceof NbdError) return err.errno;
  const code = (err as { code?: unknown } | null)?.code;
  if (typeof code === "string" && code in SYSTEM_ERRNO) return SYSTEM_ERRNO[code]!;
  return "EIO";
}

/** Maps any thrown value to the NBD errno wire value. */
export function wireErrno(err: unknown): number {
  return Errno[errnoOf(err)];
}

export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
