// Network checks run inside a lab host (`ip netns exec NS node probe.mjs CHECKS`): a Node process
// cannot move its own sockets into another network namespace, so the lab runs this there.
// CHECKS is a JSON array of
//   {"reach": ["10.77.0.2", 2379], "timeoutMs": 1000}  -> "open" | "refused" | "timeout" | "unreachable" | error code
//   {"health": "http://10.77.0.2:2379", "timeoutMs": 1000} -> true | false | "timeout" | error code
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

const checks = JSON.parse(process.argv[2] ?? "[]");
const answers = await Promise.all(
  checks.map((c) => {
    const ms = c.timeoutMs ?? 1000;
    if (c.reach) return reach(c.reach[0], c.reach[1], ms);
    if (c.health) return health(c.health, ms);
    return Promise.resolve(`unknown check ${JSON.stringify(c)}`);
  }),
);
process.stdout.write(JSON.stringify(answers) + "\n");
