// Shared by the etcd client tests (src/coord/*.test.ts) and the lab test. Real etcd processes come
// from etcd.mjs.
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import pino from "pino";
import type { Logger } from "pino";

export function tempDir(tag: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `nbdstack-${tag}-`));
}

/** A debug logger whose lines land in `lines` (parsed). */
export function captureLogger(): { logger: Logger; lines: Array<Record<string, unknown> & { msg: string }> } {
  const lines: Array<Record<string, unknown> & { msg: string }> = [];
  const logger = pino({ level: "debug" }, { write: (s: string) => void lines.push(JSON.parse(s)) });
  return { logger, lines };
}

export async function until<T>(what: string, probe: () => Promise<T | undefined | false> | T | undefined | false, deadlineMs = 20_000): Promise<T> {
  const end = performance.now() + deadlineMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await probe();
      if (v !== undefined && v !== false) return v;
    } catch (err) {
      last = err;
    }
    if (performance.now() > end) throw new Error(`timed out after ${deadlineMs} ms waiting for ${what}${last ? ` (last error: ${(last as Error).message})` : ""}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

function certtool(dir: string, args: string[], template?: string): void {
  const t = path.join(dir, `t${Math.random().toString(36).slice(2)}.info`);
  if (template) fs.writeFileSync(t, template);
  execFileSync("certtool", [...args, ...(template ? ["--template", t] : [])], { stdio: ["ignore", "ignore", "pipe"] });
  if (template) fs.rmSync(t);
}

export interface Pki {
  ca: string;
  serverCert: string;
  serverKey: string;
  clientCert: string;
  clientKey: string;
}

/** A CA, a server certificate for 127.0.0.1 and a client certificate, made with certtool. */
export function makePki(dir: string, name: string): Pki {
  fs.mkdirSync(dir, { recursive: true });
  const f = (n: string) => path.join(dir, n);
  certtool(dir, ["--generate-privkey", "--key-type=ecdsa", "--outfile", f("ca-key.pem")]);
  certtool(dir, ["--generate-self-signed", "--load-privkey", f("ca-key.pem"), "--outfile", f("ca-cert.pem")], `cn = ${name} CA\nca\ncert_signing_key\nexpiration_days = 30\n`);
  const issue = (who: string, template: string) => {
    certtool(dir, ["--generate-privkey", "--key-type=ecdsa", "--outfile", f(`${who}-key.pem`)]);
    certtool(
      dir,
      ["--generate-certificate", "--load-ca-certificate", f("ca-cert.pem"), "--load-ca-privkey", f("ca-key.pem"), "--load-privkey", f(`${who}-key.pem`), "--outfile", f(`${who}-cert.pem`)],
      template,
    );
  };
  issue("server", `cn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\ntls_www_client\nsigning_key\nencryption_key\nexpiration_days = 30\n`);
  issue("client", `cn = ${name}-client\ntls_www_client\nsigning_key\nencryption_key\nexpiration_days = 30\n`);
  return { ca: f("ca-cert.pem"), serverCert: f("server-cert.pem"), serverKey: f("server-key.pem"), clientCert: f("client-cert.pem"), clientKey: f("client-key.pem") };
}

/**
 * Another client certificate from a PKI made by makePki in `dir`: `cn` null gives one without a
 * CommonName (only a subjectAltName), as etcd's JSON gateway wants when its auth is on.
 */
export function clientCertOf(dir: string, who: string, cn: string | null): { cert: string; key: string } {
  const f = (n: string) => path.join(dir, n);
  certtool(dir, ["--generate-privkey", "--key-type=ecdsa", "--outfile", f(`${who}-key.pem`)]);
  certtool(
    dir,
    ["--generate-certificate", "--load-ca-certificate", f("ca-cert.pem"), "--load-ca-privkey", f("ca-key.pem"), "--load-privkey", f(`${who}-key.pem`), "--outfile", f(`${who}-cert.pem`)],
    `${cn === null ? "" : `cn = ${cn}\n`}dns_name = ${who}.nbdstack.test\ntls_www_client\nsigning_key\nencryption_key\nexpiration_days = 30\n`,
  );
  return { cert: f(`${who}-cert.pem`), key: f(`${who}-key.pem`) };
}

/**
 * A TCP proxy in front of etcd that can be cut silently: from cut() on, nothing passes either way
 * and new connections are accepted and held — a network partition (or a frozen etcd) as one
 * client sees it, while every other client reaches etcd. heal() ends the cut (the connections it
 * held are closed: clients connect again).
 */
export async function startProxy(target: string): Promise<{
  url: string;
  cut(): void;
  heal(): void;
  dropReplyTo(marker: string | null): void;
  delayRequestTo(marker: string, ms: number, times?: number): void;
  close(): void;
}> {
  const u = new URL(target);
  const socks = new Set<net.Socket>();
  let cut = false;
  let marker: string | null = null;
  const delays: Array<{ marker: string; ms: number; left: number }> = [];
  const track = (s: net.Socket) => {
    socks.add(s);
    s.on("close", () => socks.delete(s));
    s.on("error", () => {});
  };
  const server = net.createServer((c) => {
    track(c);
    if (cut) return;
    const up = net.connect(Number(u.port), u.hostname);
    track(up);
    let drop = false;
    let requests = Promise.resolve(); // what follows a delayed request waits for it
    c.on("data", (d) => {
      if (marker !== null && d.includes(marker)) drop = true;
      const delay = delays.find((x) => x.left > 0 && d.includes(x.marker));
      if (delay) delay.left--;
      const ms = delay?.ms ?? 0;
      requests = requests.then(() => (ms ? new Promise<void>((r) => setTimeout(r, ms)) : undefined)).then(() => void (cut || up.destroyed || up.write(d)));
    });
    up.on("data", (d) => void (cut || drop || c.write(d)));
    c.on("close", () => up.destroy());
    up.on("close", () => c.destroy());
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const port = (server.address() as net.AddressInfo).port;
  return {
    url: `http://127.0.0.1:${port}`,
    cut: () => void (cut = true),
    heal: () => {
      cut = false;
      for (const s of socks) s.destroy();
    },
    /** From now on, a connection that carries a request containing `marker` gets no more answers: that request reaches etcd, its outcome is unknown. */
    dropReplyTo: (m: string | null) => void (marker = m),
    /** The next `times` requests (default 1) containing `marker` reach etcd `ms` late (what follows on their connection waits for them): a slow path to etcd. */
    delayRequestTo: (m: string, ms: number, times = 1) => void delays.push({ marker: m, ms, left: times }),
    close: () => {
      for (const s of socks) s.destroy();
      server.close();
    },
  };
}
