"""The `vlpipe` command: one entry point for every service and tool.

Each subcommand lives in its own module and exposes `main(argv) -> int`; this file only
dispatches, so that `vlpipe engine` does not import the broker and vice versa.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("vlpipe.services.ingest.__main__", "run the ingest service"),
    "broker": ("vlpipe.services.broker.__main__", "run the session broker"),
    "egress": ("vlpipe.services.egress.__main__", "run the egress service and gateway"),
    "engine": ("vlpipe.services.engine.__main__", "run the local Voice Live engine"),
    "up": ("vlpipe.tools.up", "run the whole pipeline on this machine"),
    "publish": ("vlpipe.tools.publish", "publish an audio file as a session"),
    "tail": ("vlpipe.tools.tail", "follow a session's transcripts"),
    "sessions": ("vlpipe.tools.sessions", "list live sessions, owners and lag"),
    "doctor": ("vlpipe.tools.doctor", "check Redis, the upstream and credentials"),
    "config": ("vlpipe.tools.config", "print the effective settings, secrets redacted"),
    "contracts": ("vlpipe.tools.contracts", "write or check the JSON Schema/AsyncAPI files"),
    "token": ("vlpipe.tools.token", "print a gateway token for one session and scope"),
    "redis-acl": ("vlpipe.tools.redis_acl", "print the Redis ACL file: one user per role"),
}


def usage() -> str:
    lines = ["usage: vlpipe COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if args[0] in ("-V", "--version"):
        from vlpipe import __version__

        print(f"vlpipe {__version__}")
        return 0
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"vlpipe: unknown command {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(command[0])
    code: int = module.main(args[1:])
    return code


if __name__ == "__main__":
    sys.exit(main())
