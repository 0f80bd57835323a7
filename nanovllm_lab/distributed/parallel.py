"""Rank state of this process, set once, plus the process-group init/cleanup pair.

Rendezvous goes through a FileStore in a per-engine temporary directory, so two engines on one machine (two
sweep jobs) never collide on a port.
"""
from __future__ import annotations

import logging
import os
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


_INFO = ParallelInfo()
_SAVED_THREADS: int | None = None  # this process's thread count before a CPU tensor-parallel engine lowered it


def tp_rank() -> int:
    return _INFO.rank


def tp_size() -> int:
    return _INFO.world_size


def init_distributed(rank: int, world_size: int, device: str, init_file: str | None,
                     timeout_s: float = 600.0) -> ParallelInfo:
    """Set this process's rank and, when world_size > 1, join the process group (nccl on cuda, gloo on cpu)."""
    global _INFO
    for k, v in SAFE_ENV.items():
        os.environ[k] = v
    dev = f"cuda:{rank}" if device.startswith("cuda") else "cpu"
    if dev.startswith("cuda"):
        torch.cuda.set_device(rank)
    elif world_size > 1:
        # N CPU ranks each using every core oversubscribe the machine (measured 5x slower layer sweeps).
        global _SAVED_THREADS
        _SAVED_THREADS = torch.get_num_threads()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    if world_size > 1:
        backend = "nccl" if dev.startswith("cuda") else "gloo"
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s),
                                device_id=torch.device(dev) if dev.startswith("cuda") else None)
    _INFO = ParallelInfo(rank, world_size, dev)
    return _INFO


def destroy_distributed() -> None:
    """Tear down this process's process group. NCCL groups are aborted rather than destroyed: on 2 x H200
    (torch 2.11, NCCL 2.28) `destroy_process_group` after CUDA-graph decode hung in both ranks at engine exit
    (each rank's teardown waited for its peer; the worker was then killed and rank 0 waited forever). An abort
    is local to the rank, and the engine only tears down after its last step has finished."""
    global _INFO, _SAVED_THREADS
    if _SAVED_THREADS is not None:  # rank 0 lives on after its engine: give the threads back
        torch.set_num_threads(_SAVED_THREADS)
        _SAVED_THREADS = None
    if dist.is_available() and dist.is_initialized():
        try:
            if dist.get_backend() == "nccl":
                torch.cuda.synchronize()
                from torch.distributed.distributed_c10d import _abort_process_group
                _abort_process_group()
            else:
                dist.destroy_process_group()
        except Exception as e:  # a peer may already be gone; nothing left to synchronise with
            log.debug("destroy_process_group: %s", e)
    _INFO = ParallelInfo()
