import { describe, expect, it } from "vitest";
import {
  compare,
  decodeEvent,
  decodeRange,
  decodeTxn,
  decodeWatchResponse,
  encodeCompare,
  encodeRange,
  encodeTxn,
  encodeWatchCreate,
  num,
  op,
  prefixEnd,
  showKey,
} from "./etcd-codec.js";
import { parseAnswer, gatewayError } from "./etcd-transport.js";

const b64 = (s: string) => Buffer.from(s).toString("base64");

describe("etcd JSON codec (the shapes etcd 3.4's gateway sends, as seen from a real 3.4.23)", () => {
  it("encodes a prefix as etcd's range end, the empty prefix as every key", () => {
    expect(prefixEnd("foo").toString()).toBe("fop");
    expect(prefixEnd(Buffer.from([0x61, 0xff, 0xff]))).toEqual(Buffer.from([0x62]));
    expect(prefixEnd(Buffer.from([0xff]))).toEqual(Buffer.from([0]));
    expect(encodeRange("/a/", { prefix: true })).toEqual({ key: b64("/a/"), range_end: b64("/a0") });
    expect(encodeRange("", { prefix: true })).toEqual({ key: "AA==", range_end: "AA==" });
    expect(() => encodeRange("")).toThrow(/empty key/);
    expect(() => encodeRange("a", { prefix: true, rangeEnd: "b" })).toThrow(/not both/);
  });

  it("sends 64-bit integers as decimal strings and refuses what is not a safe integer", () => {
    expect(encodeRange("k", { revision: 12, limit: 1, serializable: true })).toEqual({ key: b64("k"), revision: "12", limit: "1", serializable: true });
    expect(() => encodeRange("k", { revision: 1.5 })).toThrow(/integer/);
    expect(num("9007199254740991")).toBe(Number.MAX_SAFE_INTEGER);
    expect(() => num("9007199254740993")).toThrow(/safe integer/);
    expect(num(undefined)).toBe(0);
  });

  it("encodes comparisons with etcd's enum names and the right oneof field", () => {
    expect(encodeCompare(compare.absent("k"))).toEqual({ result: "EQUAL", target: "CREATE", key: b64("k"), create_revision: "0" });
    expect(encodeCompare(compare.modRevision("k", "<", 7))).toEqual({ result: "LESS", target: "MOD", key: b64("k"), mod_revision: "7" });
    expect(encodeCompare(compare.version("k", ">", 2))).toEqual({ result: "GREATER", target: "VERSION", key: b64("k"), version: "2" });
    expect(encodeCompare(compare.value("k", "!=", "v"))).toEqual({ result: "NOT_EQUAL", target: "VALUE", key: b64("k"), value: b64("v") });
    expect(encodeCompare(compare.lease("k", "==", "7587872134523410001"))).toEqual({ result: "EQUAL", target: "LEASE", key: b64("k"), lease: "7587872134523410001" });
    expect(() => encodeCompare({ key: "k", target: "mod", result: "==", value: "x" })).toThrow(/number/);
  });

  it("encodes a txn's ops as request unions", () => {
    const t = encodeTxn({ compare: [compare.absent("a")], success: [op.put("a", "1", { lease: "5", prevKv: true }), op.delete("b", { prefix: true })], failure: [op.get("a")] });
    expect(t).toEqual({
      compare: [{ result: "EQUAL", target: "CREATE", key: b64("a"), create_revision: "0" }],
      success: [{ request_put: { key: b64("a"), value: b64("1"), lease: "5", prev_kv: true } }, { request_delete_range: { key: b64("b"), range_end: b64("c") } }],
      failure: [{ request_range: { key: b64("a") } }],
    });
  });

  it("decodes a range answer: zero fields are left out, ids stay exact", () => {
    const r = decodeRange({
      header: { cluster_id: "15118495548433857066", member_id: "13668033151171901709", revision: "2", raft_term: "2" },
      kvs: [{ key: b64("foo"), create_revision: "2", mod_revision: "2", version: "1", value: b64("bar"), lease: "4111120375909372170" }],
      count: "1",
    });
    expect(r.header).toEqual({ clusterId: "15118495548433857066", memberId: "13668033151171901709", revision: 2, raftTerm: "2" });
    expect(r.kvs[0]!.value.toString()).toBe("bar");
    expect(r.kvs[0]!.lease).toBe("4111120375909372170");
    expect(r.count).toBe(1);
    expect(r.more).toBe(false);
    const empty = decodeRange({ header: { revision: "5" } });
    expect(empty.kvs).toEqual([]);
    expect(empty.count).toBe(0);
  });

  it("decodes a txn answer's response unions in order", () => {
    const t = decodeTxn({
      header: { revision: "5" },
      succeeded: true,
      responses: [
        { response_put: { header: { revision: "5" }, prev_kv: { key: b64("foo"), create_revision: "2", mod_revision: "2", version: "1", value: b64("bar") } } },
        { response_delete_range: { header: { revision: "5" } } },
        { response_range: { header: { revision: "5" }, kvs: [], count: "0" } },
      ],
    });
    expect(t.succeeded).toBe(true);
    expect(t.results.map((r) => r.type)).toEqual(["put", "delete", "get"]);
    expect(t.results[0]!.type === "put" && t.results[0]!.prevKv?.value.toString()).toBe("bar");
    expect(decodeTxn({ header: { revision: "4" } }).succeeded).toBe(false);
  });

  it("decodes watch messages: PUT is left out as the zero enum, DELETE named, compaction and cancel reasons kept", () => {
    expect(decodeEvent({ kv: { key: b64("k"), mod_revision: "7", create_revision: "7", version: "1", value: b64("v") } }).type).toBe("put");
    const del = decodeEvent({ type: "DELETE", kv: { key: b64("k"), mod_revision: "8" }, prev_kv: { key: b64("k"), value: b64("v"), mod_revision: "7" } });
    expect(del.type).toBe("delete");
    expect(del.kv.modRevision).toBe(8);
    expect(del.prevKv?.value.toString()).toBe("v");
    const c = decodeWatchResponse({ header: { raft_term: "2" }, canceled: true, compact_revision: "4" });
    expect(c.canceled && c.compactRevision).toBe(4);
    const a = decodeWatchResponse({ header: { revision: "9" }, watch_id: "-1", created: true, canceled: true, cancel_reason: "rpc error: code = Unauthenticated desc = etcdserver: invalid auth token" });
    expect(a.cancelReason).toMatch(/invalid auth token/);
    expect(() => decodeEvent({ type: "WHAT" })).toThrow(/unknown type/);
  });

  it("encodes a watch's create request", () => {
    expect(encodeWatchCreate({ key: "/p/", prefix: true, startRevision: 5, prevKv: true })).toEqual({
      create_request: { key: b64("/p/"), range_end: b64("/p0"), start_revision: "5", prev_kv: true },
    });
    expect(encodeWatchCreate({ key: "k" })).toEqual({ create_request: { key: b64("k") } });
  });

  it("reads the gateway's answers: a message, a stream result, both error shapes, and what is not the gateway", () => {
    expect(parseAnswer("u", "/v3/kv/range", 200, '{"header":{"revision":"3"}}').json).toEqual({ header: { revision: "3" } });
    expect(parseAnswer("u", "/v3/lease/keepalive", 200, '{"result":{"ID":"1","TTL":"5"}}').json).toEqual({ ID: "1", TTL: "5" });
    expect(parseAnswer("u", "/v3/kv/put", 404, '{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}').error).toEqual({
      code: 5,
      message: "etcdserver: requested lease not found",
    });
    expect(gatewayError({ error: { grpc_code: 14, http_code: 503, message: "etcdserver: no leader", http_status: "Service Unavailable" } })).toEqual({ code: 14, message: "etcdserver: no leader" });
    expect(() => parseAnswer("u", "/v3/kv/range", 404, "Not Found\n")).toThrow(/etcd ≥ 3.4/);
  });

  it("shows keys readably in messages", () => {
    expect(showKey("/nbdstack/owner/disk")).toBe('"/nbdstack/owner/disk"');
    expect(showKey(Buffer.from([0, 1, 255]))).toBe("0x0001ff");
  });
});
