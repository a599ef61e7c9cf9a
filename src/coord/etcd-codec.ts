/**
 * etcd's v3 messages in the JSON mapping its gateway speaks (etcd 3.4: `/v3/...`, field names as
 * in rpc.proto — `create_revision`, `range_end`, but `ID` and `TTL` for leases —, bytes as base64,
 * 64-bit integers as decimal strings, fields at their zero value left out). Pure: no I/O.
 *
 * Revisions and versions become numbers (etcd's never reach 2^53; a larger one is refused rather
 * than rounded); lease ids stay decimal strings (they use all 63 bits).
 */

/** A key, a value or a range end: a string is its UTF-8 bytes. */
export type Bytes = string | Uint8Array;

export interface ResponseHeader {
  clusterId: string;
  memberId: string;
  /** The store's revision when the request was applied. */
  revision: number;
  raftTerm: string;
}

export interface KeyValue {
  key: Buffer;
  value: Buffer;
  /** Revision of the put that created the key (0 in a delete event's kv). */
  createRevision: number;
  /** Revision of the last change of the key. */
  modRevision: number;
  /** Number of puts since the key was created (1 after the first; 0 in a delete event). */
  version: number;
  /** Lease id the key is bound to, "0" for none. */
  lease: string;
}

export interface GetOptions {
  /** Every key starting with `key`. */
  prefix?: boolean;
  /** Keys in [key, rangeEnd); `"\0"` with key `"\0"` is every key. */
  rangeEnd?: Bytes;
  limit?: number;
  /** Read the store as it was at this revision (ETCD_COMPACTED once compacted). */
  revision?: number;
  /** Answer from the member's local state without asking the leader (may be stale). */
  serializable?: boolean;
  keysOnly?: boolean;
  countOnly?: boolean;
}

export interface GetResult {
  header: ResponseHeader;
  kvs: KeyValue[];
  /** More keys matched than `limit` returned. */
  more: boolean;
  count: number;
}

export interface PutOptions {
  /** Bind the key to this lease: it is deleted when the lease ends. */
  lease?: string;
  prevKv?: boolean;
}

export interface PutResult {
  header: ResponseHeader;
  prevKv?: KeyValue;
}

export interface DeleteOptions {
  prefix?: boolean;
  rangeEnd?: Bytes;
  prevKv?: boolean;
}

export interface DeleteResult {
  header: ResponseHeader;
  deleted: number;
  prevKvs: KeyValue[];
}

export type CompareTarget = "version" | "create" | "mod" | "value" | "lease";
export type CompareResult = "==" | "!=" | ">" | "<";

/**
 * One condition of a transaction: `target` of `key` compared with `value`. A key that does not
 * exist has version, create and mod revision 0 and lease "0". For `value` a string is compared as
 * UTF-8 bytes; for `lease` the value is a lease id (decimal string).
 */
export interface Compare {
  key: Bytes;
  target: CompareTarget;
  result: CompareResult;
  value: number | Bytes;
  /** Compare every key in [key, rangeEnd) (all must match). */
  rangeEnd?: Bytes;
}

/** Builders for the usual conditions. */
export const compare = {
  version: (key: Bytes, result: CompareResult, version: number): Compare => ({ key, target: "version", result, value: version }),
  createRevision: (key: Bytes, result: CompareResult, revision: number): Compare => ({ key, target: "create", result, value: revision }),
  modRevision: (key: Bytes, result: CompareResult, revision: number): Compare => ({ key, target: "mod", result, value: revision }),
  value: (key: Bytes, result: CompareResult, value: Bytes): Compare => ({ key, target: "value", result, value }),
  lease: (key: Bytes, result: CompareResult, lease: string): Compare => ({ key, target: "lease", result, value: lease }),
  /** The key does not exist. */
  absent: (key: Bytes): Compare => ({ key, target: "create", result: "==", value: 0 }),
};

export type TxnOp =
  | ({ type: "get"; key: Bytes } & GetOptions)
  | ({ type: "put"; key: Bytes; value: Bytes } & PutOptions)
  | ({ type: "delete"; key: Bytes } & DeleteOptions);

export const op = {
  get: (key: Bytes, o: GetOptions = {}): TxnOp => ({ type: "get", key, ...o }),
  put: (key: Bytes, value: Bytes, o: PutOptions = {}): TxnOp => ({ type: "put", key, value, ...o }),
  delete: (key: Bytes, o: DeleteOptions = {}): TxnOp => ({ type: "delete", key, ...o }),
};

export interface TxnRequest {
  compare?: Compare[];
  success?: TxnOp[];
  failure?: TxnOp[];
}

export type TxnOpResult =
  | ({ type: "get" } & GetResult)
  | ({ type: "put" } & PutResult)
  | ({ type: "delete" } & DeleteResult);

export interface TxnResult {
  header: ResponseHeader;
  /** All comparisons held: the success ops ran, else the failure ops. */
  succeeded: boolean;
  /** One per op that ran, in order (their headers carry only the revision). */
  results: TxnOpResult[];
}

export interface WatchEvent {
  type: "put" | "delete";
  /** For a delete: the key and the delete's modRevision only. */
  kv: KeyValue;
  /** The key before this event, when the watch asked for it (`prevKv`). */
  prevKv?: KeyValue;
}

export interface LeaseTimeToLive {
  id: string;
  /** Seconds left (as etcd counts them). */
  ttl: number;
  grantedTtl: number;
  keys: Buffer[];
}

// ——— encoding ———

export function toBuffer(b: Bytes): Buffer {
  return typeof b === "string" ? Buffer.from(b, "utf8") : Buffer.from(b.buffer, b.byteOffset, b.byteLength);
}

export function b64(b: Bytes): string {
  return toBuffer(b).toString("base64");
}

/** The smallest key greater than every key starting with `prefix` (etcd's prefix range end). */
export function prefixEnd(prefix: Bytes): Buffer {
  const p = Buffer.from(toBuffer(prefix));
  for (let i = p.length - 1; i >= 0; i--) {
    if (p[i]! < 0xff) {
      p[i]!++;
      return p.subarray(0, i + 1);
    }
  }
  return Buffer.from([0]); // every byte is 0xff: to the end of the key space
}

/**
 * The key and range end etcd gets for a key with prefix/rangeEnd options (end undefined: the key
 * alone). The empty prefix is every key: etcd spells it key "\0", range end "\0".
 */
export function rangeOf(key: Bytes, o: { prefix?: boolean; rangeEnd?: Bytes }): { key: Buffer; end: Buffer | undefined } {
  if (o.prefix && o.rangeEnd !== undefined) throw new TypeError("give prefix or rangeEnd, not both");
  const k = toBuffer(key);
  if (o.prefix) return k.length === 0 ? { key: Buffer.from([0]), end: Buffer.from([0]) } : { key: k, end: prefixEnd(k) };
  if (k.length === 0) throw new TypeError("an empty key names nothing (use prefix: true for every key)");
  return { key: k, end: o.rangeEnd === undefined ? undefined : toBuffer(o.rangeEnd) };
}

function withRange(m: Json, key: Bytes, o: { prefix?: boolean; rangeEnd?: Bytes }): Json {
  const r = rangeOf(key, o);
  m.key = r.key.toString("base64");
  if (r.end) m.range_end = r.end.toString("base64");
  return m;
}

function int64(n: number, what: string): string {
  if (!Number.isSafeInteger(n)) throw new TypeError(`${what} must be an integer, got ${n}`);
  return String(n);
}

function leaseId(id: string, what = "lease id"): string {
  if (!/^-?\d{1,20}$/.test(id)) throw new TypeError(`${what} must be a decimal string, got ${JSON.stringify(id)}`);
  return id;
}

type Json = Record<string, unknown>;

export function encodeRange(key: Bytes, o: GetOptions = {}): Json {
  const m = withRange({}, key, o);
  if (o.limit !== undefined) m.limit = int64(o.limit, "limit");
  if (o.revision !== undefined) m.revision = int64(o.revision, "revision");
  if (o.serializable) m.serializable = true;
  if (o.keysOnly) m.keys_only = true;
  if (o.countOnly) m.count_only = true;
  return m;
}

export function encodePut(key: Bytes, value: Bytes, o: PutOptions = {}): Json {
  const m = withRange({}, key, {});
  m.value = b64(value);
  if (o.lease !== undefined && o.lease !== "0") m.lease = leaseId(o.lease);
  if (o.prevKv) m.prev_kv = true;
  return m;
}

export function encodeDelete(key: Bytes, o: DeleteOptions = {}): Json {
  const m = withRange({}, key, o);
  if (o.prevKv) m.prev_kv = true;
  return m;
}

const RESULT = { "==": "EQUAL", ">": "GREATER", "<": "LESS", "!=": "NOT_EQUAL" } as const;
const TARGET = { version: "VERSION", create: "CREATE", mod: "MOD", value: "VALUE", lease: "LEASE" } as const;

export function encodeCompare(c: Compare): Json {
  const m: Json = { result: RESULT[c.result], target: TARGET[c.target], key: b64(c.key) };
  if (!m.result || !m.target) throw new TypeError(`bad comparison ${JSON.stringify({ target: c.target, result: c.result })}`);
  if (c.rangeEnd !== undefined) m.range_end = b64(c.rangeEnd);
  const num = (what: string) => {
    if (typeof c.value !== "number") throw new TypeError(`compare ${c.target}: value must be a number`);
    return int64(c.value, what);
  };
  switch (c.target) {
    case "version":
      m.version = num("version");
      break;
    case "create":
      m.create_revision = num("create revision");
      break;
    case "mod":
      m.mod_revision = num("mod revision");
      break;
    case "value":
      if (typeof c.value === "number") throw new TypeError("compare value: value must be bytes or a string");
      m.value = b64(c.value);
      break;
    case "lease":
      m.lease = leaseId(typeof c.value === "number" ? int64(c.value, "lease") : String(c.value));
      break;
  }
  return m;
}

export function encodeOp(o: TxnOp): Json {
  switch (o.type) {
    case "get":
      return { request_range: encodeRange(o.key, o) };
    case "put":
      return { request_put: encodePut(o.key, o.value, o) };
    case "delete":
      return { request_delete_range: encodeDelete(o.key, o) };
  }
}

export function encodeTxn(t: TxnRequest): Json {
  return {
    compare: (t.compare ?? []).map(encodeCompare),
    success: (t.success ?? []).map(encodeOp),
    failure: (t.failure ?? []).map(encodeOp),
  };
}

export interface WatchCreate {
  key: Bytes;
  prefix?: boolean;
  rangeEnd?: Bytes;
  /** First revision to deliver (inclusive); default: changes after now. */
  startRevision?: number;
  prevKv?: boolean;
}

export function encodeWatchCreate(w: WatchCreate): Json {
  const m = withRange({}, w.key, w);
  if (w.startRevision !== undefined && w.startRevision > 0) m.start_revision = int64(w.startRevision, "start revision");
  if (w.prevKv) m.prev_kv = true;
  return { create_request: m };
}

// ——— decoding ———

/** A 64-bit integer field as a number; missing means 0 (the JSON mapping leaves zeros out). */
export function num(v: unknown, what = "integer"): number {
  if (v === undefined || v === null) return 0;
  const n = typeof v === "number" ? v : typeof v === "string" && /^-?\d+$/.test(v) ? Number(v) : NaN;
  if (!Number.isSafeInteger(n)) throw new RangeError(`etcd sent ${what} ${JSON.stringify(v)}, not a safe integer`);
  return n;
}

/** A 64-bit id field kept exactly, as a decimal string ("0" when missing). */
export function id(v: unknown): string {
  if (v === undefined || v === null) return "0";
  if (typeof v === "number" && Number.isSafeInteger(v)) return String(v);
  if (typeof v === "string" && /^-?\d+$/.test(v)) return v;
  throw new RangeError(`etcd sent id ${JSON.stringify(v)}, not an integer`);
}

function bytes(v: unknown): Buffer {
  if (v === undefined || v === null) return Buffer.alloc(0);
  if (typeof v !== "string") throw new TypeError(`etcd sent bytes as ${typeof v}, not base64`);
  return Buffer.from(v, "base64");
}

export function decodeHeader(h: unknown): ResponseHeader {
  const m = (h ?? {}) as Json;
  return { clusterId: id(m.cluster_id), memberId: id(m.member_id), revision: num(m.revision, "revision"), raftTerm: id(m.raft_term) };
}

export function decodeKv(v: unknown): KeyValue {
  const m = (v ?? {}) as Json;
  return {
    key: bytes(m.key),
    value: bytes(m.value),
    createRevision: num(m.create_revision, "create_revision"),
    modRevision: num(m.mod_revision, "mod_revision"),
    version: num(m.version, "version"),
    lease: id(m.lease),
  };
}

export function decodeRange(r: Json): GetResult {
  return { header: decodeHeader(r.header), kvs: ((r.kvs as unknown[]) ?? []).map(decodeKv), more: r.more === true, count: num(r.count, "count") };
}

export function decodePut(r: Json): PutResult {
  const out: PutResult = { header: decodeHeader(r.header) };
  if (r.prev_kv) out.prevKv = decodeKv(r.prev_kv);
  return out;
}

export function decodeDelete(r: Json): DeleteResult {
  return { header: decodeHeader(r.header), deleted: num(r.deleted, "deleted"), prevKvs: ((r.prev_kvs as unknown[]) ?? []).map(decodeKv) };
}

export function decodeTxn(r: Json): TxnResult {
  const results = ((r.responses as Json[]) ?? []).map((u): TxnOpResult => {
    if (u.response_range) return { type: "get", ...decodeRange(u.response_range as Json) };
    if (u.response_put) return { type: "put", ...decodePut(u.response_put as Json) };
    if (u.response_delete_range) return { type: "delete", ...decodeDelete(u.response_delete_range as Json) };
    throw new TypeError(`etcd sent a txn response of unknown kind: ${Object.keys(u).join(",")}`);
  });
  return { header: decodeHeader(r.header), succeeded: r.succeeded === true, results };
}

export function decodeEvent(e: unknown): WatchEvent {
  const m = (e ?? {}) as Json;
  const type = m.type === undefined || m.type === "PUT" || m.type === 0 ? "put" : m.type === "DELETE" || m.type === 1 ? "delete" : null;
  if (!type) throw new TypeError(`etcd sent a watch event of unknown type ${JSON.stringify(m.type)}`);
  const ev: WatchEvent = { type, kv: decodeKv(m.kv) };
  if (m.prev_kv) ev.prevKv = decodeKv(m.prev_kv);
  return ev;
}

/** One message of a watch stream, as the gateway sends it (`{"result": WatchResponse}`). */
export interface WatchMessage {
  header: ResponseHeader;
  watchId: string;
  created: boolean;
  canceled: boolean;
  compactRevision: number;
  cancelReason: string;
  events: WatchEvent[];
}

export function decodeWatchResponse(r: Json): WatchMessage {
  return {
    header: decodeHeader(r.header),
    watchId: id(r.watch_id),
    created: r.created === true,
    canceled: r.canceled === true,
    compactRevision: num(r.compact_revision, "compact_revision"),
    cancelReason: typeof r.cancel_reason === "string" ? r.cancel_reason : "",
    events: ((r.events as unknown[]) ?? []).map(decodeEvent),
  };
}

/** A key for messages: UTF-8 when printable, else hex; long keys shortened. */
export function showKey(k: Bytes): string {
  const b = toBuffer(k);
  const s = b.toString("utf8");
  const printable = /^[\x20-\x7e]*$/.test(s);
  const shown = printable ? JSON.stringify(s.length > 80 ? `${s.slice(0, 77)}...` : s) : `0x${b.subarray(0, 40).toString("hex")}${b.length > 40 ? "..." : ""}`;
  return shown;
}
