"""Rank state of this process, set once, plus the process-group init/cleanup pair.

Rendezvous goes through a FileStore in a per-engine temporary directory, so two engines on one machine (two
sweep jobs) never collide on a port.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Multicast (NVLS / multimem) must stay off on the shared GPU hosts; children inherit these.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class ParallelInfo:
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    single_rank: bool = False  # rank 0 of world_size alone: shard shapes, no peers, no process group


_INFO = ParallelInfo()
_SAVED_THREADS: int | None = None  # this process's thread count before a CPU tensor-parallel engine lowered it
TEARDOWN_TIMEOUT_ENV = "NANOVLLM_TEARDOWN_TIMEOUT_S"  # seconds a process-group teardown may take (default 30)
_STUCK_TEARDOWN = ""  # set when a teardown did not return: this process cannot join another group


def tp_rank() -> int:
    return _INFO.rank


def tp_size() -> int:
    return _INFO.world_size


def init_distributed(rank: int, world_size: int, device: str, init_file: str | None,
                     timeout_s: float = 600.0, single_rank: bool = False) -> ParallelInfo:
    """Set this process's rank and, when world_size > 1, join the process group (nccl on cuda, gloo on cpu).

    With `single_rank` this process is rank 0 of a world_size-way shard with no peers: layers are sized as rank
    0's, no process group is joined, and only strategies that communicate nothing can run (Config.single_rank).
    It measures one rank's compute at tp=N on one device."""
    global _INFO
    if single_rank and rank != 0:
        raise ValueError(f"single_rank runs rank 0 alone, got rank {rank}")
    if _STUCK_TEARDOWN and world_size > 1 and not single_rank:
        raise RuntimeError(f"cannot start a tensor-parallel engine in this process: {_STUCK_TEARDOWN}. "
                           "Start the next engine in a new process.")
    for k, v in SAFE_ENV.items():
        os.environ[k] = v
    dev = f"cuda:{rank}" if device.startswith("cuda") else "cpu"
    if dev.startswith("cuda"):
        torch.cuda.set_device(rank)
    elif world_size > 1:
        # N CPU ranks each using every core oversubscribe the machine (measured 5x slower layer sweeps): each gets
        # its share, a rank run alone (single_rank) too. destroy_distributed gives the threads back.
        global _SAVED_THREADS
        _SAVED_THREADS = torch.get_num_threads()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    if world_size > 1 and not single_rank:
        backend = "nccl" if dev.startswith("cuda") else "gloo"
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s),
                                device_id=torch.device(dev) if dev.startswith("cuda") else None)
    _INFO = ParallelInfo(rank, world_size, dev, single_rank)
    return _INFO


def destroy_distributed() -> None:
    """Tear down this process's process group. NCCL groups are aborted rather than destroyed: on 2 x H200
    (torch 2.11, NCCL 2.28) `destroy_process_group` after CUDA-graph decode hung in both ranks at engine exit
    (each rank's teardown waited for its peer; the worker was then killed and rank 0 waited forever). An abort
    is local to the rank, and the engine only tears down after its last step has finished.

    The teardown runs in a helper thread and gets NANOVLLM_TEARDOWN_TIMEOUT_S seconds (default 30). In session 5
    rank 0's abort itself never returned in 3 of 3 pytest runs of the GPU strategy tests, after the scenario had
    finished and its worker had exited, while 9 engines in a row tore down promptly in a lab sweep
    (results/gpu/2026-11-28e_h200x2). A teardown past its time is logged and abandoned: the engine's exit
    returns, and this process refuses to start another tensor-parallel engine, with an error that says why,
    because the half-torn group still holds the process's default-group slot."""
    global _INFO, _SAVED_THREADS, _STUCK_TEARDOWN
    if _SAVED_THREADS is not None:  # rank 0 lives on after its engine: give the threads back
        torch.set_num_threads(_SAVED_THREADS)
        _SAVED_THREADS = None
    if dist.is_available() and dist.is_initialized():
        nccl = dist.get_backend() == "nccl"
        if nccl:
            try:
                torch.cuda.synchronize()
            except Exception as e:  # a peer may already be gone; the abort below is local
                log.debug("synchronize before the NCCL abort: %s", e)
        timeout = teardown_timeout_s()
        if not run_bounded(_abort_nccl_group if nccl else dist.destroy_process_group, timeout):
            _STUCK_TEARDOWN = (f"the previous engine's {'NCCL' if nccl else 'gloo'} process group did not tear "
                               f"down within {timeout:g} s ({TEARDOWN_TIMEOUT_ENV})")
            log.warning("%s; its teardown is left running in the background", _STUCK_TEARDOWN)
    _INFO = ParallelInfo()


def _abort_nccl_group() -> None:
    from torch.distributed.distributed_c10d import _abort_process_group
    if _INFO.device.startswith("cuda"):
        torch.cuda.set_device(_INFO.device)  # the helper thread starts on device 0; rank r's group is on r
    _abort_process_group()


def teardown_timeout_s() -> float:
    raw = os.environ.get(TEARDOWN_TIMEOUT_ENV, "30")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{TEARDOWN_TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{TEARDOWN_TIMEOUT_ENV} must be > 0, got {raw!r}")
    return value


def run_bounded(fn, timeout_s: float) -> bool:
    """Run `fn` in a daemon thread and wait at most `timeout_s`: True if it returned (an exception it raised is
    logged: a peer may already be gone, and there is nothing left to synchronise with), False if still running.
    The caller's thread waits without the GIL, so a teardown that needs the GIL from a thread of its own can
    still finish."""
    done = threading.Event()

    def body() -> None:
        try:
            fn()
        except Exception as e:
            log.debug("process-group teardown: %s", e)
        finally:
            done.set()

    threading.Thread(target=body, name="nanovllm-teardown", daemon=True).start()
    return done.wait(timeout_s)
