// Module hooks for record-modules.mjs: every resolved URL is appended to the log file.
import fs from "node:fs";

let log;

export function initialize(data) {
  log = data.log;
}

export async function resolve(specifier, context, next) {
  const r = await next(specifier, context);
  if (log) fs.appendFileSync(log, `${r.url}\n`);
  return r;
}
