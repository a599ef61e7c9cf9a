import fs from "node:fs";
import path from "node:path";
import { execFileSync } from "node:child_process";
import { pathToFileURL } from "node:url";
import { afterAll, describe, expect, it } from "vitest";
import { blankImage, ROOT, serve, tempDir } from "../helpers/serve.js";
import { needTools } from "../helpers/tools.js";

// A server of plain image files holds only the code it serves them with: the layers other stacks
// name, the cluster node, etcd, TLS, the control API and the other commands' code are imported when
// they are used (a few MiB
// of memory each; README, "Memory under hostile clients"). Checked through the modules the process
// imports, recorded by a module hook.

const dir = tempDir("nbdstack-lazy-");
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));
const hook = pathToFileURL(path.join(ROOT, "test/helpers/record-modules.mjs")).href;

/** The modules `nbdstack serve ARGS` imported while it served one nbdinfo call: paths under dist/, and node: builtins. */
async function modulesOf(args: string[], name: string): Promise<string[]> {
  const log = path.join(dir, `${name}.modules`);
  const s = await serve(args, 1, { NODE_OPTIONS: `--import=${hook}`, NBDSTACK_MODULE_LOG: log });
  try {
    execFileSync("nbdinfo", ["--size", s.uri], { stdio: "pipe" });
  } finally {
    await s.stop();
  }
  const dist = pathToFileURL(path.join(ROOT, "dist")).href + "/";
  return [...new Set(fs.readFileSync(log, "utf8").split("\n"))].flatMap((u) => (u.startsWith(dist) ? [u.slice(dist.length)] : u.startsWith("node:") ? [u] : []));
}

const ONLY_WHEN_USED = [
  "stack/qcow2/qcow2-layer.js",
  "stack/volume/cow-layer.js",
  "stack/volume/mirror-layer.js",
  "stack/fault/fault-layer.js",
  "stack/fs/fs-file-layer.js",
  "stack/port/memory-port.js",
  "stack/port/port-pair.js",
  "node/storage-node.js",
  "coord/etcd-node.js",
  "control/control-server.js",
  "server/loop-pool.js",
  "tls/tls-config.js",
  "client/nbd-client.js",
  "bench/run.js",
  "fs/probe.js",
  "commands/progress-bar.js",
  "node:tls",
  "node:https",
];

describe.skipIf(!needTools("nbdinfo"))("serve imports code when it is used", () => {
  it("a plain image file: none of the other layers, the node, etcd, TLS, the control API or other commands", async () => {
    const img = blankImage(path.join(dir, "plain.img"), 1 << 20);
    const loaded = await modulesOf([img], "plain");
    expect(loaded).toContain("stack/port/file-port.js");
    expect(loaded).toContain("server/connection.js");
    expect(loaded.filter((m) => ONLY_WHEN_USED.includes(m))).toEqual([]);
  });

  it("the same file with a fault layer: its code and the control API that steers it are imported", async () => {
    const img = blankImage(path.join(dir, "fault.img"), 1 << 20);
    const loaded = await modulesOf([img, "--fault", "--token-file", path.join(dir, "token")], "fault");
    expect(loaded).toContain("stack/fault/fault-layer.js");
    expect(loaded).toContain("control/control-server.js");
    expect(loaded).not.toContain("stack/qcow2/qcow2-layer.js");
    expect(loaded).not.toContain("node:https"); // the control API without TLS
  });

  it("a cluster node's export: the node's code, but not the file-system readers (--skip-free) or node:https", async () => {
    const img = blankImage(path.join(dir, "node.img"), 1 << 20);
    const cfg = path.join(dir, "node.yaml");
    fs.writeFileSync(cfg, `node-id: lazy\ncontrol: 127.0.0.1:0\nexports:\n  - name: ""\n    stack: file:${img}\n`);
    const loaded = await modulesOf(["--config", cfg, "--token-file", path.join(dir, "token")], "node");
    expect(loaded).toContain("node/storage-node.js");
    expect(loaded).toContain("control/control-server.js");
    expect(loaded).not.toContain("fs/probe.js");
    expect(loaded).not.toContain("node:https");
  });
});
