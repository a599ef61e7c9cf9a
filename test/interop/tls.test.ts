import { execFileSync, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { NbdClient, type ConnectOptions } from "../../src/client/nbd-client.js";
import { controlCall, getStatus, setControlCa } from "../../src/control/control-client.js";
import { randomImage, serve, sha256, tempDir, controlUrl, type Served } from "../helpers/serve.js";
import { debianEnv, needTools } from "../helpers/tools.js";

const MiB = 1024 * 1024;

/** Runs a client; never throws, so failures can be asserted on. */
function run(cmd: string, args: string[], env: NodeJS.ProcessEnv = {}) {
  const r = spawnSync(cmd, args, { encoding: "utf8", env: { ...debianEnv, ...env }, timeout: 30_000 });
  return { code: r.status, out: r.stdout, err: r.stderr };
}
function ok(cmd: string, args: string[]): string {
  const r = run(cmd, args);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(" ")} exited ${r.code}: ${r.err}`);
  return r.out;
}

/** certtool in batch mode: a template file per certificate. */
function certtool(dir: string, args: string[], template?: string): void {
  const t = path.join(dir, `t${Math.random().toString(36).slice(2)}.info`);
  if (template) fs.writeFileSync(t, template);
  execFileSync("certtool", [...args, ...(template ? ["--template", t] : [])], { stdio: ["ignore", "ignore", "pipe"] });
  if (template) fs.rmSync(t);
}

/**
 * A CA, a server certificate for 127.0.0.1/localhost (also good as a client certificate, so nodes
 * can show it to peers) and a client certificate, in the layout nbdkit, qemu and libnbd read.
 */
function makePki(dir: string, name: string): void {
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
}

/** Waits until the server logged a line matching `re` (clients run synchronously, so its stderr arrives late). */
async function logged(s: Served, re: RegExp): Promise<void> {
  for (let i = 0; i < 100 && !re.test(s.stderr()); i++) await new Promise((r) => setTimeout(r, 20));
  expect(s.stderr()).toMatch(re);
}

const port = (s: Served) => new URL(s.uri).port;
const qemuX509 = (dir: string) => `tls-creds-x509,id=tls0,endpoint=client,dir=${dir}`;
const qemuPsk = (dir: string, user = "alice") => `tls-creds-psk,id=tls0,endpoint=client,dir=${dir},username=${user}`;
const qemuNbd = (s: Served, exp: string) => `driver=nbd,host=127.0.0.1,port=${port(s)},export=${exp},tls-creds=tls0`;

describe.skipIf(!needTools("certtool", "psktool", "nbdinfo", "nbdsh", "qemu-img"))("TLS with real clients", () => {
  let dir: string;
  let pki: string;
  let otherPki: string;
  let pskDir: string;
  let img: string;
  const servers: Served[] = [];
  const start = async (args: string[], n = 2) => {
    const s = await serve([img, path.join(dir, "target.img"), "--name", "disk", "--name", "target", ...args], n);
    servers.push(s);
    return s;
  };

  beforeAll(() => {
    dir = tempDir();
    pki = path.join(dir, "pki");
    otherPki = path.join(dir, "other");
    makePki(pki, "test");
    makePki(otherPki, "other");
    pskDir = path.join(dir, "psk");
    fs.mkdirSync(pskDir);
    execFileSync("psktool", ["-u", "alice", "-p", path.join(pskDir, "keys.psk")], { stdio: "ignore" });
    // The same identity with another key.
    fs.mkdirSync(path.join(dir, "badpsk"));
    execFileSync("psktool", ["-u", "alice", "-p", path.join(dir, "badpsk", "keys.psk")], { stdio: "ignore" });
    img = path.join(dir, "disk.img");
    randomImage(img, 16 * MiB, 11);
    fs.writeFileSync(path.join(dir, "target.img"), "");
    fs.truncateSync(path.join(dir, "target.img"), 16 * MiB);
  });
  afterAll(async () => {
    await Promise.all(servers.map((s) => s.stop()));
  });

  describe("X.509 (--tls-certificates, require by default)", () => {
    let srv: Served;
    beforeAll(async () => {
      srv = await start(["--tls-certificates", pki]);
    });

    it("prints nbds:// URIs; nbdinfo connects over TLS and lists exports", () => {
      expect(srv.uri).toMatch(/^nbds:\/\/127\.0\.0\.1:\d+\/disk$/);
      const info = ok("nbdinfo", [`${srv.uri}?tls-certificates=${pki}`]);
      expect(info).toMatch(/with TLS/);
      expect(info).toMatch(/export-size: 16777216/);
      const list = ok("nbdinfo", ["--list", `nbds://127.0.0.1:${port(srv)}/?tls-certificates=${pki}`]);
      expect(list).toMatch(/export="disk"/);
      expect(list).toMatch(/export="target"/);
    });

    it("qemu-img reads and writes through tls-creds-x509, byte for byte", () => {
      const info = JSON.parse(ok("qemu-img", ["info", "--output=json", "--object", qemuX509(pki), "--image-opts", qemuNbd(srv, "disk")]));
      expect(info["virtual-size"]).toBe(16 * MiB);
      const out = path.join(dir, "x509-out.raw");
      ok("qemu-img", ["convert", "--object", qemuX509(pki), "--image-opts", qemuNbd(srv, "disk"), "-O", "raw", out]);
      expect(sha256(out)).toBe(sha256(img));
      ok("qemu-img", ["convert", "-n", "--object", qemuX509(pki), "-f", "raw", img, "--target-image-opts", qemuNbd(srv, "target")]);
      ok("qemu-img", ["compare", "--object", qemuX509(pki), "--image-opts", `driver=raw,file.driver=file,file.filename=${img}`, qemuNbd(srv, "target")]);
      expect(sha256(path.join(dir, "target.img"))).toBe(sha256(img));
    });

    it("refuses plain clients: NBD_REP_ERR_TLS_REQD to options, nbdinfo fails", () => {
      const r = run("nbdinfo", [`nbd://127.0.0.1:${port(srv)}/disk`], { LIBNBD_DEBUG: "1" });
      expect(r.code).not.toBe(0);
      expect(r.err).toMatch(/TLS is required/);
      const out = ok("nbdsh", [
        "-c",
        `h.set_opt_mode(True)
h.connect_uri("nbd://127.0.0.1:${port(srv)}/disk")
print("negotiated", h.get_tls_negotiated())
for name, f in (("list", lambda: h.opt_list(lambda n, d: 0)), ("info", h.opt_info), ("go", h.opt_go)):
    try:
        f()
        print(name, "ok")
    except nbd.Error as e:
        print(name, "refused", e.errno)`,
      ]);
      expect(out).toMatch(/negotiated False/);
      expect(out).toMatch(/list refused ENOTSUP/);
      expect(out).toMatch(/info refused ENOTSUP/);
      expect(out).toMatch(/go refused ENOTSUP/);
    });

    it("a client trusting another CA refuses the server", () => {
      const r = run("nbdinfo", [`${srv.uri}?tls-certificates=${otherPki}`]);
      expect(r.code).not.toBe(0);
      expect(r.err).toMatch(/certificate verification/i);
      const q = run("qemu-img", ["info", "--object", qemuX509(otherPki), "--image-opts", qemuNbd(srv, "disk")]);
      expect(q.code).not.toBe(0);
      expect(q.err).toMatch(/certificate/i);
    });
  });

  describe("X.509 with --tls-verify-peer", () => {
    let srv: Served;
    beforeAll(async () => {
      srv = await start(["--tls-cert", path.join(pki, "server-cert.pem"), "--tls-key", path.join(pki, "server-key.pem"), "--tls-ca", path.join(pki, "ca-cert.pem"), "--tls-verify-peer"]);
    });

    it("accepts a client certificate of the CA (nbdinfo and qemu-img)", async () => {
      expect(ok("nbdinfo", [`${srv.uri}?tls-certificates=${pki}`])).toMatch(/with TLS/);
      ok("qemu-img", ["compare", "--object", qemuX509(pki), "--image-opts", `driver=raw,file.driver=file,file.filename=${img}`, qemuNbd(srv, "disk")]);
      await logged(srv, /"client":"test-client".*"TLS established"/);
    });

    it("refuses a client without a certificate, or with one of another CA", async () => {
      const noCert = path.join(dir, "ca-only");
      fs.mkdirSync(noCert, { recursive: true });
      fs.copyFileSync(path.join(pki, "ca-cert.pem"), path.join(noCert, "ca-cert.pem"));
      expect(run("nbdinfo", [`${srv.uri}?tls-certificates=${noCert}`]).code).not.toBe(0);
      const mixed = path.join(dir, "mixed");
      fs.mkdirSync(mixed, { recursive: true });
      fs.copyFileSync(path.join(pki, "ca-cert.pem"), path.join(mixed, "ca-cert.pem"));
      for (const f of ["client-cert.pem", "client-key.pem"]) fs.copyFileSync(path.join(otherPki, f), path.join(mixed, f));
      expect(run("nbdinfo", [`${srv.uri}?tls-certificates=${mixed}`]).code).not.toBe(0); // gnutls does not even send it
      await logged(srv, /peer did not return a certificate/);
      // A client that does send a certificate of another CA.
      const o = (n: string) => fs.readFileSync(path.join(otherPki, n));
      const u = new URL(srv.uri);
      const tls = { ca: fs.readFileSync(path.join(pki, "ca-cert.pem")), cert: o("client-cert.pem"), key: o("client-key.pem") };
      await expect(NbdClient.connect({ host: u.hostname, port: Number(u.port) }, { exportName: "disk", tls })).rejects.toThrow();
      await logged(srv, /client certificate refused: UNABLE_TO_VERIFY_LEAF_SIGNATURE/);
    });
  });

  describe("PSK (--tls-psk, psktool's file)", () => {
    let srv: Served;
    beforeAll(async () => {
      srv = await start(["--tls-psk", path.join(pskDir, "keys.psk")]);
    });

    it("nbdinfo connects with tls-psk-file", async () => {
      const out = ok("nbdinfo", [`nbds://alice@127.0.0.1:${port(srv)}/disk?tls-psk-file=${path.join(pskDir, "keys.psk")}`]);
      expect(out).toMatch(/with TLS/);
      await logged(srv, /"client":"alice".*"TLS established"/);
    });

    it("qemu-img reads and writes through tls-creds-psk, byte for byte", () => {
      const out = path.join(dir, "psk-out.raw");
      ok("qemu-img", ["convert", "--object", qemuPsk(pskDir), "--image-opts", qemuNbd(srv, "disk"), "-O", "raw", out]);
      expect(sha256(out)).toBe(sha256(img));
      fs.truncateSync(path.join(dir, "target.img"), 0);
      fs.truncateSync(path.join(dir, "target.img"), 16 * MiB);
      ok("qemu-img", ["convert", "-n", "--object", qemuPsk(pskDir), "-f", "raw", img, "--target-image-opts", qemuNbd(srv, "target")]);
      ok("qemu-img", ["compare", "--object", qemuPsk(pskDir), "--image-opts", `driver=raw,file.driver=file,file.filename=${img}`, qemuNbd(srv, "target")]);
    });

    it("refuses a wrong key and an unknown identity", async () => {
      const bad = run("nbdinfo", [`nbds://alice@127.0.0.1:${port(srv)}/disk?tls-psk-file=${path.join(dir, "badpsk", "keys.psk")}`]);
      expect(bad.code).not.toBe(0);
      expect(bad.err).toMatch(/TLS|gnutls/);
      const q = run("qemu-img", ["info", "--object", qemuPsk(path.join(dir, "badpsk")), "--image-opts", qemuNbd(srv, "disk")]);
      expect(q.code).not.toBe(0);
      const stranger = path.join(dir, "bob.psk");
      execFileSync("psktool", ["-u", "bob", "-p", stranger], { stdio: "ignore" });
      expect(run("nbdinfo", [`nbds://bob@127.0.0.1:${port(srv)}/disk?tls-psk-file=${stranger}`]).code).not.toBe(0);
      await logged(srv, /unknown PSK identity \\"bob\\"/);
      // The server is still fine.
      expect(ok("nbdinfo", [`nbds://alice@127.0.0.1:${port(srv)}/disk?tls-psk-file=${path.join(pskDir, "keys.psk")}`])).toMatch(/with TLS/);
    });
  });

  describe("--tls on", () => {
    it("offers TLS and serves plain clients too", async () => {
      const srv = await start(["--tls", "on", "--tls-psk", path.join(pskDir, "keys.psk")]);
      expect(ok("nbdinfo", [`nbd://127.0.0.1:${port(srv)}/disk`])).toMatch(/without TLS/);
      expect(ok("nbdinfo", [`nbds://alice@127.0.0.1:${port(srv)}/disk?tls-psk-file=${path.join(pskDir, "keys.psk")}`])).toMatch(/with TLS/);
    });
  });
});

describe.skipIf(!needTools("certtool", "psktool"))("two TLS nodes", () => {
  let dir: string;
  let pki: string;
  let nodes: Served[] = [];
  beforeAll(() => {
    dir = tempDir();
    pki = path.join(dir, "pki");
    makePki(pki, "cluster");
    execFileSync("psktool", ["-u", "node", "-p", path.join(dir, "keys.psk")], { stdio: "ignore" });
  });
  afterEach(async () => {
    await Promise.all(nodes.map((n) => n.stop("SIGKILL")));
    nodes = [];
    setControlCa(null);
  });

  async function migrateOverTls(tlsArgs: string[], client: ConnectOptions["tls"], scheme: string) {
    const img = path.join(dir, `disk-${scheme}.img`);
    fs.writeFileSync(img, "");
    fs.truncateSync(img, 16 * MiB);
    const a = await serve([img, "--name", "disk", "--node-id", "a", ...tlsArgs], 2);
    nodes.push(a);
    const b = await serve([img, "--name", "disk", "--node-id", "b", ...tlsArgs], 2);
    nodes.push(b);
    expect(controlUrl(a)).toMatch(new RegExp(`^${scheme}://`));
    const u = new URL(a.uri);
    const c = await NbdClient.connect({ host: u.hostname, port: Number(u.port) }, { exportName: "disk", tls: client });
    const data = Buffer.alloc(MiB);
    for (let i = 0; i < data.length; i++) data[i] = (i * 13) & 0xff;
    await c.pwrite(data, 2 * MiB);
    await controlCall(controlUrl(a), "POST", "v1/exports/disk/migrate", { to: controlUrl(b) });
    expect((await getStatus(controlUrl(b))).exports[0]).toMatchObject({ owner: "b", state: "LOCAL" });
    expect((await getStatus(controlUrl(a))).exports[0]).toMatchObject({ owner: "b", state: "REMOTE" });
    // Through a's port B, over TLS, to b.
    await c.pwrite(data.subarray(0, 4096), 0);
    await c.flush();
    expect((await c.pread(data.length, 2 * MiB)).equals(data)).toBe(true);
    await c.disconnect();
    expect(b.stderr()).toMatch(/"portB":true[^\n]*"tls":true[^\n]*"transmission started"/);
    expect(b.stderr()).not.toMatch(/"portB":true[^\n]*"tls":false/);
  }

  it("X.509 with --tls-verify-peer: port B and the control API (HTTPS) use the node's certificates", async () => {
    setControlCa(fs.readFileSync(path.join(pki, "ca-cert.pem")));
    const f = (n: string) => fs.readFileSync(path.join(pki, n));
    await migrateOverTls(["--tls-certificates", pki, "--tls-verify-peer"], { ca: f("ca-cert.pem"), cert: f("client-cert.pem"), key: f("client-key.pem") }, "https");
  });

  it("PSK: port B uses the node's own PSK identity; the control API stays HTTP", async () => {
    const [identity, hex] = fs.readFileSync(path.join(dir, "keys.psk"), "utf8").trim().split(":");
    const psk = Buffer.from(hex!, "hex");
    await migrateOverTls(["--tls-psk", path.join(dir, "keys.psk")], { pskCallback: () => ({ identity: identity!, psk }), checkServerIdentity: () => undefined }, "http");
  });
});
