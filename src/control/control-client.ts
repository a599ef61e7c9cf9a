/** A small client of a node's control API (HTTP/JSON). */

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

export async function controlCall<T>(base: string, method: "GET" | "POST", path: string, body?: unknown, timeoutMs = 30_000): Promise<T> {
  const url = new URL(path, base.endsWith("/") ? base : `${base}/`);
  const res = await fetch(url, {
    method,
    headers: body === undefined ? {} : { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(timeoutMs),
  });
  const text = await res.text();
  const data = text ? JSON.parse(text) : {};
  if (!res.ok) throw new ControlError(`${method} ${url.pathname}: ${res.status} ${data.error ?? text}`, res.status);
  return data as T;
}

export const getStatus = (base: string) => controlCall<NodeStatus>(base, "GET", "v1/status");
