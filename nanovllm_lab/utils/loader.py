"""Weight loading: Hugging Face safetensors shards, or seeded random ("dummy") weights.

Both paths feed full checkpoint-named tensors through each parameter's `weight_loader`, which maps packed
modules (q/k/v -> qkv, gate/up -> gate_up) and slices this rank's shard, so dummy weights are identical
across tensor-parallel sizes. Missing or mis-shaped tensors are errors that name the tensor.
"""
from __future__ import annotations

import glob
import os
from typing import Iterator

import torch
import xxhash
from safetensors import safe_open
from torch import nn


def _target(model: nn.Module, name: str) -> tuple[str, object | None]:
    """The parameter name this checkpoint tensor loads into, and the shard id for packed modules."""
    for frag, (packed, shard_id) in getattr(model, "packed_modules_mapping", {}).items():
        if f".{frag}." in name:
            return name.replace(f".{frag}.", f".{packed}."), shard_id
    return name, None


def _load_one(model: nn.Module, params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor,
              loaded: set[str]) -> None:
    pname, shard_id = _target(model, name)
    param = params.get(pname)
    if param is None:
        if name == "lm_head.weight" and pname not in params:  # tied checkpoints may still ship it
            return
        raise ValueError(f"checkpoint tensor {name!r} matches no parameter of {type(model).__name__}")
    loader = getattr(param, "weight_loader", None)
    if loader is None:
        if param.shape != tensor.shape:
            raise ValueError(f"{name}: expected shape {tuple(param.shape)}, got {tuple(tensor.shape)}")
        param.data.copy_(tensor)
    elif shard_id is None:
        loader(param, tensor, name)
    else:
        loader(param, tensor, name, shard_id)
    loaded.add(f"{pname}#{shard_id}")


def _expected(model: nn.Module, names: list[str]) -> set[str]:
    return {"{}#{}".format(*_target(model, n)) for n in names}


def _iter_safetensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path!r}")
    for file in files:
        try:
            with safe_open(file, "pt", "cpu") as f:
                tensors = [(name, f.get_tensor(name)) for name in f.keys()]
        except Exception as e:  # safetensors raises its own error types for malformed or truncated files
            raise ValueError(f"cannot read safetensors file {file!r} (truncated or corrupt?): {e}") from None
        yield from tensors


def load_safetensors(model: nn.Module, path: str, required: list[str]) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for name, tensor in _iter_safetensors(path):
        _load_one(model, params, name, tensor, loaded)
    missing = sorted(_expected(model, required) - loaded)
    if missing:
        names = [n for n in required if "{}#{}".format(*_target(model, n)) in missing]
        raise ValueError(f"checkpoint {path!r} is missing tensor(s): {', '.join(names[:5])}"
                         + (f" and {len(names) - 5} more" if len(names) > 5 else ""))


def _seed_for(name: str, seed: int) -> int:
    return xxhash.xxh64(name.encode(), seed=seed).intdigest() & 0x7FFF_FFFF_FFFF


def load_dummy(model: nn.Module, shapes: dict[str, tuple[int, ...]], seed: int, device: torch.device) -> None:
    """Seeded random weights: each full tensor generated from (seed, its name), then sliced like a checkpoint."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    gen = torch.Generator(device=device)
    for name, shape in shapes.items():
        gen.manual_seed(_seed_for(name, seed))
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen, device=device)
        else:
            t = 0.02 * torch.randn(shape, generator=gen, device=device)
        _load_one(model, params, name, t, loaded)
