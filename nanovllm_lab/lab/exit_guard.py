"""A deadline for the lab process's own exit, armed once its results are on disk.

After a tp=2 sweep on 2 x H200 (torch 2.11), the process printed its table and then stayed alive for
minutes in interpreter shutdown. The suspect is inductor's compile-worker pool, whose shutdown waits up to
300 s; compilation now runs in-process (utils/compile.py). Shutdown also runs third-party atexit handlers and
joins non-daemon threads, and none of those has a bound. Every result file is already written atomically
when the deadline is armed. So if shutdown outlives the deadline, a daemon timer says so on stderr and ends
the process with the exit code it was going to return, rather than leaving a GPU job hanging. The timer is a
Python thread. It covers waits in atexit handlers and thread joins, where the GIL is released. It cannot end a
stall in native destructors after the interpreter has finalized, and none has been seen.
"""
from __future__ import annotations

import os
import sys
import threading

DEFAULT_GRACE_S = 60.0
ENV = "NANOVLLM_LAB_EXIT_GRACE_S"  # seconds; 0 or less turns the deadline off


def arm_exit_deadline(code: int) -> threading.Timer | None:
    """Start the daemon timer (call it last, just before returning `code` to the interpreter)."""
    try:
        grace = float(os.environ.get(ENV, DEFAULT_GRACE_S))
    except ValueError:
        raise ValueError(f"{ENV} must be a number of seconds, got {os.environ[ENV]!r}") from None
    if grace <= 0:
        return None

    def expire() -> None:
        print(f"nanovllm_lab: the process was still shutting down {grace:g} s after its results were written; "
              f"ending it with exit code {code} (set {ENV} to change the grace period)", file=sys.stderr)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)

    timer = threading.Timer(grace, expire)
    timer.daemon = True  # must not itself hold the exit it guards
    timer.start()
    return timer
