"""The ``linechatd`` command: run, check-config, dev, status, drain, chat.

What each subcommand does and its exit codes are in its ``--help``; the
operator's view of them is docs/operations.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from . import __version__

# Exit codes shared by status and drain (admin.py defines them; repeated here
# so that --help needs no import of the ZooKeeper client).
_ADMIN_EXIT_CODES = """\
exit codes:
  0  {ok}
  1  {failed}
  2  bad arguments, or the --config file is invalid
  3  ZooKeeper cannot be reached, or holds no such cluster"""

_EPILOGS = {
    "run": """\
exit codes:
  0   drained and stopped (SIGTERM, SIGINT or an admin drain)
  1   cannot start for a reason outside the configuration (see the log)
  78  the configuration is at fault: invalid file, a check check-config also
      makes, the cluster's partition count, a duplicate instance.id
      (the unit's RestartPreventExitStatus: systemd does not restart it)""",
    "check-config": """\
Runs every check `linechatd run` makes before it connects anywhere: the keys
and their values, key and certificate files, exposure of auth mode "none",
advertised urls, durability settings of a production cluster.

Problems go to stderr, one line each, starting with the dotted key; warnings
start with "warning: ".

exit codes:
  0  valid (warnings may have been printed)
  2  invalid""",
    "dev": """\
exit codes:
  0  stopped by Ctrl-C / SIGTERM after a clean start
  1  a service or instance failed to start or died
  2  bad arguments""",
    "status": _ADMIN_EXIT_CODES.format(
        ok="every partition has an owner and every instance answered",
        failed="degraded: a partition without owner, or an instance that did not answer",
    ),
    "drain": _ADMIN_EXIT_CODES.format(
        ok="the drain started (with --wait: it finished)",
        failed="no such live instance, the instance refused (admin token), or --wait timed out",
    ),
    "publish": """\
Posts /api/publish with the server key of [server_api] key_file, as a
backend would (CONTRACT §6): one durable record per recipient partition.

exit codes:
  0  published: every record durable
  1  not published in time (HTTP 503): run it again with the same --id;
     recipients drop the copies
  2  refused: bad recipients, id, sender or body; no or wrong key""",
    "chat": """\
exit codes:
  0  end of input or Ctrl-C
  1  the gateway refused for good (bad uid, bad token, closed for abuse)
  2  bad arguments""",
}


def _run(args: argparse.Namespace) -> int:
    from .gateway import run_from_config

    return trio.run(run_from_config, Path(args.config))


def _check_config(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config
    from .startup import config_findings

    errors: list[str] = []
    warnings: list[str] = []
    try:
        config = load_config(args.path)
    except ConfigError as exc:
        errors = exc.problems
    else:
        findings = config_findings(config)
        errors, warnings = findings.errors, findings.warnings
    if args.json:
        json.dump({"valid": not errors, "errors": errors, "warnings": warnings}, sys.stdout)
        print()
    for problem in errors:
        print(problem, file=sys.stderr)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if errors:
        return 2
    if not args.json:
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


class _UsageError(Exception):
    """Bad arguments or configuration for an admin command (exit 2)."""


def _cluster_target(args: argparse.Namespace) -> tuple[str, str, Path | None]:
    """ZooKeeper hosts, cluster name and admin token file: from --config, overridden by flags."""
    hosts, cluster = args.zookeeper, args.cluster
    token_file = getattr(args, "admin_token_file", None)
    if args.config:
        from .config import ConfigError, load_config

        try:
            config = load_config(args.config)
        except ConfigError as exc:
            raise _UsageError(f"{args.config}: invalid configuration:\n{exc}") from None
        hosts = hosts or config.zookeeper.hosts
        cluster = cluster or config.cluster.name
        if token_file is None and config.admin.token_file is not None:
            token_file = str(config.admin.token_file)
    if not hosts:
        raise _UsageError("give --config PATH or --zookeeper HOSTS")
    return hosts, cluster or "default", Path(token_file) if token_file else None


def _quiet_libraries(verbose: bool) -> None:
    """Library warnings (kazoo's connection retries) are not the command's output."""
    if verbose:
        from . import logs

        logs.configure(level="debug", fmt="logfmt", instance="cli")
        return
    logging.getLogger().addHandler(logging.NullHandler())
    logging.getLogger().setLevel(logging.CRITICAL)


def _status(args: argparse.Namespace) -> int:
    from .admin import status_command

    hosts, cluster, _token_file = _cluster_target(args)
    _quiet_libraries(args.verbose)
    return status_command(hosts, cluster, as_json=args.json)


def _drain(args: argparse.Namespace) -> int:
    from .admin import drain_command

    hosts, cluster, token_file = _cluster_target(args)
    _quiet_libraries(args.verbose)
    return drain_command(
        hosts,
        cluster,
        args.instance,
        token_file=token_file,
        as_json=args.json,
        wait=args.wait,
        timeout_s=args.timeout,
    )


def _publish(args: argparse.Namespace) -> int:
    from .publisher import publish_command

    url, key_file = args.url, args.key_file
    if args.config:
        from .config import ConfigError, load_config

        try:
            config = load_config(args.config)
        except ConfigError as exc:
            raise SystemExit(f"{args.config}: invalid configuration:\n{exc}") from None
        url = url or config.http.advertise
        key_file = key_file or config.server_api.key_file
    if not url or not key_file:
        raise SystemExit(
            "linechatd publish: give --config PATH (with [server_api] key_file), "
            "or --url and --key-file"
        )
    to = [uid for uid in args.to.replace(",", " ").split() if uid]
    return publish_command(
        url=url,
        key_file=Path(key_file),
        to=to,
        body=args.body,
        msg_id=args.id,
        from_name=args.sender,
        as_json=args.json,
    )


def _chat(args: argparse.Namespace) -> int:
    from . import chat

    try:
        token = chat.token_from_arguments(args)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    return chat.run(args.http, args.uid, args.to, token=token)


def _add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="an instance's TOML file (gives ZooKeeper, the cluster and the admin token file)",
    )
    parser.add_argument("--zookeeper", metavar="HOSTS", help="ZooKeeper hosts, e.g. 127.0.0.1:2181")
    parser.add_argument(
        "--cluster", metavar="NAME", help="cluster name (default: from --config, else 'default')"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show the ZooKeeper client's own log"
    )


def _subcommand(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_text: str
) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=help_text,
        description=help_text[0].upper() + help_text[1:] + ".",
        epilog=_EPILOGS[name],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linechatd",
        description="A distributed WebSocket chat gateway. `linechatd COMMAND --help` "
        "describes each command and its exit codes.",
    )
    parser.add_argument("--version", action="version", version=f"linechatd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = _subcommand(sub, "run", "run one gateway instance (what systemd starts)")
    run.add_argument("--config", required=True, metavar="PATH", help="the TOML configuration file")
    run.set_defaults(func=_run)

    check = _subcommand(
        sub, "check-config", "validate a TOML configuration file as `run` would (exit 2 if invalid)"
    )
    check.add_argument("path", metavar="PATH")
    check.add_argument(
        "--json",
        action="store_true",
        help='print {"valid", "errors", "warnings"} on stdout (problems still go to stderr)',
    )
    check.set_defaults(func=_check_config)

    dev = _subcommand(sub, "dev", "run ZooKeeper, a broker and N instances locally")
    dev.add_argument("--instances", type=int, default=3, help="gateway instances (default 3)")
    dev.add_argument("--partitions", type=int, default=16, help="partitions (default 16)")
    dev.add_argument("--base-port", type=int, default=7100, help="first port used (default 7100)")
    dev.add_argument(
        "--workdir", default=None, help="where configs and logs go (default: a temporary directory)"
    )
    dev.set_defaults(func=_dev)

    status = _subcommand(
        sub, "status", "show the cluster: instances, partition owners, lag, connections"
    )
    _add_cluster_flags(status)
    status.set_defaults(func=_status)

    drain = _subcommand(
        sub, "drain", "gracefully drain one instance (its partitions move elsewhere)"
    )
    drain.add_argument("instance", metavar="INSTANCE", help="the instance id")
    _add_cluster_flags(drain)
    drain.add_argument(
        "--admin-token-file",
        metavar="PATH",
        help="the admin token (default: [admin] token_file of --config)",
    )
    drain.add_argument(
        "--wait",
        action="store_true",
        help="return once the instance owns no partition and has left the cluster",
    )
    drain.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long --wait waits (default 120)",
    )
    drain.set_defaults(func=_drain)

    publish = _subcommand(sub, "publish", "publish a message to users through the server API")
    publish.add_argument("--to", required=True, help="recipients, comma-separated (up to 1,000)")
    publish.add_argument(
        "--body", required=True, help='the message body, JSON (e.g. \'{"text": "hi"}\')'
    )
    publish.add_argument("--id", help="message id (default: random); reuse it to retry")
    publish.add_argument("--from", dest="sender", help='the sender name shown (default "server")')
    publish.add_argument("--config", metavar="PATH", help="an instance's TOML file (url and key)")
    publish.add_argument("--url", help="an instance's HTTP url (default: from --config)")
    publish.add_argument("--key-file", help="the server key file (default: from --config)")
    publish.add_argument("--json", action="store_true", help="machine-readable output")
    publish.set_defaults(func=_publish)

    chat = _subcommand(sub, "chat", "a terminal chat for trying the system by hand")
    chat.add_argument("--uid", required=True, help="who you are")
    chat.add_argument(
        "--to", required=True, help="who you write to (several: a comma-separated list)"
    )
    chat.add_argument(
        "--http",
        default="http://127.0.0.1:7110",
        help="any instance's HTTP url (default: the first instance of `linechatd dev`)",
    )
    from .chat import add_token_arguments

    add_token_arguments(chat)
    chat.set_defaults(func=_chat)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .admin import AdminError

    try:
        return int(args.func(args))
    except _UsageError as exc:
        print(f"linechatd: {exc}", file=sys.stderr)
        return 2
    except AdminError as exc:
        print(f"linechatd: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into `head` and friends: not an error worth a traceback.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
