"""Child processes that do not outlive the process that started them.

`vlpipe up` stops its children itself on Ctrl-C or SIGTERM; when it is SIGKILLed (or
dies of anything else) nothing of it runs, so the kernel must do it: on Linux a child
asks for a signal when its parent dies (`prctl(PR_SET_PDEATHSIG)`), set between fork and
exec. The kernel's "parent" is the *thread* that started the child: start such children
from a thread that lives as long as the process (the main thread), not from a worker
thread (`asyncio.to_thread`) that may end first. Elsewhere than Linux this does nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A `preexec_fn` for `subprocess.Popen`: the child gets `signum` when the thread that
    started it exits (the whole process, when that is the main thread); None (no
    `preexec_fn`) where the kernel offers no such thing."""
    if not sys.platform.startswith("linux"):
        return None
    # Looked up here, in the parent: between fork and exec the child only calls it.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def ask_for_the_signal() -> None:
        if prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signum)

    return ask_for_the_signal
