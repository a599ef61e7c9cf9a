import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { loadConfig, validateConfig } from "./config-file.js";
import { formatStack, parseStackLine } from "./stack-spec.js";

const ctx = { baseDir: "/srv" };

describe("stack declarations", () => {
  it("reads the one-line form bottom-up, resolving paths against the config's directory", () => {
    const s = parseStackLine("file:base.img → cow:overlay.img -> partition:2 → fault:op=pread,errno=EIO", "stack", ctx);
    expect(s).toEqual([
      { kind: "file", path: "/srv/base.img" },
      { kind: "cow", overlay: "/srv/overlay.img" },
      { kind: "partition", index: 2 },
      { kind: "fault", rules: ["op=pread,errno=EIO"] },
    ]);
    expect(formatStack(s)).toBe("file:/srv/base.img → cow:/srv/overlay.img → partition:2 → fault:op=pread,errno=EIO");
  });

  it("treats file: above the bottom as a file inside the file system below", () => {
    expect(parseStackLine("file:/a.img → partition:1 → file:images/vm.img", "s", ctx)[2]).toEqual({ kind: "fs-file", path: "/images/vm.img" });
  });

  it("reads the list form with options and nested devices", () => {
    const cfg = validateConfig(
      {
        exports: [
          {
            name: "m",
            stack: [{ mirror: ["file:a.img", [{ file: "b.img" }, { fault: null, seed: 3, id: "legb" }]] }, { cow: "o.img", "block-size": "128k" }],
          },
          { name: "s", stack: [{ stripe: ["memory:1M", "memory:1M"], chunk: "4k" }], partitions: false },
        ],
      },
      "/srv",
    );
    expect(cfg.exports[0]!.stack).toEqual([
      {
        kind: "mirror",
        devices: [
          [{ kind: "file", path: "/srv/a.img" }],
          [
            { kind: "file", path: "/srv/b.img" },
            { kind: "fault", rules: [], seed: 3, id: "legb" },
          ],
        ],
      },
      { kind: "cow", overlay: "/srv/o.img", blockSize: 131072 },
    ]);
    expect(cfg.exports[1]).toMatchObject({ name: "s", partitions: false, stack: [{ kind: "stripe", chunk: 4096 }] });
  });

  const bad: Array<[unknown, RegExp]> = [
    [{}, /exports: expected a non-empty list/],
    [{ exports: [], listen: 1 }, /exports: expected a non-empty list/],
    [{ exports: [{ name: "a", stack: "file:a" }], lisen: "x" }, /^lisen: unknown key; expected one of exports, listen/],
    [{ exports: [{ stack: "file:a" }] }, /exports\[0\]\.name: expected an export name/],
    [{ exports: [{ name: "a" }] }, /exports\[0\]\.stack: missing/],
    [{ exports: [{ name: "a", stack: "file:a", partitons: true }] }, /exports\[0\]\.partitons: unknown key/],
    [{ exports: [{ name: "a", stack: "file:a" }, { name: "a", stack: "file:b" }] }, /exports\[1\]\.name: export "a" is declared twice/],
    [{ exports: [{ name: "a", stack: "partition:1" }] }, /exports\[0\]\.stack\[0\]: "partition" needs a device below it/],
    [{ exports: [{ name: "a", stack: "file:a → patition:1" }] }, /exports\[0\]\.stack\[1\]: unknown layer "patition"/],
    [{ exports: [{ name: "a", stack: "file:a → partition:x" }] }, /exports\[0\]\.stack\[1\]\.partition: expected a partition number/],
    [{ exports: [{ name: "a", stack: "file:a → memory:1M" }] }, /stack\[1\]: "memory" can only be at the bottom/],
    [{ exports: [{ name: "a", stack: [{ file: "a", "read-ony": true }] }] }, /stack\[0\]\.read-ony: unknown option of file; expected read-only/],
    [{ exports: [{ name: "a", stack: [{ stripe: ["file:a"], chunk: "big" }] }] }, /stack\[0\]\.chunk: expected a size/],
    [{ exports: [{ name: "a", stack: [{ mirror: "file:a" }] }] }, /stack\[0\]\.mirror: expected a list of at least 1 devices/],
    [{ exports: [{ name: "a", stack: [{ file: "a", cow: "b" }] }] }, /stack\[0\]: one layer per list item, found file and cow/],
    [{ exports: [{ name: "a", stack: "file:a → fault", "read-only": "yes" }] }, /exports\[0\]\.read-only: expected true or false/],
    [{ exports: [{ name: "a", stack: [{ fault: 3 }] }] }, /stack\[0\]: "fault" needs a device below it/],
    [{ exports: [{ name: "a", stack: ["file:a", { fault: 3 }] }] }, /stack\[1\]\.fault: expected a rule/],
    [{ exports: [{ name: "a", stack: "file:a" }], io: "fast" }, /^io: expected auto, sync or async/],
    [{ exports: [{ name: "a", stack: "file:a" }], etcd: 2379 }, /^etcd: /],
    [{ exports: [{ name: "a", stack: "file:a" }], "etcd-cacert": "" }, /^etcd-cacert: expected a file path/],
    [{ exports: [{ name: "a", stack: "file:a" }], "etcd-password": "x" }, /^etcd-password: unknown key/],
    [{ exports: [{ name: "a", stack: "file:a" }], threads: 0 }, /^threads: expected a positive integer/],
    [{ exports: [{ name: "a", stack: "file:a" }], threads: "2" }, /^threads: expected a positive integer/],
  ];
  it.each(bad)("rejects %j with an error naming the key", (doc, re) => {
    expect(() => validateConfig(doc, "/srv")).toThrow(re);
  });
});

describe("threads", () => {
  it("reads the number of event loops (serve --threads)", () => {
    expect(validateConfig({ exports: [{ name: "a", stack: "file:a" }], threads: 4 }, "/srv").threads).toBe(4);
    expect(validateConfig({ exports: [{ name: "a", stack: "file:a" }] }, "/srv").threads).toBeUndefined();
  });
});

describe("etcd keys", () => {
  it("reads the endpoints as a list or one comma-separated string, and resolves certificate paths against the config's directory", () => {
    const cfg = validateConfig({ exports: [{ name: "a", stack: "file:a" }], etcd: ["http://10.0.0.1:2379", "http://10.0.0.2:2379"], "etcd-prefix": "/c1", "etcd-cacert": "pki/ca.pem", "etcd-cert": "/etc/c.pem", "etcd-key": "pki/k.pem", "etcd-user": "nbd" }, "/srv");
    expect(cfg).toMatchObject({ etcd: ["http://10.0.0.1:2379", "http://10.0.0.2:2379"], etcdPrefix: "/c1", etcdCacert: "/srv/pki/ca.pem", etcdCert: "/etc/c.pem", etcdKey: "/srv/pki/k.pem", etcdUser: "nbd" });
    expect(validateConfig({ exports: [{ name: "a", stack: "file:a" }], etcd: "http://a:2379,http://b:2379" }, "/srv").etcd).toEqual(["http://a:2379", "http://b:2379"]);
  });
});

describe("config files", () => {
  it("loads YAML, names the file in errors, and reports YAML syntax errors with their line", () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdstack-cfg-"));
    try {
      const f = path.join(dir, "exports.yaml");
      fs.writeFileSync(f, "listen: 127.0.0.1:10900\nexports:\n  - name: vm\n    stack: file:base.img → cow:vm.cow → partition:1\n");
      const cfg = loadConfig(f);
      expect(cfg.listen).toEqual(["127.0.0.1:10900"]);
      expect(cfg.exports[0]!.stack[0]).toEqual({ kind: "file", path: path.join(dir, "base.img") });
      fs.writeFileSync(f, "exports:\n  - name: vm\n    stack: [file:a\n");
      expect(() => loadConfig(f)).toThrow(new RegExp(`${f}: .*at line \\d+, column \\d+`, "s"));
      fs.writeFileSync(f, "exports:\n  - name: vm\n    stak: file:a\n");
      expect(() => loadConfig(f)).toThrow(`${f}: exports[0].stak: unknown key`);
      expect(() => loadConfig(path.join(dir, "none.yaml"))).toThrow(/cannot read config/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
