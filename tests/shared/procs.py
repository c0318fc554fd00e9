"""Start test worker processes (real processes, so tests can SIGKILL and SIGTERM them)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def start_in_own_group(args: list[str], env: dict[str, str], **popen: Any) -> subprocess.Popen[str]:
    """`args` as the leader of a process group of its own, text output: whatever it
    starts is in that group too, so `kill_group` ends it all whatever state it is in."""
    return subprocess.Popen(args, cwd=ROOT, env=env, text=True, start_new_session=True, **popen)


def kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL `proc`'s whole process group (a test's teardown: what it started must not
    outlive it, even when the process failed to stop its children)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
