"""Who may do what at the gateway: scoped tokens, where they travel, and origins.

Pure and synchronous (no sockets, no Redis), so every rule is tested on its own:

* A **token** is a JWT signed with HS256 (`VLPIPE_GATEWAY_SIGNING_KEY`) whose `sub` is one
  session id and whose `scope` is `listen` (receive only), `call` (send and receive, and
  end the session) or `admin` (any session); `exp` is required, `aud` is checked when
  `VLPIPE_GATEWAY_AUDIENCE` is set. Static operator tokens (`VLPIPE_GATEWAY_TOKENS`) are
  `admin`. `mint_token` makes one; `AccessPolicy.grant` checks one and says what it allows.
* **Where tokens travel** (`offered_token`): `Authorization: Bearer`, or the WebSocket
  subprotocol `vlpipe.bearer.<token>` (browsers cannot set headers). A token in the URL
  (`?token=`, `/twilio/<token>`) ends up in proxy and access logs, so it is refused unless
  `VLPIPE_GATEWAY_ALLOW_QUERY_TOKEN=true`. Twilio's token comes in its `start` message.
* **Origins** (`OriginPolicy`): a browser's `Origin` must be the gateway's own or one on
  the allowlist (`VLPIPE_GATEWAY_ORIGINS`); clients that send none (apps, servers, phones)
  are not browsers and need no check.

Every refusal is an `AccessRefused` with the HTTP status for the handshake, a reason that
names the problem (never the token itself) and a short `kind` for the metric.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import jwt

from vlpipe.shared.keys import check_session_id

ALGORITHM = "HS256"
MIN_KEY_BYTES = 32
"""RFC 7518 §3.2: an HS256 key must be at least as long as the hash (256 bits)."""
SUBPROTOCOL = "vlpipe"
BEARER_SUBPROTOCOL = "vlpipe.bearer."
LEEWAY_S = 5.0
"""Clock difference tolerated between the minting backend and the gateway on `exp`."""
ANY_SESSION = "*"


class Scope(StrEnum):
    """What a token allows on its session, each scope including the ones before it."""

    LISTEN = "listen"
    CALL = "call"
    ADMIN = "admin"

    def covers(self, needed: Scope) -> bool:
        order = (Scope.LISTEN, Scope.CALL, Scope.ADMIN)
        return order.index(self) >= order.index(needed)


class AccessRefused(Exception):
    """A request the gateway refuses: `status` at the handshake, 1008 on an open socket."""

    def __init__(self, status: HTTPStatus, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Grant:
    """What a verified credential allows: one session (or any, for admin) up to `scope`."""

    scope: Scope
    session: str | None
    """The one session the token names; None for admin (every session)."""

    def check(self, session: str | None, needed: Scope) -> None:
        """AccessRefused (403) unless this grant covers `needed` on `session` (None: only
        the scope is checked, the session being the token's own or not known yet)."""
        if not self.scope.covers(needed):
            raise AccessRefused(
                HTTPStatus.FORBIDDEN,
                f"this token's scope is {self.scope.value!r}; this needs {needed.value!r}",
                "scope",
            )
        if self.session is not None and session is not None and self.session != session:
            raise AccessRefused(
                HTTPStatus.FORBIDDEN,
                f"this token is for another session, not {session!r}",
                "session",
            )


OPEN = Grant(Scope.ADMIN, None)
"""Everything, for a gateway with no credentials configured (loopback only)."""


def mint_token(
    signing_key: str,
    session: str,
    scope: Scope,
    *,
    ttl_s: float = 300,
    audience: str | None = None,
    now: float | None = None,
) -> str:
    """A token for `session` with `scope`, valid for `ttl_s` seconds, signed with HS256.

    `session` is `*` for an admin token that covers every session.
    """
    check_signing_key(signing_key)
    if session != ANY_SESSION:
        check_session_id(session)
    elif scope is not Scope.ADMIN:
        raise ValueError("only an admin token may cover every session ('*')")
    if ttl_s <= 0:
        raise ValueError(f"ttl {ttl_s} s: a token must live for a positive time")
    issued = time.time() if now is None else now
    claims: dict[str, object] = {
        "sub": session, "scope": scope.value, "iat": int(issued), "exp": int(issued + ttl_s),
    }  # fmt: skip
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, signing_key, algorithm=ALGORITHM)


def check_signing_key(key: str) -> str:
    """`key` if it is long enough to sign with HS256, else ValueError saying how to make one."""
    size = len(key.encode())
    if size < MIN_KEY_BYTES:
        raise ValueError(
            f"VLPIPE_GATEWAY_SIGNING_KEY is {size} bytes; HS256 needs at least "
            f"{MIN_KEY_BYTES}: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return key


class AccessPolicy:
    """Verifies tokens: static operator tokens (admin) and signed, scoped JWTs."""

    def __init__(
        self,
        *,
        signing_key: str | None,
        static_tokens: Iterable[str] = (),
        audience: str | None = None,
        allow_url_token: bool = False,
        open_access: bool = False,
    ) -> None:
        self.signing_key = check_signing_key(signing_key) if signing_key else None
        self.static_tokens = tuple(static_tokens)
        self.audience = audience or None
        self.allow_url_token = allow_url_token
        self.open = open_access
        """No credential configured: every client is trusted (the gateway stays on loopback)."""

    def grant(self, token: str | None) -> Grant:
        """What `token` allows; AccessRefused (401) when it is missing, bad or expired."""
        if self.open:
            return OPEN
        if not token:
            raise AccessRefused(
                HTTPStatus.UNAUTHORIZED,
                "missing token: send Authorization: Bearer <token> (browsers: the "
                "subprotocol vlpipe.bearer.<token>)",
                "token",
            )
        # Compare with every static token, so the time taken says nothing about which.
        matches = [hmac.compare_digest(token.encode(), t.encode()) for t in self.static_tokens]
        if any(matches):
            return Grant(Scope.ADMIN, None)
        if self.signing_key is None or token.count(".") != 2:
            raise AccessRefused(HTTPStatus.UNAUTHORIZED, "wrong token", "token")
        return self._verify(token, self.signing_key)

    def _verify(self, token: str, key: str) -> Grant:
        try:
            claims = jwt.decode(
                token, key, algorithms=[ALGORITHM], audience=self.audience, leeway=LEEWAY_S,
                options={"require": ["exp", "sub", "scope"], "verify_aud": self.audience is not None},
            )  # fmt: skip
        except jwt.ExpiredSignatureError:
            raise AccessRefused(HTTPStatus.UNAUTHORIZED, "token expired", "expired") from None
        except jwt.InvalidSignatureError:
            raise AccessRefused(
                HTTPStatus.UNAUTHORIZED, "token signature does not verify", "token"
            ) from None
        except jwt.InvalidAudienceError:
            raise AccessRefused(
                HTTPStatus.UNAUTHORIZED,
                f"token is for another deployment (aud is not {self.audience!r})",
                "token",
            ) from None
        except jwt.InvalidTokenError as exc:
            # PyJWT's messages name the claim or the format problem, never the token.
            raise AccessRefused(HTTPStatus.UNAUTHORIZED, f"bad token: {exc}", "token") from None
        try:
            scope = Scope(claims["scope"])
        except ValueError:
            raise AccessRefused(
                HTTPStatus.UNAUTHORIZED,
                f"bad token: scope {claims['scope']!r} is not listen, call or admin",
                "token",
            ) from None
        subject = str(claims["sub"])
        if scope is Scope.ADMIN and subject == ANY_SESSION:
            return Grant(scope, None)
        try:
            return Grant(scope, check_session_id(subject))
        except ValueError as exc:
            raise AccessRefused(
                HTTPStatus.UNAUTHORIZED, f"bad token: sub: {exc}", "token"
            ) from None

    def offered_token(self, path: str, authorization: str, subprotocols: list[str]) -> str | None:
        """The token a request carries (its path, `Authorization` header and offered
        subprotocols); AccessRefused for one in the URL unless allowed."""
        in_url = _url_token(path)
        if in_url and not self.allow_url_token:
            raise AccessRefused(
                HTTPStatus.UNAUTHORIZED,
                "a token in the URL is refused (URLs end up in proxy and access logs): send "
                "Authorization: Bearer <token>, or the subprotocol vlpipe.bearer.<token>",
                "url_token",
            )
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
        for offered in subprotocols:
            if offered.startswith(BEARER_SUBPROTOCOL):
                return offered.removeprefix(BEARER_SUBPROTOCOL)
        return in_url


def basic_password(authorization: str) -> str | None:
    """The password of an `Authorization: Basic` header (how a browser asks an operator for
    the console's credential), or None."""
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[2] or None


def _url_token(path: str) -> str | None:
    parts = urlsplit(path)
    token = parse_qs(parts.query).get("token", [""])[0]
    if not token and parts.path.startswith("/twilio/"):
        token = parts.path.removeprefix("/twilio/")
    return token or None


class OriginPolicy:
    """Which browser pages may open sockets: the gateway's own origin (the console), the
    allowlist, and clients that send no `Origin` (not browsers)."""

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        self.allowed = {_normal_origin(o) for o in allowed if o.strip()}

    def check(self, origin: str | None, host: str | None) -> None:
        """AccessRefused (403) unless a socket from a page at `origin` may be opened."""
        if origin is None:
            return
        normal = _normal_origin(origin)
        if normal in self.allowed:
            return
        own = urlsplit(normal).netloc
        if host and own and own == host.strip().lower():
            return
        raise AccessRefused(
            HTTPStatus.FORBIDDEN,
            f"origin {origin[:100]!r} is not allowed (VLPIPE_GATEWAY_ORIGINS)",
            "origin",
        )


def _normal_origin(origin: str) -> str:
    """`scheme://host[:port]` in lower case, the default port dropped, as browsers send it."""
    parts = urlsplit(origin.strip().lower())
    default = {"http": 80, "https": 443}.get(parts.scheme)
    try:
        port = parts.port
    except ValueError:
        return origin.strip().lower()
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default else "")


def is_loopback_host(host: str | None) -> bool:
    """Whether a `Host` header names this machine's loopback (a DNS-rebinding page names
    its own domain, even when that domain resolves to 127.0.0.1)."""
    if not host:
        return False
    name = urlsplit(f"//{host.strip().lower()}").hostname or ""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
