import { Cmd, CmdFlag } from "./constants.js";

const KNOWN_FLAGS =
  CmdFlag.NBD_CMD_FLAG_FUA | CmdFlag.NBD_CMD_FLAG_NO_HOLE | CmdFlag.NBD_CMD_FLAG_DF | CmdFlag.NBD_CMD_FLAG_REQ_ONE | CmdFlag.NBD_CMD_FLAG_FAST_ZERO;

/**
 * Why the flags of a request may not go with its command (the server answers EINVAL with this
 * text), or null if they may. `structured`: structured replies were negotiated.
 */
export function flagError(type: number, flags: number, structured: boolean): string | null {
  if (flags & ~KNOWN_FLAGS) return `unknown command flags 0x${flags.toString(16)}`;
  if (flags & CmdFlag.NBD_CMD_FLAG_DF && (type !== Cmd.NBD_CMD_READ || !structured)) return "NBD_CMD_FLAG_DF is only valid on reads with structured replies";
  if (flags & CmdFlag.NBD_CMD_FLAG_FAST_ZERO && type !== Cmd.NBD_CMD_WRITE_ZEROES) return "NBD_CMD_FLAG_FAST_ZERO is only valid on write zeroes";
  return null;
}
