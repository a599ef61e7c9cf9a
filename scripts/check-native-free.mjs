#!/usr/bin/env node
// Fails when a dependency would build native code at install time, or when anything the product
// needs at run time (the production dependency tree) ships a native addon.
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), "..");
const problems = [];

function packageDirs(omitDev) {
  const args = ["ls", "--all", "--parseable", ...(omitDev ? ["--omit=dev"] : [])];
  const out = execFileSync("npm", args, { cwd: root, encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] });
  return out.split("\n").filter((d) => d && d !== root);
}

function walk(dir, visit, depth = 0) {
  if (depth > 6) return;
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    if (e.name === "node_modules") continue;
    const p = path.join(dir, e.name);
    if (e.isDirectory()) walk(p, visit, depth + 1);
    else visit(p);
  }
}

for (const dir of packageDirs(false)) {
  const pkg = JSON.parse(fs.readFileSync(path.join(dir, "package.json"), "utf8"));
  const scripts = pkg.scripts ?? {};
  for (const hook of ["preinstall", "install", "postinstall"]) {
    if (scripts[hook]) problems.push(`${pkg.name}: runs an install-time "${hook}" script: ${scripts[hook]}`);
  }
  if (fs.existsSync(path.join(dir, "binding.gyp"))) problems.push(`${pkg.name}: has a binding.gyp (node-gyp build)`);
}
for (const dir of packageDirs(true)) {
  walk(dir, (file) => {
    if (file.endsWith(".node")) problems.push(`${path.relative(root, file)}: a native addon in a run-time dependency`);
  });
}

if (problems.length) {
  console.error("native-free check failed:\n  " + problems.join("\n  "));
  process.exit(1);
}
console.log("native-free check: no install-time builds, no native addons in run-time dependencies");
