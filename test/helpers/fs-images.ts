import { expect } from "vitest";
import { FsError, probeFileSystem, type ReadAt } from "../../src/fs/probe.js";

/** Test support shared by the ext and FAT tests: an image held in memory as a device. */
export const reader =
  (buf: Buffer): ReadAt =>
  async (length, offset) =>
    Buffer.from(buf.subarray(offset, offset + length));

/** Probing `buf` (and reading file `p`, if given) must fail with an FsError whose message matches `re`. */
export async function expectFsError(buf: Buffer, p: string | null, re: RegExp): Promise<void> {
  const err = await (async () => {
    const f = await probeFileSystem(reader(buf), buf.length);
    if (p) await f!.readFile(p);
    return null;
  })().catch((e) => e);
  expect(err).toBeInstanceOf(FsError);
  expect(err.message).toMatch(re);
}
