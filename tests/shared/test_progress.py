"""The watchdog's view of loops that share one name and run side by side (the session
reader's loop per slot on a Redis Cluster): the oldest turn in progress counts."""

from __future__ import annotations

from vlpipe.shared.progress import LoopProgress


def test_overlapping_turns_report_the_oldest_until_the_last_ends() -> None:
    progress = LoopProgress("session reader")
    first = progress.turn()
    first.__enter__()
    began = progress.busy_since
    assert began is not None
    second = progress.turn()
    second.__enter__()
    assert progress.busy_since == began  # a newer turn does not hide the older one
    second.__exit__(None, None, None)
    assert progress.busy_since == began  # nor does its end clear it
    third = progress.turn()
    third.__enter__()
    first.__exit__(None, None, None)
    assert progress.busy_since is not None and progress.busy_since >= began  # the third's
    third.__exit__(None, None, None)
    assert progress.busy_since is None


def test_a_turn_that_raises_still_ends() -> None:
    progress = LoopProgress("x")
    try:
        with progress.turn():
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert progress.busy_since is None
