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
