"""`vlpipe redis-acl [--prefix vl] [--out FILE] [--cluster]`: the Redis ACL file, one user per role.

ingest, broker and egress, producer, consumer and monitor, each with the least keys and
commands it needs (vlpipe/shared/redis_acl.py) and the SHA-256 of its password from
`VLPIPE_REDIS_PASSWORD_<ROLE>`. Load it with `aclfile` in redis.conf; give each service
its user in its URL: `redis://ingest:PASSWORD@HOST:6379/0`. With `--cluster`, also the
users of a self-run Redis Cluster: `replica` (its replicas' `masteruser`) and `operator`
(creates and reshards it). Load the same file on every node. See docs/security.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from vlpipe.shared.config import ServiceSettings
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.redis_acl import AclTable


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlpipe redis-acl", description=__doc__)
    parser.add_argument("--prefix", help="stream prefix (default: VLPIPE_STREAM_PREFIX or vl)")
    parser.add_argument("--out", type=Path, help="write the file here (default: print it)")
    parser.add_argument(
        "--cluster", action="store_true",
        help="add the users of a self-run Redis Cluster: replica and operator",
    )  # fmt: skip
    args = parser.parse_args(argv)
    table = AclTable(StreamKeys(args.prefix or ServiceSettings().stream_prefix), args.cluster)
    try:
        text = table.render(os.environ)
    except ValueError as exc:
        print(f"vlpipe redis-acl: {exc}", file=sys.stderr)
        return 2
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
    return 0
