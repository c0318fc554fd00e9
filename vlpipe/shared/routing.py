"""Commands sent to a Redis Cluster node's own connection, for the hot paths that need it:
the fenced writer (many writes pipelined per master), the session reader (a blocking read
per slot) and the outbox relay (a script and its WAIT on one connection).

redis-py's cluster client routes every command by itself, but two things need a command's
connection in hand: pipelining many commands to one node packed by hiredis, and WAIT,
which counts the writes of its own connection. And one thing it gets wrong: on an ASK
redirection (a slot being migrated, the key already moved) it sends ASKING and the command
on two connections taken from the node's pool one after the other (redis-py 8.1,
`redis.asyncio.cluster`), so when the node has several idle connections the command runs
without ASKING, is answered MOVED back to the old master, and after 16 rounds fails with
"TTL exhausted": a slot could not be used until its migration ended. `send_to_slot` sends
ASKING and the command together on one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import hiredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    MovedError,
    NoScriptError,
    ResponseError,
    TryAgainError,
)

#: Replies that mean "not run here, send it where the cluster says": a slot that moved
#: (failover, resharding), a slot migrating (ASK), keys split by a migration (TRYAGAIN),
#: a master that is failing over (CLUSTERDOWN).
REDIRECTED = (AskError, TryAgainError, ClusterDownError)

REDIRECTIONS = 8
"""How many MOVED or ASK replies one command may follow before giving up (an outage:
the caller retries, backing off)."""

RELEARN_EVERY_S = 0.5
"""A client relearns the slots at most this often (each call asks the nodes)."""


async def send_pipelined(connection: Connection, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Send the commands on `connection` packed by hiredis, read their replies in order; an
    error reply is its exception, in its place."""
    await connection.send_packed_command(b"".join(map(hiredis.pack_command, commands)))
    replies: list[Any] = []
    for _ in commands:
        try:
            replies.append(await connection.read_response())
        except ResponseError as exc:  # this command's reply; the others follow it
            replies.append(exc)
    return replies


async def on_node(node: ClusterNode, commands: list[tuple[Any, ...]]) -> list[Any]:
    """`send_pipelined` on one of `node`'s pooled connections."""
    connection = node.acquire_connection()
    try:
        return await send_pipelined(connection, commands)
    finally:  # one that failed (a reply not read) was disconnected by redis-py: not reused
        node.release(connection)


_relearned_at: dict[int, float] = {}


async def relearn_slots(cluster: RedisCluster) -> None:
    """Ask the nodes for the slots again (after a connection error or a MOVED), at most
    every `RELEARN_EVERY_S` per client; a failure is left for the next call."""
    now = time.monotonic()
    if now - _relearned_at.get(id(cluster), -1e9) < RELEARN_EVERY_S:
        return
    _relearned_at[id(cluster)] = now
    with contextlib.suppress(Exception):
        await cluster.nodes_manager.initialize()


async def send_to_slot(
    cluster: RedisCluster, slot: int, command: tuple[Any, ...], *, script: str | None = None
) -> Any:
    """`command` (whose keys are all on `slot`) on the master of `slot`, following MOVED
    (relearning the slots) and ASK (ASKING and the command on one connection); with
    `script`, a node that lacks it (NOSCRIPT) loads it and gets the command again. Returns
    the raw reply; raises an error reply, a connection error, or `ClusterError` after
    `REDIRECTIONS` redirections."""
    await cluster.initialize()  # a no-op unless the client must (re)learn the slots
    node = cluster.nodes_manager.get_node_from_slot(slot)
    asking = False
    for _ in range(REDIRECTIONS):
        prefix: list[tuple[Any, ...]] = [("ASKING",)] if asking else []
        try:
            replies = await on_node(node, [*prefix, command])
        except Exception:  # the node is gone or silent: a failover, maybe
            await relearn_slots(cluster)
            raise
        reply = replies[-1]
        if isinstance(reply, NoScriptError) and script is not None:
            replies = await on_node(node, [("SCRIPT", "LOAD", script), *prefix, command])
            reply = replies[-1]
        if isinstance(reply, MovedError):
            await cluster.nodes_manager.move_slot(reply)  # what redis-py does on MOVED
            node = cluster.nodes_manager.get_node_from_slot(slot)
            asking = False
            continue
        if isinstance(reply, AskError):
            target = cluster.get_node(host=reply.host, port=reply.port)
            if target is None:  # a node the client does not know yet
                await relearn_slots(cluster)
                raise ClusterError(f"ASK to an unknown node {reply.host}:{reply.port}")
            node, asking = target, True
            continue
        if isinstance(reply, TryAgainError):
            await asyncio.sleep(0.05)  # the slot's keys are split by a migration
            continue
        if isinstance(reply, Exception):
            raise reply
        return reply
    raise ClusterError(f"slot {slot}: still redirected after {REDIRECTIONS} tries")
