"""The results store: what a run directory holds, written atomically, and loaders that read many of them.

A run directory (results/runs/<time>_<strategy>_tp<N>, or results/sweeps/<time>_<tag>/<job>_<strategy>_tp<N>):

    config.yaml          the resolved config            env.json            git SHA, versions, GPUs, host
    steps.parquet        one row per engine step        requests.parquet    TTFT/TPOT per request
    summary.json         throughput, percentiles, ...   layer.parquet       layer-workload rows
    trace_summary.json   overlap analysis (trace=true)  profile.trace.json  Chrome trace (trace=true)
    error.json           a failed job's traceback (then no summary.json)

Every file is written to a temporary name and `os.replace`d, so a reader (a notebook watching a sweep) never
sees half a file. Loaders take any directory above run directories and find them recursively. `run_variants`
names what set each run apart from the runs it is compared with (summary.json's Hydra `overrides`), so that the
report keeps a sweep over an engine setting (elementwise_kernels=torch,triton) apart rather than pooling it.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from omegaconf import OmegaConf

STEP_SCHEMA = {"step": "int", "phase": "str", "num_seqs": "int", "num_tokens": "int", "latency_ms": "float",
               "cuda_graph": "bool", "kv_tokens_read": "int", "warmup": "bool", "host_ms": "float", "strategy": "str", "tp": "int", "workload": "str",
               "model": "str"}
REQUEST_SCHEMA = {"request": "int", "prompt_tokens": "int", "output_tokens": "int", "ttft_ms": "float",
                  "tpot_ms": "float", "e2e_ms": "float", "strategy": "str", "tp": "int", "workload": "str",
                  "model": "str"}
LAYER_SCHEMA = {"arch": "str", "tp": "int", "phase": "str", "tokens": "int", "unit": "str", "strategy": "str",
                "t_ms": "float", "t_p10_ms": "float", "t_p90_ms": "float", "t_blocking_ms": "float",
                "t_none_ms": "float", "t_comm_ms": "float", "exposed_comm_ms": "float",
                "overlap_efficiency": "float"}
# Keys every summary.json has (more are workload-specific); the type a reader can rely on.
SUMMARY_SCHEMA = {"run_id": "str", "status": "str", "created_at": "str", "workload": "str", "model": "str",
                  "strategy": "str", "strategy_params": "dict", "tp": "int", "device": "str", "dtype": "str",
                  "valid_outputs": "bool", "num_steps": "int", "elapsed_s": "float", "measured_s": "float",
                  "throughput_tok_s": "float|None", "git_sha": "str|None", "tag": "str", "overrides": "list"}

_PANDAS_TYPES = {"int": "int64", "float": "float64", "bool": "bool", "str": "string"}


# -- writing ----------------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call write(tmp_path), then rename onto path: readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def to_jsonable(obj: Any) -> Any:
    """Plain JSON values: numpy scalars unwrapped, NaN/inf as null (strict JSON), paths as strings."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and not isinstance(obj, (str, bytes)):
        try:
            obj = obj.item()
        except (ValueError, TypeError):
            return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_yaml(path: str | os.PathLike, obj: dict) -> Path:
    text = OmegaConf.to_yaml(OmegaConf.create(obj))
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def conform(df: pd.DataFrame, schema: dict[str, str]) -> pd.DataFrame:
    """Schema columns first, in order, with their dtypes; extra columns kept after them."""
    missing = [c for c in schema if c not in df.columns]
    if missing:
        raise ValueError(f"table lacks columns {missing}")
    out = df[list(schema) + [c for c in df.columns if c not in schema]].copy()
    for col, kind in schema.items():
        out[col] = out[col].astype(_PANDAS_TYPES[kind])
    return out.reset_index(drop=True)


def write_parquet(path: str | os.PathLike, df: pd.DataFrame, schema: dict[str, str] | None = None) -> Path:
    if schema is not None:
        df = conform(df, schema)
    return atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


# -- reading ----------------------------------------------------------------------------------------
def find_run_dirs(root: str | os.PathLike) -> list[Path]:
    """Run directories under root (root itself may be one): those with a summary.json or an error.json."""
    root = Path(root)
    found = {p.parent for name in ("summary.json", "error.json") for p in root.rglob(name)}
    return sorted(found)


def _run_key(run_dir: Path, root: Path) -> str:
    rel = run_dir.relative_to(root).as_posix()
    return run_dir.name if rel == "." else rel


def read_json(path: str | os.PathLike) -> dict:
    with open(path) as f:
        return json.load(f)


def load_summaries(root: str | os.PathLike) -> pd.DataFrame:
    """One row per run, failed ones included (status 'error', with error_type and message)."""
    root = Path(root)
    rows = []
    for d in find_run_dirs(root):
        rec = read_json(d / "summary.json") if (d / "summary.json").exists() else read_json(d / "error.json")
        rec = {k: v for k, v in rec.items() if k != "traceback"}
        rows.append({"run": _run_key(d, root), "run_dir": str(d), **rec})
    return pd.DataFrame(rows)


def _load_tables(root: str | os.PathLike, name: str) -> pd.DataFrame:
    root = Path(root)
    frames = []
    for d in find_run_dirs(root):
        if (d / name).exists():
            df = pd.read_parquet(d / name)
            df.insert(0, "run", _run_key(d, root))
            frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_steps(root: str | os.PathLike) -> pd.DataFrame:
    return _load_tables(root, "steps.parquet")


def load_requests(root: str | os.PathLike) -> pd.DataFrame:
    return _load_tables(root, "requests.parquet")


def load_layer(root: str | os.PathLike) -> pd.DataFrame:
    return _load_tables(root, "layer.parquet")


def load_trace_sizes(root: str | os.PathLike) -> pd.DataFrame:
    """One row per profiled run and (phase, tokens) of its traced steps: trace_summary.json's `steps_by_size`."""
    root = Path(root)
    rows = [{"run": _run_key(d, root), **row} for d in find_run_dirs(root) if (d / "trace_summary.json").exists()
            for row in read_json(d / "trace_summary.json").get("steps_by_size", [])]
    return pd.DataFrame(rows)


def load_trace_summaries(root: str | os.PathLike) -> pd.DataFrame:
    root = Path(root)
    rows = [{"run": _run_key(d, root), **{k: v for k, v in read_json(d / "trace_summary.json").items()
                                          if not isinstance(v, (list, dict))}}
            for d in find_run_dirs(root) if (d / "trace_summary.json").exists()]
    return pd.DataFrame(rows)


# -- variants -----------------------------------------------------------------------------------------
# Override keys that never make a variant: keys the report has columns for already (workload, model, tp; the
# strategy and its parameters are `strategy` and `strategy_params`), or where and how results are kept rather
# than what ran. `trace` stays a variant: the profiler slows the steps it times.
_NOT_VARIANT_KEYS = {"workload", "model", "tp", "strategy", "results_dir", "progress", "tag", "logger",
                     "overlap_table", "single_rank"}  # single_rank: labelled from the run's own record, below
_NOT_VARIANT_PREFIXES = ("strategy.", "logger.", "hydra.")
VARIANT_GROUP = ("workload", "model", "tp")


def _variant_overrides(overrides: Any) -> set[str] | None:
    """The overrides that can make a variant; None where the run recorded none (runs before `overrides`)."""
    if hasattr(overrides, "tolist"):  # a numpy array (a parquet round trip)
        overrides = overrides.tolist()
    if not isinstance(overrides, (list, tuple)):
        return None
    keep = set()
    for o in map(str, overrides):
        key = o.split("=", 1)[0].lstrip("+~")  # +key=v adds, ++key=v forces, ~key deletes
        if key not in _NOT_VARIANT_KEYS and not key.startswith(_NOT_VARIANT_PREFIXES):
            keep.add(o)
    return keep


def run_variants(summaries: pd.DataFrame, group: tuple[str, ...] = VARIANT_GROUP) -> pd.Series:
    """Per run (row of `summaries`, same index): its variant, the overrides it does not share with every other
    run of its group (same workload, model and tp), sorted and joined by spaces: "elementwise_kernels=triton" for
    one job of `-m elementwise_kernels=torch,triton`; "" where nothing differs. Overrides the report has columns for
    (workload, model, tp, +strategy / strategy.*) or that do not change what ran (results_dir, progress, tag,
    logger, overlap_table) are left out. Runs without recorded `overrides` (older results) get "" and take no
    part in deciding what the others share. Pass the runs that are compared (the successful ones)."""
    out = [""] * len(summaries)
    has_overrides = "overrides" in summaries.columns
    sets = [_variant_overrides(o) for o in summaries["overrides"]] if has_overrides else []
    keys = [k for k in group if k in summaries.columns]
    parts = [] if not has_overrides or summaries.empty else (
        summaries.groupby(keys, dropna=False, sort=False).indices.values() if keys else [range(len(sets))])
    for positions in parts:
        known = [sets[i] for i in positions if sets[i] is not None]
        shared = set.intersection(*known) if known else set()
        for i in positions:
            if sets[i] is not None:
                out[i] = " ".join(sorted(sets[i] - shared))
    if "single_rank" in summaries.columns:  # what ran, not what was asked (at tp=1 the key changes nothing)
        for i, alone in enumerate(summaries["single_rank"]):
            if pd.notna(alone) and bool(alone):
                out[i] = " ".join(sorted([*out[i].split(), "single_rank=true"]))
    return pd.Series(out, index=summaries.index, dtype=object)
