import pino from "pino";
import { describe, expect, it } from "vitest";
import type { NodeIdentity } from "../migration/lease.js";
import type { Ownership } from "../migration/ownership.js";
import { ANNOUNCE_MS, announce } from "./hand-over.js";
import type { Managed, NodeContext } from "./node-context.js";

const me: NodeIdentity = { nodeId: "a", nbd: "127.0.0.1:1", control: "http://127.0.0.1:2" };
const them: NodeIdentity = { nodeId: "b", nbd: "127.0.0.1:3", control: "http://127.0.0.1:4" };
const node = { identity: me, opts: { log: pino({ level: "silent" }) } } as unknown as NodeContext;
const managed = (announceMove?: Ownership["announceMove"]) => ({ name: "disk", lease: { announceMove } }) as unknown as Managed;

/** A move's announcement is advice (src/migration/README.md): a slow or failing store neither delays nor fails the move. */
describe("a move's announcement", () => {
  it("is made with the owner, its epoch and the destination", async () => {
    const calls: unknown[] = [];
    await announce(node, managed(async (...a) => void calls.push(a)), 7, them);
    expect(calls).toEqual([[me, 7, them]]);
  });

  it("is waited for at most ANNOUNCE_MS when the store does not answer", async () => {
    const t0 = performance.now();
    await announce(node, managed(() => new Promise<void>(() => {})), 7, them);
    const ms = performance.now() - t0;
    expect(ms).toBeGreaterThanOrEqual(ANNOUNCE_MS - 5);
    expect(ms).toBeLessThan(ANNOUNCE_MS + 400);
  });

  it("fails nothing when the store refuses it, and is skipped by a store that cannot announce", async () => {
    await expect(announce(node, managed(() => Promise.reject(new Error("etcd down"))), 7, them)).resolves.toBeUndefined();
    expect(announce(node, managed(undefined), 7, them)).toBeUndefined();
  });
});
