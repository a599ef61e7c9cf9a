// Network checks run inside a lab host (`ip netns exec NS node probe.mjs CHECKS`): a Node process
// cannot move its own sockets into another network namespace, so the lab runs this there.
// CHECKS is a JSON array of
//   {"reach": ["10.77.0.2", 2379], "timeoutMs": 1000}  -> "open" | "refused" | "timeout" | "unreachable" | error code
//   {"health": "http://10.77.0.2:2379", "timeoutMs": 1000} -> true | false | "timeout" | error code
//   {"rtt": ["10.77.0.2", 2379], "count": 10, "timeoutMs": 1000} -> [ms, …]: TCP connects one after
//     another, each one round trip (SYN, SYN-ACK); a connect that is not "open" ends the list
// and the answers, in order, are printed as one JSON array. Checks run concurrently.
import http from "node:http";
import net from "node:net";

function reach(host, port, timeoutMs) {
  return new Promise((resolve) => {
    const s = net.connect({ host, port });
    const t = setTimeout(() => {
      s.destroy();
      resolve("timeout");
    }, timeoutMs);
    s.once("connect", () => {
      clearTimeout(t);
      s.destroy();
      resolve("open");
    });
    s.once("error", (e) => {
      clearTimeout(t);
      resolve(e.code === "ECONNREFUSED" ? "refused" : e.code === "EHOSTUNREACH" || e.code === "ENETUNREACH" ? "unreachable" : e.code || e.message);
    });
  });
}

function health(url, timeoutMs) {
  return new Promise((resolve) => {
    const req = http.get(`${url}/health`, (res) => {
      let body = "";
      res.setEncoding("utf8");
      res.on("data", (d) => (body += d));
      res.on("end", () => {
        clearTimeout(t);
        try {
          resolve(JSON.parse(body).health === "true");
        } catch {
          resolve(false);
        }
      });
    });
    const t = setTimeout(() => {
      req.destroy();
      resolve("timeout");
    }, timeoutMs);
    req.on("error", (e) => {
      clearTimeout(t);
      resolve(e.code === "ECONNREFUSED" ? "refused" : e.code || e.message);
    });
  });
}

async function rtt(host, port, count, timeoutMs) {
  const out = [];
  for (let i = 0; i < count; i++) {
    const t0 = performance.now();
    if ((await reach(host, port, timeoutMs)) !== "open") break;
    out.push(Math.round((performance.now() - t0) * 100) / 100);
    await new Promise((r) => setTimeout(r, 10));
  }
  return out;
}

const checks = JSON.parse(process.argv[2] ?? "[]");
const answers = await Promise.all(
  checks.map((c) => {
    const ms = c.timeoutMs ?? 1000;
    if (c.reach) return reach(c.reach[0], c.reach[1], ms);
    if (c.health) return health(c.health, ms);
    if (c.rtt) return rtt(c.rtt[0], c.rtt[1], c.count ?? 10, ms);
    return Promise.resolve(`unknown check ${JSON.stringify(c)}`);
  }),
);
process.stdout.write(JSON.stringify(answers) + "\n");
