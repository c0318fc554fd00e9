"""The code reads as the style guide asks: ruff clean and formatted, mypy --strict clean.

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
    ],
)
def test_the_code_passes(command: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}\n{done.stderr}"
