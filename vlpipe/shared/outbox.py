"""Shared streams written from a session's fenced write: direct on one Redis, through a
per-session outbox on a Redis Cluster.

Egress adds each final transcript to `vl:transcripts` and the broker each tool call to
`vl:tool-calls` in the same fenced write as the session's own outputs and checkpoint, so
a takeover neither loses nor repeats one. On one Redis that write names the shared stream
directly. On a cluster it cannot: a script may only name keys of one slot, and the
shared stream has its own. So there the write adds the entry to the session's outbox
(`vl:outbox:transcripts:{sid}`, in the session's slot, inside the fenced write), and
`relay()` then moves the outbox to the shared stream with one script call on the shared
stream's slot. That script keeps, in a marker hash whose hash tag is the shared stream's
whole name (`{vl:transcripts}:relayed:<sid>`, same slot as `vl:transcripts`), the id of
the last outbox entry relayed, and adds only entries after it: a relay retried after a
lost reply, a second relay of the same entries by a replica that lost the session (a
zombie), or one racing the owner's, adds nothing twice. The outbox is trimmed after a
relay only once a replica of the shared stream's master has the relay's writes (`WAIT 1`
on the script's connection): if that master fails before, its promoted replica lacks the
entries and the marker, and the next relay adds them again from the outbox.

The owner relays in the background after each write that filled the outbox
(`relay_soon`: the session's outputs never wait for the shared stream's master), with the
session's last write until a replica confirms (`settle`, a few tries), and when it takes
a session over (what a dead owner wrote but did not relay). The marker expires
`RELAYED_TTL_S` after its last use.

Entries are ordered by their outbox id, or by a number they carry (`order_field`: a
final transcript's `seq`, the session's output number). With a number, an entry written
again after a failover lost acknowledged writes of the session (reported, `Regressed`:
its owner resumes from an older checkpoint and writes the same outputs again, into new
outbox entries) is recognised as relayed; without one (tool calls) it is relayed again.

What a consumer group of the shared stream sees on a cluster: each entry once, a little
later than on one Redis (the relay's round trips), sessions' entries interleaved as their
relays run. An entry can still be lost from the shared stream when its master fails
after the last relay of a session whose writes no replica confirmed (the shared master's
replica down for longer than `settle` tries; the outbox then keeps the entry until the
session's keys expire, and each such relay is logged).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import NoScriptError

from vlpipe.shared.fencing import SessionWrite
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.routing import REDIRECTED, on_node, relearn_slots, send_to_slot
from vlpipe.shared.streams import is_cluster, through_outages

RELAYED_TTL_S = 7 * 24 * 3600
RELAY_BATCH = 100
RELAY_WAIT_MS = 500
"""How long a relay waits for a replica of the shared stream's master to have its writes
(usually well under a millisecond)."""

log = logging.getLogger("vlpipe.outbox")

# KEYS[1]: the shared stream; KEYS[2]: the session's relay marker (a hash, `last`).
# ARGV[1]: the marker's expiry (s); then per outbox entry: its place in the session's
# order ("<a>-<b>", compared as a pair: the outbox id, or "<seq>-0"), 2 x fields, the fields.
_RELAY = """
local function later(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, bms = tonumber(ams), tonumber(bms)
  if ams ~= bms then return ams > bms end
  return tonumber(aseq) > tonumber(bseq)
end
local last = redis.call('HGET', KEYS[2], 'last') or '0-0'
local relayed = 0
local i = 2
while i <= #ARGV do
  local id, n = ARGV[i], tonumber(ARGV[i + 1])
  if later(id, last) then
    redis.call('XADD', KEYS[1], '*', unpack(ARGV, i + 2, i + 1 + n))
    last = id
    relayed = relayed + 1
  end
  i = i + 2 + n
end
redis.call('HSET', KEYS[2], 'last', last)
redis.call('EXPIRE', KEYS[2], ARGV[1])
return {relayed, last}
"""


class SharedOutbox:
    """How one service writes one shared stream (`shared`, e.g. `keys.transcripts`) from
    sessions' fenced writes: `add()` in the write, `relay()` after it (a no-op on one
    Redis, where `add()` wrote the shared stream itself)."""

    def __init__(
        self, redis: aioredis.Redis, keys: StreamKeys, shared: str, order_field: str | None = None
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.shared = shared
        self.order_field = order_field.encode() if order_field else None
        self.cluster = is_cluster(redis)
        self.name = shared.removeprefix(f"{keys.prefix}:")
        self._relay = redis.register_script(_RELAY)
        self.relayed = 0
        self.unsettled: set[str] = set()
        """Sessions whose outbox keeps relayed entries no replica has confirmed yet."""
        self._relaying: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()

    def relay_soon(self, sid: str) -> None:
        """Relay the session's outbox in the background (one relay at a time per session;
        a request during one makes it go again): a session's outputs never wait for the
        shared stream's master, or for its replica to confirm."""
        if not self.cluster:
            return
        running = self._relaying.get(sid)
        if running is not None and not running.done():
            self._again.add(sid)
            return
        self._relaying[sid] = asyncio.create_task(self._relay_while_asked(sid))

    async def _relay_while_asked(self, sid: str) -> None:
        try:
            while True:
                self._again.discard(sid)
                await through_outages(lambda: self.relay(sid), f"relay {self.name}")
                if sid not in self._again:
                    return
        except Exception:  # the next write's relay, or a takeover's, tries again
            log.exception("relay failed", extra={"stream": self.shared, "session": sid})
        finally:
            if self._relaying.get(sid) is asyncio.current_task():
                del self._relaying[sid]

    async def settle(self, sid: str, attempts: int = 5) -> None:
        """At a session's end, when no later relay would add what the shared stream's
        master lost: wait for the session's relays, and relay again (a few times, backing
        off) until a replica confirms them; then forget the session."""
        if not self.cluster:
            return
        running = self._relaying.get(sid)
        if running is not None:
            await asyncio.gather(running, return_exceptions=True)
        for attempt in range(attempts):
            await through_outages(lambda: self.relay(sid), f"relay {self.name}")
            if sid not in self.unsettled:
                return
            await asyncio.sleep(0.2 * (attempt + 1))
        self.unsettled.discard(sid)  # given up: each relay logged it

    def outbox(self, sid: str) -> str:
        return self.keys.outbox(self.name, sid)

    def marker(self, sid: str) -> str:
        return f"{{{self.shared}}}:relayed:{sid}"

    def add(self, write: SessionWrite, sid: str, fields: dict[str, Any]) -> None:
        """Queue `fields` for the shared stream on `write` (the session's fenced write)."""
        write.xadd(self.outbox(sid) if self.cluster else self.shared, fields)

    def pending_in(self, write: SessionWrite, sid: str) -> bool:
        """Whether `write` put anything in the session's outbox (a relay should follow)."""
        return self.cluster and self.outbox(sid) in write.keys

    async def relay(self, sid: str) -> int:
        """Move the session's outbox to the shared stream, each entry once; returns how
        many entries this call added (0 if another relay had them). Raises Redis errors:
        retrying is always safe."""
        if not self.cluster:
            return 0
        outbox, total = self.outbox(sid), 0
        while True:
            entries: Any = await self.redis.xrange(outbox, count=RELAY_BATCH)
            if not entries:
                return total
            args: list[Any] = [RELAYED_TTL_S]
            for entry_id, fields in entries:
                flat = [x for pair in fields.items() for x in pair]
                args += [self._place(entry_id, fields), len(flat), *flat]
            relayed, replicated = await self._relay_replicated(sid, args)
            total += relayed
            self.relayed += relayed
            if not replicated:
                # Kept in the outbox: if the shared stream's master fails before its replica
                # has them, the next relay (the next write's, or a takeover's) adds them again.
                self.unsettled.add(sid)
                log.warning("relayed entries not replicated yet; kept in the outbox",
                            extra={"stream": self.shared, "session": sid})  # fmt: skip
                return total
            # Every entry sent is on the shared stream and its replica now (by this call or
            # an earlier one): the outbox may let them go.
            ms, _, seq = _text(entries[-1][0]).partition("-")
            await self.redis.xtrim(outbox, minid=f"{ms}-{int(seq) + 1}", approximate=False)
            if len(entries) < RELAY_BATCH:
                self.unsettled.discard(sid)
                return total

    async def _relay_replicated(self, sid: str, args: list[Any]) -> tuple[int, bool]:
        """The relay script on the shared stream's master, then `WAIT 1` on the same
        connection (WAIT counts that connection's writes): how many entries it added, and
        whether a replica has them (or the master has none)."""
        cluster = cast(RedisCluster, self.redis)
        await cluster.initialize()
        slot = key_slot(self.shared.encode())
        node = cluster.nodes_manager.get_node_from_slot(slot)
        script = ("EVALSHA", self._relay.sha, 2, self.shared, self.marker(sid), *args)
        wait = ("WAIT", 1, RELAY_WAIT_MS)
        try:
            replies = await on_node(node, [script, wait])
        except Exception:
            await relearn_slots(cluster)
            raise
        if isinstance(replies[0], NoScriptError):
            replies = await on_node(node, [("SCRIPT", "LOAD", _RELAY), script, wait])
            replies = replies[1:]
        if isinstance(replies[0], REDIRECTED):  # the slot moved or moves: follow it
            reply: Any = await send_to_slot(cluster, slot, script, script=_RELAY)
            # Not confirmed: kept for the next relay (unless there is no replica to wait for).
            return int(reply[0]), await _without_replicas(cluster, slot)
        if isinstance(replies[0], Exception):
            raise replies[0]
        acked = replies[1] if isinstance(replies[1], int) else 0
        return int(replies[0][0]), acked >= 1 or await _without_replicas(cluster, slot)

    def _place(self, entry_id: bytes, fields: dict[bytes, bytes]) -> str:
        """An entry's place in the session's order: its number (`order_field`) when the
        entries carry one, else its outbox id."""
        if self.order_field is not None and self.order_field in fields:
            return f"{int(fields[self.order_field]) + 1}-0"  # after the marker's "0-0"
        return _text(entry_id)


async def _without_replicas(cluster: RedisCluster, slot: int) -> bool:
    """Whether the master of `slot` has no replica at all (so no relay of it can be
    confirmed, and none is waited for). The client's view of the slots is asked again
    before it is believed: one learned while a replica was joining or rejoining (after a
    failover, the old master comes back as one) lacks it, and would pass every relay as
    confirmed until the client next relearned the slots."""
    if len(cluster.nodes_manager.slots_cache.get(slot, ())) > 1:
        return False
    await relearn_slots(cluster)
    return len(cluster.nodes_manager.slots_cache.get(slot, ())) <= 1


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
