"""Start test worker processes (real processes, so tests can SIGKILL and SIGTERM them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def start_worker(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`python -m tests.shared.worker ARGS`, with `env` added to this process's environment
    (e.g. `VLPIPE_REDIS_CLUSTER=true`)."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.shared.worker", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
