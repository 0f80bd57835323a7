"""Environment capture for env.json: what a result was measured with (code, libraries, hardware).

Nothing here may fail a run: every probe falls back to None. Library versions come from package metadata,
so heavy packages (transformers, triton) are not imported just to be named.
"""
from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

_REPO = Path(__file__).resolve().parents[2]
# Variables that change communication behaviour; recorded so two runs can be compared fairly.
_ENV_PREFIXES = ("NCCL_", "TORCH_SYMM_MEM", "NVSHMEM_", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "TORCH_NCCL")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(_REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info() -> dict[str, Any]:
    sha = _git("rev-parse", "HEAD")
    # Untracked files do not change what ran from the repository's tracked code.
    status = _git("status", "--porcelain", "--untracked-files=no") if sha else None
    # A copied working tree (a remote GPU machine) may carry an older .git than the code it holds: the caller
    # can name the commit it sent in GIT_SHA, which is then recorded beside what git itself says.
    return {"git_sha": sha, "git_dirty": bool(status) if status is not None else None,
            "git_sha_declared": os.environ.get("GIT_SHA") or None}


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _nccl_version() -> str | None:
    if not torch.cuda.is_available():
        return None
    try:
        v = torch.cuda.nccl.version()
    except Exception:  # a build without NCCL
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def capture_env() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "captured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **git_info(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": _nccl_version(),
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "hydra": _version("hydra-core"),
        "nanovllm_lab": _version("nanovllm_lab"),
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(_ENV_PREFIXES)},
    }
