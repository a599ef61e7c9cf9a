// Preloaded with `node --import` (NODE_OPTIONS): records the URL of every module the process
// imports, one a line, in the file $NBDSTACK_MODULE_LOG (the hook runs on Node's loader thread).
import { register } from "node:module";

register(new URL("./record-modules-hook.mjs", import.meta.url), { data: { log: process.env.NBDSTACK_MODULE_LOG } });
