"""The ``linechatd`` command (CONTRACT.md §1)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from . import __version__


def _run(args: argparse.Namespace) -> int:
    from .gateway import run_from_config

    return trio.run(run_from_config, Path(args.config))


def _check_config(args: argparse.Namespace) -> int:
    from .config import check_config_file

    problems = check_config_file(args.path)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 2
    print(f"{args.path}: ok")
    return 0


def _dev(args: argparse.Namespace) -> int:
    from . import dev

    return dev.run(
        instances=args.instances,
        partitions=args.partitions,
        base_port=args.base_port,
        workdir=Path(args.workdir) if args.workdir else None,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linechatd", description="A distributed WebSocket chat gateway."
    )
    parser.add_argument("--version", action="version", version=f"linechatd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run one gateway instance (what systemd starts)")
    run.add_argument("--config", required=True, metavar="PATH", help="the TOML configuration file")
    run.set_defaults(func=_run)

    check = sub.add_parser(
        "check-config", help="validate a TOML configuration file (exit 2 if invalid)"
    )
    check.add_argument("path", metavar="PATH")
    check.set_defaults(func=_check_config)

    dev = sub.add_parser("dev", help="run ZooKeeper, a broker and N instances locally")
    dev.add_argument("--instances", type=int, default=3, help="gateway instances (default 3)")
    dev.add_argument("--partitions", type=int, default=16, help="partitions (default 16)")
    dev.add_argument("--base-port", type=int, default=7100, help="first port used (default 7100)")
    dev.add_argument(
        "--workdir", default=None, help="where configs and logs go (default: a temporary directory)"
    )
    dev.set_defaults(func=_dev)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
