"""Which Redis and key prefix a command works on: `--redis-url` and `--prefix`, else the
`VLPIPE_REDIS_URL` and `VLPIPE_STREAM_PREFIX` every service reads."""

from __future__ import annotations

import argparse

import redis.asyncio as aioredis

from vlpipe.shared.config import ServiceSettings
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.streams import connect


def add_redis_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", help="default: VLPIPE_REDIS_URL")
    parser.add_argument("--prefix", help="stream prefix (default: VLPIPE_STREAM_PREFIX or vl)")


def redis_target(args: argparse.Namespace) -> tuple[str, StreamKeys]:
    settings = ServiceSettings()
    url = args.redis_url or settings.redis_url.get_secret_value()
    return url, StreamKeys(args.prefix or settings.stream_prefix)


def redis_client(url: str, name: str) -> aioredis.Redis:
    """A client for `url` with the TLS files and the cluster mode every service reads
    (`VLPIPE_REDIS_CA_FILE`..., `VLPIPE_REDIS_CLUSTER`)."""
    settings = ServiceSettings()
    return connect(url, name=name, tls=settings.redis_tls, cluster=settings.redis_cluster)
