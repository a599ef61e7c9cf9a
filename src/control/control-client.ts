/** A small client of a node's control API (HTTP/JSON). */
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
}

export interface NodeStatus {
  nodeId: string;
  nbd: string;
  control: string;
  exports: ExportStatus[];
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
  const res = await fetch(url, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(timeoutMs),
  });
  const text = await res.text();
  const data = text ? JSON.parse(text) : {};
  if (!res.ok) throw new ControlError(`${method} ${url.pathname}: ${res.status} ${data.error ?? text}`, res.status);
  return data as T;
}

export const getStatus = (base: string) => controlCall<NodeStatus>(base, "GET", "v1/status");
