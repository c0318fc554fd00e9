"""Reordering within a window, duplicates dropped, gaps reported."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from vlpipe.shared.reorder import Gap, SequenceWindow, Stale


def feed(window: SequenceWindow[int], seqs: list[int]) -> tuple[list[int], list[object]]:
    out: list[int] = []
    notices: list[object] = []
    for seq in seqs:
        ready, got = window.accept(seq, seq)
        out += ready
        notices += got
    ready, got = window.drain()
    return out + ready, notices + got


def test_out_of_order_entries_are_put_back_in_order() -> None:
    assert feed(SequenceWindow(), [0, 2, 1, 3, 5, 4]) == ([0, 1, 2, 3, 4, 5], [])


def test_duplicates_are_dropped_and_reported() -> None:
    out, notices = feed(SequenceWindow(), [0, 1, 1, 2, 0])
    assert out == [0, 1, 2] and notices == [Stale(1), Stale(0)]


def test_a_missing_entry_becomes_a_gap_once_the_window_is_full() -> None:
    out, notices = feed(SequenceWindow(window=3), [0, 1, 4, 5, 6, 7, 8])
    assert out == [0, 1, 4, 5, 6, 7, 8]
    assert notices == [Gap(2, 3)] and Gap(2, 3).count == 2


def test_entries_without_sequence_numbers_pass_through() -> None:
    window: SequenceWindow[str] = SequenceWindow()
    assert window.accept(None, "a") == (["a"], [])


@given(st.lists(st.integers(0, 40), max_size=60), st.integers(1, 8))
def test_output_is_strictly_ordered_and_every_entry_is_delivered_or_reported(
    seqs: list[int], size: int
) -> None:
    out, notices = feed(SequenceWindow(window=size), seqs)
    assert all(a < b for a, b in itertools.pairwise(out)), "ordered, never twice"
    stale = {n.seq for n in notices if isinstance(n, Stale)}
    assert set(out) | stale == set(seqs), "nothing vanishes silently"
    skipped = {
        s for n in notices if isinstance(n, Gap) for s in range(n.first_missing, n.last_missing + 1)
    }
    assert not (skipped & set(out)), "a number reported missing is never delivered"


@given(st.permutations(list(range(20))))
def test_a_shuffle_within_the_window_comes_out_complete(perm: list[int]) -> None:
    window = SequenceWindow[int](window=20, expected=0)
    out, notices = feed(window, perm)
    assert out == list(range(20)) and notices == []
