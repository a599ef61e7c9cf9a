import type { Command } from "commander";
import { setControlToken } from "../control/control-client.js";
import { readToken } from "../control/token.js";

/** preAction hook: commands that make control calls read the token from --token-file when given. */
export function useTokenFile(cmd: Command): void {
  const file = cmd.opts().tokenFile as string | undefined;
  if (file) setControlToken(readToken(file));
}
