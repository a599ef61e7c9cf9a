import http from "node:http";
import type { AddressInfo } from "node:net";
import type { Logger } from "pino";
import { tokenMatches } from "./token.js";

/** A route's answer: JSON by default; a string body with `contentType` is sent as it is. */
export type Handler = (params: Record<string, string>, body: unknown) => Promise<{ status?: number; body: unknown; contentType?: string }>;

interface Route {
  method: string;
  pattern: RegExp;
  keys: string[];
  handler: Handler;
}

/** A minimal JSON-over-HTTP router for a node's control API (bound to localhost by default). */
export class ControlServer {
  private readonly routes: Route[] = [];
  private server: http.Server | null = null;

  /**
   * @param token required as "Authorization: Bearer TOKEN" on every call but GET.
   * @param tls when given, the API is served over HTTPS with this certificate and key.
   */
  constructor(
    private readonly log: Logger,
    private readonly token: string,
    private readonly tls: { cert: Buffer; key: Buffer } | null = null,
  ) {}

  route(method: string, path: string, handler: Handler): this {
    const keys: string[] = [];
    const pattern = new RegExp(`^${path.replace(/:(\w+)/g, (_, k: string) => (keys.push(k), "([^/]+)"))}$`);
    this.routes.push({ method, pattern, keys, handler });
    return this;
  }

  async listen(host: string, port: number): Promise<string> {
    const handler = (req: http.IncomingMessage, res: http.ServerResponse) => void this.serve(req, res);
    // node:https (and node:tls below it) imported only for a TLS control API: a few hundred KiB.
    const server = this.tls ? (await import("node:https")).createServer({ cert: this.tls.cert, key: this.tls.key, minVersion: "TLSv1.2" }, handler) : http.createServer(handler);
    this.server = server;
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(port, host, () => resolve());
    });
    const a = server.address() as AddressInfo;
    return `${this.tls ? "https" : "http"}://${a.address.includes(":") ? `[${a.address}]` : a.address}:${a.port}`;
  }

  close(): Promise<void> {
    const s = this.server;
    if (!s) return Promise.resolve();
    s.closeAllConnections();
    return new Promise((r) => s.close(() => r()));
  }

  private async serve(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const reply = (status: number, body: unknown, contentType?: string) => {
      res.writeHead(status, { "content-type": contentType ?? "application/json" });
      res.end(contentType ? String(body) : JSON.stringify(body) + "\n");
    };
    try {
      const url = new URL(req.url ?? "/", "http://x");
      // The token first: a caller without it learns nothing, not even which routes or exports exist.
      if (req.method !== "GET" && !tokenMatches(req.headers.authorization, this.token)) {
        this.log.warn({ method: req.method, path: url.pathname, from: req.socket.remoteAddress }, "control call refused: missing or wrong token");
        return reply(401, { error: "a bearer token is needed (the token file of this cluster, see --token-file)" });
      }
      const route = this.routes.find((r) => r.method === req.method && r.pattern.test(url.pathname));
      if (!route) return reply(404, { error: `no route for ${req.method} ${url.pathname}` });
      const m = route.pattern.exec(url.pathname)!;
      const params = Object.fromEntries(route.keys.map((k, i) => [k, decodeURIComponent(m[i + 1]!)]));
      let body: unknown = undefined;
      if (req.method === "POST") {
        const chunks: Buffer[] = [];
        let size = 0;
        for await (const c of req) {
          size += (c as Buffer).length;
          if (size > 1 << 20) return reply(413, { error: "body too large" });
          chunks.push(c as Buffer);
        }
        const text = Buffer.concat(chunks).toString("utf8");
        try {
          body = text ? JSON.parse(text) : {};
        } catch {
          return reply(400, { error: "body is not JSON" });
        }
      }
      if (req.method !== "GET") this.log.info({ method: req.method, path: url.pathname, from: req.socket.remoteAddress }, "control call");
      const out = await route.handler(params, body);
      reply(out.status ?? 200, out.body, out.contentType);
    } catch (err) {
      const status = (err as { status?: number }).status ?? 500;
      this.log.warn({ err: (err as Error).message, path: req.url }, "control call failed");
      reply(status, { error: (err as Error).message });
    }
  }
}

export class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}
