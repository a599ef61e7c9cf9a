/**
 * The one error class of the etcd client, with stable codes. Every message starts with what was
 * asked (`etcd put "/a/b"`), says what failed and names the endpoint(s).
 *
 * - ETCD_UNAVAILABLE: no endpoint answered before the call's deadline; nothing was applied
 *   (for a mutation: none of the attempts can have reached a member). `attempts` says, per
 *   endpoint, what failed.
 * - ETCD_OUTCOME_UNKNOWN: a mutation (put, delete, txn, lease grant) reached a member and no
 *   answer came (timeout, connection reset): it may or may not have been applied. Read the keys
 *   to learn which; the client never sends it again by itself.
 * - ETCD_COMPACTED: the revision asked for (a read at a revision, a watch's start) was compacted;
 *   `compactRevision` is the oldest one still kept.
 * - ETCD_LEASE_NOT_FOUND: the lease expired or was revoked.
 * - ETCD_AUTH_FAILED: wrong user name or password.
 * - ETCD_AUTH_REQUIRED: the cluster has auth enabled and the client has no credentials.
 * - ETCD_PERMISSION_DENIED: the user's roles do not allow it.
 * - ETCD_INVALID: etcd refused the request as malformed (duplicate key in a txn, too many ops…).
 * - ETCD_PROTOCOL: the answer was not what etcd's JSON gateway sends (not etcd ≥ 3.4?).
 * - ETCD_SERVER: any other error etcd answered (`grpcCode` and etcd's message kept).
 * - ETCD_CLOSED: the client was closed.
 */
export type EtcdErrorCode =
  | "ETCD_UNAVAILABLE"
  | "ETCD_OUTCOME_UNKNOWN"
  | "ETCD_COMPACTED"
  | "ETCD_LEASE_NOT_FOUND"
  | "ETCD_AUTH_FAILED"
  | "ETCD_AUTH_REQUIRED"
  | "ETCD_PERMISSION_DENIED"
  | "ETCD_INVALID"
  | "ETCD_PROTOCOL"
  | "ETCD_SERVER"
  | "ETCD_CLOSED";

/** What one attempt on one endpoint ended with. */
export interface EtcdAttempt {
  endpoint: string;
  error: string;
  /** True when the request may have reached the member (it was written on a connected socket). */
  sent: boolean;
}

export class EtcdError extends Error {
  readonly code: EtcdErrorCode;
  /** What was asked, e.g. `put "/nbdstack/owner/disk"`. */
  readonly op: string;
  /** The endpoint that answered (or the last one tried). */
  readonly endpoint: string | undefined;
  /** gRPC status code etcd answered with, when it answered. */
  readonly grpcCode: number | undefined;
  readonly attempts: EtcdAttempt[];
  /** For ETCD_COMPACTED from a watch: the oldest revision still kept. */
  compactRevision: number | undefined;

  constructor(code: EtcdErrorCode, op: string, detail: string, o: { endpoint?: string; grpcCode?: number; attempts?: EtcdAttempt[]; cause?: unknown } = {}) {
    super(`etcd ${op}: ${detail}`, o.cause === undefined ? undefined : { cause: o.cause });
    this.name = "EtcdError";
    this.code = code;
    this.op = op;
    this.endpoint = o.endpoint;
    this.grpcCode = o.grpcCode;
    this.attempts = o.attempts ?? [];
    this.compactRevision = undefined;
  }
}

/** gRPC status codes etcd's gateway answers with (the `code` field of its error body). */
export const GrpcCode = {
  OK: 0,
  CANCELLED: 1,
  UNKNOWN: 2,
  INVALID_ARGUMENT: 3,
  DEADLINE_EXCEEDED: 4,
  NOT_FOUND: 5,
  ALREADY_EXISTS: 6,
  PERMISSION_DENIED: 7,
  RESOURCE_EXHAUSTED: 8,
  FAILED_PRECONDITION: 9,
  ABORTED: 10,
  OUT_OF_RANGE: 11,
  UNIMPLEMENTED: 12,
  INTERNAL: 13,
  UNAVAILABLE: 14,
  DATA_LOSS: 15,
  UNAUTHENTICATED: 16,
} as const;

/** Maps an error etcd answered (gRPC code and message) to one of our codes. */
export function codeOfGrpc(grpcCode: number, message: string): EtcdErrorCode {
  if (/required revision has been compacted/.test(message)) return "ETCD_COMPACTED";
  if (/requested lease not found/.test(message)) return "ETCD_LEASE_NOT_FOUND";
  if (/authentication failed, invalid user ID or password/.test(message)) return "ETCD_AUTH_FAILED";
  if (/user name is empty/.test(message)) return "ETCD_AUTH_REQUIRED";
  if (grpcCode === GrpcCode.PERMISSION_DENIED || /permission denied/.test(message)) return "ETCD_PERMISSION_DENIED";
  if (grpcCode === GrpcCode.INVALID_ARGUMENT) return "ETCD_INVALID";
  return "ETCD_SERVER";
}

/** An answer that says this member cannot serve now, but another may: try the next endpoint. */
export function memberUnavailable(grpcCode: number, message: string): boolean {
  return grpcCode === GrpcCode.UNAVAILABLE || /no leader|not capable|leader changed|server stopped|too many requests/.test(message);
}

/**
 * An Unavailable answer given before the request was proposed to raft, so a mutation can be sent
 * to another member without being applied twice: the member has no leader (checked by the
 * `hasleader` metadata the client always sends) or is not ready.
 */
export function rejectedBeforeProposal(message: string): boolean {
  return /etcdserver: no leader|not capable|too many requests/.test(message);
}

/** An answer that the auth token is stale: authenticate again and send the request again. */
export function staleToken(message: string): boolean {
  return /invalid auth token|revision of auth store is old/.test(message);
}
