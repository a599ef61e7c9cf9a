import { describe, expect, it } from "vitest";
import { formatStack, parseStack, parseStackLine, stackHelp } from "../config/stack-spec.js";
import { buildLayer, buildStack, loadKinds, StackHandles } from "./compose.js";
import { aboveKind, bottomKind, coherentAcrossProcesses, LAYER_KINDS } from "./kinds.js";
import { plainIo } from "./layer.js";
import { createMemoryPort } from "./port/memory-port.js";

const MiB = 1024 * 1024;
const ctx = () => ({ exportName: "t", readOnly: false, handles: new StackHandles() });

describe("the layer kinds", () => {
  it("are declared once each, and each may stand somewhere", () => {
    const names = LAYER_KINDS.map((k) => k.name);
    expect(new Set(names).size).toBe(names.length);
    for (const k of LAYER_KINDS) {
      expect(k.bottom || k.above, k.name).toBeTruthy();
      // A prepare hook only makes sense for a layer built over another.
      if (k.prepare) expect(k.above, k.name).toBeTruthy();
      for (const alias of k.writtenAbove ?? []) expect(aboveKind(alias), alias).toBe(k);
    }
    expect(bottomKind("file")?.name).toBe("file");
    expect(aboveKind("file")?.name).toBe("fs-file");
    expect(bottomKind("partition")).toBeUndefined();
    expect(aboveKind("memory")).toBeUndefined();
    // Exports whose stack serves a part of the device get no NAME/pN exports by default.
    expect(LAYER_KINDS.filter((k) => k.selectsPart).map((k) => k.name)).toEqual(["partition", "fs-file"]);
  });

  it("say which stacks every event loop of serve --threads may build: those keeping no state of their own", () => {
    expect(LAYER_KINDS.filter((k) => k.coherentAcrossProcesses).map((k) => k.name)).toEqual(["file", "concat", "stripe", "partition", "fs-file"]);
    const at = { baseDir: "/" };
    expect(coherentAcrossProcesses(parseStackLine("file:a.img → partition:1 → file:/disk.img", "s", at))).toBe(true);
    expect(coherentAcrossProcesses(parseStack([{ stripe: ["file:a", "file:b"] }, "partition:2"], "s", at))).toBe(true);
    expect(coherentAcrossProcesses(parseStack([{ concat: ["file:a", "memory:1M"] }], "s", at))).toBe(false);
    expect(coherentAcrossProcesses(parseStack([{ mirror: ["file:a", "file:b"] }], "s", at))).toBe(false);
    expect(coherentAcrossProcesses(parseStackLine("file:a.img → cow:a.cow", "s", at))).toBe(false);
    expect(coherentAcrossProcesses(parseStackLine("file:a.img → fault", "s", at))).toBe(false);
  });

  it("give the one-line form for logs and descriptions, which parses back where it is not a volume", () => {
    const at = { baseDir: "/" };
    const line = "file:/a.img → cow:/o.cow → partition:2 → file:/vm.img → fault:op=pread,errno=EIO";
    expect(parseStackLine(formatStack(parseStackLine(line, "s", at)), "s", at)).toEqual(parseStackLine(line, "s", at));
    const volume = parseStack([{ stripe: ["memory:64k", "file:/b → partition:1"], chunk: "4k" }, "fault"], "s", at);
    expect(formatStack(volume)).toBe("stripe[4096](memory:65536, file:/b → partition:1) → fault");
    expect(formatStack(parseStack([{ mirror: ["file:/a", { concat: ["memory:512"] }] }], "s", at))).toBe("mirror(file:/a, concat(memory:512))");
  });

  it("build a stack bottom-up; partition reads the table in its prepare hook, once the device below is open", async () => {
    const handles = new StackHandles();
    const c = { ...ctx(), handles };
    const stack = parseStackLine("memory:4M → fault → partition:1", "s", { baseDir: "/" });
    // A kind's layer code is loaded when a stack names it: building before that says so.
    expect(() => buildStack(stack, c)).toThrow("the memory layer's code is not loaded: build stacks after loadKinds()");
    await loadKinds(stack);
    const layer = buildStack(stack, c);
    expect(layer.describe()).toBe("partition 1 → fault(0 rules) → memory:4194304");
    expect(handles.faults.has("t")).toBe(true);
    await expect(layer.open()).rejects.toThrow("partition 1: no partition table on fault(0 rules) → memory:4194304");

    // One MBR entry: partition 1 from sector 2048, 2048 sectors long.
    const mbr = Buffer.alloc(512);
    mbr[450] = 0x83;
    mbr.writeUInt32LE(2048, 454);
    mbr.writeUInt32LE(2048, 458);
    mbr.writeUInt16LE(0xaa55, 510);
    const port = createMemoryPort({ size: 4 * MiB });
    await port.pwrite(mbr, 0, plainIo);
    await port.pwrite(Buffer.alloc(512, 7), MiB, plainIo);
    const disk = buildLayer({ kind: "partition", index: 1 }, port, ctx());
    await disk.open();
    expect(disk.size()).toBe(MiB);
    expect(disk.describe()).toMatch(/^partition 1 \(mbr, 1048576 bytes at 1048576\) → memory:4194304$/);
    const b = Buffer.alloc(512);
    await disk.pread(b, 0, plainIo);
    expect(b.every((x) => x === 7)).toBe(true);
    await disk.close();
  });

  it("write the stack help from their declarations", () => {
    const help = stackHelp();
    for (const k of LAYER_KINDS) expect(help).toContain(`  ${k.name} ${k.argument}`);
    expect(help).toContain("chunk: the stripe chunk");
  });
});
