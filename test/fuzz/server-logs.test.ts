import { describe, expect, it } from "vitest";
// @ts-expect-error -- plain ES module without types, shared with `npm run fuzz`
import { ServerLogs } from "./grammar-fuzzer.mjs";

// The fuzzer reads the server's log by client address. The kernel gives a client port out again
// once its connection is closed, and the closed connection's last line may reach the fuzzer after
// the new connection began: it must not be taken for the new one's (a full-suite run failed so:
// "closed, but the server's log does not say "bad request magic"", the line shown being the
// previous connection's "bad option magic").
describe("the fuzzer's view of the server's log", () => {
  const line = (peer: string, time: number, reason: string) => JSON.stringify({ level: 40, time, conn: 1, peer, reason, msg: "closing connection: protocol violation" });

  it("drops a line logged before the address's current connection was made, and keeps the new one's", async () => {
    const logs = new ServerLogs();
    const peer = "127.0.0.1:48620";
    const before = Date.now() - 50;
    logs.add(line(peer, before - 10, "an earlier one"));
    logs.forget(peer); // the new connection from the same port
    logs.add(line(peer, before, "bad option magic 0x4948e856454f5054")); // the earlier one's, late
    expect(logs.get(peer)).toEqual([]);
    logs.add(line(peer, Date.now(), "bad request magic"));
    expect(logs.get(peer).map((l: { reason: string }) => l.reason)).toEqual(["bad request magic"]);
    expect(await logs.wait(peer, (l: { reason: string }) => l.reason.includes("bad request magic"), 100)).not.toBeNull();
  });
});
