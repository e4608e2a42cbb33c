import copy
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from linechatd.config import (
    RELOAD,
    RESTART_REQUIRED_KEYS,
    Config,
    ConfigError,
    HostPort,
    KafkaConfig,
    ZooKeeperConfig,
    check_config_file,
    dotted_keys,
    load_config,
    parse_config,
    read_token_file,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "linechatd.toml"

REQUIRED: dict[str, Any] = {
    "zookeeper": {"hosts": "127.0.0.1:2181"},
    "kafka": {"bootstrap_servers": "127.0.0.1:9092"},
}

# Every key with a fixed default, by its TOML name, as the interface lists them.
DEFAULTS: dict[str, Any] = {
    "cluster.name": "default",
    "cluster.partitions": 64,
    "cluster.environment": "development",
    "http.listen": HostPort("127.0.0.1", 8080),
    "http.advertise": "http://127.0.0.1:8080",
    "http.demo_page": False,
    "http.tls_cert_file": None,
    "http.tls_key_file": None,
    "websocket.listen": HostPort("127.0.0.1", 8765),
    "websocket.advertise": "ws://127.0.0.1:8765/ws",
    "websocket.handshake_timeout_s": 10.0,
    "websocket.max_unfinished_handshakes": 4096,
    "websocket.max_unfinished_handshakes_per_address": 256,
    "websocket.tcp_keepalive_idle_s": 45,
    "websocket.tcp_keepalive_interval_s": 15,
    "websocket.tcp_keepalive_count": 3,
    "websocket.tcp_user_timeout_s": 90.0,
    "websocket.allowed_origins": (),
    "websocket.tls_cert_file": None,
    "websocket.tls_key_file": None,
    "admin.token_file": None,
    "admin.listen": None,
    "admin.advertise": "",
    "zookeeper.session_timeout": 10.0,
    "zookeeper.connect_timeout_s": 30.0,
    "kafka.topic_prefix": "topic-",
    "kafka.group_prefix": "consumer-group-",
    "kafka.create_topics": True,
    "kafka.replication_factor": 1,
    "kafka.min_insync_replicas": None,
    "kafka.topic_retention_s": None,
    "kafka.produce_timeout_s": 5.0,
    "kafka.linger_ms": 1,
    "kafka.fetch_wait_max_ms": 50,
    "kafka.unhealthy_release_s": 15.0,
    "auth.mode": "none",
    "auth.jwt_secret_file": None,
    "auth.jwt_algorithm": "HS256",
    "auth.jwt_issuer": None,
    "auth.jwt_audience": None,
    "auth.jwt_leeway_s": 30.0,
    "auth.allow_insecure_none": False,
    "auth.allow_any_audience": False,
    "auth.allow_any_issuer": False,
    "auth.max_token_lifetime_s": 86400.0,
    "limits.max_frame_bytes": 65536,
    "limits.bad_frames_per_minute": 10,
    "limits.outbound_queue_messages": 1024,
    "limits.send_timeout_s": 10.0,
    "limits.sends_per_second": 100.0,
    "limits.send_burst": 200,
    "limits.max_connections": 100000,
    "limits.max_connections_per_address": 1000,
    "limits.handshakes_per_second_per_address": 20.0,
    "limits.handshake_burst_per_address": 200,
    "limits.max_devices_per_uid": 16,
    "limits.max_frames_per_s": 200.0,
    "limits.idle_timeout_s": 120.0,
    "limits.partial_message_timeout_s": 10.0,
    "limits.max_recipients": 100,
    "server_api.key_file": None,
    "partitions.max_per_instance": 0,
    "partitions.weight": 1.0,
    "partitions.rebalance_pause_s": 0.2,
    "partitions.settle_s": 2.0,
    "replay.max_records": 100000,
    "replay.max_age_s": 604800.0,
    "replay.resumes_per_minute_per_uid": 20.0,
    "replay.resume_burst_per_uid": 20,
    "shutdown.grace_period_s": 30.0,
    "shutdown.drain_stagger_s": 0.5,
    "log.level": "info",
    "log.format": "logfmt",
}
# What jwt mode requires besides the key (or their explicit opt-outs).
CLAIMS = {"jwt_issuer": "https://idp.example", "jwt_audience": "chat"}
ALL_KEYS = [*DEFAULTS, "instance.id", "zookeeper.hosts", "kafka.bootstrap_servers"]
TOKEN = "t" * 32


def with_values(**tables: dict[str, Any]) -> dict[str, Any]:
    """The required keys plus ``tables`` (merged into their tables)."""
    data = copy.deepcopy(REQUIRED)
    for name, values in tables.items():
        data.setdefault(name, {}).update(values)
    return data


def problems_of(data: dict[str, Any], base_dir: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, base_dir=base_dir)
    return info.value.problems


def write(tmp_path: Path, text: str, name: str = "linechatd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- valid files and defaults ---------------------------------------------------


def test_example_file_parses_cleanly() -> None:
    assert check_config_file(EXAMPLE) == []
    config = load_config(EXAMPLE)
    assert config.zookeeper.hosts == "127.0.0.1:2181"
    assert config.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert config.auth.mode == "none"


def test_example_file_documents_every_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    table = ""
    documented = set()
    for line in text.splitlines():
        if match := re.fullmatch(r"\[(\w+)\]", line):
            table = match[1]
        elif match := re.fullmatch(r"#? ?(\w+) = .*", line):
            documented.add(f"{table}.{match[1]}")
    assert documented == set(ALL_KEYS)


def test_example_file_is_valid_with_the_jwt_examples_uncommented(tmp_path: Path) -> None:
    # The commented-out keys must be real keys with valid example values.
    text = EXAMPLE.read_text(encoding="utf-8")
    text = re.sub(
        r"^# ((?:jwt_\w+|token_file|listen|advertise|min_insync_replicas|topic_retention_s|id) = )",
        r"\1",
        text,
        flags=re.M,
    )
    text = text.replace('mode = "none"', 'mode = "jwt"')
    text = text.replace('"/etc/linechatd/jwt.key"', '"jwt.key"')
    (tmp_path / "jwt.key").write_bytes(b"secret\n")
    (tmp_path / "admin.token").write_bytes(b"a" * 32 + b"\n")
    config = load_config(write(tmp_path, text))
    assert config.auth.mode == "jwt"
    assert config.auth.jwt_secret_file == tmp_path / "jwt.key"
    assert config.instance.id == "gw-1"
    assert config.admin.token_file == tmp_path / "admin.token"
    assert config.admin.listen == HostPort("127.0.0.1", 8081)
    assert config.kafka.min_insync_replicas == 2


def test_defaults() -> None:
    config = parse_config(REQUIRED)
    for key, default in DEFAULTS.items():
        value = config.value(key)
        assert value == default, key
        assert type(value) is type(default), key


def test_config_can_be_built_directly_with_defaults() -> None:
    config = Config(
        zookeeper=ZooKeeperConfig(hosts="127.0.0.1:2181"),
        kafka=KafkaConfig(bootstrap_servers="127.0.0.1:9092"),
    )
    assert config == parse_config(REQUIRED)


def test_config_is_frozen() -> None:
    config = parse_config(REQUIRED)
    with pytest.raises(AttributeError):
        config.cluster.partitions = 3  # type: ignore[misc]


def test_instance_id_defaults_to_the_cleaned_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "my host!" + "x" * 100)
    instance_id = parse_config(REQUIRED).instance.id
    assert instance_id == ("my-host-" + "x" * 100)[:64]


def test_instance_id_default_never_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "")
    assert parse_config(REQUIRED).instance.id


def test_values_are_read() -> None:
    config = parse_config(
        with_values(
            cluster={"name": "prod_eu-1", "partitions": 4096},
            instance={"id": "gw-2.eu"},
            http={"listen": "[::1]:0", "demo_page": True},
            websocket={"allowed_origins": ["https://Chat.Example.com", "http://127.0.0.1:3000"]},
            zookeeper={"hosts": "zk1:2181, zk2:2182/linechat/prod", "session_timeout": 5},
            kafka={"bootstrap_servers": "[::1]:9092,k2:9093", "linger_ms": 0},
            auth={"jwt_issuer": "https://auth.example.com", "jwt_leeway_s": 0},
            log={"level": "debug", "format": "json"},
        )
    )
    assert config.cluster.name == "prod_eu-1"
    assert config.cluster.partitions == 4096
    assert config.instance.id == "gw-2.eu"
    assert config.http.listen == HostPort("::1", 0)
    assert config.http.demo_page is True
    assert config.websocket.allowed_origins == ("https://chat.example.com", "http://127.0.0.1:3000")
    assert config.zookeeper.hosts == "zk1:2181,zk2:2182/linechat/prod"
    # Ints are accepted for float keys and become floats.
    assert config.zookeeper.session_timeout_s == 5.0
    assert type(config.zookeeper.session_timeout_s) is float
    assert config.kafka.bootstrap_servers == "[::1]:9092,k2:9093"
    assert config.kafka.linger_ms == 0
    assert config.auth.jwt_issuer == "https://auth.example.com"
    assert config.log.level == "debug"
    assert config.log.format == "json"


def test_host_port_str() -> None:
    assert str(HostPort("127.0.0.1", 8080)) == "127.0.0.1:8080"
    assert str(HostPort("::1", 0)) == "[::1]:0"
    assert HostPort.parse("[::]:80") == HostPort("::", 80)
    assert HostPort.parse("localhost:65535") == HostPort("localhost", 65535)


# --- advertise ------------------------------------------------------------------


def test_advertise_defaults_derive_from_listen() -> None:
    config = parse_config(
        with_values(http={"listen": "0.0.0.0:9000"}, websocket={"listen": "[::1]:9001"})
    )
    assert config.http.advertise == "http://0.0.0.0:9000"
    assert config.websocket.advertise == "ws://[::1]:9001/ws"


def test_explicit_advertise_is_kept() -> None:
    config = parse_config(
        with_values(
            http={"listen": "0.0.0.0:9000", "advertise": "https://gw1.example.com"},
            websocket={"advertise": "wss://gw1.example.com/ws"},
        )
    )
    assert config.http.advertise == "https://gw1.example.com"
    assert config.websocket.advertise == "wss://gw1.example.com/ws"


@pytest.mark.parametrize(
    ("table", "value", "reason"),
    [
        ("http", "ws://h:1", "must start with http:// or https://, got 'ws://h:1'"),
        ("http", "h:1", "must start with http:// or https://, got 'h:1'"),
        ("http", "http://", "expected a URL like http://host:port, got 'http://'"),
        ("http", "http://[zz]:1", "expected a URL like http://host:port, got 'http://[zz]:1'"),
        ("websocket", "http://h:1/ws", "must start with ws:// or wss://, got 'http://h:1/ws'"),
        ("http", "http://h:99999", "expected a URL like http://host:port, got 'http://h:99999'"),
        ("websocket", "wss://", "expected a URL like ws://host:port/ws, got 'wss://'"),
    ],
)
def test_bad_advertise(table: str, value: str, reason: str) -> None:
    assert problems_of(with_values(**{table: {"advertise": value}})) == [
        f"{table}.advertise: {reason}"
    ]


# --- paths ------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_dir = tmp_path / "etc"
    (config_dir / "keys").mkdir(parents=True)
    (config_dir / "keys" / "jwt.key").write_bytes(b"s3cret\n")
    (config_dir / "admin.token").write_text(TOKEN + "\n")
    path = write(
        config_dir,
        '[zookeeper]\nhosts = "127.0.0.1:2181"\n'
        '[kafka]\nbootstrap_servers = "127.0.0.1:9092"\n'
        '[admin]\ntoken_file = "admin.token"\n'
        '[auth]\nmode = "jwt"\njwt_secret_file = "keys/jwt.key"\n'
        'jwt_issuer = "https://idp.example"\njwt_audience = "chat"\n',
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(os.path.relpath(path, elsewhere))
    assert config.auth.jwt_secret_file == config_dir / "keys" / "jwt.key"
    assert config.admin.token_file == config_dir / "admin.token"
    assert config.auth.jwt_secret_file.is_absolute()


def test_parse_config_resolves_paths_against_base_dir(tmp_path: Path) -> None:
    (tmp_path / "jwt.key").write_bytes(b"s")
    config = parse_config(
        with_values(auth={"mode": "jwt", "jwt_secret_file": "jwt.key", **CLAIMS}), base_dir=tmp_path
    )
    assert config.auth.jwt_secret_file == tmp_path / "jwt.key"


def test_absolute_path_is_kept(tmp_path: Path) -> None:
    key = tmp_path / "jwt.key"
    key.write_bytes(b"s")
    config = parse_config(
        with_values(auth={"mode": "jwt", "jwt_secret_file": str(key), **CLAIMS}),
        base_dir=Path("/nowhere"),
    )
    assert config.auth.jwt_secret_file == key


def test_missing_file_is_reported(tmp_path: Path) -> None:
    data = with_values(
        admin={"token_file": "nope.token"},
        auth={"mode": "jwt", "jwt_secret_file": "nope.key", **CLAIMS},
    )
    assert sorted(problems_of(data, base_dir=tmp_path)) == [
        f"admin.token_file: cannot read {str(tmp_path / 'nope.token')!r}: "
        "No such file or directory",
        f"auth.jwt_secret_file: cannot read {str(tmp_path / 'nope.key')!r}: "
        "No such file or directory",
    ]


def test_directory_is_not_a_readable_file(tmp_path: Path) -> None:
    problems = problems_of(with_values(admin={"token_file": "."}), base_dir=tmp_path)
    assert len(problems) == 1
    assert problems[0].startswith("admin.token_file: cannot read ")


def test_empty_path_is_rejected(tmp_path: Path) -> None:
    assert problems_of(with_values(admin={"token_file": ""}), base_dir=tmp_path) == [
        "admin.token_file: must not be empty (leave the key out instead)"
    ]


def test_jwt_mode_requires_a_secret_file() -> None:
    assert problems_of(with_values(auth={"mode": "jwt", **CLAIMS})) == [
        'auth.jwt_secret_file: required when auth.mode is "jwt"'
    ]


def test_jwt_mode_requires_audience_and_issuer_or_their_explicit_opt_outs(tmp_path: Path) -> None:
    (tmp_path / "jwt.key").write_bytes(b"s")
    base = {"mode": "jwt", "jwt_secret_file": "jwt.key"}
    problems = problems_of(with_values(auth=base), base_dir=tmp_path)
    assert [p.split(":", 1)[0] for p in problems] == ["auth.jwt_audience", "auth.jwt_issuer"]
    assert "auth.allow_any_audience = true" in problems[0]
    assert "auth.allow_any_issuer = true" in problems[1]
    only_aud = {**base, "jwt_audience": "chat"}
    assert [p.split(":", 1)[0] for p in problems_of(with_values(auth=only_aud), tmp_path)] == [
        "auth.jwt_issuer"
    ]
    opted_out = {**base, "allow_any_audience": True, "allow_any_issuer": True}
    config = parse_config(with_values(auth=opted_out), base_dir=tmp_path)
    assert config.auth.jwt_audience is None and config.auth.allow_any_audience
    # "none" needs neither.
    assert parse_config(with_values(auth={"mode": "none"})).auth.jwt_audience is None


def test_jwt_mode_with_unreadable_secret_file_is_one_problem(tmp_path: Path) -> None:
    problems = problems_of(
        with_values(auth={"mode": "jwt", "jwt_secret_file": "missing", **CLAIMS}),
        base_dir=tmp_path,
    )
    assert len(problems) == 1
    assert problems[0].startswith("auth.jwt_secret_file: cannot read ")


# --- error paths --------------------------------------------------------------------


def test_unknown_key() -> None:
    # The contract's line, with the likely key after it.
    assert problems_of(with_values(websocket={"lisen": "127.0.0.1:1"})) == [
        "websocket.lisen: unknown key (did you mean 'listen'?)"
    ]


def test_unknown_table() -> None:
    assert problems_of({**REQUIRED, "foo": {"a": 1}}) == ["foo: unknown key"]


def test_unknown_top_level_value() -> None:
    assert problems_of({**REQUIRED, "partitions_count": 3}) == [
        "partitions_count: unknown key (did you mean 'partitions'?)"
    ]


def test_unknown_nested_table() -> None:
    assert problems_of(with_values(http={"extra": {"a": 1}})) == ["http.extra: unknown key"]


def test_table_that_is_not_a_table() -> None:
    assert problems_of({**REQUIRED, "cluster": 5}) == ["cluster: expected a table, got integer"]


@pytest.mark.parametrize("key", ["zookeeper.hosts", "kafka.bootstrap_servers"])
def test_missing_required(key: str) -> None:
    data = copy.deepcopy(REQUIRED)
    table, name = key.split(".")
    del data[table][name]
    assert problems_of(data) == [f"{key}: required"]


def test_missing_required_tables() -> None:
    assert problems_of({}) == ["zookeeper.hosts: required", "kafka.bootstrap_servers: required"]


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("cluster.partitions", "64", "expected an integer, got string"),
        ("cluster.partitions", 64.0, "expected an integer, got float"),
        ("cluster.partitions", [64], "expected an integer, got array"),
        ("cluster.name", 1, "expected a string, got integer"),
        ("instance.id", {"a": 1}, "expected a string, got table"),
        ("http.listen", 8080, "expected a string, got integer"),
        ("http.demo_page", "yes", "expected a boolean, got string"),
        ("http.demo_page", 1, "expected a boolean, got integer"),
        ("websocket.handshake_timeout_s", "10", "expected a number, got string"),
        (
            "websocket.allowed_origins",
            "https://a.example",
            "expected an array of strings, got string",
        ),
        (
            "websocket.allowed_origins",
            ["https://a.example", 1],
            "expected an array of strings, got array",
        ),
        ("zookeeper.hosts", ["127.0.0.1:2181"], "expected a string, got array"),
        ("kafka.create_topics", 0, "expected a boolean, got integer"),
        ("auth.mode", True, "expected a string, got boolean"),
        ("auth.jwt_issuer", 3, "expected a string, got integer"),
        ("auth.jwt_secret_file", 3, "expected a string, got integer"),
        ("log.level", 1.5, "expected a string, got float"),
    ],
)
def test_wrong_type(key: str, value: Any, reason: str) -> None:
    table, name = key.split(".")
    assert problems_of(with_values(**{table: {name: value}})) == [f"{key}: {reason}"]


def test_toml_datetime_type_is_named(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[zookeeper]\nhosts = "h:1"\n[kafka]\nbootstrap_servers = "h:2"\n'
        "[cluster]\nname = 1979-05-27T07:32:00Z\npartitions = 1979-05-27\n",
    )
    assert check_config_file(path) == [
        "cluster.name: expected a string, got datetime",
        "cluster.partitions: expected an integer, got date",
    ]


@pytest.mark.parametrize(
    "key",
    ["cluster.partitions", "kafka.linger_ms", "limits.max_frame_bytes", "replay.max_records"],
)
def test_bool_is_not_an_integer(key: str) -> None:
    table, name = key.split(".")
    assert problems_of(with_values(**{table: {name: True}})) == [
        f"{key}: expected an integer, got boolean"
    ]


def test_bool_is_not_a_number() -> None:
    assert problems_of(with_values(partitions={"weight": False})) == [
        "partitions.weight: expected a number, got boolean"
    ]


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("cluster.partitions", 0, "must be between 1 and 4096, got 0"),
        ("cluster.partitions", 4097, "must be between 1 and 4096, got 4097"),
        ("kafka.replication_factor", 33, "must be between 1 and 32, got 33"),
        ("kafka.linger_ms", -1, "must be between 0 and 1000, got -1"),
        ("kafka.fetch_wait_max_ms", 0, "must be between 1 and 1000, got 0"),
        ("limits.max_frame_bytes", 255, "must be between 256 and 16777216, got 255"),
        ("limits.send_burst", 0, "must be at least 1, got 0"),
        ("limits.max_devices_per_uid", 1025, "must be between 1 and 1024, got 1025"),
        ("partitions.max_per_instance", -1, "must be at least 0, got -1"),
        ("replay.max_records", -5, "must be at least 0, got -5"),
        ("zookeeper.session_timeout", 0.5, "must be between 1 and 600, got 0.5"),
        ("zookeeper.session_timeout", 601, "must be between 1 and 600, got 601"),
        ("zookeeper.connect_timeout_s", 0, "must be greater than 0 and at most 600, got 0"),
        (
            "websocket.handshake_timeout_s",
            300.5,
            "must be greater than 0 and at most 300, got 300.5",
        ),
        ("kafka.produce_timeout_s", -1.0, "must be greater than 0 and at most 120, got -1.0"),
        ("limits.sends_per_second", 0, "must be greater than 0, got 0"),
        ("replay.max_age_s", 0.0, "must be greater than 0, got 0.0"),
        ("partitions.weight", 1000.1, "must be between 0 and 1000, got 1000.1"),
        ("auth.jwt_leeway_s", -0.1, "must be between 0 and 600, got -0.1"),
        ("shutdown.grace_period_s", 3601, "must be between 0 and 3600, got 3601"),
        ("shutdown.drain_stagger_s", 61, "must be between 0 and 60, got 61"),
        ("partitions.rebalance_pause_s", 60.01, "must be between 0 and 60, got 60.01"),
        ("limits.sends_per_second", float("inf"), "must be a finite number, got inf"),
        ("replay.max_age_s", float("nan"), "must be a finite number, got nan"),
        ("replay.max_age_s", 10**400, f"must be a finite number, got {10**400}"),
    ],
)
def test_out_of_range(key: str, value: Any, reason: str) -> None:
    table, name = key.split(".")
    assert problems_of(with_values(**{table: {name: value}})) == [f"{key}: {reason}"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("cluster.partitions", 1),
        ("cluster.partitions", 4096),
        ("zookeeper.session_timeout", 1),
        ("zookeeper.session_timeout", 600.0),
        ("websocket.handshake_timeout_s", 300),
        ("partitions.weight", 0),
        ("limits.bad_frames_per_minute", 0),
        ("limits.max_connections", 10**12),
        ("replay.max_records", 0),
    ],
)
def test_range_bounds_are_inclusive_where_documented(key: str, value: Any) -> None:
    table, name = key.split(".")
    config = parse_config(with_values(**{table: {name: value}}))
    assert config.value(key) == value


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("cluster.name", "", "must be 1-64 characters of [A-Za-z0-9_-], got ''"),
        ("cluster.name", "a.b", "must be 1-64 characters of [A-Za-z0-9_-], got 'a.b'"),
        ("cluster.name", "x" * 65, f"must be 1-64 characters of [A-Za-z0-9_-], got {'x' * 65!r}"),
        ("instance.id", "gw 1", "must be 1-64 characters of [A-Za-z0-9_.-], got 'gw 1'"),
        ("kafka.topic_prefix", "t/", "must be 1-100 characters of [A-Za-z0-9._-], got 't/'"),
        ("kafka.group_prefix", "", "must be 1-100 characters of [A-Za-z0-9._-], got ''"),
        ("auth.mode", "JWT", 'must be one of "none", "jwt", got \'JWT\''),
        ("auth.jwt_algorithm", "none", 'must be one of "HS256", "RS256", "ES256", got \'none\''),
        ("auth.jwt_audience", "", "must not be empty (leave the key out instead)"),
        ("log.level", "trace", 'must be one of "debug", "info", "warning", "error", got \'trace\''),
        ("log.format", "text", 'must be one of "logfmt", "json", got \'text\''),
    ],
)
def test_bad_string(key: str, value: str, reason: str) -> None:
    table, name = key.split(".")
    assert problems_of(with_values(**{table: {name: value}})) == [f"{key}: {reason}"]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("abc", "expected host:port, got 'abc'"),
        ("", "expected host:port, got ''"),
        (":8080", "expected host:port, got ':8080'"),
        ("host:", "expected host:port, got 'host:'"),
        ("host:http", "expected host:port, got 'host:http'"),
        ("host:-1", "expected host:port, got 'host:-1'"),
        ("::1:8080", "expected host:port, got '::1:8080'"),
        ("[nothex]:8080", "expected host:port, got '[nothex]:8080'"),
        ("a b:80", "expected host:port, got 'a b:80'"),
        ("host:65536", "port must be between 0 and 65535, got 65536"),
    ],
)
def test_bad_listen(value: str, reason: str) -> None:
    assert problems_of(with_values(http={"listen": value})) == [f"http.listen: {reason}"]


@pytest.mark.parametrize(
    "value", ["", "abc", "h:1,", "h:1,,h:2", "h:0", "/chroot", "h:1/", "h:1/a//b", "h:1/a b", "h"]
)
def test_bad_zookeeper_hosts(value: str) -> None:
    assert problems_of(with_values(zookeeper={"hosts": value})) == [
        f"zookeeper.hosts: expected host:port[,host:port...][/chroot], got {value!r}"
    ]


@pytest.mark.parametrize("value", ["", "abc", "h:1,", "h:1/chroot", "h:99999", "h"])
def test_bad_bootstrap_servers(value: str) -> None:
    assert problems_of(with_values(kafka={"bootstrap_servers": value})) == [
        f"kafka.bootstrap_servers: expected host:port[,host:port...], got {value!r}"
    ]


@pytest.mark.parametrize(
    "origin",
    [
        "chat.example.com",
        "ftp://chat.example.com",
        "https://chat.example.com/",
        "https://chat.example.com/app",
        "https://chat.example.com?x=1",
        "https://chat.example.com#x",
        "https://user@chat.example.com",
        "https://chat.example.com:99999",
        "https://*.example.com",
        "https://",
        "https://[zz]",
        "null",
    ],
)
def test_bad_origin(origin: str) -> None:
    data = with_values(websocket={"allowed_origins": ["https://ok.example", origin]})
    assert problems_of(data) == [
        "websocket.allowed_origins: expected origins like 'https://chat.example.com', "
        f"got {origin!r}"
    ]


def test_good_origins() -> None:
    origins = ["https://chat.example.com", "http://localhost:3000", "https://[::1]:8443"]
    config = parse_config(with_values(websocket={"allowed_origins": origins}))
    assert config.websocket.allowed_origins == tuple(origins)


# --- files --------------------------------------------------------------------------


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    expected = [f"{path}: cannot read file: No such file or directory"]
    assert check_config_file(path) == expected
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.problems == expected


def test_directory_as_config_file(tmp_path: Path) -> None:
    problems = check_config_file(tmp_path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{tmp_path}: cannot read file: ")


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[cluster\nname = 1\n")
    problems = check_config_file(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: invalid TOML: ")
    with pytest.raises(tomllib.TOMLDecodeError) as info:
        tomllib.loads(path.read_text())
    assert problems[0] == f"{path}: invalid TOML: {info.value}"


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[cluster]\nname = "caf\xe9"\n')
    problems = check_config_file(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: invalid TOML: ")


def test_all_problems_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[cluster]\npartitions = "64"\n'
        '[websocket]\nlisen = "127.0.0.1:8765"\n'
        '[kafka]\nbootstrap_servers = "127.0.0.1:9092"\n',
    )
    problems = check_config_file(path)
    assert sorted(problems) == sorted(
        [
            "cluster.partitions: expected an integer, got string",
            "websocket.lisen: unknown key (did you mean 'listen'?)",
            "zookeeper.hosts: required",
        ]
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == "\n".join(problems)


def test_many_problems_in_one_table_are_all_reported() -> None:
    problems = problems_of(
        with_values(
            limits={"max_frame_bytes": 1, "send_burst": "x", "oops": 1},
            log={"level": "loud", "format": 3},
        )
    )
    assert problems == [
        "limits.oops: unknown key",
        "limits.max_frame_bytes: must be between 256 and 16777216, got 1",
        "limits.send_burst: expected an integer, got string",
        'log.level: must be one of "debug", "info", "warning", "error", got \'loud\'',
        "log.format: expected a string, got integer",
    ]


def test_every_problem_starts_with_its_dotted_key(tmp_path: Path) -> None:
    # A value of no TOML type at all is wrong for every key.
    data: dict[str, dict[str, Any]] = {}
    for key in ALL_KEYS:
        table, name = key.split(".")
        data.setdefault(table, {})[name] = object()
    problems = problems_of(data, base_dir=tmp_path)
    assert sorted(p.split(": ", 1)[0] for p in problems) == sorted(ALL_KEYS)


# --- reload -------------------------------------------------------------------------


def test_restart_required_changes_none() -> None:
    assert parse_config(REQUIRED).restart_required_changes(parse_config(REQUIRED)) == []


def test_restart_required_changes_ignores_live_keys() -> None:
    old = parse_config(REQUIRED)
    new = parse_config(
        with_values(
            limits={"sends_per_second": 5.0},
            partitions={"weight": 2.0},
            log={"level": "debug", "format": "json"},
            websocket={"allowed_origins": ["https://chat.example.com"]},
        )
    )
    assert old.restart_required_changes(new) == []
    assert old.changed_keys(new) == [
        "websocket.allowed_origins",
        "limits.sends_per_second",
        "partitions.weight",
        "log.level",
        "log.format",
    ]


def test_restart_required_changes_lists_each_changed_key() -> None:
    old = parse_config(REQUIRED)
    changed = {
        "cluster.name": "other",
        "cluster.partitions": 8,
        "instance.id": "gw-other",
        "http.listen": "127.0.0.1:1",
        "http.advertise": "http://gw.example.com:1",
        "websocket.listen": "127.0.0.1:2",
        "websocket.advertise": "ws://gw.example.com:2/ws",
        "websocket.handshake_timeout_s": 3.0,
        "websocket.max_unfinished_handshakes": 100,
        "websocket.max_unfinished_handshakes_per_address": 10,
        "websocket.tcp_keepalive_idle_s": 30,
        "websocket.tcp_keepalive_interval_s": 5,
        "websocket.tcp_keepalive_count": 4,
        "websocket.tcp_user_timeout_s": 60,
        "admin.listen": "127.0.0.1:3",
        "admin.advertise": "http://10.0.0.1:3",
        "zookeeper.hosts": "127.0.0.1:2182",
        "zookeeper.session_timeout": 20.0,
        "zookeeper.connect_timeout_s": 5.0,
        "kafka.bootstrap_servers": "127.0.0.1:9093",
        "kafka.topic_prefix": "t-",
        "kafka.group_prefix": "g-",
        "kafka.create_topics": False,
        "kafka.replication_factor": 3,
        "kafka.min_insync_replicas": 2,
        "kafka.topic_retention_s": 86400.0,
        "kafka.produce_timeout_s": 7.0,
        "kafka.linger_ms": 5,
        "kafka.fetch_wait_max_ms": 200,
        "limits.max_frame_bytes": 1024,
        "limits.partial_message_timeout_s": 3.0,
    }
    assert list(changed) == list(RESTART_REQUIRED_KEYS)
    for key, value in changed.items():
        table, name = key.split(".")
        new = parse_config(with_values(**{table: {name: value}}))
        # A listen address also moves the advertise url derived from it.
        expected = (
            [key, f"{table}.advertise"] if key in ("http.listen", "websocket.listen") else [key]
        )
        assert old.restart_required_changes(new) == expected
        assert new.restart_required_changes(old) == expected
    everything = with_values()
    for key, value in changed.items():
        table, name = key.split(".")
        everything.setdefault(table, {})[name] = value
    assert old.restart_required_changes(parse_config(everything)) == list(RESTART_REQUIRED_KEYS)


def test_every_key_says_whether_a_reload_applies_it() -> None:
    assert set(RELOAD) == set(ALL_KEYS)
    assert list(RELOAD) == dotted_keys(), "RELOAD follows the declaration order"


def test_live_keys_are_taken_and_restart_keys_kept() -> None:
    old = parse_config(REQUIRED)
    new = parse_config(
        with_values(
            limits={"sends_per_second": 5.0, "max_frame_bytes": 1024},
            websocket={"allowed_origins": ["https://a.example"], "handshake_timeout_s": 3.0},
            log={"format": "json"},
        )
    )
    applied = old.with_live_keys_of(new)
    assert applied.limits.sends_per_second == 5.0
    assert applied.websocket.allowed_origins == ("https://a.example",)
    assert applied.log.format == "json"
    assert applied.limits.max_frame_bytes == 65536
    assert applied.websocket.handshake_timeout_s == 10.0
    assert applied.websocket.advertise == old.websocket.advertise


def _documented_reload(text: str) -> dict[str, str]:
    """Key -> "live"/"restart", from the (live)/(restart) marks of the example file."""
    marks: dict[str, str] = {}
    table, block = "", []
    for line in text.splitlines():
        if match := re.fullmatch(r"\[(\w+)\]", line):
            table, block = match[1], []
        elif (match := re.fullmatch(r"#? ?(\w+) = .*", line)) and not line.startswith("# ("):
            found = set(re.findall(r"\((live|restart)\)", " ".join(block)))
            assert len(found) == 1, f"{table}.{match[1]}: marks {found}"
            marks[f"{table}.{match[1]}"] = found.pop()
            block = []
        else:
            block.append(line)
    return marks


def test_example_file_marks_each_key_as_the_table_says() -> None:
    marks = _documented_reload(EXAMPLE.read_text(encoding="utf-8"))
    assert marks == {key: reload.value for key, reload in RELOAD.items()}


def test_operations_doc_table_matches_the_reload_table() -> None:
    doc = (EXAMPLE.parents[1] / "docs" / "operations.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \| [^|]* \| (live|restart)\b", doc, flags=re.M)
    assert dict(rows) == {key: reload.value for key, reload in RELOAD.items()}


def test_unknown_key_suggests_the_one_meant() -> None:
    assert problems_of(with_values(zookeeper={"session_timeout_s": 5})) == [
        "zookeeper.session_timeout_s: unknown key (did you mean 'session_timeout'?)"
    ]
    assert problems_of({**with_values(), "websockets": {}}) == [
        "websockets: unknown key (did you mean 'websocket'?)"
    ]
    assert problems_of(with_values(limits={"zzz": 1})) == ["limits.zzz: unknown key"]


def test_deprecated_admin_token_file_still_works(tmp_path: Path) -> None:
    (tmp_path / "admin.token").write_text(TOKEN)
    config = parse_config(with_values(http={"admin_token_file": "admin.token"}), base_dir=tmp_path)
    assert config.admin.token_file == tmp_path / "admin.token"
    assert config.deprecations == (
        "http.admin_token_file: renamed to admin.token_file; the old name will stop working",
    )
    both = with_values(
        http={"admin_token_file": "admin.token"}, admin={"token_file": "admin.token"}
    )
    assert problems_of(both, base_dir=tmp_path) == [
        "http.admin_token_file: renamed to admin.token_file; set only admin.token_file"
    ]


@pytest.mark.parametrize(
    "content,reason",
    [
        ("short", "at least 32 printable ASCII characters, got 5"),
        ("a" * 20 + " " + "b" * 20, "without spaces"),
        ("ä" * 40, "printable ASCII only"),
        ("a" * 32 + "\n" + "b" * 32, "without spaces"),
    ],
)
def test_admin_token_file_must_hold_a_usable_token(
    tmp_path: Path, content: str, reason: str
) -> None:
    (tmp_path / "admin.token").write_text(content, encoding="utf-8")
    [problem] = problems_of(with_values(admin={"token_file": "admin.token"}), base_dir=tmp_path)
    assert problem.startswith("admin.token_file: ") and reason in problem


def test_admin_token_is_the_stripped_line(tmp_path: Path) -> None:
    (tmp_path / "admin.token").write_text(f"\n  {TOKEN}  \n\n")
    assert read_token_file(tmp_path / "admin.token") == TOKEN


def test_cluster_placeholder_in_kafka_prefixes() -> None:
    config = parse_config(
        with_values(
            cluster={"name": "eu1"},
            kafka={"topic_prefix": "{cluster}-topic-", "group_prefix": "{cluster}.cg-"},
        )
    )
    assert config.kafka.topic_prefix == "eu1-topic-"
    assert config.kafka.group_prefix == "eu1.cg-"
    [problem] = problems_of(with_values(kafka={"topic_prefix": "{other}-"}))
    assert problem.startswith("kafka.topic_prefix: must be 1-100 characters")


def test_admin_url_never_names_a_proxy() -> None:
    config = parse_config(
        with_values(http={"listen": "0.0.0.0:8080", "advertise": "https://chat.example.com"})
    )
    assert config.admin_url == "http://127.0.0.1:8080"
    config = parse_config(with_values(admin={"listen": "[::]:9000"}))
    assert config.admin_url == "http://[::1]:9000"
    config = parse_config(
        with_values(admin={"listen": "127.0.0.1:9000", "advertise": "http://10.1.2.3:9000"})
    )
    assert config.admin_url == "http://10.1.2.3:9000"


def test_value_by_unknown_key() -> None:
    with pytest.raises(KeyError):
        parse_config(REQUIRED).value("zookeeper.session_timeout_s")


# -- TLS listener keys ---------------------------------------------------------


def _tls_files(tmp_path: Path) -> tuple[str, str]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("cert")
    key.write_text("key")
    return str(cert), str(key)


def _required() -> dict[str, dict[str, object]]:
    return {
        "zookeeper": {"hosts": "127.0.0.1:2181"},
        "kafka": {"bootstrap_servers": "127.0.0.1:9092"},
    }


def test_tls_keys_switch_default_advertise_to_secure_schemes(tmp_path: Path) -> None:
    cert, key = _tls_files(tmp_path)
    data = _required() | {
        "http": {"listen": "127.0.0.1:8443", "tls_cert_file": cert, "tls_key_file": key},
        "websocket": {"listen": "127.0.0.1:9443", "tls_cert_file": cert, "tls_key_file": key},
    }
    config = parse_config(data)
    assert config.http.advertise == "https://127.0.0.1:8443"
    assert config.websocket.advertise == "wss://127.0.0.1:9443/ws"


def test_tls_cert_without_key_is_an_error(tmp_path: Path) -> None:
    cert, _key = _tls_files(tmp_path)
    with pytest.raises(ConfigError) as info:
        parse_config(_required() | {"websocket": {"tls_cert_file": cert}})
    assert info.value.problems == [
        "websocket.tls_key_file: required when websocket.tls_cert_file is set"
    ]


def test_tls_with_plain_advertise_is_an_error(tmp_path: Path) -> None:
    cert, key = _tls_files(tmp_path)
    table = {"tls_cert_file": cert, "tls_key_file": key, "advertise": "ws://x:1/ws"}
    with pytest.raises(ConfigError) as info:
        parse_config(_required() | {"websocket": table})
    assert info.value.problems == [
        "websocket.advertise: must start with wss:// when websocket.tls_cert_file is set, "
        "got 'ws://x:1/ws'"
    ]


def test_tls_file_must_be_readable(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(ConfigError) as info:
        parse_config(_required() | {"http": {"tls_cert_file": missing, "tls_key_file": missing}})
    assert any(p.startswith("http.tls_cert_file: ") for p in info.value.problems)
    assert any(p.startswith("http.tls_key_file: ") for p in info.value.problems)
