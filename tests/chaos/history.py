"""A history of what went into Redis and what came out of the pipeline, checked per session.

The history is Redis's own append-only file: with `appendfsync always` every write Redis
acknowledged is in it, in order, byte for byte, including the writes the services' fenced
scripts made (Redis logs a script's effects, with the entry ids it chose) and the entries
that were trimmed since. A test server with automatic AOF rewrites off (`chaos_redis`)
keeps every command of the test. `History.read()` parses it after the test and `check()`
asserts, per session:

* frames are numbered 0..n with no gap or duplicate, and the last is the final marker;
* event sequence numbers are 0..m, unique and in order, ending with
  `vlpipe.session.ended` exactly once;
* every final transcript (per speaker and item) appears exactly once, and each output
  stream is numbered 0..k with no gap or duplicate;
* no service's checkpoint ever moved backwards;
* the session ended in every service.

On a Redis Cluster each master has an AOF of its own. A replica's AOF holds what its
master replicated to it (Redis writes the replication stream to it), so once promoted it
holds the slot's history as the cluster kept it, without what its dead master had
acknowledged but not yet replicated. `History.read` takes the data directories of the
masters in an order where a slot's earlier owner comes first (the source of a migration
before its target: a migrated key arrives as a RESTORE, which is skipped, and its later
writes follow in the target's AOF). `lost_entries` lists what a crashed master had and
the survivors do not: Redis's own record of the acknowledged writes a failover lost.
An AOF rewrite folds the history into a snapshot this module cannot read: `aof_base`
names the snapshot file, so a test can check it did not change under it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis

from vlpipe.shared.contracts import AudioOut, Event, Frame, TranscriptPiece, decode
from vlpipe.shared.keys import StreamKeys

CHECKPOINTS = {
    "ingest": "ingest.next_seq",
    "broker": "broker.seq",
    "egress": "egress.next_event",
}
"""The field of each service's checkpoint that only ever grows."""


def aof_commands(data_dir: Path) -> list[list[bytes]]:
    """Every command in the server's AOF, in order (Redis 7's multi-part AOF, or the
    single file of Redis 6). The base file of a server started empty holds nothing."""
    parts = data_dir / "appendonlydir"
    if parts.is_dir():
        manifest = (parts / "appendonly.aof.manifest").read_text().splitlines()
        names = [line.split()[1] for line in manifest if " type i" in line]
        files = [parts / name for name in names]
    else:
        files = [data_dir / "appendonly.aof"]
    commands: list[list[bytes]] = []
    for path in files:
        commands += _parse_resp(path.read_bytes())
    return commands


def aof_base(data_dir: Path) -> str | None:
    """The name of the AOF's base file (its snapshot), None for a single-file AOF. A new
    name means the AOF was rewritten: commands before the rewrite are no longer in it."""
    manifest = data_dir / "appendonlydir" / "appendonly.aof.manifest"
    if not manifest.exists():
        return None
    return next((ln.split()[1] for ln in manifest.read_text().splitlines() if " type b" in ln),
                None)  # fmt: skip


def lost_entries(
    crashed: Path, survivors: Sequence[Path], prefix: str, *, retried_kept: bool = False
) -> dict[str, list[bytes]]:
    """Per key, the ids of the entries the crashed master's AOF has and no survivor's has:
    writes it acknowledged that a failover lost (a promoted replica had not got them).
    Entry ids are the ms time of the master that added them, so an entry added after the
    promotion never takes the id of a lost one (the promotion takes seconds).

    A write the master applied but whose reply the kill cut off was never acknowledged:
    its writer sends it again, unchanged, to the promoted replica, which adds the same
    fields under new ids. With `retried_kept`, an entry whose key and fields a survivor
    has under another id is such a retry, not a loss (every entry of the pipeline's
    streams carries its own sequence number, so two different entries never have the
    same fields)."""
    kept: set[tuple[str, bytes]] = set()
    contents: set[tuple[str, tuple[bytes, ...]]] = set()
    for path in survivors:
        survivor = stream_contents(path, prefix)
        kept |= survivor.keys()
        contents |= {(key, fields) for (key, _), fields in survivor.items()}
    crashed_contents = stream_contents(crashed, prefix)
    lost: dict[str, list[bytes]] = defaultdict(list)
    for key, entry_id in sorted(crashed_contents.keys() - kept):
        if retried_kept and (key, crashed_contents[key, entry_id]) in contents:
            continue
        lost[key].append(entry_id)
    return dict(lost)


def stream_contents(data_dir: Path, prefix: str) -> dict[tuple[str, bytes], tuple[bytes, ...]]:
    """(key, entry id) -> the entry's fields, of every XADD under `prefix` in the node's
    AOF."""
    out = {}
    for command in aof_commands(data_dir):
        if command[0].upper() == b"XADD" and command[1].startswith(f"{prefix}:".encode()):
            out[command[1].decode(), _entry_id(command)] = tuple(command[_id_index(command) + 1 :])
    return out


def _parse_resp(data: bytes) -> list[list[bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        end = data.index(b"\r\n", pos)
        assert data[pos : pos + 1] == b"*", f"not a RESP array at byte {pos}"
        count = int(data[pos + 1 : end])
        pos = end + 2
        args = []
        for _ in range(count):
            end = data.index(b"\r\n", pos)
            size = int(data[pos + 1 : end])
            pos = end + 2
            args.append(data[pos : pos + size])
            pos += size + 2
        out.append(args)
    return out


@dataclass
class SessionHistory:
    frames: list[int] = field(default_factory=list)
    final_frame: bool = False
    audio: list[int] = field(default_factory=list)
    """The producer's `seq` of each raw audio entry (a retried XADD may repeat one)."""
    input_final: bool = False
    """The broker's checkpoint said the input ended (direct input has no frame marker)."""
    events: list[tuple[int, str]] = field(default_factory=list)
    transcript: list[TranscriptPiece] = field(default_factory=list)
    audio_out: list[AudioOut] = field(default_factory=list)
    checkpoints: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    done: set[str] = field(default_factory=set)


@dataclass
class History:
    keys: StreamKeys
    sessions: dict[str, SessionHistory] = field(default_factory=lambda: defaultdict(SessionHistory))

    @classmethod
    def read(cls, data_dirs: Path | Sequence[Path], keys: StreamKeys) -> History:
        """The history in the AOF of one server, or of a cluster's masters (a slot's
        earlier owner first; see the module's docstring)."""
        history = cls(keys)
        dirs = [data_dirs] if isinstance(data_dirs, Path) else list(data_dirs)
        commands = [command for path in dirs for command in aof_commands(path)]
        for command in commands:
            name = command[0].upper()
            if name == b"XADD":
                history._added(command[1].decode(), _fields(command))
            elif name == b"HSET":
                history._state(command[1].decode(), command[2:])
        return history

    def _sid(self, key: str, kind: str) -> str | None:
        prefix = f"{self.keys.prefix}:{kind}:{{"
        return key[len(prefix) : -1] if key.startswith(prefix) else None

    def _added(self, key: str, fields: dict[bytes, bytes]) -> None:
        if sid := self._sid(key, "frames"):
            frame = decode(Frame, fields)
            self.sessions[sid].frames.append(frame.seq)
            self.sessions[sid].final_frame |= frame.final
        elif sid := self._sid(key, "audio"):
            if b"seq" in fields:
                self.sessions[sid].audio.append(int(fields[b"seq"]))
        elif sid := self._sid(key, "events"):
            event = decode(Event, fields)
            self.sessions[sid].events.append((event.seq, event.type))
        elif sid := self._sid(key, "transcript"):
            self.sessions[sid].transcript.append(decode(TranscriptPiece, fields))
        elif sid := self._sid(key, "audio-out"):
            self.sessions[sid].audio_out.append(decode(AudioOut, fields))

    def _state(self, key: str, pairs: list[bytes]) -> None:
        sid = self._sid(key, "session")
        if sid is None:
            return
        values = {pairs[i].decode(): pairs[i + 1] for i in range(0, len(pairs) - 1, 2)}
        history = self.sessions[sid]
        history.input_final |= values.get("broker.input_final") == b"1"
        for service, name in CHECKPOINTS.items():
            if name in values:
                history.checkpoints[service].append(int(values[name]))
            if values.get(f"{service}.done") == b"1":
                history.done.add(service)

    def check(self, sid: str, *, ended: bool = True, direct: bool = False) -> None:
        """Assert the session's history: nothing lost, nothing twice, ended everywhere.
        `direct`: the session's start named `audio_in` (the broker read the producer's
        chunks: no frames, and the end of input is in the broker's checkpoint)."""
        history = self.sessions[sid]
        frames = sorted(set(history.audio)) if direct else history.frames
        assert frames, f"{sid}: no frames"
        assert frames == list(range(len(frames))), f"{sid}: frames {_gaps(frames)}"
        if direct:
            assert not history.frames, f"{sid}: ingest wrote frames for a direct session"
        events = [seq for seq, _ in history.events]
        assert events == list(range(len(events))), f"{sid}: events {_gaps(events)}"
        for service, seen in history.checkpoints.items():
            assert seen == sorted(seen), f"{sid}: {service} checkpoint moved back: {seen}"
        pieces, chunks = history.transcript, history.audio_out
        finals = Counter((p.speaker, p.item_id) for p in pieces if p.final)
        twice = {k: n for k, n in finals.items() if n > 1}
        assert not twice, f"{sid}: final transcripts written more than once: {twice}"
        for name, numbers in (("transcript", [p.seq for p in pieces]),
                              ("audio-out", [c.seq for c in chunks])):  # fmt: skip
            assert numbers == list(range(len(numbers))), f"{sid}: {name} {_gaps(numbers)}"
        if not ended:
            return
        assert history.input_final if direct else history.final_frame, f"{sid}: input never ended"
        kinds = [kind for _, kind in history.events]
        assert kinds.count("vlpipe.session.ended") == 1, f"{sid}: ended {kinds[-5:]}"
        assert kinds[-1] == "vlpipe.session.ended", f"{sid}: events after the end {kinds[-5:]}"
        assert history.done == set(CHECKPOINTS), f"{sid}: done in {history.done} only"

    def speakers(self, sid: str) -> set[str]:
        return {p.speaker for p in self.sessions[sid].transcript if p.final}


def _id_index(command: list[bytes]) -> int:
    """Where the entry id is in an XADD as the AOF has it (`XADD key [options] id f v
    ...`): the first argument that looks like one."""
    for i in range(2, len(command)):
        ms, dash, seq = command[i].partition(b"-")
        if dash and ms.isdigit() and seq.isdigit():
            return i
    raise AssertionError(f"no entry id in {command[:4]}")


def _entry_id(command: list[bytes]) -> bytes:
    return command[_id_index(command)]


def _fields(command: list[bytes]) -> dict[bytes, bytes]:
    """The fields of an XADD as the AOF has it."""
    rest = command[_id_index(command) + 1 :]
    return {rest[j]: rest[j + 1] for j in range(0, len(rest), 2)}


def _gaps(numbers: list[int]) -> str:
    counts = Counter(numbers)
    twice = sorted(n for n, c in counts.items() if c > 1)
    missing = sorted(set(range(max(numbers, default=-1) + 1)) - set(numbers))
    return f"missing {missing[:20]}, repeated {twice[:20]} (of {len(numbers)})"


async def ended_everywhere(redis: aioredis.Redis, keys: StreamKeys, sid: str) -> bool:
    """Every service has finished the session."""
    state = await redis.hmget(keys.session_state(sid), [f"{s}.done" for s in CHECKPOINTS])
    return all(v == b"1" for v in state)
