"""Bearer tokens: pinned algorithms, claims, key files, and hostile tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from linechatd.auth import (
    MAX_TOKEN_CHARS,
    Authenticator,
    AuthError,
    Identity,
    KeyFileError,
    bearer_token,
    load_key,
)
from linechatd.config import AuthConfig, HostPort, parse_config
from linechatd.startup import (
    auth_exposure_problems,
    cleartext_token_listeners,
    is_loopback,
    log_auth_warnings,
)

SECRET = b"s3cret-s3cret-s3cret-s3cret-s3cret-s3cret"  # 41 bytes
JWT_CLAIMS = {"jwt_issuer": "https://idp.example", "jwt_audience": "chat"}

FUZZ = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# ------------------------------------------------------------------------ helpers


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def pem_public(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def pem_private(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def authenticator(tmp_path: Path, key_bytes: bytes = SECRET, **auth: Any) -> Authenticator:
    path = write(tmp_path, "jwt.key", key_bytes)
    return Authenticator(AuthConfig(mode="jwt", jwt_secret_file=path, **auth))


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "exp": int(time.time()) + 600, **extra}


def hs256(payload: dict[str, Any], secret: bytes = SECRET, **kwargs: Any) -> str:
    return jwt.encode(payload, secret, algorithm="HS256", **kwargs)


def refused(auth: Authenticator, token: str | None, uid: str = "alice") -> AuthError:
    with pytest.raises(AuthError) as info:
        auth.authenticate(token, uid)
    return info.value


# -------------------------------------------------------------------- mode none


def test_mode_none_accepts_anyone_without_expiry() -> None:
    auth = Authenticator(AuthConfig(mode="none"))
    assert not auth.required
    assert auth.authenticate(None, "alice") == Identity("alice", None)
    assert auth.authenticate("garbage", "bob") == Identity("bob", None)


# ---------------------------------------------------------------------- HS256


def test_valid_token_gives_identity_expiring_with_the_leeway(tmp_path: Path) -> None:
    auth = authenticator(tmp_path, jwt_leeway_s=30.0)
    exp = int(time.time()) + 600
    identity = auth.authenticate(hs256(claims(exp=exp)), "alice")
    assert identity == Identity("alice", exp + 30.0)
    assert auth.required


def test_secret_file_whitespace_is_stripped(tmp_path: Path) -> None:
    auth = authenticator(tmp_path, b"\n  " + SECRET + b"\r\n")
    assert auth.authenticate(hs256(claims()), "alice").uid == "alice"


@pytest.mark.parametrize("token", [None, ""])
def test_missing_token_is_401(tmp_path: Path, token: str | None) -> None:
    err = refused(authenticator(tmp_path), token)
    assert (err.status, err.code) == (401, "unauthorized")


def test_wrong_subject_is_403(tmp_path: Path) -> None:
    err = refused(authenticator(tmp_path), hs256(claims()), uid="bob")
    assert (err.status, err.code) == (403, "forbidden")


@pytest.mark.parametrize(
    "payload",
    [
        {"exp": 2_000_000_000},  # no sub
        {"sub": "alice"},  # no exp
        {"sub": 7, "exp": 2_000_000_000},
        {"sub": ["alice"], "exp": 2_000_000_000},
        {"sub": "alice", "exp": "2000000000"},
        {"sub": "alice", "exp": True},
        {"sub": "alice", "exp": 2_000_000_000, "iat": "1700000000"},
        {"sub": "alice", "exp": None},
        {"sub": "alice", "exp": 2_000_000_000, "nbf": "soon"},
    ],
)
def test_malformed_claims_are_401(tmp_path: Path, payload: dict[str, Any]) -> None:
    err = refused(authenticator(tmp_path), hs256(payload))
    assert err.status == 401


def test_expiry_and_leeway(tmp_path: Path) -> None:
    auth = authenticator(tmp_path, jwt_leeway_s=30.0)
    now = int(time.time())
    assert auth.authenticate(hs256(claims(exp=now - 10)), "alice").uid == "alice"
    err = refused(auth, hs256(claims(exp=now - 60)))
    assert (err.status, err.detail) == (401, "token expired")
    strict = authenticator(tmp_path, jwt_leeway_s=0.0)
    assert refused(strict, hs256(claims(exp=now - 2))).status == 401


def test_not_before(tmp_path: Path) -> None:
    auth = authenticator(tmp_path, jwt_leeway_s=5.0)
    now = int(time.time())
    assert auth.authenticate(hs256(claims(nbf=now + 3)), "alice").uid == "alice"
    assert refused(auth, hs256(claims(nbf=now + 120))).status == 401


def test_huge_expiry_is_refused_cleanly(tmp_path: Path) -> None:
    auth = authenticator(tmp_path)
    now = int(time.time())
    for exp in (10**400, 1e308, 2**63):
        for extra in ({}, {"iat": now}):
            err = refused(auth, hs256(claims(exp=exp, **extra)))
            assert (err.status, err.code) == (401, "unauthorized")
    # As JSON text too: a number no float holds, and one that only fits as infinity.
    for exp_text in ("1" + "0" * 400, "1e400"):
        payload = b64url(f'{{"sub":"alice","exp":{exp_text}}}'.encode())
        header = b64url(b'{"alg":"HS256","typ":"JWT"}')
        signature = b64url(
            hmac.new(SECRET, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        )
        assert refused(auth, f"{header}.{payload}.{signature}").status == 401


def test_token_lifetime_is_capped(tmp_path: Path) -> None:
    auth = authenticator(tmp_path, max_token_lifetime_s=3600.0, jwt_leeway_s=30.0)
    now = int(time.time())
    # exp - iat: the lifetime the issuer gave the token, whatever is left of it.
    assert auth.authenticate(hs256(claims(iat=now - 100, exp=now + 3500)), "alice")
    assert refused(auth, hs256(claims(iat=now - 100, exp=now + 3501))).status == 401
    assert refused(auth, hs256(claims(iat=now - 7200, exp=now + 60))).status == 401
    # Without iat: what is left of it, with the clock skew tolerated.
    assert auth.authenticate(hs256(claims(exp=now + 3600)), "alice")
    assert refused(auth, hs256(claims(exp=now + 3600 + 120))).status == 401
    # The default cap is a day.
    default = authenticator(tmp_path)
    assert default.authenticate(hs256(claims(iat=now, exp=now + 86400)), "alice")
    assert refused(default, hs256(claims(iat=now, exp=now + 86401))).status == 401


def test_float_claims_within_the_lifetime_are_accepted(tmp_path: Path) -> None:
    auth = authenticator(tmp_path, max_token_lifetime_s=3600.0)
    now = time.time()
    identity = auth.authenticate(hs256(claims(iat=now, exp=now + 600.5)), "alice")
    assert identity.expires_at == pytest.approx(now + 600.5 + 30.0)


def test_issuer_and_audience_when_configured(tmp_path: Path) -> None:
    auth = authenticator(tmp_path, jwt_issuer="https://idp.example", jwt_audience="chat")
    good = claims(iss="https://idp.example", aud="chat")
    assert auth.authenticate(hs256(good), "alice").uid == "alice"
    assert auth.authenticate(hs256({**good, "aud": ["other", "chat"]}), "alice").uid == "alice"
    for bad in (
        claims(aud="chat"),  # no iss
        claims(iss="https://idp.example"),  # no aud
        {**good, "iss": "https://evil.example"},
        {**good, "aud": "other"},
    ):
        assert refused(auth, hs256(bad)).status == 401


def test_audience_ignored_when_not_configured(tmp_path: Path) -> None:
    auth = authenticator(tmp_path)
    assert auth.authenticate(hs256(claims(aud="anything")), "alice").uid == "alice"


def test_wrong_secret_is_401(tmp_path: Path) -> None:
    token = hs256(claims(), secret=b"another-secret-that-is-long-enough-000")
    assert refused(authenticator(tmp_path), token).status == 401


def hmac_token(alg: str, digest: str, payload: dict[str, Any], secret: bytes = SECRET) -> str:
    signing_input = (
        b64url(json.dumps({"alg": alg}).encode()) + "." + b64url(json.dumps(payload).encode())
    )
    signature = hmac.new(secret, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64url(signature)}"


def test_algorithm_is_pinned_not_taken_from_the_token(tmp_path: Path) -> None:
    auth = authenticator(tmp_path)
    unsigned = b64url(b'{"alg":"none","typ":"JWT"}') + "." + b64url(json.dumps(claims()).encode())
    assert auth.authenticate(hmac_token("HS256", "sha256", claims()), "alice")
    for token in (
        unsigned + ".",
        hmac_token("HS512", "sha512", claims()),
        hmac_token("HS384", "sha384", claims()),
        hmac_token("hs256", "sha256", claims()),
    ):
        err = refused(auth, token)
        assert err.status == 401


def test_rs256_public_key_cannot_be_used_as_an_hmac_secret(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    # The classic algorithm confusion: sign HS256 with the public key's PEM.
    public_pem = pem_public(rsa_key)
    auth = authenticator(tmp_path, public_pem, jwt_algorithm="RS256")
    header = b64url(b'{"alg":"HS256","typ":"JWT"}')
    body = b64url(json.dumps(claims()).encode())
    signature = hmac.new(public_pem, f"{header}.{body}".encode(), hashlib.sha256).digest()
    assert refused(auth, f"{header}.{body}.{b64url(signature)}").status == 401


@pytest.mark.parametrize(
    "token",
    [
        "x" * (MAX_TOKEN_CHARS + 1),
        "not-a-jwt",
        "a.b",
        "a.b.c.d",
        "é.é.é",
        "...",
        "eyJhbGciOiJIUzI1NiJ9.e30.",
        "eyJhbGciOiJIUzI1NiJ9.!!!.abc",
    ],
)
def test_garbage_tokens_are_401(tmp_path: Path, token: str) -> None:
    assert refused(authenticator(tmp_path), token).status == 401


def test_deeply_nested_header_is_401_not_a_crash(tmp_path: Path) -> None:
    depth = 3000
    header = b64url(b"[" * depth + b"]" * depth)
    token = f"{header}.{b64url(b'{}')}.{b64url(b'sig')}"
    assert len(token) <= MAX_TOKEN_CHARS
    assert refused(authenticator(tmp_path), token).status == 401


# -------------------------------------------------------------- RS256 / ES256


def test_rs256(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    auth = authenticator(tmp_path, pem_public(rsa_key), jwt_algorithm="RS256")
    token = jwt.encode(claims(), rsa_key, algorithm="RS256")
    assert auth.authenticate(token, "alice").uid == "alice"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert refused(auth, jwt.encode(claims(), other, algorithm="RS256")).status == 401
    # Same key, other algorithm: still pinned.
    assert refused(auth, jwt.encode(claims(), rsa_key, algorithm="PS256")).status == 401


def test_es256(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    auth = authenticator(tmp_path, pem_public(ec_key), jwt_algorithm="ES256")
    assert auth.authenticate(jwt.encode(claims(), ec_key, algorithm="ES256"), "alice")
    assert refused(auth, jwt.encode(claims(), ec_key, algorithm="ES256"), "bob").status == 403


def test_certificate_is_accepted_as_a_public_key(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(rsa_key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(rsa_key, hashes.SHA256())
    )
    auth = authenticator(
        tmp_path, cert.public_bytes(serialization.Encoding.PEM), jwt_algorithm="RS256"
    )
    assert auth.authenticate(jwt.encode(claims(), rsa_key, algorithm="RS256"), "alice")


# ------------------------------------------------------------------- key files


def test_key_file_problems(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    small_rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    p384 = ec.generate_private_key(ec.SECP384R1())
    cases = [
        (b"short", "HS256", "at least 32 bytes"),
        (b"   " + b"x" * 31 + b"\n", "HS256", "at least 32 bytes"),
        (pem_public(rsa_key), "HS256", "needs a shared secret"),
        (pem_private(rsa_key), "RS256", "holds a private key"),
        (pem_private(ec_key), "ES256", "holds a private key"),
        (pem_public(small_rsa), "RS256", "at least 2048 bits"),
        (pem_public(ec_key), "RS256", "needs an RSA public key"),
        (pem_public(rsa_key), "ES256", "needs an EC public key on curve P-256"),
        (pem_public(p384), "ES256", "needs an EC public key on curve P-256"),
        (SECRET, "RS256", "not a PEM public key"),
        (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "ES256", "not a PEM"),
    ]
    for data, algorithm, fragment in cases:
        path = write(tmp_path, "key", data)
        with pytest.raises(KeyFileError, match=fragment) as info:
            load_key(path, algorithm)
        # The message names the file and never quotes its content.
        assert str(path) in str(info.value)
        assert data.strip()[:16].decode(errors="replace") not in str(info.value)


def test_missing_key_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        load_key(tmp_path / "absent", "HS256")


def test_rotation_new_authenticator_accepts_only_the_new_key(tmp_path: Path) -> None:
    new_secret = b"rotated-secret-rotated-secret-rotated!!"
    old_auth = authenticator(tmp_path)
    new_auth = Authenticator(
        AuthConfig(mode="jwt", jwt_secret_file=write(tmp_path, "new.key", new_secret))
    )
    old_token, new_token = hs256(claims()), hs256(claims(), secret=new_secret)
    assert old_auth.authenticate(old_token, "alice")
    assert refused(new_auth, old_token).status == 401
    assert new_auth.authenticate(new_token, "alice")


# ---------------------------------------------------------------- bearer header


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("BEARER abc", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer   ", None),
        ("Token abc", None),
    ],
)
def test_bearer_token(header: str | None, expected: str | None) -> None:
    assert bearer_token(header) == expected


# ------------------------------------------------------- auth "none" exposure


def config_with(**tables: dict[str, Any]) -> Any:
    base: dict[str, Any] = {
        "zookeeper": {"hosts": "127.0.0.1:2181"},
        "kafka": {"bootstrap_servers": "127.0.0.1:9092"},
    }
    base.update(tables)
    return parse_config(base)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("chat.example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(HostPort(host, 80)) is loopback


def test_auth_none_is_refused_on_a_public_listener() -> None:
    assert auth_exposure_problems(c := config_with(), c) == []
    public_ws = config_with(websocket={"listen": "0.0.0.0:8765"})
    [problem] = auth_exposure_problems(public_ws, public_ws)
    assert problem.startswith('auth.mode: "none"')
    for key in ("websocket.listen = 0.0.0.0:8765", "auth.allow_insecure_none", "auth.mode"):
        assert key in problem
    both = config_with(http={"listen": "[::]:8080"}, websocket={"listen": "0.0.0.0:8765"})
    [problem] = auth_exposure_problems(both, both)
    assert "http.listen = [::]:8080 and websocket.listen = 0.0.0.0:8765 are" in problem


def test_auth_none_on_a_public_listener_can_be_allowed_explicitly(tmp_path: Path) -> None:
    allowed = config_with(
        websocket={"listen": "0.0.0.0:8765"}, auth={"mode": "none", "allow_insecure_none": True}
    )
    assert auth_exposure_problems(allowed, allowed) == []
    key = write(tmp_path, "jwt.key", SECRET)
    jwt_mode = config_with(
        websocket={"listen": "0.0.0.0:8765"},
        auth={"mode": "jwt", "jwt_secret_file": str(key), **JWT_CLAIMS},
    )
    assert auth_exposure_problems(jwt_mode, jwt_mode) == []


def test_auth_none_behind_a_proxy_is_exposed_by_its_advertised_url() -> None:
    # The documented nginx set-up: loopback listeners, public advertised URLs.
    proxied = config_with(
        http={"listen": "127.0.0.1:8080", "advertise": "https://chat.example.com"},
        websocket={"listen": "127.0.0.1:8765", "advertise": "wss://chat.example.com/ws"},
    )
    [problem] = auth_exposure_problems(proxied, proxied)
    assert (
        "http.advertise = https://chat.example.com and "
        "websocket.advertise = wss://chat.example.com/ws are reachable from other hosts"
    ) in problem
    ws_only = config_with(websocket={"advertise": "ws://10.0.0.5:8765/ws"})
    [problem] = auth_exposure_problems(ws_only, ws_only)
    assert "websocket.advertise = ws://10.0.0.5:8765/ws is reachable" in problem
    local_names = config_with(
        http={"advertise": "http://localhost:8080"},
        websocket={"advertise": "ws://[::1]:8765/ws"},
    )
    assert auth_exposure_problems(local_names, local_names) == []
    allowed = config_with(
        websocket={"advertise": "wss://chat.example.com/ws"},
        auth={"mode": "none", "allow_insecure_none": True},
    )
    assert auth_exposure_problems(allowed, allowed) == []


@pytest.mark.parametrize(
    ("tables", "expected"),
    [
        ({}, []),
        # The WebSocket listener on a public address, advertised in clear text.
        ({"websocket": {"listen": "0.0.0.0:8765"}}, ["websocket.advertise = ws://0.0.0.0:8765/ws"]),
        # connection-url carries the token in its Authorization header.
        (
            {"http": {"listen": "0.0.0.0:8080", "advertise": "http://chat.example.com"}},
            ["http.advertise = http://chat.example.com"],
        ),
        # Loopback listeners behind a proxy that forwards without TLS.
        (
            {"http": {"advertise": "http://chat.example.com:8080"}},
            ["http.advertise = http://chat.example.com:8080"],
        ),
        # TLS in the proxy: nothing in clear.
        (
            {
                "http": {"advertise": "https://chat.example.com"},
                "websocket": {"advertise": "wss://chat.example.com/ws"},
            },
            [],
        ),
    ],
)
def test_cleartext_token_listeners(
    tmp_path: Path, tables: dict[str, Any], expected: list[str]
) -> None:
    key = write(tmp_path, "jwt.key", SECRET)
    config = config_with(auth={"mode": "jwt", "jwt_secret_file": str(key), **JWT_CLAIMS}, **tables)
    assert cleartext_token_listeners(config) == expected


def test_auth_warnings_are_logged_for_opt_outs_and_cleartext(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = write(tmp_path, "jwt.key", SECRET)
    config = config_with(
        auth={
            "mode": "jwt",
            "jwt_secret_file": str(key),
            "allow_any_audience": True,
            "allow_any_issuer": True,
        },
        http={"listen": "0.0.0.0:8080"},
    )
    with caplog.at_level(logging.WARNING, logger="linechatd.startup"):
        log_auth_warnings(config)
    events = [record.getMessage() for record in caplog.records]
    assert events == ["jwt_audience_not_checked", "jwt_issuer_not_checked", "tokens_in_cleartext"]
    assert caplog.records[2].listeners == ["http.advertise = http://0.0.0.0:8080"]  # type: ignore[attr-defined]


# --------------------------------------------------------------------- fuzzing

# Claim values a buggy or hostile issuer might put in a token, as JSON *text*
# (NaN, 1e400, huge integers and deep nesting cannot come from Python values).
claim_values = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.integers(min_value=-1000, max_value=1000).map(lambda d: str(int(time.time()) + d)),
    st.floats(allow_nan=False, allow_infinity=False).map(json.dumps),
    st.sampled_from(
        [
            "NaN",
            "Infinity",
            "-Infinity",
            "1e400",
            "9" * 500,
            "null",
            "true",
            "false",
            '"alice"',
            '"bob"',
            '""',
            '"\\ud800"',
            "[]",
            '["alice"]',
            "{}",
            '{"sub":"alice"}',
            "[" * 2000 + "]" * 2000,
        ]
    ),
    st.text(max_size=12).map(json.dumps),
)
claim_names = st.sampled_from(["sub", "exp", "nbf", "iat", "iss", "aud", "jti", "x"])


def json_object(pairs: list[tuple[str, str]]) -> str:
    # Text, not json.dumps: duplicate keys must survive.
    return "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in pairs) + "}"


good_payload = st.builds(
    lambda exp, extra: json_object([("sub", '"alice"'), ("exp", str(exp)), *extra]),
    st.integers(min_value=-100, max_value=10_000).map(lambda d: int(time.time()) + d),
    st.lists(st.tuples(claim_names, claim_values), max_size=3),
)


def weighted(*choices: tuple[int, st.SearchStrategy[str]]) -> st.SearchStrategy[str]:
    """Pick a strategy by weight (one_of would weigh every branch of a nested one_of alike)."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(min_value=0, max_value=len(table) - 1).flatmap(lambda i: table[i])


payload_text = weighted(
    (5, good_payload),
    (3, st.lists(st.tuples(claim_names, claim_values), max_size=6).map(json_object)),
    (2, claim_values),
)
header_text = weighted(
    (4, st.just('{"alg":"HS256","typ":"JWT"}')),
    (
        4,
        st.builds(
            lambda alg, extra: json_object([("alg", alg), *extra]),
            st.sampled_from(
                ['"HS256"', '"hs256"', '"none"', '"None"', '"RS256"', '"ES256"', '""', "null", "1"]
                + ['["HS256"]', '"HS512"']
            ),
            st.lists(
                st.tuples(
                    st.sampled_from(["typ", "kid", "crit", "b64", "jku", "cty"]), claim_values
                ),
                max_size=3,
            ),
        ),
    ),
    (2, claim_values),
)


def segment(text: str) -> str:
    return b64url(text.encode("utf-8", "surrogatepass"))


@st.composite
def jwtish_tokens(draw: st.DrawFn) -> str:
    header = segment(draw(header_text))
    payload = segment(draw(payload_text))
    signing_input = f"{header}.{payload}"
    how = draw(st.sampled_from(["signed", "signed", "random", "empty", "mangled"]))
    if how == "signed":
        signature = b64url(hmac.new(SECRET, signing_input.encode(), hashlib.sha256).digest())
    elif how == "random":
        signature = b64url(draw(st.binary(max_size=64)))
    elif how == "empty":
        signature = ""
    else:
        signature = draw(st.text(alphabet="A-_=+/.%é\x00 ", max_size=20))
    return f"{signing_input}.{signature}"


raw_tokens = st.one_of(
    st.text(max_size=200),
    st.lists(st.text(alphabet="ABCabc0123-_=+/ ", max_size=30), min_size=1, max_size=5).map(
        ".".join
    ),
    jwtish_tokens(),
)


def check_outcome(auth: Authenticator, token: str, uid: str) -> None:
    try:
        identity = auth.authenticate(token, uid)
    except AuthError as exc:
        assert (exc.status, exc.code) in {(401, "unauthorized"), (403, "forbidden")}
        return
    assert identity.uid == uid
    assert isinstance(identity.expires_at, float) and identity.expires_at > time.time() - 60


@FUZZ
@given(raw_tokens, st.sampled_from(["alice", "bob"]))
def test_fuzz_hs256_tokens_only_ever_raise_auth_error(tmp_path: Path, token: str, uid: str) -> None:
    auth = authenticator(tmp_path)
    check_outcome(auth, token, uid)


@FUZZ
@given(jwtish_tokens())
def test_fuzz_signed_tokens_reach_claim_checks(tmp_path: Path, token: str) -> None:
    # Signed with the right key, so whatever the claims hold is what is checked.
    check_outcome(authenticator(tmp_path, jwt_issuer="idp", jwt_audience="chat"), token, "alice")


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw_tokens)
def test_fuzz_es256_tokens_only_ever_raise_auth_error(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey, token: str
) -> None:
    auth = authenticator(tmp_path, pem_public(ec_key), jwt_algorithm="ES256")
    check_outcome(auth, token, "alice")
