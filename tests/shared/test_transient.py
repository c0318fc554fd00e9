"""Which Redis error replies mean "not now": redis-py cuts the code off some of them."""

from __future__ import annotations

from redis.exceptions import (
    ClusterDownError,
    MasterDownError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)

from vlpipe.shared.streams import _redis_down, transient


def test_cluster_replies_redis_py_renames_are_transient() -> None:
    # What redis-py raises for "CLUSTERDOWN The cluster is down", "TRYAGAIN ...", etc.
    for exc in (ClusterDownError("The cluster is down"), MasterDownError("Link down"),
                TryAgainError("Multiple keys request during rehashing of slot"),
                ReadOnlyError("You can't write against a read only replica.")):  # fmt: skip
        assert transient(exc) and _redis_down(exc), exc


def test_replies_that_keep_their_code_are_read_by_it() -> None:
    assert transient(ResponseError("NOREPLICAS Not enough good replicas to write."))
    assert not transient(ResponseError("WRONGTYPE Operation against a key"))
    assert not transient(ResponseError("NOGROUP No such key"))


async def test_a_command_whose_connection_redis_py_closed_under_it_is_an_outage() -> None:
    # What a command of one task meets when redis-py's cluster client closed every
    # connection on another task's CLUSTERDOWN: the connection's writer is gone.
    from redis.asyncio.connection import Connection

    try:
        await Connection()._send_packed_command([b"PING\r\n"])
    except AttributeError as exc:
        assert _redis_down(exc)
    else:
        raise AssertionError("redis-py wrote on a connection it never opened")
    try:
        getattr(None, "missing")  # noqa: B009 - a bug of our own is not an outage
    except AttributeError as exc:
        assert not _redis_down(exc)
