"""The session broker: one Voice Live WebSocket per session, events out to Redis.

It claims sessions through the `broker` consumer group (SessionOwnership), follows every
owned session's frames and control streams with one shared XREAD (SessionStreamReader),
and runs a `BrokerSession` per session for its upstream socket. SIGTERM: stop taking
sessions, hand the owned ones over (their checkpoints are current), exit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Any, get_args

from opentelemetry.metrics import Observation

from vlpipe.services.broker.session import LATENCY_SAMPLE_EVERY, BrokerSession
from vlpipe.services.broker.settings import BrokerSettings
from vlpipe.services.broker.upstream import Auth, make_auth, reachable, realtime_url
from vlpipe.services.egress.writing import OutputWriter
from vlpipe.shared import telemetry
from vlpipe.shared.contracts import ContractError, Control, Frame, Message, decode
from vlpipe.shared.outbox import SharedOutbox
from vlpipe.shared.ownership import OwnedSession
from vlpipe.shared.service import ServiceContext
from vlpipe.shared.sessions import refuse, run_sessions, session_ownership, session_reader
from vlpipe.shared.streams import REDIS_DOWN, Entry, through_outages

log = logging.getLogger("vlpipe.broker")

LATENCY_BUCKETS_MS = (0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 250, 500, 1000, 2500)


class BrokerService:
    def __init__(
        self, ctx: ServiceContext, settings: BrokerSettings, credential: Any = None
    ) -> None:
        self.ctx = ctx
        self.settings = settings
        self.redis = ctx.redis
        self.keys = ctx.keys
        self.retention = ctx.retention
        self.url = realtime_url(settings)
        self.auth: Auth = make_auth(settings, credential)
        self.sessions: dict[str, BrokerSession] = {}
        self.reader = session_reader(ctx, settings)
        # Control messages are rare: their streams have a reader of their own, so the
        # input's reads (every 20 ms) name half the keys and a control read rarely wakes.
        self.ctl_reader = session_reader(ctx, settings, "ctl")
        self.tool_call_outbox = SharedOutbox(ctx.redis, ctx.keys, ctx.keys.tool_calls)
        # The outputs of the sessions whose outputs the broker makes (`BrokerSession`).
        transcripts = SharedOutbox(ctx.redis, ctx.keys, ctx.keys.transcripts, "seq")
        self.outputs = OutputWriter("broker", ctx.keys, ctx.retention, transcripts)
        self.ownership = session_ownership(
            ctx, settings, self.run_session,
            shared_streams=((ctx.keys.tool_calls, self.retention.tool_calls_cap),
                            (ctx.keys.transcripts, self.retention.transcripts_cap)),
        )  # fmt: skip
        self._upstream_ok: tuple[float, bool] = (0.0, False)
        self.totals: Counter[str] = Counter()  # plain counts for tests and benchmarks
        self.sampled_latency_ms: deque[float] = deque(maxlen=50_000)  # for benchmarks
        ctx.ready_checks.append(self.upstream_ready)
        meter = telemetry.meter("broker")
        # Counted per frame (and per write) in `totals` and observed only when metrics are
        # collected: an instrument's add() per 20 ms frame of every session cost more than
        # the count, and one per write was 1% of the broker's CPU at 25 calls.
        meter.create_observable_counter(
            "vlpipe.broker.frames", description="Frames sent upstream",
            callbacks=[lambda _: [Observation(self.totals["frames"])]],
        )  # fmt: skip
        meter.create_observable_counter(
            "vlpipe.broker.appends", description="input_audio_buffer.append messages sent",
            callbacks=[lambda _: [Observation(self.totals["appends"])]],
        )  # fmt: skip
        meter.create_observable_counter(
            "vlpipe.broker.events", description="Events written",
            callbacks=[lambda _: [Observation(self.totals["events"])]],
        )  # fmt: skip
        self.reconnects = meter.create_counter(
            "vlpipe.broker.reconnects", description="Upstream connections lost or refused"
        )
        self.upstream_errors = meter.create_counter(
            "vlpipe.broker.upstream_errors", description="Upstream error events, by code"
        )
        self.tool_calls = meter.create_counter("vlpipe.broker.tool_calls", description="Tool calls")
        self.barge_ins = meter.create_counter("vlpipe.broker.barge_ins", description="Barge-ins")
        self.frame_latency = meter.create_histogram(
            "vlpipe.broker.frame_to_upstream",
            unit="ms",
            description="From a frame's arrival on the frames stream to its append upstream "
            f"(every {LATENCY_SAMPLE_EVERY}th append of a session: a sample)",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        meter.create_observable_gauge(
            "vlpipe.broker.sessions",
            callbacks=[lambda _: [Observation(len(self.sessions))]],
            description="Sessions this replica owns",
        )

    async def run(self) -> None:
        ticker = asyncio.create_task(self._tick())
        try:
            await run_sessions(
                self.ctx, self.settings, self.reader, self.ownership, self.ctl_reader
            )
        finally:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
            await self.auth.close()

    async def _tick(self) -> None:
        """Wake every session's sender 4 times a second: tool deadlines, drains, rollovers."""
        while True:
            await asyncio.sleep(0.25)
            for session in list(self.sessions.values()):
                session.due = True
                session.work.set()

    async def relay_tool_calls(self, sid: str) -> None:
        """The session's outbox to `vl:tool-calls` (a Redis Cluster only; exactly once,
        so retried through outages)."""
        await through_outages(lambda: self.tool_call_outbox.relay(sid), "relay tool calls")

    async def relay_transcripts(self, sid: str) -> None:
        """The session's outbox to `vl:transcripts` (a Redis Cluster only, when the broker
        makes the session's outputs)."""
        outbox = self.outputs.transcripts
        await through_outages(lambda: outbox.relay(sid), "relay transcripts")

    async def run_session(self, owned: OwnedSession) -> None:
        session = BrokerSession(self, owned)
        self.sessions[owned.sid] = session
        try:
            await session.run()
        finally:
            if self.sessions.get(owned.sid) is session:
                del self.sessions[owned.sid]

    # ---------------------------------------------------------------- reader handlers

    # Plain functions, run inline by the reader (no task per delivery): they await only
    # when an entry is refused, by returning the coroutine that refuses it first. A refusal
    # that fails (Redis down) fails the delivery before anything was queued, so the
    # reader's retry queues nothing twice.

    def on_frames(self, key: str, entries: list[Entry]) -> Awaitable[None] | None:
        session = self.sessions.get(_sid(key))
        if session is None:
            return None
        frames: list[tuple[str, Frame]] = []
        refused: list[tuple[Entry, str]] = []
        for entry in entries:
            try:
                frames.append((entry.id, decode(Frame, entry.fields)))
            except ContractError as exc:
                refused.append((entry, str(exc)))
        queue = (lambda: session.queue_frames(frames)) if frames else None
        return self._refusing(session, refused, queue)

    def on_audio(self, key: str, entries: list[Entry]) -> Awaitable[None] | None:
        """Direct input (`vlpipe.services.broker.direct`): the producer's own chunks."""
        session = self.sessions.get(_sid(key))
        if session is None:
            return None
        assert session.direct is not None
        chunks, refused = session.direct.read(entries)
        return self._refusing(session, refused, lambda: session.direct_frames(chunks))

    def on_ctl(self, key: str, entries: list[Entry]) -> Awaitable[None] | None:
        session = self.sessions.get(_sid(key))
        if session is None:
            return None
        controls: list[tuple[Entry, Message]] = []
        refused: list[tuple[Entry, str]] = []
        for entry in entries:
            kind = entry.fields.get(b"type", b"").decode("utf-8", "replace")
            model = CONTROLS.get(kind)
            if model is None:
                shown = repr(kind) if kind else "(missing)"
                refused.append((entry, f"unknown control message type {shown}; expected one "
                                       f"of: {', '.join(CONTROLS)}"))  # fmt: skip
                continue
            try:
                controls.append((entry, decode(model, entry.fields)))
            except ContractError as exc:
                refused.append((entry, str(exc)))

        def queue() -> None:
            for entry, msg in controls:
                session.queue_control(entry, msg)

        return self._refusing(session, refused, queue)

    def _refusing(
        self, session: BrokerSession, refused: list[tuple[Entry, str]],
        then: Callable[[], object] | None,
    ) -> Awaitable[None] | None:  # fmt: skip
        """`then()` at once when nothing is refused; else a coroutine that refuses each
        entry, then calls it. An entry dead-lettered already (read again by a new owner)
        is passed over, as it was the first time."""
        if refused:  # nearly never: no list made for every delivery
            refused = [(e, why) for e, why in refused if not session.core.refused_already(e)]
        if not refused:
            if then is not None:
                then()
            return None

        async def refuse_then() -> None:
            for entry, reason in refused:
                await self.refuse(session.sid, entry, reason)
                session.refused(entry)
            if then is not None:
                then()

        return refuse_then()

    async def refuse(self, sid: str, entry: Entry, reason: str) -> None:
        await refuse(self.ctx, sid, entry, reason)

    async def playback(self, sid: str) -> dict[str, str]:
        """What egress delivered and the consumer played of the current response; nothing
        when Redis is down (a barge-in then cuts at what the broker itself knows)."""
        try:
            raw: Any = await self.redis.hgetall(self.keys.playback(sid))
        except REDIS_DOWN:
            return {}
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def upstream_ready(self) -> str | None:
        checked_at, ok = self._upstream_ok
        if time.monotonic() - checked_at > 5:
            ok = await reachable(self.url)
            self._upstream_ok = (time.monotonic(), ok)
        return None if ok else "upstream unreachable"


def _sid(key: str) -> str:
    return key[key.index("{") + 1 : key.rindex("}")]


CONTROLS: dict[str, type[Message]] = {
    model.model_fields["type"].default: model for model in get_args(get_args(Control)[0])
}
"""Control message models by their `type` field."""
