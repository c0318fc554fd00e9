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
zombie), or one racing the owner's, adds nothing twice. The outbox is trimmed up to the
marker after each relay (only relayed entries go). The owner relays after each write that
filled the outbox, and when it takes a session over (what a dead owner wrote but did not
relay). The marker expires `RELAYED_TTL_S` after its last use.

Entries are ordered by their outbox id, or by a number they carry (`order_field`: a
final transcript's `seq`, the session's output number). With a number, an entry written
again after a failover lost acknowledged writes of the session (reported, `Regressed`:
its owner resumes from an older checkpoint and writes the same outputs again, into new
outbox entries) is recognised as relayed; without one (tool calls) it is relayed again.

What a consumer group of the shared stream sees on a cluster: each entry once, a little
later than on one Redis (the relay's round trips), sessions' entries interleaved as their
relays run. What the shared stream's own master loses in a failover (its asynchronous
replication) is lost there as on one Redis with its replica.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from vlpipe.shared.fencing import SessionWrite
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.streams import is_cluster

RELAYED_TTL_S = 7 * 24 * 3600
RELAY_BATCH = 100

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
            reply: Any = await self._relay(keys=[self.shared, self.marker(sid)], args=args)
            relayed = int(reply[0])
            # Every entry sent is on the shared stream now (by this call or an earlier one).
            ms, _, seq = _text(entries[-1][0]).partition("-")
            await self.redis.xtrim(outbox, minid=f"{ms}-{int(seq) + 1}", approximate=False)
            total += relayed
            self.relayed += relayed
            if len(entries) < RELAY_BATCH:
                return total

    def _place(self, entry_id: bytes, fields: dict[bytes, bytes]) -> str:
        """An entry's place in the session's order: its number (`order_field`) when the
        entries carry one, else its outbox id."""
        if self.order_field is not None and self.order_field in fields:
            return f"{int(fields[self.order_field]) + 1}-0"  # after the marker's "0-0"
        return _text(entry_id)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
