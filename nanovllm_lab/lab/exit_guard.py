"""The lab process's own exit, once its results are on disk: bounded, and without native teardown.

After tp=2 sweeps on 2 x H200 (torch 2.11), the process printed its table and then stayed alive for minutes.
Session 4 blamed inductor's compile-worker pool (compilation now runs in-process, utils/compile.py) and added
a deadline: a daemon timer that ends the process if shutdown outlives NANOVLLM_LAB_EXIT_GRACE_S (default 60 s).
Session 5 saw the stall again past that deadline: a bench sweep printed its table at 12:59:01 and was still
alive when its box ended it two minutes later, with no deadline message. A Python timer cannot fire once the
interpreter has finalized, nor while a native call holds the GIL, so the stall was in native code: teardown of
CUDA, NCCL or a library, after every engine had already released its GPU state (inferred; no stack was caught).

So `finish` runs the atexit handlers (wandb, multiprocessing, torch) itself, under the deadline, flushes the
logs and standard streams, and ends the process with `os._exit`, skipping native teardown, which has nothing
left to save: every result file is written atomically before this point.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from typing import NoReturn

DEFAULT_GRACE_S = 60.0
ENV = "NANOVLLM_LAB_EXIT_GRACE_S"  # seconds; 0 or less turns the deadline off


def arm_exit_deadline(code: int) -> threading.Timer | None:
    """Start the daemon timer that ends the process with `code` after the grace period (`finish` arms it)."""
    try:
        grace = float(os.environ.get(ENV, DEFAULT_GRACE_S))
    except ValueError:
        raise ValueError(f"{ENV} must be a number of seconds, got {os.environ[ENV]!r}") from None
    if grace <= 0:
        return None

    def expire() -> None:
        print(f"nanovllm_lab: the process was still shutting down {grace:g} s after its results were written; "
              f"ending it with exit code {code} (set {ENV} to change the grace period)", file=sys.stderr)
        _flush_streams()
        os._exit(code)

    timer = threading.Timer(grace, expire)
    timer.daemon = True  # must not itself hold the exit it guards
    timer.start()
    return timer


def finish(code: int) -> NoReturn:
    """End the lab process with `code`: atexit handlers under the deadline, logs flushed, then os._exit."""
    arm_exit_deadline(code)
    atexit._run_exitfuncs()  # what interpreter shutdown would run first; os._exit below skips them otherwise
    logging.shutdown()
    _flush_streams()
    os._exit(code)


def _flush_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
