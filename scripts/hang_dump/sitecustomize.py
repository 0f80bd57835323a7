"""Put this folder on PYTHONPATH with HANG_DUMP_S=N: every Python process (pytest and its spawned TP workers)
dumps all thread stacks to stderr every N seconds, so a hang inside a time box leaves evidence of where."""
import faulthandler
import os
import sys

if os.environ.get("HANG_DUMP_S"):
    faulthandler.dump_traceback_later(float(os.environ["HANG_DUMP_S"]), repeat=True, file=sys.stderr)
