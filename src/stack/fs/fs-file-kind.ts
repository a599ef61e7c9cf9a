import { str } from "../../config/values.js";
import { lazyCode, type LayerKind } from "../layer-kind.js";
import type { FileMap } from "./fs-file-layer.js";

const code = lazyCode("fs-file", () => import("./fs-file-layer.js"));

export interface FsFileSpec {
  kind: "fs-file";
  /** Absolute inside the file system. */
  path: string;
}

/** `file:PATH` above the bottom (or `fs-file:PATH`): one file inside the ext2/3/4 or FAT file system below. */
export const fsFileKind: LayerKind<FsFileSpec, FileMap> = {
  name: "fs-file",
  coherentAcrossProcesses: true,
  summary: "one file inside the ext2/3/4 or FAT file system below, as a device",
  argument: "PATH: the file's path inside the file system; written file:PATH above the bottom",
  options: {},
  selectsPart: true,
  writtenAbove: ["file"],
  parse(arg, _opts, at) {
    const p = str(arg, at.key, "the path of a file inside the file system below");
    return { kind: "fs-file", path: p.startsWith("/") ? p : `/${p}` };
  },
  format: (s) => `file:${s.path}`,
  // Once the device below is open: find the file system and the file, and read where its bytes are.
  load: code.load,
  prepare: (s, below) => code.get().readFileMap(below, s.path),
  above: (s, below, _ctx, map) => new (code.get().FsFileLayer)(below, s.path, map),
};
