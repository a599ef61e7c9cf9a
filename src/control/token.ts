import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

/**
 * The bearer token that mutating control calls need. Nodes of a cluster and the CLI share it
 * through one file: by default a per-user file created with mode 0600 at the first start, so
 * local examples work without flags. NBDSTACK_TOKEN_FILE or --token-file name another file.
 */
export function defaultTokenFile(): string {
  if (process.env.NBDSTACK_TOKEN_FILE) return process.env.NBDSTACK_TOKEN_FILE;
  const base = process.env.XDG_CONFIG_HOME || path.join(os.homedir(), ".config");
  return path.join(base, "nbdstack", "token");
}

/** Reads the token file, creating it (0600, in a 0700 directory) with a random token if missing. */
export function loadOrCreateToken(file = defaultTokenFile()): string {
  try {
    return readToken(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
  }
  fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o700 });
  const token = crypto.randomBytes(32).toString("hex");
  try {
    fs.writeFileSync(file, token + "\n", { mode: 0o600, flag: "wx" });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err; // another node was first
  }
  return readToken(file);
}

export function readToken(file = defaultTokenFile()): string {
  const t = fs.readFileSync(file, "utf8").trim();
  if (t.length < 16) throw new Error(`${file}: the token is too short (at least 16 characters)`);
  return t;
}

/** Constant-time comparison of an Authorization header with the token. */
export function tokenMatches(header: string | undefined, token: string): boolean {
  const m = /^Bearer (.+)$/.exec(header ?? "");
  if (!m) return false;
  const a = Buffer.from(m[1]!);
  const b = Buffer.from(token);
  return a.length === b.length && crypto.timingSafeEqual(a, b);
}
