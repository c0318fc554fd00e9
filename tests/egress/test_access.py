"""Tokens, where they travel, and origins: the gateway's access rules, without sockets."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from http import HTTPStatus

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.shared.procs import ROOT
from vlpipe.services.egress.access import (
    OPEN,
    AccessPolicy,
    AccessRefused,
    Grant,
    OriginPolicy,
    Scope,
    basic_password,
    is_loopback_host,
    mint_token,
)

KEY = "test-signing-key-of-at-least-32-bytes!"
FAR_FUTURE = 4_102_444_800  # 2100: tokens made when the tests are collected stay valid
OTHER_KEY = "another-signing-key-of-32-bytes-or-more"


def policy(**options: object) -> AccessPolicy:
    settings: dict[str, object] = {"signing_key": KEY, "static_tokens": ["operator-token"]}
    settings.update(options)
    return AccessPolicy(**settings)  # type: ignore[arg-type]


def refused(call: object) -> AccessRefused:
    with pytest.raises(AccessRefused) as caught:
        call()  # type: ignore[operator]
    return caught.value


def test_a_minted_token_grants_its_scope_on_its_session_only() -> None:
    grant = policy().grant(mint_token(KEY, "s1", Scope.LISTEN))
    assert grant == Grant(Scope.LISTEN, "s1")
    grant.check("s1", Scope.LISTEN)
    other = refused(lambda: grant.check("s2", Scope.LISTEN))
    assert other.status is HTTPStatus.FORBIDDEN and other.kind == "session"
    assert "another session" in other.reason
    sending = refused(lambda: grant.check("s1", Scope.CALL))
    assert sending.status is HTTPStatus.FORBIDDEN and sending.kind == "scope"
    assert "'listen'" in sending.reason and "'call'" in sending.reason


def test_scopes_include_the_ones_before_them() -> None:
    assert Scope.ADMIN.covers(Scope.CALL) and Scope.CALL.covers(Scope.LISTEN)
    assert not Scope.LISTEN.covers(Scope.CALL) and not Scope.CALL.covers(Scope.ADMIN)
    Grant(Scope.CALL, "s1").check("s1", Scope.LISTEN)


def test_static_operator_tokens_are_admin_on_every_session() -> None:
    grant = policy().grant("operator-token")
    assert grant == Grant(Scope.ADMIN, None)
    grant.check("any-session", Scope.CALL)


def test_an_admin_jwt_for_every_session() -> None:
    grant = policy().grant(mint_token(KEY, "*", Scope.ADMIN))
    assert grant == Grant(Scope.ADMIN, None)
    with pytest.raises(ValueError, match="only an admin token"):
        mint_token(KEY, "*", Scope.CALL)


@pytest.mark.parametrize(
    ("token", "kind", "words"),
    [
        (mint_token(KEY, "s1", Scope.CALL, now=time.time() - 3600, ttl_s=60), "expired",
         "token expired"),
        (mint_token(OTHER_KEY, "s1", Scope.CALL), "token", "signature does not verify"),
        ("not.a.jwt", "token", "bad token"),
        ("guess", "token", "wrong token"),
        (jwt.encode({"sub": "s1", "scope": "call"}, KEY, algorithm="HS256"), "token",
         '"exp" claim'),
        (jwt.encode({"sub": "s1", "scope": "root", "exp": FAR_FUTURE}, KEY,
                    algorithm="HS256"), "token", "scope 'root'"),
        (jwt.encode({"sub": "bad id!", "scope": "call", "exp": FAR_FUTURE}, KEY,
                    algorithm="HS256"), "token", "invalid session id"),
    ],
)  # fmt: skip
def test_bad_tokens_are_refused_with_401_and_a_reason(token: str, kind: str, words: str) -> None:
    caught = refused(lambda: policy().grant(token))
    assert caught.status is HTTPStatus.UNAUTHORIZED and caught.kind == kind
    assert words in caught.reason
    assert token not in caught.reason


def test_a_tampered_token_is_refused() -> None:
    header, _claims, signature = mint_token(KEY, "s1", Scope.LISTEN).split(".")
    bigger = base64.urlsafe_b64encode(b'{"sub":"s1","scope":"admin","exp":9999999999}')
    forged = f"{header}.{bigger.decode().rstrip('=')}.{signature}"
    caught = refused(lambda: policy().grant(forged))
    assert caught.status is HTTPStatus.UNAUTHORIZED and "signature" in caught.reason


def test_a_token_of_another_algorithm_is_refused() -> None:
    unsigned = jwt.encode({"sub": "s1", "scope": "admin", "exp": FAR_FUTURE}, None,
                          algorithm="none")  # fmt: skip
    assert refused(lambda: policy().grant(unsigned)).status is HTTPStatus.UNAUTHORIZED


def test_the_audience_must_match_when_set() -> None:
    mine = policy(audience="prod-eu")
    assert mine.grant(mint_token(KEY, "s1", Scope.CALL, audience="prod-eu")).session == "s1"
    for token in (mint_token(KEY, "s1", Scope.CALL, audience="staging"),
                  mint_token(KEY, "s1", Scope.CALL)):  # fmt: skip
        assert refused(lambda t=token: mine.grant(t)).status is HTTPStatus.UNAUTHORIZED  # type: ignore[misc]


def test_a_missing_token_is_refused_unless_the_gateway_is_open() -> None:
    caught = refused(lambda: policy().grant(None))
    assert caught.status is HTTPStatus.UNAUTHORIZED and "missing token" in caught.reason
    assert AccessPolicy(signing_key=None, open_access=True).grant(None) is OPEN


def test_a_short_signing_key_is_refused_with_how_to_make_one() -> None:
    with pytest.raises(ValueError, match="at least 32") as caught:
        AccessPolicy(signing_key="short")
    assert "secrets.token_urlsafe" in str(caught.value)


def test_tokens_travel_in_the_header_or_the_subprotocol_and_not_the_url() -> None:
    p = policy()
    assert p.offered_token("/v1/call", "Bearer abc", []) == "abc"
    assert p.offered_token("/v1/call", "", ["vlpipe", "vlpipe.bearer.xyz"]) == "xyz"
    assert p.offered_token("/v1/call", "", []) is None
    for path in ("/v1/call?session=s&token=abc", "/twilio/abc"):
        caught = refused(lambda path=path: p.offered_token(path, "Bearer abc", []))  # type: ignore[misc]
        assert caught.kind == "url_token" and "in the URL is refused" in caught.reason
    allowed = policy(allow_url_token=True)
    assert allowed.offered_token("/v1/call?token=abc", "", []) == "abc"
    assert allowed.offered_token("/twilio/abc", "", []) == "abc"


def test_the_console_credential_comes_from_http_basic() -> None:
    header = "Basic " + base64.b64encode(b"operator:operator-token").decode()
    assert basic_password(header) == "operator-token"
    assert basic_password("Basic !!!") is None and basic_password("Bearer x") is None


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        (None, "gw.example.com", True),  # not a browser
        ("https://gw.example.com", "gw.example.com", True),  # its own page (the console)
        ("http://127.0.0.1:8080", "127.0.0.1:8080", True),
        ("https://app.example.com", "gw.example.com", True),  # on the allowlist
        ("https://APP.example.com:443", "gw.example.com", True),  # the same origin
        ("https://evil.example", "gw.example.com", False),
        ("https://app.example.com:8443", "gw.example.com", False),
        ("null", "gw.example.com", False),  # sandboxed frames and files
        ("http://gw.example.com.evil.example", "gw.example.com", False),
    ],
)
def test_origins(origin: str | None, host: str, allowed: bool) -> None:
    origins = OriginPolicy(["https://app.example.com"])
    if allowed:
        origins.check(origin, host)
    else:
        caught = refused(lambda: origins.check(origin, host))
        assert caught.status is HTTPStatus.FORBIDDEN and caught.kind == "origin"


def test_only_loopback_names_are_loopback_hosts() -> None:
    for host in ("127.0.0.1:8080", "localhost:8080", "[::1]:8080", "LOCALHOST"):
        assert is_loopback_host(host), host
    for host in ("evil.example:8080", "192.168.1.2", "", None):
        assert not is_loopback_host(host), host


@given(
    session=st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,40}\Z"),
    scope=st.sampled_from(list(Scope)),
    other=st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,40}\Z"),
)
def test_every_minted_token_opens_exactly_its_session_and_scope(
    session: str, scope: Scope, other: str
) -> None:
    grant = policy().grant(mint_token(KEY, session, scope))
    for needed in Scope:
        if scope.covers(needed):
            grant.check(session, needed)
        else:
            refused(lambda n=needed: grant.check(session, n))  # type: ignore[misc]
    if other != session:
        refused(lambda: grant.check(other, Scope.LISTEN))


def test_vlpipe_token_prints_a_token_the_gateway_accepts() -> None:
    def run(*args: str, key: str | None = KEY) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VLPIPE_GATEWAY")}
        if key is not None:
            env["VLPIPE_GATEWAY_SIGNING_KEY"] = key
        return subprocess.run([sys.executable, "-m", "vlpipe", "token", *args], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=60)  # fmt: skip

    done = run("--session", "s1", "--scope", "listen", "--ttl", "60")
    assert done.returncode == 0, done.stderr
    assert policy().grant(done.stdout.strip()) == Grant(Scope.LISTEN, "s1")
    admin = run("--scope", "admin")
    assert policy().grant(admin.stdout.strip()) == Grant(Scope.ADMIN, None)
    for args, key, words in [
        (("--session", "s1"), None, "set VLPIPE_GATEWAY_SIGNING_KEY"),
        (("--scope", "call"), KEY, "needs --session"),
        (("--session", "bad id!"), KEY, "invalid session id"),
        (("--session", "s1"), "short", "at least 32"),
    ]:
        refused = run(*args, key=key)
        assert refused.returncode == 2 and words in refused.stderr, (args, refused.stderr)
