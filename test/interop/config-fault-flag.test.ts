import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { NbdClient } from "../../src/client/nbd-client.js";
import { controlCall } from "../../src/control/control-client.js";
import { blankImage, controlUrl, nbdAddress as addr, serve, tempDir } from "../helpers/serve.js";

const MiB = 1024 * 1024;
/**
 * `--fault` and `--fault-powerloss` put a fault layer directly above each export's port — exports
 * declared in a config file included (they were once silently left without one). A stack that
 * declares its own fault layer under the export's name keeps it, and gets no second one. A
 * partition table that cannot be read (here: a fault rule on its sector) leaves the whole-device
 * export served.
 */
describe("--fault with exports from a config file", () => {
  it("gives a declared stack a fault layer above its port, steerable by the export's name, with the power-loss cache", async () => {
    const dir = tempDir();
    for (const f of ["a.img", "b.img"]) blankImage(path.join(dir, f), 4 * MiB);
    fs.writeFileSync(
      path.join(dir, "c.yaml"),
      "exports:\n  - name: plain\n    stack: file:a.img\n  - name: own\n    stack: file:b.img → fault:op=pread,errno=EIO,range=0-512\n",
    );
    const srv = await serve(["--config", path.join(dir, "c.yaml"), "--fault-powerloss"], 3);
    try {
      const ctl = controlUrl(srv);
      const plain = srv.uris.find((u) => u.endsWith("/plain"))!;
      const own = srv.uris.find((u) => u.endsWith("/own"))!;
      // plain: a fault layer answers to its name, and its rules fire.
      await controlCall(ctl, "POST", "v1/exports/plain/faults", { add: "op=pread,errno=EIO,range=0-512" });
      const c = await NbdClient.connect(addr(plain), { exportName: "plain" });
      await expect(c.pread(512, 0)).rejects.toMatchObject({ errno: "EIO" });
      // …with the power-loss cache: an unflushed write never reaches the image before a flush.
      await c.pwrite(Buffer.alloc(4096, 0x5a), MiB);
      expect(fs.readFileSync(path.join(dir, "a.img")).subarray(MiB, MiB + 4096).every((b) => b === 0)).toBe(true);
      await c.flush();
      expect(fs.readFileSync(path.join(dir, "a.img")).subarray(MiB, MiB + 4096).every((b) => b === 0x5a)).toBe(true);
      await c.disconnect();
      // own: its declared layer is the one the name steers (its declared rule is there), and only one.
      const f = await controlCall<{ rules: Array<{ text: string }> }>(ctl, "GET", "v1/exports/own/faults");
      expect(f.rules.map((r) => r.text)).toEqual(["op=pread,errno=EIO,range=0-512"]);
      const d = await NbdClient.connect(addr(own), { exportName: "own" });
      await expect(d.pread(512, 0)).rejects.toMatchObject({ errno: "EIO" });
      await d.disconnect();
      // That rule also failed the read of own's partition table at start: served anyway, the reason logged.
      expect(srv.stderr()).toMatch(/"export":"own".*partition table unreadable: injected EIO/);
    } finally {
      await srv.stop();
    }
  });
});
