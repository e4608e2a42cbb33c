// The package around the module: its declarations name exactly what the
// module exports, and package.json points at files that exist.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { BOUNDED, linechat } from "./support.mjs";

const read = (path) => readFileSync(new URL(path, import.meta.url), "utf8");

test("linechat.d.ts declares every runtime export, and nothing else", BOUNDED, () => {
  const declared = [...read("../linechat.d.ts").matchAll(/^export declare (?:class|function|const) (\w+)/gm)]
    .map((match) => match[1])
    .sort();
  assert.deepEqual([...new Set(declared)], Object.keys(linechat).sort());
});

test("package.json: an ES module whose exports are the client and its types", BOUNDED, () => {
  const pkg = JSON.parse(read("../package.json"));
  assert.equal(pkg.type, "module");
  assert.deepEqual(pkg.exports["."], { types: "./linechat.d.ts", default: "./dist/linechat.js" });
  assert.deepEqual(pkg.files.sort(), ["dist/linechat.js", "linechat.d.ts"]);
  assert.equal(pkg.scripts.prepack, "node scripts/build.mjs");
  assert.deepEqual(Object.keys(pkg.dependencies ?? {}), []); // dependency-free
});
