// Copies the client into this package (dist/linechat.js): the one source is
// linechatd/static/linechat.js, which the Python package serves at
// /static/linechat.js. Runs before `npm pack` and `npm publish` (prepack).
import { copyFileSync, mkdirSync } from "node:fs";
import { fileURLToPath } from "node:url";

export const SOURCE = fileURLToPath(new URL("../../../linechatd/static/linechat.js", import.meta.url));
export const TARGET = fileURLToPath(new URL("../dist/linechat.js", import.meta.url));

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  mkdirSync(fileURLToPath(new URL("../dist/", import.meta.url)), { recursive: true });
  // Silent: `npm pack --json` prints this script's output into its JSON.
  copyFileSync(SOURCE, TARGET);
}
