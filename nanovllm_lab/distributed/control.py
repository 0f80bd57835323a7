"""The control plane: how rank 0 tells the worker ranks which runner method to call.

`ControlPlane` is the small interface (broadcast a call, check the workers, shut down); `PipeControlPlane`
implements it for one machine with spawned processes and pipes. A torchrun launch across machines would
implement the same interface over torch.distributed.

Failure handling: a watchdog thread notices a worker that dies and records its rank; the next call raises
`WorkerDiedError` naming it (a gloo collective with a dead peer fails at once, and the engine reports that
as the rank's death). Workers exit when rank 0's pipe closes, so none outlives the engine.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import threading
import traceback
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

from nanovllm_lab.distributed.parallel import SAFE_ENV

log = logging.getLogger(__name__)


class WorkerDiedError(RuntimeError):
    pass


class ControlPlane:
    world_size: int = 1
    init_file: str | None = None

    def call(self, method: str, *args: Any) -> None:
        """Ask every worker rank to run `runner.method(*args)` (rank 0 runs it itself)."""

    def check(self) -> None:
        """Raise WorkerDiedError if a worker is gone."""

    def wait_booted(self, timeout_s: float) -> None:
        """Return once every worker is about to join the process group (so rank 0 never waits there for a
        worker that already died: the group's rendezvous has no way to notice)."""

    def wait_ready(self, timeout_s: float) -> None:
        """Return once every worker has built its model runner."""

    def close(self) -> None:
        pass


def _worker_main(config: Any, rank: int, conn: Connection, init_file: str) -> None:
    from nanovllm_lab.engine.model_runner import ModelRunner
    conn.send(("booted", None))  # rank 0 joins the process group only once every worker got this far
    try:
        runner = ModelRunner(config, rank, init_file)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", None))
    try:
        while True:
            try:
                method, args = conn.recv()
            except (EOFError, OSError):  # rank 0 is gone
                return
            if method == "exit":
                return
            getattr(runner, method)(*args)
    finally:
        runner.shutdown()


class PipeControlPlane(ControlPlane):
    def __init__(self, config: Any, world_size: int) -> None:
        self.world_size = world_size
        self.tmpdir = tempfile.mkdtemp(prefix="nanovllm_lab_")
        self.init_file = os.path.join(self.tmpdir, "rendezvous")  # unique per engine: no port to collide on
        self.dead_rank: int | None = None
        self.closing = False
        # Called from the watchdog thread when a worker dies (the engine aborts NCCL there, see llm_engine).
        self.on_death: Callable[[int], None] | None = None
        for k, v in SAFE_ENV.items():
            os.environ[k] = v
        ctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[mp.process.BaseProcess] = []
        for rank in range(1, world_size):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(config, rank, child, self.init_file), daemon=True,
                            name=f"nanovllm_lab-rank{rank}")
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        self._watchdog = threading.Thread(target=self._watch, daemon=True, name="nanovllm_lab-watchdog")
        self._watchdog.start()

    def _watch(self) -> None:
        sentinels = {p.sentinel: rank for rank, p in enumerate(self.procs, 1)}
        while sentinels and not self.closing:
            for s in wait(list(sentinels), timeout=0.5):
                rank = sentinels.pop(s)
                if not self.closing and self.dead_rank is None:
                    self.dead_rank = rank
                    log.error("tensor-parallel worker rank %d died (exit code %s)", rank,
                              self.procs[rank - 1].exitcode)
                    if self.on_death is not None:
                        self.on_death(rank)

    def wait_booted(self, timeout_s: float = 120.0) -> None:
        self._wait_for("booted", "start", timeout_s)

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        self._wait_for("ready", "build its model runner", timeout_s)

    def _wait_for(self, expected: str, what: str, timeout_s: float) -> None:
        """Wait for message `expected` from every worker; a worker that dies or reports an error raises."""
        pending = dict(enumerate(self.conns, 1))
        while pending:
            ready = wait(list(pending.values()) + [self.procs[r - 1].sentinel for r in pending], timeout=timeout_s)
            if not ready:
                raise TimeoutError(f"tensor-parallel workers {sorted(pending)} did not {what} in {timeout_s:.0f} s")
            for rank, conn in list(pending.items()):
                if conn.poll():
                    try:
                        kind, payload = conn.recv()
                    except EOFError:
                        raise WorkerDiedError(f"tensor-parallel worker rank {rank} died before it could {what}") from None
                    if kind == "error":
                        raise RuntimeError(f"tensor-parallel worker rank {rank} failed to {what}:\n{payload}")
                    if kind == expected:
                        del pending[rank]
                elif not self.procs[rank - 1].is_alive():
                    raise WorkerDiedError(f"tensor-parallel worker rank {rank} died before it could {what} "
                                          f"(exit code {self.procs[rank - 1].exitcode}); a script that starts "
                                          f"tensor-parallel engines needs an `if __name__ == '__main__':` guard")

    def check(self) -> None:
        if self.dead_rank is None:
            for rank, p in enumerate(self.procs, 1):
                if not p.is_alive():
                    self.dead_rank = rank
                    break
        if self.dead_rank is not None:
            raise WorkerDiedError(f"tensor-parallel worker rank {self.dead_rank} died "
                                  f"(exit code {self.procs[self.dead_rank - 1].exitcode}); the engine cannot continue")

    def call(self, method: str, *args: Any) -> None:
        self.check()
        for rank, conn in enumerate(self.conns, 1):
            try:
                conn.send((method, args))
            except (BrokenPipeError, OSError):
                self.dead_rank = self.dead_rank or rank
                self.check()

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        for conn in self.conns:
            try:
                conn.send(("exit", ()))
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        for conn in self.conns:
            conn.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)
