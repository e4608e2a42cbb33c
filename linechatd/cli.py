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


def _cluster_target(args: argparse.Namespace) -> tuple[str, str]:
    """ZooKeeper hosts and cluster name: from --config, overridden by the flags."""
    hosts, cluster = args.zookeeper, args.cluster
    if args.config:
        from .config import ConfigError, load_config

        try:
            config = load_config(args.config)
        except ConfigError as exc:
            raise SystemExit(f"{args.config}: invalid configuration:\n{exc}") from None
        hosts = hosts or config.zookeeper.hosts
        cluster = cluster or config.cluster.name
        if getattr(args, "admin_token_file", "") is None:
            args.admin_token_file = config.http.admin_token_file
    if not hosts:
        raise SystemExit("linechatd: give --config PATH or --zookeeper HOSTS")
    return hosts, cluster or "default"


def _status(args: argparse.Namespace) -> int:
    from .admin import status_command

    hosts, cluster = _cluster_target(args)
    return status_command(hosts, cluster, as_json=args.json)


def _drain(args: argparse.Namespace) -> int:
    from .admin import drain_command

    hosts, cluster = _cluster_target(args)
    token_file = Path(args.admin_token_file) if args.admin_token_file else None
    return drain_command(hosts, cluster, args.instance, token_file=token_file, as_json=args.json)


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

    return chat.run(args.http, args.uid, args.to)


def _add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="PATH", help="an instance's TOML file (gives ZooKeeper and the cluster)"
    )
    parser.add_argument("--zookeeper", metavar="HOSTS", help="ZooKeeper hosts, e.g. 127.0.0.1:2181")
    parser.add_argument(
        "--cluster", metavar="NAME", help="cluster name (default: from --config, else 'default')"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")


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

    status = sub.add_parser(
        "status", help="the cluster: instances, partition owners, lag, connections"
    )
    _add_cluster_flags(status)
    status.set_defaults(func=_status)

    drain = sub.add_parser(
        "drain", help="gracefully drain one instance (its partitions move elsewhere)"
    )
    drain.add_argument("instance", metavar="INSTANCE", help="the instance id")
    _add_cluster_flags(drain)
    drain.add_argument(
        "--admin-token-file", metavar="PATH", help="bearer token for the admin endpoint"
    )
    drain.set_defaults(func=_drain)

    publish = sub.add_parser(
        "publish",
        help="publish a message to users through the server API (exit 0 stored, 1 retry, 2 refused)",
    )
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

    chat = sub.add_parser("chat", help="a terminal chat for trying the system by hand")
    chat.add_argument("--uid", required=True, help="who you are")
    chat.add_argument(
        "--to", required=True, help="who you write to (several: a comma-separated list)"
    )
    chat.add_argument(
        "--http",
        default="http://127.0.0.1:7110",
        help="any instance's HTTP url (default: the first instance of `linechatd dev`)",
    )
    chat.set_defaults(func=_chat)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .admin import AdminError

    try:
        return int(args.func(args))
    except AdminError as exc:
        print(f"linechatd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into `head` and friends: not an error worth a traceback.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
