"""The code reads as the style guide asks: ruff clean and formatted, mypy --strict clean
(the package and the benchmarks).

Run with the test suite so that CI enforces them with the README's one test command.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.shared.procs import ROOT


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["ruff", "check", "."], id="ruff-check"),
        pytest.param(["ruff", "format", "--check", "."], id="ruff-format"),
        pytest.param(["mypy", "vlpipe"], id="mypy-strict"),
        # The benchmarks are code too: what mypy found in them first included a soak mode
        # reading attributes the broker's sessions no longer have.
        pytest.param(["mypy", "--explicit-package-bases", "bench"], id="mypy-strict-bench"),
    ],
)
def test_the_code_passes(command: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}\n{done.stderr}"
