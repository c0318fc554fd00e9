"""A streaming resampler that a new owner of the session can resume without losing audio.

soxr's streaming resampler holds back up to ~25 ms of output (its filter's delay and its
block size), and its state cannot be exported. `ResumableResampler` therefore keeps the
input from a little before the first output sample it has not returned yet. A new owner
feeds that input to a new filter and drops the outputs that were already returned: the
held-back audio comes out, and because the new filter has seen `MARGIN_MS` of input before
that point, the samples continue the old ones within rounding (see the tests).

The replay starts at an input sample whose time is also a whole output sample (a multiple
of `in_rate / gcd(in_rate, out_rate)` input samples), so the resumed stream gives exactly
as many samples as an uninterrupted one. For rate pairs whose period is longer than
`MAX_PERIOD_MS` (not any of the usual 8 to 48 kHz rates) the replay starts at the nearest
input sample instead, and the count may differ by one sample.
"""

from __future__ import annotations

from math import gcd
from typing import Any

from vlpipe.services.ingest.framing import b64, unb64
from vlpipe.shared.audio import SAMPLE_WIDTH, StreamingResampler

MARGIN_MS = 2
"""Input replayed before the first unreturned output, so the new filter is warm there."""
MAX_PERIOD_MS = 50


class ResumableResampler:
    """PCM16 mono from `in_rate` to `out_rate` Hz for the source `kind` (a format name)."""

    def __init__(self, in_rate: int, out_rate: int, kind: str) -> None:
        self.in_rate = in_rate
        self.out_rate = out_rate
        self.kind = kind
        self._stream = StreamingResampler(in_rate, out_rate)
        self._in = 0  # input samples taken (counted from where this stream's timeline began)
        self._out = 0  # output samples made (returned or dropped)
        self._drop = 0  # outputs still to drop: a new owner's replay of returned ones
        self._history = bytearray()  # the input from sample `_history_at` on
        self._history_at = 0
        period = in_rate // gcd(in_rate, out_rate)
        self._period = period if period * 1000 <= MAX_PERIOD_MS * in_rate else 1
        self._margin = 0 if in_rate == out_rate else in_rate * MARGIN_MS // 1000

    def process(self, pcm: bytes) -> bytes:
        """Resample a chunk; may return fewer samples than will eventually come."""
        out = self._returned(self._stream.process(pcm))
        self._in += len(pcm) // SAMPLE_WIDTH
        self._history += pcm
        keep_from = self._replay_start()
        del self._history[: (keep_from - self._history_at) * SAMPLE_WIDTH]
        self._history_at = keep_from
        return out

    def flush(self) -> bytes:
        """The samples still held in the filter; call once at the end of the source."""
        return self._returned(self._stream.flush())

    def state(self) -> dict[str, Any]:
        """What a new owner needs: the source, the replay input and where it begins."""
        if self.in_rate == self.out_rate and not self._history and not self._drop:
            # Nothing held and nothing to replay: where the counts stand does not matter
            # (the state stays the same from chunk to chunk, so it is not written again).
            return {"rate": self.in_rate, "kind": self.kind, "at": 0, "out": 0, "pcm": ""}
        return {
            "rate": self.in_rate,
            "kind": self.kind,
            "at": self._history_at,
            "out": self._out + self._drop,
            "pcm": b64(self._history),
        }

    @classmethod
    def resume(cls, out_rate: int, state: dict[str, Any]) -> tuple[ResumableResampler, bytes]:
        """The resampler another owner's `state()` describes, and the output its replay
        gives beyond what that owner returned. ValueError if the state is not valid."""
        if not 8000 <= int(state["rate"]) <= 48000:
            raise ValueError(f"resampler input rate {state['rate']} out of range")
        resampler = cls(int(state["rate"]), out_rate, str(state["kind"]))
        at, returned, pcm = int(state["at"]), int(state["out"]), unb64(state["pcm"])
        first_out = at * out_rate // resampler.in_rate
        if at < 0 or returned < first_out or len(pcm) % SAMPLE_WIDTH:
            raise ValueError(f"resampler state out of range: at {at}, out {returned}")
        resampler._in = resampler._history_at = at
        resampler._out = first_out
        resampler._drop = returned - first_out
        return resampler, resampler.process(pcm)

    def _returned(self, out: bytes) -> bytes:
        made = len(out) // SAMPLE_WIDTH
        self._out += made
        if self._drop:
            dropped = min(self._drop, made)
            self._drop -= dropped
            out = out[dropped * SAMPLE_WIDTH :]
        return out

    def _replay_start(self) -> int:
        """The input sample a new owner's replay would begin at now."""
        # The first output not returned (made ones, and those a replay will make and drop,
        # were returned) lies at input time (_out + _drop) * in / out.
        pending_at = (self._out + self._drop) * self.in_rate // self.out_rate - self._margin
        start = max(0, pending_at) // self._period * self._period
        return min(max(start, self._history_at), self._in)
