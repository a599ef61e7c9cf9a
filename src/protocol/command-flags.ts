import { Cmd, CmdFlag as F } from "./constants.js";

const KNOWN_FLAGS = F.NBD_CMD_FLAG_FUA | F.NBD_CMD_FLAG_NO_HOLE | F.NBD_CMD_FLAG_DF | F.NBD_CMD_FLAG_REQ_ONE | F.NBD_CMD_FLAG_FAST_ZERO;

/**
 * The flags each command may carry (doc/proto.md, "Command flags"): FUA on every command (clients
 * are known to set it everywhere; the server MUST accept it), NO_HOLE and FAST_ZERO on write
 * zeroes, DF on reads, REQ_ONE on block status.
 */
const ALLOWED: Readonly<Record<number, number>> = {
  [Cmd.NBD_CMD_READ]: F.NBD_CMD_FLAG_FUA | F.NBD_CMD_FLAG_DF,
  [Cmd.NBD_CMD_WRITE]: F.NBD_CMD_FLAG_FUA,
  [Cmd.NBD_CMD_DISC]: F.NBD_CMD_FLAG_FUA,
  [Cmd.NBD_CMD_FLUSH]: F.NBD_CMD_FLAG_FUA,
  [Cmd.NBD_CMD_TRIM]: F.NBD_CMD_FLAG_FUA,
  [Cmd.NBD_CMD_CACHE]: F.NBD_CMD_FLAG_FUA,
  [Cmd.NBD_CMD_WRITE_ZEROES]: F.NBD_CMD_FLAG_FUA | F.NBD_CMD_FLAG_NO_HOLE | F.NBD_CMD_FLAG_FAST_ZERO,
  [Cmd.NBD_CMD_BLOCK_STATUS]: F.NBD_CMD_FLAG_FUA | F.NBD_CMD_FLAG_REQ_ONE,
};

const NAMES: ReadonlyArray<[number, string]> = [
  [F.NBD_CMD_FLAG_NO_HOLE, "NBD_CMD_FLAG_NO_HOLE is only valid on write zeroes"],
  [F.NBD_CMD_FLAG_FAST_ZERO, "NBD_CMD_FLAG_FAST_ZERO is only valid on write zeroes"],
  [F.NBD_CMD_FLAG_DF, "NBD_CMD_FLAG_DF is only valid on reads with structured replies"],
  [F.NBD_CMD_FLAG_REQ_ONE, "NBD_CMD_FLAG_REQ_ONE is only valid on block status"],
];

/**
 * Why the flags of a request may not go with its command (the server answers EINVAL with this
 * text), or null if they may. `structured`: structured replies were negotiated (DF needs them).
 * Unknown commands are left to the caller.
 */
export function flagError(type: number, flags: number, structured: boolean): string | null {
  if (flags & ~KNOWN_FLAGS) return `unknown command flags 0x${flags.toString(16)}`;
  const allowed = ALLOWED[type];
  if (allowed === undefined) return null;
  const wrong = flags & ~(structured ? allowed : allowed & ~F.NBD_CMD_FLAG_DF);
  if (!wrong) return null;
  return NAMES.find(([bit]) => wrong & bit)![1];
}
