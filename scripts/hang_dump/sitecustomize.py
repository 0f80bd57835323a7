"""Put this folder on PYTHONPATH with HANG_DUMP_S=N: every Python process (pytest and its spawned TP workers)
dumps all thread stacks to stderr every N seconds, so a hang inside a time box leaves evidence of where.

Use it for hangs only, not for benchmark stages: faulthandler reads the other threads' frames without holding
the GIL, and on 2 x H200 (session 5) its first dump segfaulted a lab process that was inside torch.compile
(results/gpu/2026-11-28e_h200x2/prefill_67e53d9_segfault.log). Under pytest, whose output capture swallows the
dumps, pass -s."""
import faulthandler
import os
import sys

if os.environ.get("HANG_DUMP_S"):
    faulthandler.dump_traceback_later(float(os.environ["HANG_DUMP_S"]), repeat=True, file=sys.stderr)
