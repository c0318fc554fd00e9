"""The broker's turn bookkeeping stays bounded over a long session (no I/O, no exporter)."""

from __future__ import annotations

from vlpipe.services.broker.turns import TurnTracer


def test_turns_that_get_no_answer_do_not_stay_open_for_the_rest_of_the_session() -> None:
    # Speech the upstream never answers (create_response off, or noise), and every turn
    # when telemetry is off (no span records, so no response is tracked): each must end
    # once the next turn's barge-in check ran, not pile up until the session ends.
    turns = TurnTracer("s1", None)
    for n in range(200):
        turns.start("speech_started", None, item_id=f"u{n}")
        turns.observe("input_audio_buffer.speech_stopped", {"item_id": f"u{n}"})
        turns.close_finished(all_earlier=True)
    assert len(turns.open) <= 2
    turns.end()
    assert turns.open == [] and turns.current is None
