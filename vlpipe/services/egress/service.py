"""The egress service: the Redis shell around `SessionOutputs`.

For each session it owns (SessionOwnership, group `egress`) it follows the session's
events stream from its checkpoint (one shared XREAD for the process), turns each batch
into transcript pieces, audio chunks and status messages, and writes them together with
the playback position, its checkpoint and the trim of the events stream as one fenced
write (`SessionOwnership.commit`), so a replica that takes the session over continues
both output streams with no entry lost or written twice, and a stalled replica that lost
the session writes nothing. A failed write is retried unchanged until it is applied. The
write that carries `vlpipe.session.ended` also sets the session's keys to expire; then
the session is released. Final transcripts also go to the shared `vl:transcripts`: in the
same write on one Redis, through the session's outbox and a relay on a Redis Cluster
(`vlpipe.shared.outbox`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from opentelemetry.metrics import Observation

from vlpipe.services.egress.outputs import STATE_FIELDS, Outputs, SessionOutputs
from vlpipe.services.egress.settings import EgressSettings
from vlpipe.services.egress.writing import OutputWriter
from vlpipe.shared import telemetry
from vlpipe.shared.contracts import ContractError, Event, decode
from vlpipe.shared.fencing import SessionLost
from vlpipe.shared.outbox import SharedOutbox
from vlpipe.shared.ownership import OwnedSession
from vlpipe.shared.service import ServiceContext
from vlpipe.shared.sessions import refuse, run_sessions, session_ownership, session_reader
from vlpipe.shared.streams import Entry, through_outages

log = logging.getLogger("vlpipe.egress")


@dataclass
class SessionEgress:
    owned: OwnedSession
    outputs: SessionOutputs
    next_event: int
    checkpointed: dict[str, str | int | float]
    """The checkpoint fields as last written: a write carries only those that changed."""
    done: asyncio.Event = field(default_factory=asyncio.Event)


class EgressService:
    def __init__(self, ctx: ServiceContext, settings: EgressSettings) -> None:
        self.ctx = ctx
        self.settings = settings
        self.redis = ctx.redis
        self.keys = ctx.keys
        self.retention = ctx.retention
        self.sessions: dict[str, SessionEgress] = {}
        self.reader = session_reader(ctx, settings)
        self.transcripts = SharedOutbox(ctx.redis, ctx.keys, ctx.keys.transcripts, "seq")
        self.ownership = session_ownership(
            ctx, settings, self.run_session,
            shared_streams=((ctx.keys.transcripts, self.retention.transcripts_cap),),
        )  # fmt: skip
        self.writer = OutputWriter("egress", ctx.keys, ctx.retention, self.transcripts)
        self.events_read = 0
        telemetry.meter("egress").create_observable_counter(
            "vlpipe.egress.events", description="Events read",
            callbacks=[lambda _: [Observation(self.events_read)]],
        )  # fmt: skip

    async def run(self) -> None:
        await run_sessions(self.ctx, self.settings, self.reader, self.ownership)

    async def run_session(self, owned: OwnedSession) -> None:
        checkpoint = owned.checkpoint
        if owned.taken_over:  # finals the previous owner wrote but did not relay
            await self._relay(owned.sid)
        if checkpoint.get("ended") == "1":
            return
        outputs = self._outputs(owned, checkpoint)
        next_event = int(checkpoint.get("next_event", "0"))
        state = SessionEgress(owned, outputs, next_event, checkpointed={
            **{k: checkpoint[k] for k in STATE_FIELDS if k in checkpoint}, "next_event": next_event,
        })  # fmt: skip
        self.sessions[owned.sid] = state
        key = self.keys.events(owned.sid)
        self.reader.add(key, checkpoint.get("events_id", "0-0"), self._on_events)
        try:
            await state.done.wait()
        finally:
            self.reader.remove(key)
            self.sessions.pop(owned.sid, None)

    async def _on_events(self, key: str, entries: list[Entry]) -> None:
        sid = key[key.index("{") + 1 : key.rindex("}")]
        state = self.sessions.get(sid)
        if state is None or state.owned.lost.is_set() or state.done.is_set():
            return
        out = Outputs()
        for entry in entries:
            try:
                event: Event = decode(Event, entry.fields)
            except ContractError as exc:
                await self._refuse(sid, entry, str(exc))
                continue
            if event.seq < state.next_event:
                continue  # already handled (a repeat after a broker takeover)
            if event.type == "vlpipe.session.started" and (
                event.event.get("outputs_by") == "broker"
            ):
                await self._let_go(state, entry.id)
                return
            state.next_event = event.seq + 1
            state.outputs.observe(event, out)
            if out.ended:
                break
        self.events_read += len(entries)
        try:
            await self._write(state, out, entries[-1].id)
        except SessionLost:
            raise
        except Exception:
            # Not applied: back to the last checkpoint, so that the reader's retry of these
            # entries makes the same outputs instead of skipping them as handled.
            self._rewind(state)
            raise
        if out.ended:
            log.info("session output finished", extra={"session": sid})
            state.done.set()

    async def _let_go(self, state: SessionEgress, events_id: str) -> None:
        """The broker makes this session's outputs (it said so in the session's first
        event): nothing to make here. The checkpoint says so, for a replica that would
        take the session over, and the session is released."""
        write = self.ownership.write(state.owned)
        write.checkpoint({"events_id": events_id, "ended": 1, "outputs_by": "broker"})
        await self.ownership.commit(state.owned, write)
        log.info("the broker makes the session's outputs", extra={"session": state.owned.sid})
        state.done.set()

    def _rewind(self, state: SessionEgress) -> None:
        """The session's state as of its last applied write (its checkpoint)."""
        state.outputs = self._outputs(
            state.owned, {k: str(v) for k, v in state.checkpointed.items()}
        )
        state.next_event = int(state.checkpointed.get("next_event", 0))

    def _outputs(self, owned: OwnedSession, checkpoint: Mapping[str, str]) -> SessionOutputs:
        """The session's output state as of `checkpoint`."""
        config = owned.start.config
        outputs = SessionOutputs(
            owned.sid, owned.start.audio_out, config.output_audio_format, self.settings.partial_ms
        )
        outputs.load(checkpoint)
        return outputs

    async def _write(self, state: SessionEgress, out: Outputs, events_id: str) -> None:
        """Outputs, playback position, checkpoint and trim in one fenced write (and, with
        the session's end, the expiry of its keys)."""
        sid = state.owned.sid
        write = self.ownership.write(state.owned)
        self.writer.add(write, sid, state.outputs, out)
        values: dict[str, str | int | float] = {
            "events_id": events_id, "next_event": state.next_event, "ended": int(out.ended),
            **state.outputs.snapshot(),
        }  # fmt: skip
        write.checkpoint({k: v for k, v in values.items() if state.checkpointed.get(k) != v})
        write.trim_before(self.keys.events(sid), events_id, approximate=False)
        await self.ownership.commit(state.owned, write)
        state.checkpointed = values
        if out.ended:  # the last relay: no later one would add what the relay lost
            await self.transcripts.settle(sid)
        elif self.transcripts.pending_in(write, sid):
            self.transcripts.relay_soon(sid)
        self.writer.written(sid, out)

    async def _relay(self, sid: str) -> None:
        """The session's outbox to `vl:transcripts` (a Redis Cluster only; exactly once,
        so retried through outages)."""
        await through_outages(lambda: self.transcripts.relay(sid), "relay transcripts")

    async def _refuse(self, sid: str, entry: Entry, reason: str) -> None:
        await refuse(self.ctx, sid, entry, reason)
