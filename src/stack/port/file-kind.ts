import { bool, str } from "../../config/values.js";
import type { LayerKind } from "../layer-kind.js";
import { createFilePort } from "./file-port.js";

export interface FileSpec {
  kind: "file";
  path: string;
  readOnly?: boolean;
}

/** `file:IMAGE` at the bottom of a stack (above the bottom, `file:` is fs-file). */
export const fileKind: LayerKind<FileSpec, void, "read-only"> = {
  name: "file",
  coherentAcrossProcesses: true,
  summary: "an image file (raw), the device at the bottom",
  argument: "IMAGE: the image's path, relative to the config file",
  options: { "read-only": "true: open the image read-only whatever the export allows" },
  parse(arg, opts, at) {
    const p = str(arg, at.key, "an image path");
    return { kind: "file", path: at.resolve(p), ...(opts["read-only"] !== undefined ? { readOnly: bool(opts["read-only"], at.option("read-only")) } : {}) };
  },
  format: (s) => `file:${s.path}`,
  // An image under a cow overlay is only ever read.
  bottom: (s, ctx) =>
    createFilePort({
      path: s.path,
      readOnly: ctx.readOnly || !!s.readOnly,
      io: ctx.io,
      discard: ctx.discard !== "ignore",
      onPunchFailure: (err) => ctx.log?.warn({ image: s.path, err: err.message }, "punching holes failed: trims are acknowledged without freeing space from now on"),
    }),
};
