import { Errno, type ErrnoName } from "../../protocol/constants.js";

/** Request kinds a rule can match; `open` is the device being opened (a cluster node adopting an image), which `any` does not match. */
export type FaultOp = "pread" | "pwrite" | "zero" | "trim" | "flush" | "cache" | "extents" | "open" | "any";
const OPS: readonly FaultOp[] = ["pread", "pwrite", "zero", "trim", "flush", "cache", "extents", "open", "any"];
const ERRNOS: readonly ErrnoName[] = ["EIO", "ENOSPC", "EPERM", "ENOMEM", "EINVAL", "ESHUTDOWN"];

/**
 * One fault rule, parsed from "key=value,key=value,…". Every item is optional:
 * op (default any), errno, rate | every | once, range=START-END (bytes, END exclusive),
 * after=N (requests) | after=Ts (seconds), delay=Xms | delay=Xms..Yms, stall, corrupt=RATE.
 */
export interface FaultRule {
  id: number;
  text: string;
  op: FaultOp;
  errno?: ErrnoName;
  rate?: number;
  every?: number;
  once?: boolean;
  range?: { start: number; end: number };
  afterCount?: number;
  afterMs?: number;
  delay?: { min: number; max: number };
  stall?: boolean;
  corrupt?: number;
  /** Requests that matched op and range (and so counted for `every` and `after`). */
  seen: number;
  /** Times the rule fired. */
  fired: number;
  addedAt: number;
}

export class RuleSyntaxError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "RuleSyntaxError";
  }
}

function num(key: string, v: string): number {
  const n = Number(v);
  if (v === "" || !Number.isFinite(n) || n < 0) throw new RuleSyntaxError(`${key}=${v}: expected a non-negative number`);
  return n;
}

function ms(key: string, v: string): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s)?$/.exec(v);
  if (!m) throw new RuleSyntaxError(`${key}=${v}: expected a time such as 5ms or 2s`);
  return Number(m[1]) * (m[2] === "s" ? 1000 : 1);
}

export function parseRule(text: string, id: number, now: number): FaultRule {
  const r: FaultRule = { id, text, op: "any", seen: 0, fired: 0, addedAt: now };
  if (!text.trim()) throw new RuleSyntaxError("empty rule");
  for (const item of text.split(",")) {
    const [rawKey, ...rest] = item.split("=");
    const key = rawKey!.trim();
    const v = rest.join("=").trim();
    switch (key) {
      case "op":
        if (!OPS.includes(v as FaultOp)) throw new RuleSyntaxError(`op=${v}: expected one of ${OPS.join(", ")}`);
        r.op = v as FaultOp;
        break;
      case "errno":
        if (!ERRNOS.includes(v as ErrnoName) || !(v in Errno)) throw new RuleSyntaxError(`errno=${v}: expected one of ${ERRNOS.join(", ")}`);
        r.errno = v as ErrnoName;
        break;
      case "rate":
        r.rate = num(key, v);
        if (r.rate > 1) throw new RuleSyntaxError(`rate=${v}: expected a probability between 0 and 1`);
        break;
      case "every":
        r.every = num(key, v);
        if (!Number.isInteger(r.every) || r.every < 1) throw new RuleSyntaxError(`every=${v}: expected a whole number >= 1`);
        break;
      case "once":
        if (v !== "") throw new RuleSyntaxError("once takes no value");
        r.once = true;
        break;
      case "range": {
        const m = /^(\d+)-(\d+)$/.exec(v);
        if (!m || Number(m[2]) <= Number(m[1])) throw new RuleSyntaxError(`range=${v}: expected START-END in bytes with END > START`);
        r.range = { start: Number(m[1]), end: Number(m[2]) };
        break;
      }
      case "after":
        if (/s$/.test(v)) r.afterMs = ms(key, v);
        else r.afterCount = num(key, v);
        break;
      case "delay": {
        const [a, b] = v.split("..");
        const min = ms(key, a!);
        const max = b === undefined ? min : ms(key, b);
        if (max < min) throw new RuleSyntaxError(`delay=${v}: the upper bound is below the lower one`);
        r.delay = { min, max };
        break;
      }
      case "stall":
        if (v !== "") throw new RuleSyntaxError("stall takes no value");
        r.stall = true;
        break;
      case "corrupt":
        r.corrupt = num(key, v);
        if (r.corrupt > 1) throw new RuleSyntaxError(`corrupt=${v}: expected a probability between 0 and 1`);
        break;
      default:
        throw new RuleSyntaxError(`unknown item "${key}" (known: op, errno, rate, every, once, range, after, delay, stall, corrupt)`);
    }
  }
  if ([r.rate !== undefined, r.every !== undefined, r.once].filter(Boolean).length > 1) throw new RuleSyntaxError("use at most one of rate, every, once");
  if (!r.errno && !r.delay && !r.stall && r.corrupt === undefined) throw new RuleSyntaxError("a rule needs an effect: errno, delay, stall or corrupt");
  if (r.corrupt !== undefined && r.op !== "pread" && r.op !== "any") throw new RuleSyntaxError("corrupt applies to reads (op=pread)");
  return r;
}

/** mulberry32: a small seeded PRNG, so every random decision is reproducible from the seed. */
export function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
