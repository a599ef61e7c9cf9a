// The options of a script run by node (npm run nemesis, npm run fuzz).
import { parseArgs } from "node:util";

/**
 * Parses `options` (parseArgs' form; --help/-h is added). --help prints `usage` and exits 0; an
 * unknown option or a missing value is refused: `NAME: what is wrong`, the usage, exit 2.
 * Returns the values and `refuse(what)`, the same refusal for the script's own checks.
 */
export function scriptOptions(name, usage, options) {
  const refuse = (what) => {
    process.stderr.write(`${name}: ${what}\n${usage}\n`);
    process.exit(2);
  };
  let values;
  try {
    ({ values } = parseArgs({ options: { ...options, help: { type: "boolean", short: "h", default: false } } }));
  } catch (err) {
    refuse(err.message);
  }
  if (values.help) {
    process.stdout.write(`${usage}\n`);
    process.exit(0);
  }
  return { values, refuse };
}
