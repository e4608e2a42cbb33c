"""Runs one linechatd instance exactly as ``linechatd run --config PATH`` does.

The harness starts gateways through this module so that its processes are
recognisably the benchmark's (and are not matched by anything looking for
``linechatd run`` on a shared machine).
"""

from __future__ import annotations

import sys

from linechatd.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
