import { probeFileSystem, type AllocationRun, type FileSystem, type ReadAt } from "../../fs/probe.js";
import { plainIo, type Layer } from "../layer.js";

/**
 * A ReadAt over an opened layer for the file-system readers: reads are widened to the layer's
 * minimum block size and split at its maximum, so the readers may ask for any byte range.
 */
export function layerReader(layer: Layer): ReadAt {
  return async (length, offset) => {
    const { minimum, maximum } = layer.capabilities().blockSize;
    const size = layer.size();
    const start = Math.floor(offset / minimum) * minimum;
    const end = Math.min(size, Math.ceil((offset + length) / minimum) * minimum);
    const buf = Buffer.alloc(end - start);
    const step = Math.max(minimum, Math.floor(maximum / minimum) * minimum);
    for (let at = 0; at < buf.length; at += step) await layer.pread(buf.subarray(at, Math.min(buf.length, at + step)), start + at, plainIo);
    return buf.subarray(offset - start, offset - start + length);
  };
}

/** The file system on an opened layer, or null when it holds none that we read. */
export function probeLayer(layer: Layer): Promise<FileSystem | null> {
  return probeFileSystem(layerReader(layer), layer.size());
}

/**
 * The allocation map of the file system on an opened layer (null without one): runs covering the
 * whole device, `used: false` where the file system has free blocks. For copies that skip free
 * space; free blocks are not promised to read as zero, so never report them to clients as ZERO.
 */
export async function layerAllocationMap(layer: Layer): Promise<AllocationRun[] | null> {
  const fs = await probeLayer(layer);
  return fs ? fs.allocationMap() : null;
}
