"""Configuration: a TOML file read into frozen, typed dataclasses.

Each key is declared once, as a field of its section's dataclass. The field's
metadata carries the key's TOML name and its parser, and the field's default is
the key's default, so the list of keys, their defaults and their validation
cannot drift apart. Parsing walks those declarations and collects every problem
before failing: an operator fixing a file should see all of them at once, each
as ``"<dotted.key>: <reason>"``.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import enum
import ipaddress
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import SplitResult, urlsplit

__all__ = [
    "RELOAD",
    "RESTART_REQUIRED_KEYS",
    "AdminConfig",
    "AuthConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "HostPort",
    "HttpConfig",
    "InstanceConfig",
    "KafkaConfig",
    "LimitsConfig",
    "LogConfig",
    "PartitionsConfig",
    "Reload",
    "ReplayConfig",
    "ServerApiConfig",
    "ShutdownConfig",
    "WebSocketConfig",
    "ZooKeeperConfig",
    "check_config_file",
    "dotted_keys",
    "load_config",
    "parse_config",
    "read_token_file",
]


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` lists every reason found."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__("\n".join(self.problems))


class _Invalid(Exception):
    """One value's problem; the caller prefixes it with the dotted key."""


# A parser turns a raw TOML value into the field's value or raises _Invalid.
# It gets the config file's directory so that paths can be resolved.
Parser = Callable[[object, Path], Any]

_KEY: Final = "toml_key"
_PARSE: Final = "parse"
_SECTION: Final = "section"


# --- host:port ----------------------------------------------------------------

_HOSTNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_PORT = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True)
class HostPort:
    """A listen or connect address; IPv6 hosts are stored without brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, *, min_port: int = 0) -> HostPort:
        """Parse ``host:port`` or ``[v6]:port``; raises ValueError."""
        host, sep, port = text.rpartition(":")
        if not sep or not _PORT.fullmatch(port):
            raise ValueError(f"expected host:port, got {text!r}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"expected host:port, got {text!r}") from None
        elif not _HOSTNAME.fullmatch(host):
            # Also rejects an unbracketed IPv6 address, whose port would be ambiguous.
            raise ValueError(f"expected host:port, got {text!r}")
        number = int(port)
        if not min_port <= number <= 65535:
            raise ValueError(f"port must be between {min_port} and 65535, got {number}")
        return cls(host, number)


# --- parsers ------------------------------------------------------------------


def _toml_type(value: object) -> str:
    # bool before int and datetime before date: they are subclasses.
    kinds: tuple[tuple[type, str], ...] = (
        (bool, "boolean"),
        (int, "integer"),
        (float, "float"),
        (str, "string"),
        (list, "array"),
        (dict, "table"),
        (datetime.datetime, "datetime"),
        (datetime.date, "date"),
        (datetime.time, "time"),
    )
    return next((name for kind, name in kinds if isinstance(value, kind)), type(value).__name__)


def _wrong_type(expected: str, value: object) -> _Invalid:
    return _Invalid(f"expected {expected}, got {_toml_type(value)}")


def _expect_str(value: object) -> str:
    if not isinstance(value, str):
        raise _wrong_type("a string", value)
    return value


def _fmt(number: float) -> str:
    return str(int(number)) if isinstance(number, float) and number.is_integer() else str(number)


def _check_range(value: float, lo: float | None, hi: float | None, *, above: bool) -> None:
    """Raise unless lo <= value <= hi (lo < value when ``above``); None = unbounded."""
    low_ok = lo is None or (value > lo if above else value >= lo)
    high_ok = hi is None or value <= hi
    if low_ok and high_ok:
        return
    low = "" if lo is None else f"greater than {_fmt(lo)}" if above else f"at least {_fmt(lo)}"
    high = "" if hi is None else f"at most {_fmt(hi)}"
    if lo is not None and hi is not None and not above:
        bound = f"between {_fmt(lo)} and {_fmt(hi)}"
    else:
        bound = " and ".join(part for part in (low, high) if part)
    raise _Invalid(f"must be {bound}, got {value!r}")


def _integer(lo: int | None = None, hi: int | None = None) -> Parser:
    def parse(value: object, base_dir: Path) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong_type("an integer", value)
        _check_range(value, lo, hi, above=False)
        return value

    return parse


def _number(lo: float | None = None, hi: float | None = None, *, above: bool = False) -> Parser:
    """A float key; integers are accepted. ``above`` makes the lower bound exclusive."""

    def parse(value: object, base_dir: Path) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _wrong_type("a number", value)
        if isinstance(value, float) and not math.isfinite(value):
            raise _Invalid(f"must be a finite number, got {value!r}")
        _check_range(value, lo, hi, above=above)
        try:
            return float(value)
        except OverflowError:
            raise _Invalid(f"must be a finite number, got {value!r}") from None

    return parse


def _boolean(value: object, base_dir: Path) -> bool:
    if not isinstance(value, bool):
        raise _wrong_type("a boolean", value)
    return value


def _choice(*options: str) -> Parser:
    listed = ", ".join(f'"{option}"' for option in options)

    def parse(value: object, base_dir: Path) -> str:
        text = _expect_str(value)
        if text not in options:
            raise _Invalid(f"must be one of {listed}, got {text!r}")
        return text

    return parse


def _name(charset: str, max_len: int) -> Parser:
    pattern = re.compile(f"{charset}{{1,{max_len}}}")

    def parse(value: object, base_dir: Path) -> str:
        text = _expect_str(value)
        if not pattern.fullmatch(text):
            raise _Invalid(f"must be 1-{max_len} characters of {charset}, got {text!r}")
        return text

    return parse


def _optional_text(value: object, base_dir: Path) -> str:
    # TOML has no null: leaving the key out is how to say "none".
    text = _expect_str(value)
    if not text:
        raise _Invalid("must not be empty (leave the key out instead)")
    return text


def _host_port(value: object, base_dir: Path) -> HostPort:
    try:
        return HostPort.parse(_expect_str(value))
    except ValueError as e:
        raise _Invalid(str(e)) from None


_CHROOT = re.compile(r"(/[^/\s]+)+")


def _host_list(*, chroot: bool) -> Parser:
    """``host:port[,host:port...]``, optionally followed by ``/chroot``.

    The value is returned normalised (no spaces around commas), since the
    clients that consume it do not all tolerate them.
    """
    shape = "host:port[,host:port...]" + ("[/chroot]" if chroot else "")

    def parse(value: object, base_dir: Path) -> str:
        text = _expect_str(value)
        hosts, slash, path = text.partition("/") if chroot else (text, "", "")
        if slash and not _CHROOT.fullmatch(slash + path):
            raise _Invalid(f"expected {shape}, got {text!r}")
        try:
            items = [str(HostPort.parse(item.strip(), min_port=1)) for item in hosts.split(",")]
        except ValueError:
            raise _Invalid(f"expected {shape}, got {text!r}") from None
        return ",".join(items) + slash + path

    return parse


def _split_url(text: str) -> SplitResult | None:
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - only to raise ValueError on a malformed port
    except ValueError:
        return None
    return parts


def _url(*schemes: str, suffix: str = "") -> Parser:
    prefixes = " or ".join(f"{scheme}://" for scheme in schemes)

    def parse(value: object, base_dir: Path) -> str:
        text = _expect_str(value)
        if not any(text.startswith(f"{scheme}://") for scheme in schemes):
            raise _Invalid(f"must start with {prefixes}, got {text!r}")
        parts = _split_url(text)
        if parts is None or not parts.hostname:
            raise _Invalid(f"expected a URL like {schemes[0]}://host:port{suffix}, got {text!r}")
        return text

    return parse


def _is_origin(text: str) -> bool:
    """``scheme://host[:port]`` and nothing else, as browsers send in Origin."""
    parts = _split_url(text)
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    if text.lower() != f"{parts.scheme}://{parts.netloc.lower()}" or "@" in parts.netloc:
        return False  # a path, query, fragment or user name
    if parts.netloc.startswith("["):
        return True  # urlsplit has already checked the bracketed IPv6 address
    return _HOSTNAME.fullmatch(parts.hostname) is not None


def _origins(value: object, base_dir: Path) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _wrong_type("an array of strings", value)
    for item in value:
        if not _is_origin(item):
            raise _Invalid(f"expected origins like 'https://chat.example.com', got {item!r}")
    # Browsers send the Origin header in lower case; compare in that form.
    return tuple(item.lower() for item in value)


def _readable_file(value: object, base_dir: Path) -> Path:
    text = _expect_str(value)
    if not text:
        raise _Invalid("must not be empty (leave the key out instead)")
    path = base_dir / text  # an absolute ``text`` replaces base_dir
    try:
        with path.open("rb"):
            pass
    except OSError as e:
        raise _Invalid(f"cannot read {str(path)!r}: {e.strerror or e}") from None
    return path


# A shared secret that clients send as a bearer token (the admin token; docs/protocol.md §2).
MIN_TOKEN_CHARS: Final = 32
_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]+")


def read_token_file(path: Path) -> str:
    """The one line of a token file, surrounding whitespace stripped; raises ValueError."""
    try:
        text = path.read_bytes().decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("must hold printable ASCII only") from None
    token = text.strip()
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(
            f"must hold one line of at least {MIN_TOKEN_CHARS} printable ASCII characters, "
            f"got {len(token)}"
        )
    if not _PRINTABLE_ASCII.fullmatch(token):
        raise ValueError("must hold one line of printable ASCII characters, without spaces")
    return token


def _token_file(value: object, base_dir: Path) -> Path:
    path = _readable_file(value, base_dir)
    try:
        read_token_file(path)
    except OSError as e:
        raise _Invalid(f"cannot read {str(path)!r}: {e.strerror or e}") from None
    except ValueError as e:
        raise _Invalid(f"{str(path)!r} {e}") from None
    return path


def _kafka_prefix(value: object, base_dir: Path) -> str:
    """A topic or group prefix; ``{cluster}`` stands for the cluster's name."""
    text = _expect_str(value)
    if not _KAFKA_PREFIX.fullmatch(text.replace(CLUSTER_PLACEHOLDER, "x")):
        # ({cluster} is allowed too: see the example file.)
        raise _Invalid(f"must be 1-100 characters of [A-Za-z0-9._-], got {text!r}")
    return text


CLUSTER_PLACEHOLDER: Final = "{cluster}"
_KAFKA_PREFIX = re.compile(r"[A-Za-z0-9._-]{1,100}")


# --- declaring keys -----------------------------------------------------------


def _setting(default: Any, parse: Parser, *, key: str | None = None) -> Any:
    """A key with a default. ``key`` is its TOML name when not the field's name."""
    return field(default=default, metadata={_PARSE: parse, _KEY: key})


def _computed(factory: Callable[[], Any], parse: Parser) -> Any:
    """A key whose default is computed when the config is built."""
    return field(default_factory=factory, metadata={_PARSE: parse, _KEY: None})


def _required(parse: Parser) -> Any:
    return field(metadata={_PARSE: parse, _KEY: None})


def _toml_key(f: Field[Any]) -> str:
    return f.metadata[_KEY] or f.name


def _has_default(f: Field[Any]) -> bool:
    return f.default is not MISSING or f.default_factory is not MISSING


def _default_instance_id() -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64]
    return cleaned or "linechatd"


# --- sections -----------------------------------------------------------------


@dataclass(frozen=True)
class ClusterConfig:
    name: str = _setting("default", _name("[A-Za-z0-9_-]", 64))
    partitions: int = _setting(64, _integer(1, 4096))
    # "production" turns the durability and exposure warnings into what an
    # operator of a production cluster must hear (see startup.config_findings).
    environment: Literal["development", "production"] = _setting(
        "development", _choice("development", "production")
    )


@dataclass(frozen=True)
class InstanceConfig:
    id: str = _computed(_default_instance_id, _name("[A-Za-z0-9_.-]", 64))


@dataclass(frozen=True)
class HttpConfig:
    # Port 0 means "pick a free port".
    listen: HostPort = _setting(HostPort("127.0.0.1", 8080), _host_port)
    # "" means "derive from listen" (see __post_init__).
    advertise: str = _setting("", _url("http", "https"))
    demo_page: bool = _setting(False, _boolean)
    # PEM files; both or neither (see _tls_pair). Set: the listener speaks HTTPS.
    tls_cert_file: Path | None = _setting(None, _readable_file)
    tls_key_file: Path | None = _setting(None, _readable_file)

    def __post_init__(self) -> None:
        if not self.advertise:
            scheme = "https" if self.tls_cert_file is not None else "http"
            object.__setattr__(self, "advertise", f"{scheme}://{self.listen}")


@dataclass(frozen=True)
class WebSocketConfig:
    listen: HostPort = _setting(HostPort("127.0.0.1", 8765), _host_port)
    # "" means "derive from listen" (see __post_init__).
    advertise: str = _setting("", _url("ws", "wss", suffix="/ws"))
    handshake_timeout_s: float = _setting(10.0, _number(0, 300, above=True))
    # Sockets whose upgrade request is not complete yet; past either cap a new
    # socket is closed at once (restart: the listener keeps its start values).
    max_unfinished_handshakes: int = _setting(4096, _integer(1))
    max_unfinished_handshakes_per_address: int = _setting(256, _integer(1))
    # TCP keepalive on accepted sockets, so that a vanished client's socket
    # dies in bounded time; tcp_user_timeout_s bounds unacknowledged sends.
    tcp_keepalive_idle_s: int = _setting(45, _integer(1, 32767))
    tcp_keepalive_interval_s: int = _setting(15, _integer(1, 32767))
    tcp_keepalive_count: int = _setting(3, _integer(1, 127))
    tcp_user_timeout_s: float = _setting(90.0, _number(1, 3600))
    # Empty: no Origin check.
    allowed_origins: tuple[str, ...] = _setting((), _origins)
    # PEM files; both or neither (see _tls_pair). Set: the listener speaks wss://.
    tls_cert_file: Path | None = _setting(None, _readable_file)
    tls_key_file: Path | None = _setting(None, _readable_file)

    def __post_init__(self) -> None:
        if not self.advertise:
            scheme = "wss" if self.tls_cert_file is not None else "ws"
            object.__setattr__(self, "advertise", f"{scheme}://{self.listen}/ws")


@dataclass(frozen=True)
class AdminConfig:
    # The bearer token every admin endpoint requires (docs/protocol.md §2). Unset: the
    # admin endpoints answer 404 on every address, loopback included.
    token_file: Path | None = _setting(None, _token_file)
    # A listener of its own for /admin/*, /api/status, /metrics, /healthz and
    # /readyz (never TLS: keep it on loopback or a private network). Unset: the
    # admin endpoints are served by the HTTP listener.
    listen: HostPort | None = _setting(None, _host_port)
    # Where `linechatd status`/`drain` reach this instance's admin endpoints;
    # registered in ZooKeeper. "" means derive: "http://" + admin.listen, else
    # the HTTP listener's own address (not http.advertise, which may be a proxy
    # that hides /admin).
    advertise: str = _setting("", _url("http", "https"))


@dataclass(frozen=True)
class ZooKeeperConfig:
    hosts: str = _required(_host_list(chroot=True))
    session_timeout_s: float = _setting(10.0, _number(1.0, 600.0), key="session_timeout")
    connect_timeout_s: float = _setting(30.0, _number(0, 600, above=True))


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str = _required(_host_list(chroot=False))
    # "{cluster}" in a prefix is replaced by cluster.name (see parse_config).
    topic_prefix: str = _setting("topic-", _kafka_prefix)
    group_prefix: str = _setting("consumer-group-", _kafka_prefix)
    create_topics: bool = _setting(True, _boolean)
    replication_factor: int = _setting(1, _integer(1, 32))
    # Topic settings for the topics this instance creates; unset: the broker's default.
    min_insync_replicas: int | None = _setting(None, _integer(1, 32))
    topic_retention_s: float | None = _setting(None, _number(0, above=True))
    produce_timeout_s: float = _setting(5.0, _number(0, 120, above=True))
    linger_ms: int = _setting(1, _integer(0, 1000))
    fetch_wait_max_ms: int = _setting(50, _integer(1, 1000))
    # Unable to reach the broker this long while another instance can: give
    # every partition up (CONTRACT.md §7, the zombie owner).
    unhealthy_release_s: float = _setting(15.0, _number(1, 3600))


@dataclass(frozen=True)
class AuthConfig:
    mode: Literal["none", "jwt"] = _setting("none", _choice("none", "jwt"))
    jwt_secret_file: Path | None = _setting(None, _readable_file)
    jwt_algorithm: Literal["HS256", "RS256", "ES256"] = _setting(
        "HS256", _choice("HS256", "RS256", "ES256")
    )
    jwt_issuer: str | None = _setting(None, _optional_text)
    jwt_audience: str | None = _setting(None, _optional_text)
    jwt_leeway_s: float = _setting(30.0, _number(0, 600))
    # Longest lifetime (exp - iat, or exp - now without iat) a token may claim.
    max_token_lifetime_s: float = _setting(86400.0, _number(60, 31536000))
    allow_insecure_none: bool = _setting(False, _boolean)
    # Explicit opt-outs of the jwt_audience / jwt_issuer requirement (logged at every start).
    allow_any_audience: bool = _setting(False, _boolean)
    allow_any_issuer: bool = _setting(False, _boolean)


@dataclass(frozen=True)
class LimitsConfig:
    max_frame_bytes: int = _setting(65536, _integer(256, 16777216))
    bad_frames_per_minute: int = _setting(10, _integer(0, 100000))
    outbound_queue_messages: int = _setting(1024, _integer(1, 1000000))
    send_timeout_s: float = _setting(10.0, _number(0, 300, above=True))
    sends_per_second: float = _setting(100.0, _number(0, above=True))
    send_burst: int = _setting(200, _integer(1))
    max_connections: int = _setting(100000, _integer(1))
    max_connections_per_address: int = _setting(1000, _integer(1))
    # Handshakes per address key (IPv4 address, IPv6 /64), whatever their outcome.
    handshakes_per_second_per_address: float = _setting(20.0, _number(0, above=True))
    handshake_burst_per_address: int = _setting(200, _integer(1))
    max_devices_per_uid: int = _setting(16, _integer(1, 1024))
    # Frames of any kind per second per connection, counted before decoding;
    # bursts of twice as many. Above it: 1008 (CONTRACT.md §5).
    max_frames_per_s: float = _setting(200.0, _number(1, 100000))
    # A connection that sends nothing (not even a ping) this long is closed; 0: never.
    idle_timeout_s: float = _setting(120.0, _number(0, 86400))
    # Distinct recipients of one group send (CONTRACT.md §5).
    max_recipients: int = _setting(100, _integer(1, 1000))
    # A fragmented message must be complete within this many seconds of its first part.
    partial_message_timeout_s: float = _setting(10.0, _number(0, 300, above=True))


@dataclass(frozen=True)
class PartitionsConfig:
    # 0 = no cap.
    max_per_instance: int = _setting(0, _integer(0))
    weight: float = _setting(1.0, _number(0, 1000))
    rebalance_pause_s: float = _setting(0.2, _number(0, 60))
    # A cold cluster (most partitions free) waits for instances to stop joining this long.
    settle_s: float = _setting(2.0, _number(0, 60))


@dataclass(frozen=True)
class ReplayConfig:
    max_records: int = _setting(100000, _integer(0))
    max_age_s: float = _setting(604800.0, _number(0, above=True))
    # Handshakes with a resume parameter per uid (each may cost a read of the window).
    resumes_per_minute_per_uid: float = _setting(20.0, _number(0, above=True))
    resume_burst_per_uid: int = _setting(20, _integer(1))


@dataclass(frozen=True)
class ShutdownConfig:
    grace_period_s: float = _setting(30.0, _number(0, 3600))
    drain_stagger_s: float = _setting(0.5, _number(0, 60))


@dataclass(frozen=True)
class ServerApiConfig:
    # The server API's key: one line of at least 32 printable ASCII characters.
    # Not set: every server API path answers 404.
    key_file: Path | None = _setting(None, _readable_file)


@dataclass(frozen=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = _setting(
        "info", _choice("debug", "info", "warning", "error")
    )
    format: Literal["logfmt", "json"] = _setting("logfmt", _choice("logfmt", "json"))


def _auth_problems(raw: Mapping[str, Any]) -> list[str]:
    if raw.get("mode") != "jwt":
        return []
    problems = []
    if "jwt_secret_file" not in raw:
        problems.append('jwt_secret_file: required when auth.mode is "jwt"')
    # Without them a token your identity provider minted for another
    # application (same key, other audience) would be accepted here.
    if "jwt_audience" not in raw and raw.get("allow_any_audience") is not True:
        problems.append(
            'jwt_audience: required when auth.mode is "jwt" (the "aud" your identity provider '
            "puts in tokens for this service), or set auth.allow_any_audience = true to accept "
            "tokens issued for any application"
        )
    if "jwt_issuer" not in raw and raw.get("allow_any_issuer") is not True:
        problems.append(
            'jwt_issuer: required when auth.mode is "jwt" (the "iss" of your identity '
            "provider), or set auth.allow_any_issuer = true to accept tokens of any issuer "
            "that holds the key"
        )
    return problems


def _tls_pair(table: str, secure_scheme: str) -> Callable[[Mapping[str, Any]], list[str]]:
    """A listener's certificate and key come together, and it advertises its TLS."""

    def check(raw: Mapping[str, Any]) -> list[str]:
        has_cert, has_key = "tls_cert_file" in raw, "tls_key_file" in raw
        if has_cert != has_key:
            missing, given = (
                ("tls_key_file", "tls_cert_file") if has_cert else ("tls_cert_file", "tls_key_file")
            )
            return [f"{missing}: required when {table}.{given} is set"]
        advertise = raw.get("advertise")
        plain_scheme = secure_scheme[:-1]
        if has_cert and isinstance(advertise, str) and advertise.startswith(plain_scheme + ":"):
            return [
                f"advertise: must start with {secure_scheme}:// when {table}.tls_cert_file is set, "
                f"got {advertise!r}"
            ]
        return []

    return check


# Checks that span keys of one table. They see the table's raw TOML values and
# return problems as "<key>: <reason>", relative to the table.
_TABLE_CHECKS: Final[Mapping[str, Callable[[Mapping[str, Any]], list[str]]]] = {
    "auth": _auth_problems,
    "http": _tls_pair("http", "https"),
    "websocket": _tls_pair("websocket", "wss"),
}


def _section(cls: type[Any]) -> Any:
    """A table of Config; it has a default when every key in it has one."""
    if all(_has_default(f) for f in fields(cls)):
        return field(default_factory=cls, metadata={_SECTION: cls})
    return field(metadata={_SECTION: cls})


class Reload(enum.Enum):
    """What a reload (SIGHUP) does with a changed key."""

    LIVE = "live"  # applied to the running instance
    RESTART = "restart"  # logged as needing a restart; the running value stays


_LIVE, _RESTART = Reload.LIVE, Reload.RESTART

# Every key, and what a reload does when it changed. The one table: the
# reload, the docs' table and the annotated example file follow it (a test
# checks them). A key missing here counts as RESTART, so it is reported,
# never silently ignored.
RELOAD: Final[Mapping[str, Reload]] = {
    # Where the cluster's state lives and who this instance is.
    "cluster.name": _RESTART,
    "cluster.partitions": _RESTART,
    "cluster.environment": _LIVE,
    "instance.id": _RESTART,
    # Listeners and what they advertise (registered in ZooKeeper at start).
    "http.listen": _RESTART,
    "http.advertise": _RESTART,
    "http.demo_page": _LIVE,
    # Certificates are reloaded in place; turning TLS on or off needs a restart.
    "http.tls_cert_file": _LIVE,
    "http.tls_key_file": _LIVE,
    "websocket.listen": _RESTART,
    "websocket.advertise": _RESTART,
    "websocket.handshake_timeout_s": _RESTART,
    "websocket.max_unfinished_handshakes": _RESTART,
    "websocket.max_unfinished_handshakes_per_address": _RESTART,
    "websocket.tcp_keepalive_idle_s": _RESTART,
    "websocket.tcp_keepalive_interval_s": _RESTART,
    "websocket.tcp_keepalive_count": _RESTART,
    "websocket.tcp_user_timeout_s": _RESTART,
    "websocket.allowed_origins": _LIVE,
    "websocket.tls_cert_file": _LIVE,
    "websocket.tls_key_file": _LIVE,
    "admin.token_file": _LIVE,
    "admin.listen": _RESTART,
    "admin.advertise": _RESTART,
    "zookeeper.hosts": _RESTART,
    "zookeeper.session_timeout": _RESTART,
    "zookeeper.connect_timeout_s": _RESTART,
    "kafka.bootstrap_servers": _RESTART,
    "kafka.topic_prefix": _RESTART,
    "kafka.group_prefix": _RESTART,
    # Read when topics are created, at start.
    "kafka.create_topics": _RESTART,
    "kafka.replication_factor": _RESTART,
    "kafka.min_insync_replicas": _RESTART,
    "kafka.topic_retention_s": _RESTART,
    # The clients' settings are fixed when they are created.
    "kafka.produce_timeout_s": _RESTART,
    "kafka.linger_ms": _RESTART,
    "kafka.fetch_wait_max_ms": _RESTART,
    # Read by the balancer at every step.
    "kafka.unhealthy_release_s": _LIVE,
    "auth.mode": _LIVE,
    "auth.jwt_secret_file": _LIVE,
    "auth.jwt_algorithm": _LIVE,
    "auth.jwt_issuer": _LIVE,
    "auth.jwt_audience": _LIVE,
    "auth.jwt_leeway_s": _LIVE,
    "auth.max_token_lifetime_s": _LIVE,
    "auth.allow_insecure_none": _LIVE,
    "auth.allow_any_audience": _LIVE,
    "auth.allow_any_issuer": _LIVE,
    # The WebSocket listener's frame parser is built at start.
    "limits.max_frame_bytes": _RESTART,
    # Read when a session starts: new sessions get the new value.
    "limits.bad_frames_per_minute": _LIVE,
    "limits.outbound_queue_messages": _LIVE,
    "limits.send_timeout_s": _LIVE,
    "limits.sends_per_second": _LIVE,
    "limits.send_burst": _LIVE,
    # Read at every handshake.
    "limits.max_connections": _LIVE,
    "limits.max_connections_per_address": _LIVE,
    "limits.handshakes_per_second_per_address": _LIVE,
    "limits.handshake_burst_per_address": _LIVE,
    "limits.max_devices_per_uid": _LIVE,
    "limits.max_frames_per_s": _LIVE,
    "limits.idle_timeout_s": _LIVE,
    "limits.max_recipients": _LIVE,
    # The WebSocket listener's frame reader is built at start.
    "limits.partial_message_timeout_s": _RESTART,
    "partitions.max_per_instance": _LIVE,
    "partitions.weight": _LIVE,
    "partitions.rebalance_pause_s": _LIVE,
    "partitions.settle_s": _LIVE,
    "replay.max_records": _LIVE,
    "replay.max_age_s": _LIVE,
    "replay.resumes_per_minute_per_uid": _LIVE,
    "replay.resume_burst_per_uid": _LIVE,
    "shutdown.grace_period_s": _LIVE,
    "shutdown.drain_stagger_s": _LIVE,
    # The key file is read again at every reload (rotated in place).
    "server_api.key_file": _LIVE,
    "log.level": _LIVE,
    "log.format": _LIVE,
}


def reload_of(dotted_key: str) -> Reload:
    return RELOAD.get(dotted_key, Reload.RESTART)


# Keys that a running instance cannot pick up from a reload (SIGHUP).
RESTART_REQUIRED_KEYS: Final[tuple[str, ...]] = tuple(
    key for key, reload in RELOAD.items() if reload is Reload.RESTART
)

# Keys that moved: old dotted name -> new dotted name. The old name is still
# read, with a warning, until it is removed in a later version.
DEPRECATED_KEYS: Final[Mapping[str, str]] = {
    "http.admin_token_file": "admin.token_file",
}


def _unspecified_host(host: str) -> str:
    """A connectable address for a listener bound to every address."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole configuration; each section field is one TOML table of the same name."""

    cluster: ClusterConfig = _section(ClusterConfig)
    instance: InstanceConfig = _section(InstanceConfig)
    http: HttpConfig = _section(HttpConfig)
    websocket: WebSocketConfig = _section(WebSocketConfig)
    admin: AdminConfig = _section(AdminConfig)
    zookeeper: ZooKeeperConfig = _section(ZooKeeperConfig)
    kafka: KafkaConfig = _section(KafkaConfig)
    auth: AuthConfig = _section(AuthConfig)
    limits: LimitsConfig = _section(LimitsConfig)
    partitions: PartitionsConfig = _section(PartitionsConfig)
    replay: ReplayConfig = _section(ReplayConfig)
    shutdown: ShutdownConfig = _section(ShutdownConfig)
    server_api: ServerApiConfig = _section(ServerApiConfig)
    log: LogConfig = _section(LogConfig)
    # Deprecated key names the file used, as warnings ("<old>: renamed to <new>").
    deprecations: tuple[str, ...] = ()

    def value(self, dotted_key: str) -> Any:
        """The value of a key by its TOML name, e.g. ``"zookeeper.session_timeout"``."""
        table, _, key = dotted_key.partition(".")
        section = getattr(self, table)
        for f in fields(section):
            if _toml_key(f) == key:
                return getattr(section, f.name)
        raise KeyError(dotted_key)

    def changed_keys(self, other: Config) -> list[str]:
        """Every key whose value differs in ``other``, in declaration order."""
        return [key for key in dotted_keys() if self.value(key) != other.value(key)]

    def restart_required_changes(self, other: Config) -> list[str]:
        """The changed keys that a reload cannot apply."""
        return [key for key in self.changed_keys(other) if reload_of(key) is Reload.RESTART]

    def with_live_keys_of(self, other: Config) -> Config:
        """This configuration with every live key taken from ``other``."""
        sections: dict[str, Any] = {}
        for table in _section_fields():
            mine, theirs = getattr(self, table.name), getattr(other, table.name)
            live = {
                f.name: getattr(theirs, f.name)
                for f in fields(mine)
                if reload_of(f"{table.name}.{_toml_key(f)}") is Reload.LIVE
            }
            sections[table.name] = dataclasses.replace(mine, **live)
        return dataclasses.replace(self, **sections)

    @property
    def admin_url(self) -> str:
        """Where the admin endpoints of this instance are reached (registered in ZooKeeper)."""
        if self.admin.advertise:
            return self.admin.advertise
        if self.admin.listen is not None:
            listen = self.admin.listen
            scheme = "http"
        else:
            listen = self.http.listen
            scheme = "https" if self.http.tls_cert_file is not None else "http"
        return f"{scheme}://{HostPort(_unspecified_host(listen.host), listen.port)}"


def _section_fields() -> list[Field[Any]]:
    return [f for f in fields(Config) if _SECTION in f.metadata]


def dotted_keys() -> list[str]:
    """Every key of the configuration, as ``table.key``, in declaration order."""
    return [
        f"{table.name}.{_toml_key(f)}"
        for table in _section_fields()
        for f in fields(table.metadata[_SECTION])
    ]


# --- parsing ------------------------------------------------------------------


def _unknown(name: str, known: Iterable[str]) -> str:
    """``<name>: unknown key``, with the likeliest meant key when one is close."""
    close = difflib.get_close_matches(name.rpartition(".")[2], list(known), n=1, cutoff=0.6)
    return f"{name}: unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")


def _parse_section(
    table: str, cls: type[Any], raw: Mapping[str, Any], base_dir: Path, problems: list[str]
) -> Any:
    """The table's dataclass, or None after adding its problems to ``problems``."""
    declared = {_toml_key(f): f for f in fields(cls)}
    problems.extend(_unknown(f"{table}.{key}", declared) for key in raw if key not in declared)
    values: dict[str, Any] = {}
    failed = False
    for key, f in declared.items():
        if key not in raw:
            if not _has_default(f):
                problems.append(f"{table}.{key}: required")
                failed = True
            continue
        try:
            values[f.name] = f.metadata[_PARSE](raw[key], base_dir)
        except _Invalid as e:
            problems.append(f"{table}.{key}: {e}")
            failed = True
    check = _TABLE_CHECKS.get(table)
    cross = check(raw) if check is not None else []
    problems.extend(f"{table}.{problem}" for problem in cross)
    if failed or cross:
        return None
    return cls(**values)


def _move_deprecated(
    data: Mapping[str, Any], problems: list[str]
) -> tuple[dict[str, Any], list[str]]:
    """``data`` with deprecated keys moved to their new names, and a warning for each."""
    moved: dict[str, Any] = {
        name: dict(raw) if isinstance(raw, Mapping) else raw for name, raw in data.items()
    }
    warnings = []
    for old, new in DEPRECATED_KEYS.items():
        old_table, _, old_key = old.partition(".")
        new_table, _, new_key = new.partition(".")
        source = moved.get(old_table)
        if not isinstance(source, dict) or old_key not in source:
            continue
        target = moved.setdefault(new_table, {})
        if not isinstance(target, dict):
            continue  # reported as "expected a table" by the caller
        if new_key in target:
            problems.append(f"{old}: renamed to {new}; set only {new}")
            source.pop(old_key)
            continue
        target[new_key] = source.pop(old_key)
        warnings.append(f"{old}: renamed to {new}; the old name will stop working")
    return moved, warnings


def _expand_prefixes(kafka: KafkaConfig, cluster: ClusterConfig) -> KafkaConfig:
    return dataclasses.replace(
        kafka,
        topic_prefix=kafka.topic_prefix.replace(CLUSTER_PLACEHOLDER, cluster.name),
        group_prefix=kafka.group_prefix.replace(CLUSTER_PLACEHOLDER, cluster.name),
    )


def parse_config(data: Mapping[str, Any], *, base_dir: Path | None = None) -> Config:
    """Build a Config from parsed TOML. Relative paths resolve against ``base_dir``
    (the working directory when None). Raises ConfigError listing every problem."""
    base = base_dir if base_dir is not None else Path.cwd()
    problems: list[str] = []
    data, deprecations = _move_deprecated(data, problems)
    tables = {f.name: f for f in _section_fields()}
    problems.extend(_unknown(name, tables) for name in data if name not in tables)
    sections: dict[str, Any] = {}
    for name, f in tables.items():
        raw = data.get(name, {})
        if not isinstance(raw, Mapping):
            problems.append(f"{name}: expected a table, got {_toml_type(raw)}")
            continue
        section = _parse_section(name, f.metadata[_SECTION], raw, base, problems)
        if section is not None:
            sections[name] = section
    if problems:
        raise ConfigError(problems)
    config = Config(**sections, deprecations=tuple(deprecations))
    return dataclasses.replace(config, kafka=_expand_prefixes(config.kafka, config.cluster))


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML file. Raises ConfigError listing every problem."""
    try:
        content = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError([f"{os.fspath(path)}: cannot read file: {e.strerror or e}"]) from None
    try:
        data = tomllib.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError([f"{os.fspath(path)}: invalid TOML: {e}"]) from None
    return parse_config(data, base_dir=Path(os.path.abspath(path)).parent)


def check_config_file(path: str | os.PathLike[str]) -> list[str]:
    """Every problem with the file at ``path``; [] when it is valid."""
    try:
        load_config(path)
    except ConfigError as e:
        return e.problems
    return []
