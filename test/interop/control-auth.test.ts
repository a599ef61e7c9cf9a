import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { CLI, serve, tempDir, controlUrl } from "../helpers/serve.js";

describe("control API access", () => {
  it("creates the token file (0600), refuses mutating calls without the right token, and lets status through", async () => {
    const dir = tempDir();
    const tokenFile = path.join(dir, "sub", "token");
    const img = path.join(dir, "disk.img");
    fs.writeFileSync(img, "");
    fs.truncateSync(img, 4 * 1024 * 1024);
    const srv = await serve([img, "--name", "disk", "--node-id", "a", "--fault", "--token-file", tokenFile], 2);
    try {
      const ctl = controlUrl(srv);
      expect(fs.statSync(tokenFile).mode & 0o777).toBe(0o600);
      expect(fs.statSync(path.dirname(tokenFile)).mode & 0o777).toBe(0o700);
      const token = fs.readFileSync(tokenFile, "utf8").trim();
      expect(token).toMatch(/^[0-9a-f]{64}$/);

      const post = (auth?: string) =>
        fetch(`${ctl}/v1/exports/disk/faults`, {
          method: "POST",
          headers: { "content-type": "application/json", ...(auth ? { authorization: auth } : {}) },
          body: JSON.stringify({ add: "op=pread,errno=EIO" }),
        });
      expect((await post()).status).toBe(401);
      expect((await post("Bearer wrong-token-wrong-token")).status).toBe(401);
      expect((await post(`Basic ${token}`)).status).toBe(401);
      expect((await post(`Bearer ${token}`)).status).toBe(200);
      expect((await fetch(`${ctl}/v1/status`)).status).toBe(200); // read-only calls stay open
      expect((await fetch(`${ctl}/v1/exports/disk/faults`)).status).toBe(200);

      // The CLI reads the same file; with another token it is refused.
      const ok = spawnSync(process.execPath, [CLI, "fault", "disk", "--control", ctl, "--clear", "--token-file", tokenFile], { encoding: "utf8" });
      expect(ok.status).toBe(0);
      const other = path.join(dir, "other");
      fs.writeFileSync(other, "0123456789abcdef0123456789abcdef\n", { mode: 0o600 });
      const bad = spawnSync(process.execPath, [CLI, "fault", "disk", "--control", ctl, "--clear", "--token-file", other], { encoding: "utf8" });
      expect(bad.status).toBe(1);
      expect(bad.stderr).toMatch(/401 a bearer token is needed/);
      for (let i = 0; i < 40 && !/control call refused/.test(srv.stderr()); i++) await new Promise((r) => setTimeout(r, 25));
      expect(srv.stderr()).toMatch(/"from":"(::ffff:)?127\.0\.0\.1".*"msg":"control call refused: missing or wrong token"/);
    } finally {
      await srv.stop();
    }
  });
});
