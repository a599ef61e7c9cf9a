import fs from "node:fs";
import path from "node:path";
import tls from "node:tls";
import type { HandshakeTls } from "../server/handshake.js";

/**
 * TLS of a node, in the terms nbdkit and qemu-nbd use:
 * - off: NOTLS mode; NBD_OPT_STARTTLS is refused with NBD_REP_ERR_POLICY.
 * - on: TLS is offered; plain clients are served too.
 * - require: FORCEDTLS mode; before STARTTLS every option but NBD_OPT_ABORT gets
 *   NBD_REP_ERR_TLS_REQD and NBD_OPT_EXPORT_NAME closes the connection.
 */
export type TlsMode = "off" | "on" | "require";

export interface TlsFlags {
  tls?: string;
  tlsCert?: string;
  tlsKey?: string;
  tlsCa?: string;
  tlsVerifyPeer?: boolean;
  /** A directory in the layout nbdkit and qemu read: ca-cert.pem, server-cert.pem, server-key.pem (client-cert.pem, client-key.pem). */
  tlsCertificates?: string;
  /** psktool's file: one "identity:hexkey" a line. */
  tlsPsk?: string;
}

export interface PskEntry {
  identity: string;
  key: Buffer;
}

/** A node's TLS credentials and mode, ready for the NBD server, port B and the control API. */
export interface TlsConfig {
  mode: "on" | "require";
  /** PEM certificate chain and key of this node (X.509), if configured. */
  cert?: Buffer;
  key?: Buffer;
  /** PEM CA bundle clients' and peers' certificates are checked against. */
  ca?: Buffer;
  /** Client certificate and key this node shows when it dials a peer (port B); default cert/key. */
  clientCert?: Buffer;
  clientKey?: Buffer;
  verifyPeer: boolean;
  /** PSK identities and keys; the first one is this node's own identity towards peers. */
  psk?: PskEntry[];
}

/** Reads psktool's format: "identity:hexkey" lines; blank lines and # comments are skipped. */
export function readPskFile(file: string): PskEntry[] {
  const out: PskEntry[] = [];
  const lines = fs.readFileSync(file, "utf8").split(/\r?\n/);
  lines.forEach((line, i) => {
    const t = line.trim();
    if (!t || t.startsWith("#")) return;
    const at = t.lastIndexOf(":");
    const identity = t.slice(0, at);
    const hex = t.slice(at + 1);
    if (at <= 0 || !/^([0-9a-fA-F]{2})+$/.test(hex)) throw new Error(`${file}:${i + 1}: expected "identity:hexkey" (the format psktool writes)`);
    out.push({ identity, key: Buffer.from(hex, "hex") });
  });
  if (out.length === 0) throw new Error(`${file}: no PSK identity in the file`);
  return out;
}

/**
 * Turns the serve flags into a TlsConfig, or null when TLS is off. Credentials without --tls mean
 * "require" (as qemu-nbd does: giving keys means wanting them used); --tls on|require without
 * credentials is an error.
 */
export function loadTlsConfig(f: TlsFlags): TlsConfig | null {
  const dir = f.tlsCertificates;
  const inDir = (name: string) => (dir && fs.existsSync(path.join(dir, name)) ? path.join(dir, name) : undefined);
  const certFile = f.tlsCert ?? inDir("server-cert.pem");
  const keyFile = f.tlsKey ?? inDir("server-key.pem");
  const caFile = f.tlsCa ?? inDir("ca-cert.pem");
  const hasCreds = !!(certFile || keyFile || f.tlsPsk);
  if (dir && !fs.existsSync(dir)) throw new Error(`--tls-certificates ${dir}: no such directory`);
  const mode = f.tls ?? (hasCreds ? "require" : "off");
  if (mode !== "off" && mode !== "on" && mode !== "require") throw new Error(`--tls must be off, on or require (not "${mode}")`);
  if (mode === "off") return null;
  if (!hasCreds) throw new Error(`--tls ${mode} needs credentials: --tls-cert and --tls-key, --tls-certificates DIR, or --tls-psk FILE`);
  if (!!certFile !== !!keyFile) throw new Error("--tls-cert and --tls-key go together" + (dir ? ` (${dir} lacks server-cert.pem or server-key.pem)` : ""));
  if (f.tlsVerifyPeer && !certFile) throw new Error("--tls-verify-peer checks client certificates: it needs X.509 (--tls-cert/--tls-key or --tls-certificates)");
  if (f.tlsVerifyPeer && !caFile) throw new Error("--tls-verify-peer needs --tls-ca (or ca-cert.pem in --tls-certificates) to check client certificates against");
  const read = (file: string | undefined) => (file ? fs.readFileSync(file) : undefined);
  const cfg: TlsConfig = {
    mode,
    cert: read(certFile),
    key: read(keyFile),
    ca: read(caFile),
    clientCert: read(inDir("client-cert.pem")),
    clientKey: read(inDir("client-key.pem")),
    verifyPeer: !!f.tlsVerifyPeer,
    psk: f.tlsPsk ? readPskFile(f.tlsPsk) : undefined,
  };
  if (!cfg.clientCert || !cfg.clientKey) {
    cfg.clientCert = cfg.cert;
    cfg.clientKey = cfg.key;
  }
  // Fail at start, not at the first client, on a key that does not match its certificate.
  if (cfg.cert) tls.createSecureContext({ cert: cfg.cert, key: cfg.key, ca: cfg.ca });
  return cfg;
}

/**
 * Ciphers with PSK: Node.js's default list minus its "!PSK", so TLS 1.2 PSK suites can be chosen
 * (TLS 1.3 suites serve PSK as they are, through OpenSSL's PSK callback compatibility).
 */
function ciphers(cfg: TlsConfig): string | undefined {
  return cfg.psk ? tls.DEFAULT_CIPHERS.replace(":!PSK", "") : undefined;
}

/** TLSSocket options with pskCallback, which Node.js honours on a TLSSocket but @types/node lists only for servers. */
export type ServerSocketOptions = tls.TLSSocketOptions & { pskCallback?: (socket: tls.TLSSocket, identity: string) => Buffer | null };

/** Options of the server side of an upgraded NBD socket (new tls.TLSSocket(socket, …)). */
export function serverSocketOptions(cfg: TlsConfig): ServerSocketOptions {
  const c = ciphers(cfg);
  const psk = cfg.psk ? new Map(cfg.psk.map((e) => [e.identity, e.key])) : null;
  return {
    isServer: true,
    secureContext: tls.createSecureContext({ cert: cfg.cert, key: cfg.key, ca: cfg.ca, ciphers: c, minVersion: "TLSv1.2" }),
    requestCert: cfg.verifyPeer,
    rejectUnauthorized: cfg.verifyPeer,
    ...(psk ? { pskCallback: (_socket: tls.TLSSocket, identity: string) => psk.get(identity) ?? null } : {}),
  };
}

/** TLS for the NBD server's STARTTLS (see HandshakeTls). */
export function handshakeTls(cfg: TlsConfig): HandshakeTls {
  return { mode: cfg.mode, options: serverSocketOptions(cfg), wrap: (socket, options) => new tls.TLSSocket(socket, options as tls.TLSSocketOptions), certError: clientCertError };
}

/**
 * tls.connect options of this node dialling a peer's NBD port (port B); NbdClient adds the socket
 * and host (the peer's certificate must name the address peers dial, e.g. IP:127.0.0.1).
 */
export function clientOptions(cfg: TlsConfig): Omit<tls.ConnectionOptions, "socket"> {
  const own = cfg.psk?.[0];
  const x509 = !!cfg.cert;
  return {
    minVersion: "TLSv1.2",
    ciphers: ciphers(cfg),
    // With X.509, the peer's certificate is checked against the CA (or this node's own self-signed certificate).
    ...(x509 ? { ca: cfg.ca ?? cfg.cert, cert: cfg.clientCert, key: cfg.clientKey, rejectUnauthorized: true } : {}),
    ...(own && !x509
      ? {
          // PSK alone authenticates both ends: there is no certificate to check.
          pskCallback: () => ({ identity: own.identity, psk: own.key }),
          checkServerIdentity: () => undefined,
        }
      : {}),
  };
}

/**
 * Why the client certificate of a server-side TLSSocket failed verification, or null if it passed.
 * Node.js checks it only for sockets its own tls.Server made (onServerSocketSecure); an upgraded
 * socket has to ask the handle the same way. Fails closed if this Node.js lacks the call.
 */
export function clientCertError(t: tls.TLSSocket): string | null {
  const handle = (t as unknown as { _handle?: { verifyError?: () => unknown } })._handle;
  if (typeof handle?.verifyError !== "function") return "cannot verify the client certificate on this Node.js";
  const v = handle.verifyError();
  if (v === null || v === undefined) return null;
  if (typeof v === "string") return v;
  return String((v as { code?: unknown }).code ?? (v as Error).message ?? v);
}
