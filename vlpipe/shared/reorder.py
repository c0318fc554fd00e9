"""Producer sequence numbers: reorder within a small window, drop duplicates, report gaps.

Pure: `SequenceWindow.accept(seq, item)` returns the items now ready, in sequence order,
and what happened (`Stale`: a duplicate, or an entry that came after its place was
passed; `Gap`: entries skipped as missing). Items without a sequence number pass straight
through. A gap is declared when more than `window` later items are waiting for a missing
one; `drain()` releases everything at the end of the session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Stale:
    """An entry dropped because its number was already delivered or skipped."""

    seq: int


@dataclass(frozen=True)
class Gap:
    first_missing: int
    last_missing: int

    @property
    def count(self) -> int:
        return self.last_missing - self.first_missing + 1


Notice = Stale | Gap


@dataclass
class SequenceWindow(Generic[T]):
    window: int = 8
    expected: int | None = None
    _held: dict[int, T] = field(default_factory=dict)

    def accept(self, seq: int | None, item: T) -> tuple[list[T], list[Notice]]:
        if seq is None:
            return [item], []
        if self.expected is None:
            self.expected = seq
        if seq < self.expected or seq in self._held:
            return [], [Stale(seq)]
        self._held[seq] = item
        ready: list[T] = []
        notices: list[Notice] = []
        self._release(ready)
        if len(self._held) > self.window:
            first = min(self._held)
            notices.append(Gap(self.expected, first - 1))
            self.expected = first
            self._release(ready)
        return ready, notices

    def drain(self) -> tuple[list[T], list[Notice]]:
        ready: list[T] = []
        notices: list[Notice] = []
        while self._held:
            first = min(self._held)
            assert self.expected is not None
            if first > self.expected:
                notices.append(Gap(self.expected, first - 1))
                self.expected = first
            self._release(ready)
        return ready, notices

    def _release(self, ready: list[T]) -> None:
        assert self.expected is not None
        while self.expected in self._held:
            ready.append(self._held.pop(self.expected))
            self.expected += 1


def describe(notice: Notice) -> tuple[str, str, dict[str, int]]:
    """A notice as a status entry's kind, message and detail: gaps and stale entries go
    to the session's status stream, never silently."""
    if isinstance(notice, Gap):
        return (
            "gap",
            f"{notice.count} audio entries missing (seq {notice.first_missing}-"
            f"{notice.last_missing}); continuing without them",
            {"first_missing": notice.first_missing, "last_missing": notice.last_missing},
        )
    return (
        "stale",
        f"audio entry seq {notice.seq} dropped: duplicate or too late",
        {"seq": notice.seq},
    )
