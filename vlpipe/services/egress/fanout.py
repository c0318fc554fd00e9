"""The gateway's fan-out: one shared XREAD of sessions' output streams to many clients.

Each client has its own bounded queue and a pump that sends it; the shared reader fills
the queues without waiting, so a slow client never slows another or the pipeline.

A client joins in steps. `attach` registers it at once (no await), so a client that
joins while another of the same session leaves always finds the session followed;
`joined` returns once the streams' positions are known (only then is the client told it
is subscribed: whatever is written after that reaches it). Then `feed` catches it up: from the start of the streams (`from=start`) or from where the
session was when it joined, in pages, waiting for room in its queue before each entry
(flow control: a long backlog never overflows it), until it reaches what the shared
reader has handed out; from that point, with no await in between, it takes live entries.
Whoever registers a client detaches it (`detach` is idempotent), and a session whose last
client left is no longer read: no viewer keeps the process following a stream.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from websockets.asyncio.server import ServerConnection

from vlpipe.shared.audio import AudioFormat, FormatConverter
from vlpipe.shared.keys import StreamKeys
from vlpipe.shared.streams import Entry, SessionStreamReader

PAGE = 64
"""Backlog entries read per XRANGE while a client catches up."""


class Slow(Exception):
    """A client whose queue is full of messages that cannot be dropped."""


@dataclass(eq=False)
class Client:
    """One connected socket and its bounded outgoing queue."""

    ws: ServerConnection
    sid: str
    audio_format: AudioFormat
    limit: int
    policy: str
    twilio_stream: str | None = None
    queue: deque[str | bytes] = field(default_factory=deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    room: asyncio.Event = field(default_factory=asyncio.Event)
    dropped: int = 0
    notice_due: bool = False
    closed: bool = False
    live: bool = False
    """Takes entries from the shared reader (it has caught up)."""
    joined_at: dict[str, str] | None = None
    """Where each stream was when it joined (None: from the start, or not known yet)."""
    converter: FormatConverter | None = None
    converter_response: str | None = None

    def offer(self, message: str | bytes) -> None:
        """Queue without waiting; apply the slow-client policy when the queue is full."""
        if self.closed:
            return
        if len(self.queue) >= self.limit:
            if self.policy != "drop_audio":
                raise Slow("client too slow")
            for i, queued in enumerate(self.queue):
                if _is_audio(queued):
                    del self.queue[i]
                    self.dropped += 1
                    self.notice_due = True
                    break
            else:
                raise Slow("client too slow to take its transcripts")
        self.queue.append(message)
        self.ready.set()

    def close(self) -> None:
        """Nothing more for this client: its pump and its catching up stop."""
        self.closed = True
        self.room.set()
        self.ready.set()

    def has_room(self) -> bool:
        return len(self.queue) < self.limit // 2

    async def wait_for_room(self) -> None:
        """Until the queue is at most half full (the pump sends it down), or it closed."""
        while not self.has_room() and not self.closed:
            self.room.clear()
            await self.room.wait()

    async def pump(self) -> None:
        while not self.closed:
            await self.ready.wait()
            self.ready.clear()
            while self.queue:
                if self.notice_due:
                    self.notice_due = False
                    # Twilio's Media Streams has no such message (its socket gets Twilio's
                    # events only): `vlpipe.gateway.dropped_audio` counts its drops.
                    if self.twilio_stream is None:
                        await self.ws.send(json.dumps({
                            "type": "notice", "kind": "audio_dropped", "chunks": self.dropped,
                            "message": "this client read too slowly; its oldest audio was dropped",
                        }))  # fmt: skip
                await self.ws.send(self.queue.popleft())
                if self.has_room():
                    self.room.set()


def _is_audio(message: str | bytes) -> bool:
    if isinstance(message, bytes):
        return True
    return message.startswith('{"event":"media"')


@dataclass(eq=False)
class Followed:
    """One session whose output streams the shared reader follows for its clients."""

    sid: str
    keys: tuple[str, ...]
    clients: set[Client] = field(default_factory=set)
    delivered: dict[str, str] = field(default_factory=dict)
    """Per stream, the last entry id handed to live clients."""
    joined: dict[str, str] = field(default_factory=dict)
    """Per stream, where it was when the session began to be followed."""
    started: asyncio.Future[None] | None = None


Render = Callable[[Client, Entry], list[str | bytes]]
Deliver = Callable[[Client, Entry], None]


class OutputFanout:
    """Follows sessions' transcript, audio-out and status streams for attached clients.

    `deliver(client, entry)` renders an entry for a client and offers it (it applies the
    slow-client policy, and may detach the client).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: StreamKeys,
        reader: SessionStreamReader,
        deliver: Deliver,
        on_count: Callable[[int], None] = lambda _: None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.reader = reader
        self.deliver = deliver
        self.on_count = on_count
        self.followed: dict[str, Followed] = {}

    def streams(self, sid: str) -> tuple[str, ...]:
        return (self.keys.transcript(sid), self.keys.audio_out(sid), self.keys.status(sid))

    def attach(self, client: Client, *, from_start: bool) -> None:
        """Register `client` (no await: it cannot miss a detach running at the same time)."""
        followed = self.followed.get(client.sid)
        if followed is None:
            followed = self.followed[client.sid] = Followed(client.sid, self.streams(client.sid))
            followed.started = asyncio.ensure_future(self._follow(followed))
        elif not from_start and followed.started is not None and followed.started.done():
            client.joined_at = dict(followed.delivered)
        if from_start:
            client.joined_at = {}
        followed.clients.add(client)
        self.on_count(1)

    def detach(self, client: Client) -> None:
        """Unregister `client` (any number of times); stop following a session nobody watches."""
        client.close()
        followed = self.followed.get(client.sid)
        if followed is None or client not in followed.clients:
            return
        followed.clients.discard(client)
        self.on_count(-1)
        if not followed.clients:
            del self.followed[client.sid]
            for key in followed.keys:
                self.reader.remove(key)

    async def joined(self, client: Client) -> None:
        """Once this returns, everything written to the session's streams from now on
        reaches `client`: tell it it is subscribed only then."""
        followed = self.followed.get(client.sid)
        if followed is None or client not in followed.clients:
            return
        assert followed.started is not None
        await asyncio.shield(followed.started)
        if client.joined_at is None:
            client.joined_at = dict(followed.joined)

    async def feed(self, client: Client) -> None:
        """Catch `client` up with what it has not seen, then switch it to live entries."""
        await self.joined(client)
        followed = self.followed.get(client.sid)
        if followed is None or client not in followed.clients or client.joined_at is None:
            return
        fetched: dict[str, str | None] = {k: client.joined_at.get(k) for k in followed.keys}
        pages: dict[str, deque[Entry]] = {k: deque() for k in followed.keys}
        while not client.closed:
            behind = [k for k in followed.keys if fetched[k] != followed.delivered[k]]
            if not behind and not any(pages.values()):
                # Caught up with everything handed out so far; no await from the check on,
                # so the next live entry is this client's next entry.
                client.live = True
                return
            for key in behind:
                if not pages[key]:
                    await self._fetch(key, fetched, pages[key], followed.delivered[key])
            entry = _earliest(pages)
            if entry is None:
                continue
            await client.wait_for_room()
            if client.closed:
                return
            self.deliver(client, entry)

    async def _fetch(self, key: str, fetched: dict[str, str | None], page: deque[Entry],
                     upto: str) -> None:  # fmt: skip
        start = "-" if fetched[key] is None else f"({fetched[key]}"
        raw: Any = await self.redis.xrange(key, start, upto, count=PAGE)
        entries = [Entry(key, i.decode(), f) for i, f in raw]
        page.extend(entries)
        # Fewer than a page: nothing more up to `upto` (entries before it were trimmed).
        fetched[key] = entries[-1].id if len(entries) == PAGE else upto

    async def _follow(self, followed: Followed) -> None:
        """Find where each stream is now and have the shared reader follow it from there."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in followed.keys:
                pipe.xrevrange(key, count=1)
            last: list[Any] = await pipe.execute()
        if self.followed.get(followed.sid) is not followed:
            return  # every client left meanwhile
        for key, reply in zip(followed.keys, last, strict=True):
            position = reply[0][0].decode() if reply else "0-0"
            followed.joined[key] = followed.delivered[key] = position
            self.reader.add(key, position, self.on_output)

    async def on_output(self, key: str, entries: list[Entry]) -> None:
        """The shared reader's handler: new entries of a followed stream, to live clients."""
        sid = key[key.index("{") + 1 : key.rindex("}")]
        followed = self.followed.get(sid)
        if followed is None:
            return
        last = followed.delivered.get(key)
        fresh = [e for e in entries if last is None or _after(e.id, last)]
        if not fresh:
            return
        followed.delivered[key] = fresh[-1].id
        for entry in fresh:
            for client in list(followed.clients):
                if client.live:
                    self.deliver(client, entry)


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _after(entry_id: str, other: str) -> bool:
    return _id(entry_id) > _id(other)


def _earliest(pages: dict[str, deque[Entry]]) -> Entry | None:
    """The oldest entry at the head of any page: the streams merged in the order written."""
    heads = [page for page in pages.values() if page]
    if not heads:
        return None
    return min(heads, key=lambda page: _id(page[0].id)).popleft()
