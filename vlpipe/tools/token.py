"""`vlpipe token --session ID --scope call|listen [--ttl 300]`: print a gateway token.

Signed with `VLPIPE_GATEWAY_SIGNING_KEY` (HS256), for `VLPIPE_GATEWAY_AUDIENCE` when set:
what an app's backend hands its page or phone so that it can open one session's socket.
"""

from __future__ import annotations

import argparse
import sys

from vlpipe.services.egress.access import ANY_SESSION, Scope, mint_token
from vlpipe.services.egress.settings import EgressSettings


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlpipe token", description=__doc__)
    parser.add_argument("--session", help="the session id the token opens (admin: any)")
    parser.add_argument(
        "--scope", choices=[s.value for s in Scope], default=Scope.CALL.value,
        help="listen: receive only; call: send and receive, and end the session; admin: "
        "every session",
    )  # fmt: skip
    parser.add_argument("--ttl", type=float, default=300.0, help="seconds it is valid (300)")
    args = parser.parse_args(argv)
    settings = EgressSettings()
    if settings.signing_key is None:
        print("vlpipe token: set VLPIPE_GATEWAY_SIGNING_KEY (the gateway's too)", file=sys.stderr)
        return 2
    scope = Scope(args.scope)
    session = args.session or (ANY_SESSION if scope is Scope.ADMIN else None)
    if session is None:
        print(f"vlpipe token: a {scope.value} token needs --session ID", file=sys.stderr)
        return 2
    try:
        token = mint_token(settings.signing_key.get_secret_value(), session, scope,
                           ttl_s=args.ttl, audience=settings.audience)  # fmt: skip
    except ValueError as exc:
        print(f"vlpipe token: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0
