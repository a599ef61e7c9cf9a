import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { loadTlsConfig, readPskFile } from "./tls-config.js";

const dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdstack-tls-"));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));
const file = (name: string, text: string) => {
  const f = path.join(dir, name);
  fs.writeFileSync(f, text);
  return f;
};

describe("TLS configuration", () => {
  it("reads psktool's format", () => {
    const f = file("keys.psk", "alice:00ff10\n\n# comment\nbob:0a0b\n");
    expect(readPskFile(f)).toEqual([
      { identity: "alice", key: Buffer.from([0, 255, 16]) },
      { identity: "bob", key: Buffer.from([10, 11]) },
    ]);
    expect(() => readPskFile(file("bad.psk", "alice:xyz\n"))).toThrow(/identity:hexkey/);
    expect(() => readPskFile(file("empty.psk", "\n"))).toThrow(/no PSK identity/);
  });

  it("is off without credentials, require with them, and on only when asked", () => {
    const psk = file("k.psk", "alice:00112233\n");
    expect(loadTlsConfig({})).toBeNull();
    expect(loadTlsConfig({ tlsPsk: psk })?.mode).toBe("require");
    expect(loadTlsConfig({ tlsPsk: psk, tls: "on" })?.mode).toBe("on");
    expect(loadTlsConfig({ tlsPsk: psk, tls: "off" })).toBeNull();
    expect(() => loadTlsConfig({ tls: "require" })).toThrow(/needs credentials/);
    expect(() => loadTlsConfig({ tlsPsk: psk, tlsVerifyPeer: true })).toThrow(/X.509/);
    expect(() => loadTlsConfig({ tlsCert: psk })).toThrow(/go together/);
    expect(() => loadTlsConfig({ tlsCertificates: path.join(dir, "missing") })).toThrow(/no such directory/);
  });
});
