import http from "node:http";
import https from "node:https";
import type { Socket } from "node:net";
import type { Logger } from "pino";
import {
  EtcdError,
  GrpcCode,
  codeOfGrpc,
  memberUnavailable,
  rejectedBeforeProposal,
  staleToken,
  type EtcdAttempt,
} from "./etcd-errors.js";

export interface EtcdTlsOptions {
  /** PEM CA bundle the members' certificates are checked against (default: Node's CAs). */
  ca?: string | Buffer;
  /** PEM client certificate and key, for members run with --client-cert-auth. */
  cert?: string | Buffer;
  key?: string | Buffer;
  /** Name to check the certificate against when it differs from the endpoint's host. */
  servername?: string;
}

export interface EtcdAuthOptions {
  user: string;
  password: string;
}

export interface EtcdTransportOptions {
  /** Client URLs of the members: `http://10.0.0.1:2379`, `https://…` (TLS). */
  endpoints: string[];
  tls?: EtcdTlsOptions;
  auth?: EtcdAuthOptions;
  /** Bound on a whole call, fail-overs included (default 5000 ms). */
  timeoutMs?: number;
  /** Bound on one attempt on one endpoint (default 2000 ms). */
  attemptTimeoutMs?: number;
  /** Bound on connecting (TCP and TLS) to one endpoint (default 1000 ms). */
  connectTimeoutMs?: number;
  logger?: Logger;
}

export interface CallOptions {
  /** For messages: `put "/a"`. */
  op: string;
  /** Changes the store: never sent again once it may have reached a member. */
  mutation: boolean;
  /** This call's bound instead of the client's timeoutMs. */
  timeoutMs?: number;
  /** This call's bound on one member instead of the client's attemptTimeoutMs. */
  attemptTimeoutMs?: number;
  /** Only this endpoint (no fail-over), e.g. to probe the member a watch streams from. */
  endpoint?: string;
  /** Told of each failed attempt as it happens (a caller that gives up first still knows why). */
  onFailure?: (a: EtcdAttempt) => void;
}

type Json = Record<string, unknown>;

/** One attempt's failure: what happened, and whether the request may have reached the member. */
export class AttemptFailure extends Error {
  constructor(
    message: string,
    readonly sent: boolean,
  ) {
    super(message);
  }
}

interface GatewayError {
  code: number;
  message: string;
}

interface ExchangeState {
  sent: boolean;
  reason: string | undefined;
  timer: NodeJS.Timeout | undefined;
}

interface Endpoint {
  url: string;
  tls: boolean;
  agent: http.Agent;
}

const now = () => performance.now();
/** An attempt with less time left than this is not started: it could only time out. */
const MIN_ATTEMPT_MS = 25;
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/**
 * The wire side of the client: POSTs JSON to etcd's gateway on one member at a time, bounds every
 * attempt and every call, fails over between members, and keeps the auth token. Knows nothing of
 * keys or leases (etcd-client.ts does).
 *
 * Rules:
 * - Every call ends within its timeout (default 5 s): an attempt on one member within
 *   attemptTimeoutMs, its connect within connectTimeoutMs; then the next member.
 * - A member that cannot be reached, times out, has no leader or is not ready is left for the
 *   next one; the one that answered stays first for the next calls.
 * - A read (and a lease keep-alive, which is idempotent) is tried on every member until the
 *   deadline. A mutation is sent to another member only when it cannot have been applied: the
 *   connection never opened, or the member refused it before proposing it ("no leader": every
 *   request carries etcd's `hasleader` metadata, so a member cut off from the leader answers at
 *   once instead of after its 7 s request timeout). Otherwise it fails with ETCD_OUTCOME_UNKNOWN.
 * - With credentials, the token is fetched on first use and fetched again when etcd says it is
 *   stale (simple tokens expire after --auth-token-ttl of disuse and die with a restarted member).
 */
export class EtcdTransport {
  readonly endpoints: readonly string[];
  private readonly eps: Endpoint[];
  private current = 0;
  readonly timeoutMs: number;
  readonly attemptTimeoutMs: number;
  private readonly connectTimeoutMs: number;
  private readonly auth: EtcdAuthOptions | undefined;
  /** undefined: not fetched; null: the cluster has auth disabled; else the token. */
  private tokenValue: string | null | undefined = undefined;
  private tokenFetch: Promise<string | null> | undefined;
  private closed = false;
  readonly log: Logger | undefined;

  constructor(o: EtcdTransportOptions) {
    if (!o.endpoints?.length) throw new TypeError("etcd: no endpoints given");
    this.timeoutMs = o.timeoutMs ?? 5000;
    this.attemptTimeoutMs = o.attemptTimeoutMs ?? 2000;
    this.connectTimeoutMs = o.connectTimeoutMs ?? 1000;
    this.auth = o.auth;
    this.log = o.logger;
    this.eps = o.endpoints.map((raw) => {
      let u: URL;
      try {
        u = new URL(raw);
      } catch {
        throw new TypeError(`etcd endpoint ${JSON.stringify(raw)} is not a URL (expected http://host:2379 or https://host:2379)`);
      }
      if (u.protocol !== "http:" && u.protocol !== "https:") throw new TypeError(`etcd endpoint ${raw}: only http: and https: are supported`);
      if (u.pathname !== "/" && u.pathname !== "") throw new TypeError(`etcd endpoint ${raw}: give the member's client URL without a path`);
      const url = `${u.protocol}//${u.host}`;
      const tls = u.protocol === "https:";
      const agent = tls
        ? new https.Agent({ keepAlive: true, ca: o.tls?.ca, cert: o.tls?.cert, key: o.tls?.key, servername: o.tls?.servername })
        : new http.Agent({ keepAlive: true });
      return { url, tls, agent };
    });
    this.endpoints = this.eps.map((e) => e.url);
  }

  /** The member calls go to first. */
  preferred(): string {
    return this.eps[this.current]!.url;
  }

  /** Moves on from `url` after it failed (if it is still the preferred one). */
  failed(url: string): void {
    if (this.eps[this.current]!.url === url) this.current = (this.current + 1) % this.eps.length;
  }

  private succeeded(url: string): void {
    const i = this.eps.findIndex((e) => e.url === url);
    if (i >= 0) this.current = i;
  }

  private endpoint(url: string): Endpoint {
    const ep = this.eps.find((e) => e.url === url);
    if (!ep) throw new TypeError(`etcd endpoint ${url} is not one of ${this.endpoints.join(", ")}`);
    return ep;
  }

  /** POSTs `body` to `path` (e.g. /v3/kv/range) and returns etcd's answer; see the class rules. */
  async call(path: string, body: Json, o: CallOptions): Promise<{ json: Json; endpoint: string }> {
    const timeoutMs = o.timeoutMs ?? this.timeoutMs;
    const deadline = now() + timeoutMs;
    const attemptMs = o.attemptTimeoutMs ?? this.attemptTimeoutMs;
    const payload = JSON.stringify(body);
    const attempts: EtcdAttempt[] = [];
    let tokenRetries = 0;
    let backoff = 50;
    for (;;) {
      const order = o.endpoint ? [this.endpoint(o.endpoint)] : this.rotation();
      for (let i = 0; i < order.length; i++) {
        if (this.closed) throw new EtcdError("ETCD_CLOSED", o.op, "the client is closed");
        const ep = order[i]!;
        const left = deadline - now();
        if (left < MIN_ATTEMPT_MS) break;
        let token: string | null = null;
        try {
          token = await this.token(ep.url, Math.min(left, attemptMs));
          const r = await this.attempt(ep, path, payload, token, Math.min(deadline - now(), attemptMs));
          if (r.error === undefined) {
            this.succeeded(ep.url);
            return { json: r.json, endpoint: ep.url };
          }
          const g = r.error;
          const tokenProblem = staleToken(g.message) || (this.auth !== undefined && /user name is empty/.test(g.message));
          if (tokenProblem && tokenRetries < 3) {
            // Refused before it was applied: the same member, with a fresh token.
            tokenRetries++;
            this.dropToken(token);
            i--;
            continue;
          }
          if (memberUnavailable(g.code, g.message)) {
            if (o.mutation && !rejectedBeforeProposal(g.message)) {
              throw new EtcdError("ETCD_OUTCOME_UNKNOWN", o.op, `${ep.url} answered "${g.message}": it may or may not have been applied`, {
                endpoint: ep.url,
                grpcCode: g.code,
                attempts: [...attempts, { endpoint: ep.url, error: g.message, sent: true }],
              });
            }
            attempts.push({ endpoint: ep.url, error: `answered "${g.message}"`, sent: true });
            o.onFailure?.(attempts.at(-1)!);
            this.log?.debug({ endpoint: ep.url, op: o.op, error: g.message }, "etcd member unavailable, trying the next");
            this.failed(ep.url);
            continue;
          }
          throw new EtcdError(codeOfGrpc(g.code, g.message), o.op, `${g.message} (answered by ${ep.url})`, { endpoint: ep.url, grpcCode: g.code });
        } catch (err) {
          if (!(err instanceof AttemptFailure)) throw err;
          attempts.push({ endpoint: ep.url, error: err.message, sent: err.sent });
          o.onFailure?.(attempts.at(-1)!);
          if (this.closed) throw new EtcdError("ETCD_CLOSED", o.op, "the client is closed");
          if (err.sent && o.mutation) {
            throw new EtcdError("ETCD_OUTCOME_UNKNOWN", o.op, `${ep.url}: ${err.message}; the request reached it and may or may not have been applied`, {
              endpoint: ep.url,
              attempts,
            });
          }
          this.log?.debug({ endpoint: ep.url, op: o.op, error: err.message }, "etcd endpoint failed, trying the next");
          this.failed(ep.url);
        }
      }
      const left = deadline - now();
      if (left < MIN_ATTEMPT_MS) break;
      await sleep(Math.min(backoff, left));
      backoff = Math.min(backoff * 2, 500);
    }
    throw new EtcdError("ETCD_UNAVAILABLE", o.op, `no etcd endpoint answered within ${timeoutMs} ms: ${summary(attempts, o.endpoint ? [o.endpoint] : this.endpoints)}`, {
      endpoint: attempts.at(-1)?.endpoint,
      attempts,
    });
  }

  private rotation(): Endpoint[] {
    const n = this.eps.length;
    return Array.from({ length: n }, (_, k) => this.eps[(this.current + k) % n]!);
  }

  /**
   * The auth token to send to `url` (null: none). Fetches it when missing; a failure to reach
   * the member is an AttemptFailure (never sent), a wrong password an ETCD_AUTH_FAILED.
   */
  async token(url: string, timeoutMs: number): Promise<string | null> {
    if (!this.auth) return null;
    if (this.tokenValue !== undefined) return this.tokenValue;
    this.tokenFetch ??= this.authenticate(this.endpoint(url), timeoutMs).finally(() => (this.tokenFetch = undefined));
    return this.tokenFetch;
  }

  /** Forgets `token` after etcd called it stale (unless a newer one replaced it already). */
  dropToken(token: string | null): void {
    if (this.tokenValue === token) this.tokenValue = undefined;
  }

  private async authenticate(ep: Endpoint, timeoutMs: number): Promise<string | null> {
    const auth = this.auth!;
    let r: { json: Json; error?: GatewayError };
    try {
      r = await this.attempt(ep, "/v3/auth/authenticate", JSON.stringify({ name: auth.user, password: auth.password }), null, timeoutMs);
    } catch (err) {
      if (err instanceof AttemptFailure) throw new AttemptFailure(`authenticating as ${auth.user}: ${err.message}`, false);
      throw err;
    }
    if (r.error) {
      const g = r.error;
      if (/authentication is not enabled/.test(g.message)) {
        this.tokenValue = null;
        return null;
      }
      if (memberUnavailable(g.code, g.message)) throw new AttemptFailure(`authenticating as ${auth.user}: answered "${g.message}"`, false);
      const code = codeOfGrpc(g.code, g.message);
      throw new EtcdError(code === "ETCD_AUTH_FAILED" ? code : "ETCD_AUTH_FAILED", `authenticate as ${JSON.stringify(auth.user)}`, `${g.message} (answered by ${ep.url})`, {
        endpoint: ep.url,
        grpcCode: g.code,
      });
    }
    const token = r.json.token;
    if (typeof token !== "string" || token === "") throw new EtcdError("ETCD_PROTOCOL", "authenticate", `${ep.url} answered without a token`, { endpoint: ep.url });
    this.tokenValue = token;
    this.log?.debug({ endpoint: ep.url, user: auth.user }, "etcd token fetched");
    return token;
  }

  private headers(token: string | null, length: number): http.OutgoingHttpHeaders {
    const h: http.OutgoingHttpHeaders = { "content-type": "application/json", "content-length": length, "grpc-metadata-hasleader": "true" };
    if (token) h.authorization = token;
    return h;
  }

  /**
   * One POST on one member. Resolves with the JSON answer, or with etcd's error (the gateway's
   * `{"error","code"}`, or an error inside a stream's `{"error":{…}}`); rejects with an
   * AttemptFailure when the member could not be reached or did not answer in time.
   */
  private async attempt(ep: Endpoint, path: string, payload: string, token: string | null, timeoutMs: number): Promise<{ json: Json; error?: GatewayError }> {
    const { res, state } = await this.open(ep, path, payload, token, timeoutMs, false);
    return new Promise((resolve, reject) => {
      const chunks: Buffer[] = [];
      let ended = false;
      res.on("data", (c: Buffer) => chunks.push(c));
      res.on("end", () => {
        ended = true;
        clearTimeout(state.timer);
        try {
          resolve(parseAnswer(ep.url, path, res.statusCode ?? 0, Buffer.concat(chunks).toString("utf8")));
        } catch (e) {
          reject(e);
        }
      });
      res.on("error", () => {});
      res.on("close", () => {
        clearTimeout(state.timer);
        if (!ended) reject(new AttemptFailure(state.reason ?? "the connection closed in the middle of the answer", true));
      });
    });
  }

  /**
   * Opens a POST and resolves once the response headers arrived (a watch stream's headers come
   * with its first message). `timeoutMs` bounds the whole exchange; for a stream (`stream`
   * true) only until the headers. `state.sent` tells whether the request may have reached the
   * member; `state.reason` why the exchange was cut.
   */
  open(
    ep: Endpoint | string,
    path: string,
    payload: string,
    token: string | null,
    timeoutMs: number,
    stream: boolean,
  ): Promise<{ req: http.ClientRequest; res: http.IncomingMessage; state: ExchangeState }> {
    const e = typeof ep === "string" ? this.endpoint(ep) : ep;
    return new Promise((resolve, reject) => {
      if (this.closed) return reject(new AttemptFailure("the client is closed", false));
      const state: ExchangeState = { sent: false, reason: undefined, timer: undefined };
      let settled = false;
      const mod = e.tls ? https : http;
      const req = mod.request(`${e.url}${path}`, { method: "POST", agent: e.agent, headers: this.headers(token, Buffer.byteLength(payload)) });
      const cut = (reason: string, sent: boolean) => {
        clearTimeout(state.timer);
        clearTimeout(connectTimer);
        state.reason ??= reason;
        if (!settled) {
          settled = true;
          reject(new AttemptFailure(reason, sent));
        }
        req.destroy();
      };
      state.timer = setTimeout(() => cut(`no answer within ${Math.round(timeoutMs)} ms`, state.sent), Math.max(1, timeoutMs));
      const connectMs = Math.max(1, Math.min(this.connectTimeoutMs, timeoutMs));
      const connectTimer = setTimeout(() => {
        if (!state.sent) cut(`could not connect within ${Math.round(connectMs)} ms`, false);
      }, connectMs);
      req.on("socket", (s: Socket) => {
        const ready = () => {
          state.sent = true;
          clearTimeout(connectTimer);
        };
        // A socket kept alive from an earlier call is connected (and encrypted) already.
        if (!s.connecting) ready();
        else s.once(e.tls ? "secureConnect" : "connect", ready);
      });
      // A TLS alert ends the handshake: the member never read the request (TLS 1.3 lets the client
      // write it before the server checked the client's certificate).
      req.on("error", (err) => cut(describe(err), state.sent && !tlsAlert(err)));
      req.on("response", (res) => {
        clearTimeout(connectTimer);
        if (stream) clearTimeout(state.timer);
        if (settled) return void res.resume();
        settled = true;
        resolve({ req, res, state });
      });
      req.end(payload);
    });
  }

  /** Stops every call (they fail with ETCD_CLOSED) and closes every connection. */
  close(): void {
    this.closed = true;
    for (const e of this.eps) e.agent.destroy();
  }

  get isClosed(): boolean {
    return this.closed;
  }
}

/** Reads the gateway's answer: the message, or etcd's error in one of its two shapes. */
export function parseAnswer(url: string, path: string, status: number, text: string): { json: Json; error?: GatewayError } {
  let json: Json;
  // etcd's gateway refuses, with auth on, a client certificate that carries a CommonName (it would
  // name a user, and the gateway cannot pass it on): no retry helps, the user must change a setting.
  if (status === 400 && /CommonName of client sending a request against gateway/.test(text))
    throw new EtcdError("ETCD_AUTH_FAILED", `POST ${path}`, `${url} refuses a client certificate with a CommonName while etcd's auth is on (its JSON gateway cannot use the CN): give nbdstack a client certificate without a CommonName (subjectAltName only; the user is --etcd-user's)`, { endpoint: url });
  try {
    json = JSON.parse(text) as Json;
  } catch {
    const what = status === 404 ? "is it etcd ≥ 3.4? its JSON gateway serves /v3/" : "not JSON";
    throw new AttemptFailure(`answered ${status} to POST ${path} with ${JSON.stringify(text.slice(0, 100))} (${what})`, false);
  }
  const err = gatewayError(json);
  if (err) return { json, error: err };
  if (status !== 200) throw new AttemptFailure(`answered ${status} to POST ${path}: ${text.slice(0, 200)}`, true);
  // A streaming RPC answered through the gateway (keep-alive) wraps its message in "result".
  if (json.result && typeof json.result === "object") return { json: json.result as Json };
  return { json };
}

/** etcd's error in the gateway's unary shape `{"error","message","code"}` or stream shape `{"error":{"grpc_code","message"}}`. */
export function gatewayError(json: Json): GatewayError | undefined {
  const e = json.error;
  if (e === undefined) return undefined;
  if (typeof e === "string") return { code: typeof json.code === "number" ? json.code : GrpcCode.UNKNOWN, message: typeof json.message === "string" ? json.message : e };
  if (e && typeof e === "object") {
    const o = e as Json;
    const code = typeof o.grpc_code === "number" ? o.grpc_code : typeof o.code === "number" ? o.code : GrpcCode.UNKNOWN;
    return { code, message: typeof o.message === "string" ? o.message : JSON.stringify(o) };
  }
  return undefined;
}

function tlsAlert(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException | null)?.code ?? "";
  return /^ERR_SSL_.*ALERT/.test(code);
}

function describe(err: unknown): string {
  const e = err as NodeJS.ErrnoException & { reason?: string };
  const code = e?.code ?? "";
  if (code === "ECONNREFUSED") return "connection refused (is etcd running there?)";
  if (code === "ECONNRESET") return "connection reset";
  if (/ALERT_(BAD_CERTIFICATE|CERTIFICATE_REQUIRED|UNKNOWN_CA|CERTIFICATE_UNKNOWN)/.test(code)) {
    return `TLS: the member refused our client certificate (none given, or not signed by a CA it trusts): ${e.reason ?? code}`;
  }
  if (/^ERR_SSL_/.test(code)) return `TLS: ${e.reason ?? e.message}`;
  if (/CERT|SELF_SIGNED|UNABLE_TO|ERR_TLS/.test(code)) return `TLS: ${e.message} (checking the member's certificate)`;
  if (code === "EPROTO") return `TLS: ${e.message}`;
  return e?.message ?? String(err);
}

function summary(attempts: EtcdAttempt[], endpoints: readonly string[]): string {
  if (attempts.length === 0) return "no attempt could start";
  // Each endpoint's distinct failures, in order, the last three at most.
  const seen = new Map<string, string[]>();
  for (const a of attempts) {
    const list = seen.get(a.endpoint) ?? [];
    if (!list.includes(a.error)) list.push(a.error);
    seen.set(a.endpoint, list);
  }
  return endpoints.map((e) => `${e}: ${seen.get(e)?.slice(-3).join(", then ") ?? "not tried"}`).join("; ");
}
