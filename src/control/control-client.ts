/** A small client of a node's control API (HTTP/JSON, or HTTPS when the node has certificates). */
import type https from "node:https";
import type { CopyProgress } from "../copy/progress.js";
import type { LiveCopyState } from "../migration/live-copy.js";
import { readToken } from "./token.js";

export interface ExportStatus {
  name: string;
  image: string | null;
  owner: string | null;
  epoch: number | null;
  state: string;
  inflightA: number;
  inflightB: number;
  held: number;
  moves: number;
  size: number;
  /** The live copy this node runs, or ran last, as the source of a move by copy. */
  copy?: CopyProgress & LiveCopyState;
  /** This node holds a copy target of the export (it is the destination of a live copy). */
  copyTarget?: boolean;
}

export interface NodeStatus {
  nodeId: string;
  nbd: string;
  control: string;
  exports: ExportStatus[];
  /** With --etcd: the whole cluster as etcd has it (or why it could not be read). */
  cluster?: ClusterStatus | { error: string };
}

/** What a server that is not a cluster node (no --node-id) answers to GET /v1/status. */
export interface ServerStatus {
  exports: Array<{ name: string; size: number; stack: string }>;
  /** With serve --threads N: each event loop (src/server/THREADS.md). */
  loops?: Array<{ loop: number; pid: number | null; ready: boolean; connections: number; restarts: number }>;
}

/** Every live node and every export's ownership record in etcd (see src/coord/etcd-node.ts). */
export interface ClusterStatus {
  etcd: { endpoints: string[]; prefix: string };
  nodes: Array<{ nodeId: string; nbd: string; control: string; host: string; pid: number; started: number; alive: true }>;
  exports: Array<{ name: string; owner: string; epoch: number; nbd: string; control: string; live: boolean; released: boolean; handedFrom?: string[] }>;
}

export class ControlError extends Error {
  constructor(
    message: string,
    readonly status: number,
  ) {
    super(message);
    this.name = "ControlError";
  }
}

let token: string | null = null;

/** The token sent on mutating calls; by default read from the token file (see token.ts) on first use. */
export function setControlToken(t: string): void {
  token = t;
}

let ca: Buffer | null = null;

/**
 * The CA bundle that https:// control URLs are checked against (a node's --tls-ca); without it,
 * Node.js's own roots and NODE_EXTRA_CA_CERTS.
 */
export function setControlCa(bundle: Buffer | null): void {
  ca = bundle;
}

export async function controlCall<T>(base: string, method: "GET" | "POST", path: string, body?: unknown, timeoutMs = 30_000): Promise<T> {
  const url = new URL(path, base.endsWith("/") ? base : `${base}/`);
  const headers: Record<string, string> = body === undefined ? {} : { "content-type": "application/json" };
  if (method !== "GET") {
    try {
      token ??= readToken();
    } catch (err) {
      throw new ControlError(`cannot read the control token (${(err as Error).message}); pass --token-file`, 401);
    }
    headers.authorization = `Bearer ${token}`;
  }
  const { status, text } = await request(url, method, headers, body === undefined ? undefined : JSON.stringify(body), timeoutMs);
  const data = text ? JSON.parse(text) : {};
  if (status < 200 || status >= 300) throw new ControlError(`${method} ${url.pathname}: ${status} ${data.error ?? text}`, status);
  return data as T;
}

async function request(url: URL, method: string, headers: Record<string, string>, body: string | undefined, timeoutMs: number): Promise<{ status: number; text: string }> {
  const secure = url.protocol === "https:";
  if (!secure && url.protocol !== "http:") throw new Error(`control URL must be http:// or https:// (${url.href})`);
  // Imported at the first call: a server that makes none (no cluster node) does not load them.
  const client = secure ? await import("node:https") : await import("node:http");
  return new Promise((resolve, reject) => {
    const opts: https.RequestOptions = { method, headers, signal: AbortSignal.timeout(timeoutMs), ...(secure && ca ? { ca } : {}) };
    const req = client.request(url, opts, (res) => {
      const chunks: Buffer[] = [];
      res.on("data", (c: Buffer) => chunks.push(c));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, text: Buffer.concat(chunks).toString("utf8") }));
      res.on("error", reject);
    });
    req.on("error", reject);
    req.end(body);
  });
}

export const getStatus = (base: string) => controlCall<NodeStatus>(base, "GET", "v1/status");
