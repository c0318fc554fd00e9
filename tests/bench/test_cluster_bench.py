"""`bench/cluster_bench.py` at its smallest, on one node and on a cluster: every call it
starts is finished by every service and the report has a row per run. Nothing is timed."""

from __future__ import annotations

from pathlib import Path

from bench.cluster_bench import parser, report, run


async def test_a_minimal_run_finishes_every_call_on_one_node_and_on_a_cluster(
    tmp_path: Path,
) -> None:
    small = "--modes single,cluster --rates 2 --seconds 1 --call-s 1 --replicas 0"
    args = parser().parse_args([*small.split(), "--busy-wait", "0", "--busy-above", "100"])
    runs = await run(args)
    assert [r.mode for r in runs] == ["single", "cluster"]
    for r in runs:
        assert len(r.calls.started) == 2
        assert set(r.calls.done) == set(r.calls.ended) == set(r.calls.started), r.mode
        assert r.node_calls.get("xadd", (0, 0))[0] >= 4  # the starts and ends at least
    text = report(runs)
    assert "| single | 2 |" in text and "| cluster | 2 |" in text
