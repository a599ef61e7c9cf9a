import fs from "node:fs";

/** Makes a directory's entries durable (a file created, renamed or linked in it survives a crash). */
export function fsyncDir(dir: string): void {
  const fd = fs.openSync(dir, "r");
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}
