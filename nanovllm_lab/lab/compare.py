"""The side-by-side comparison tables of the runs under a directory (lab/reporting.py renders them).

Runs of one workload, model and tp that differ in other settings (a sweep over an engine setting such as
`elementwise_kernels=torch,triton`) are told apart by their `variant` (`results.run_variants`: the overrides
they do not share) and are compared with references of their own variant.

Speedup over blocking compares a run's headline throughput with the blocking run of the same workload, model,
tp and variant (the median if there are several; where the variant has no blocking run, the median of the
group's blocking runs); where there is also a `none` run (taken the same way), its overlap efficiency and
exposed communication (share of the run's time) follow the research guide's definitions, end to end and per
phase (T = the run's median prefill or decode step). Runs at several tp sizes get their throughput as a
fraction of linear scaling from tp=1. The step table does the same per step size for the `decode` and
`prefill` workloads: median step latency per strategy, parameters and variant (warm-up steps left out), and
overlap efficiency and exposed communication against the blocking and none runs of the same workload, model,
tp, size and variant (else of any variant). Layer rows (the layer workload) add exposed communication and
overlap efficiency per strategy, phase and token count.
"""
from __future__ import annotations

import json

import pandas as pd

from nanovllm_lab.lab import results
from nanovllm_lab.lab.trace import KERNEL_CLASSES

RUN_COLUMNS = ["run", "workload", "model", "tp", "strategy", "variant", "device", "throughput_tok_s",
               "speedup_vs_blocking", "overlap_efficiency", "exposed_comm_share", "prefill_latency_ms_p50",
               "prefill_step_efficiency", "decode_latency_ms_p50", "decode_step_efficiency", "ttft_ms_p50",
               "tpot_ms_p50", "valid_outputs"]
_GROUP = ["workload", "model", "tp"]


def _alone_apart(df: pd.DataFrame, group: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Rank-0-alone runs (single_rank=true: one rank's compute at tp=N, no peers) form groups of their own: they
    are never a blocking/none reference for real tp=N runs, nor take one from them. Adds `single_rank` to the
    group keys where some run has it (older results lack the field: False)."""
    alone = df["single_rank"].fillna(False).astype(bool) if "single_rank" in df else None
    if alone is None or not alone.any():
        return df, group
    return df.assign(single_rank=alone), [*group, "single_rank"]


def overlap_efficiency(t: pd.Series, t_blocking: pd.Series, t_none: pd.Series) -> pd.Series:
    """(T_blocking - T) / (T_blocking - T_none), element-wise; NaN where there is no communication penalty to
    recover (none not faster than blocking: noise would flip the sign). comm.layerbench.efficiency is the same
    rule for one value."""
    penalty = t_blocking - t_none
    return (t_blocking - t) / penalty.where(penalty > 0)


def _group_median(runs: pd.DataFrame, strategy: str, col: str, keys: list[str] = _GROUP) -> pd.Series:
    """Per row of `runs` (a RangeIndex): the median `col` of the `strategy` runs of its group and variant, or
    where its variant has none (or `runs` no `variant` column), of its whole group; NaN where none ran."""
    own, whole = _own_and_whole(runs, strategy, col, keys)
    return own.fillna(whole)


def _own_and_whole(rows: pd.DataFrame, strategy: str, col: str, keys: list[str]) -> tuple[pd.Series, pd.Series]:
    """Per row of `rows` (a RangeIndex): the median `col` of the `strategy` rows with the same `keys` and variant
    (all NaN without a `variant` column), and the median over all variants of those keys."""
    def median(by: list[str]) -> pd.Series:
        med = rows[rows["strategy"] == strategy].groupby(by)[col].median().rename("_median").reset_index()
        return rows[by].merge(med, on=by, how="left")["_median"]
    whole = median(keys)
    own = median([*keys, "variant"]) if "variant" in rows else pd.Series(float("nan"), index=rows.index)
    return own, whole


def _references(rows: pd.DataFrame, col: str, keys: list[str]) -> tuple[pd.Series, pd.Series]:
    """(T_blocking, T_none) per row, as one pair: the row's own variant's where it ran either; the medians over
    all variants where it ran neither (runs without variants, or a setting swept for one strategy only). A
    variant that ran only one of the two gets NaN for the other, so no efficiency: taking the missing one from
    another variant would mix settings (one's blocking against another's none), and the efficiency could leave
    [0, 1] for no reason in the runs."""
    own_b, any_b = _own_and_whole(rows, "blocking", col, keys)
    own_n, any_n = _own_and_whole(rows, "none", col, keys)
    neither = own_b.isna() & own_n.isna()
    return own_b.where(~neither, any_b), own_n.where(~neither, any_n)


def comparison_table(summaries: pd.DataFrame) -> pd.DataFrame:
    """Successful runs with their variant and their speedup over the blocking run of the same workload, model,
    tp and variant (of the group where the variant has no blocking run)."""
    if summaries.empty or "status" not in summaries:
        return pd.DataFrame(columns=RUN_COLUMNS)
    ok = summaries[summaries["status"] == "ok"].reset_index(drop=True)
    if ok.empty:
        return pd.DataFrame(columns=RUN_COLUMNS)
    ok["variant"] = results.run_variants(ok)
    ok, group = _alone_apart(ok, _GROUP)
    real = ok["strategy"] != "none"
    # The research guide's metrics end to end, where the group has a `none` run (the no-communication bound):
    # time per token T = 1 / throughput; overlap efficiency = (T_blocking - T) / (T_blocking - T_none), exposed
    # communication as a share of the run = (T - T_none) / T.
    ok["throughput_tok_s"] = pd.to_numeric(ok.get("throughput_tok_s"), errors="coerce")
    blocking_tok_s = _group_median(ok, "blocking", "throughput_tok_s", group)
    ok["speedup_vs_blocking"] = ok["throughput_tok_s"] / blocking_tok_s
    ref_b, ref_n = _references(ok, "throughput_tok_s", group)
    t, t_b, t_n = 1 / ok["throughput_tok_s"], 1 / ref_b, 1 / ref_n
    ok["overlap_efficiency"] = overlap_efficiency(t, t_b, t_n).where(real)
    ok["exposed_comm_share"] = ((t - t_n) / t).where(real)
    # The same per phase, with T = the run's median step latency: where in a request workload the gain is.
    for phase in ("prefill", "decode"):
        col = f"{phase}_latency_ms_p50"
        if col in ok:
            ok[col] = pd.to_numeric(ok[col], errors="coerce")
            ok[f"{phase}_step_efficiency"] = overlap_efficiency(ok[col], *_references(ok, col, group)).where(real)
    cols = [c for c in RUN_COLUMNS if c in ok.columns]
    return ok[cols].sort_values(["workload", "model", "tp", "variant", "strategy"],
                                kind="stable").reset_index(drop=True)


def scaling_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (workload, model, strategy) run at several tp sizes: throughput, speedup over tp=1 and that speedup as
    a fraction of linear scaling (speedup / tp). The tp=1 reference is the same strategy's tp=1 run, else
    blocking's: at tp=1 there is nothing to reduce and every strategy runs as blocking (`tp1_strategy` says
    which was used). Empty without several tp sizes."""
    need = {"workload", "model", "strategy", "tp", "throughput_tok_s"}
    if "single_rank" in runs:  # one rank's compute alone is no tp=N throughput
        runs = runs[~runs["single_rank"].fillna(False).astype(bool)]
    if runs.empty or not need <= set(runs.columns) or runs["tp"].nunique() < 2:
        return pd.DataFrame()
    keys = ["workload", "model", "strategy"]
    t = runs.groupby([*keys, "tp"])["throughput_tok_s"].median().reset_index()
    base = t[t["tp"] == 1].drop(columns="tp").rename(columns={"throughput_tok_s": "tp1_tok_s"})
    base["tp1_strategy"] = base["strategy"]
    t = t.merge(base, on=keys, how="left")
    blocking = base[base["strategy"] == "blocking"].drop(columns="strategy")
    t = t.merge(blocking, on=["workload", "model"], how="left", suffixes=("", "_blocking"))
    own = t["tp1_tok_s"].notna()
    t["tp1_tok_s"] = t["tp1_tok_s"].where(own, t["tp1_tok_s_blocking"])
    t["tp1_strategy"] = t["tp1_strategy"].where(own, t["tp1_strategy_blocking"])
    t = t.drop(columns=["tp1_tok_s_blocking", "tp1_strategy_blocking"])
    t["speedup_vs_tp1"] = t["throughput_tok_s"] / t["tp1_tok_s"]
    t["linear_scaling_fraction"] = t["speedup_vs_tp1"] / t["tp"]
    return t.sort_values([*keys, "tp"], kind="stable").reset_index(drop=True)


def failed_table(summaries: pd.DataFrame) -> pd.DataFrame:
    if summaries.empty or "status" not in summaries:
        return pd.DataFrame()
    bad = summaries[summaries["status"] != "ok"]
    return bad[[c for c in ("run", "workload", "model", "tp", "strategy", "error_type", "message") if c in bad]]


STEP_WORKLOADS = ("decode", "prefill")


def step_table(steps: pd.DataFrame, summaries: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (workload, model, tp, phase, tokens, cuda_graph) of the decode/prefill workloads: each strategy's median step
    latency with p10/p90, and where blocking and none ran too, its overlap efficiency and exposed communication
    (T = the step's median latency); where the steps record it, the median host time to launch a step and its
    share of T (`host_share` near 1: a host-paced step, whose efficiency says little about communication). With
    the runs' summaries, runs of one strategy with different parameters (`params`, JSON) or other settings
    (`variant`, `results.run_variants`) stay apart, and blocking and none are taken from the row's own variant
    where it ran them, as the medians over the variants where it ran neither, and not at all where it ran only
    one of the two (`_references`)."""
    need = {"workload", "model", "tp", "strategy", "phase", "num_tokens", "latency_ms"}
    if steps.empty or not need <= set(steps.columns):
        return pd.DataFrame()
    s = steps[steps["workload"].isin(STEP_WORKLOADS)]
    s = s[s["phase"] == s["workload"]]  # the decode workload's prefill steps only fill the KV cache
    if "warmup" in s:
        s = s[~s["warmup"].astype(bool)]
    if s.empty:
        return pd.DataFrame()
    params = {}
    if summaries is not None and {"run", "strategy_params"} <= set(summaries.columns):
        params = {r: json.dumps(p if isinstance(p, dict) else {}, sort_keys=True)
                  for r, p in zip(summaries["run"], summaries["strategy_params"])}
    variants = variants_by_run(summaries)
    s = s.assign(params=s["run"].map(params).fillna("{}") if "run" in s else "{}",
                 variant=s["run"].map(variants).fillna("") if "run" in s else "")
    if summaries is not None and {"run", "single_rank"} <= set(summaries.columns) and "run" in s:
        s = s.assign(single_rank=s["run"].map(dict(zip(summaries["run"], summaries["single_rank"]))))
    s, group = _alone_apart(s, ["workload", "model", "tp"])
    keys = [*group, "phase", "num_tokens"]
    if "cuda_graph" in s:  # graph-replayed and eager steps are compared apart (prefill_graphs=0,4 in one sweep)
        keys.append("cuda_graph")
    groups = s.groupby([*keys, "strategy", "params", "variant"])
    g = groups["latency_ms"]
    cols = {"t_ms": g.median(), "t_p10_ms": g.quantile(0.1), "t_p90_ms": g.quantile(0.9), "steps": g.size()}
    if "host_ms" in s:  # runs since session 9
        cols["host_ms"] = groups["host_ms"].median()
    stats = pd.DataFrame(cols).reset_index()
    t_b, t_n = _references(stats, "t_ms", keys)  # the row's own variant's pair, else the medians over variants
    stats["t_blocking_ms"], stats["t_none_ms"] = t_b.to_numpy(), t_n.to_numpy()
    real = stats["strategy"] != "none"
    stats["overlap_efficiency"] = overlap_efficiency(stats["t_ms"], stats["t_blocking_ms"],
                                                     stats["t_none_ms"]).where(real)
    stats["exposed_comm_ms"] = (stats["t_ms"] - stats["t_none_ms"]).where(real)
    if "host_ms" in stats:  # near 1: the step waited for the host's launches (host-paced)
        stats["host_share"] = stats["host_ms"] / stats["t_ms"]
    return stats.sort_values([*keys, "variant", "strategy", "params"], kind="stable").reset_index(drop=True)


def variants_by_run(summaries: pd.DataFrame | None) -> dict[str, str]:
    """run -> its variant among the successful runs of `summaries` ({} without summaries)."""
    if summaries is None or summaries.empty or "run" not in summaries:
        return {}
    ok = summaries[summaries["status"] == "ok"] if "status" in summaries else summaries
    return dict(zip(ok["run"], results.run_variants(ok)))


def overlap_rows_from_steps(table: pd.DataFrame) -> list[dict]:
    """`step_table` rows in the form `comm.overlap_write.write_table` takes: the overlap table tuned from
    end-to-end steps of the engine (compiled, graphed, real batches) rather than from one layer."""
    return [{"arch": r.model, "tp": int(r.tp), "phase": r.phase, "tokens": int(r.num_tokens), "unit": "step",
             "strategy": r.strategy, "params": r.params, "t_ms": r.t_ms, "t_p10_ms": r.t_p10_ms,
             "t_p90_ms": r.t_p90_ms, "t_blocking_ms": r.t_blocking_ms} for r in table.itertuples(index=False)]


# trace summary field (per step, us) -> report column (ms)
_TRACE_MS = {"trace_compute_busy_us_per_step": "compute_busy_ms", "trace_comm_busy_us_per_step": "comm_busy_ms",
             "trace_exposed_comm_us_per_step": "exposed_comm_ms"}


def trace_table(summaries: pd.DataFrame) -> pd.DataFrame:
    """Per profiled run (trace=true), per step: compute and communication busy time, communication with no compute
    beside it (the trace view of exposed communication), the share of communication that overlapped compute, and
    compute interference: compute busy time over that of the `none` run of the same workload, model and tp,
    minus one (how much the communication running beside the compute slowed it; NaN without a traced `none`;
    that of the run's own variant among the traced runs where it has one)."""
    need = {"trace_compute_busy_us_per_step", "strategy", *_GROUP}
    if summaries.empty or not need <= set(summaries.columns):
        return pd.DataFrame()
    ok = summaries[summaries["trace_compute_busy_us_per_step"].notna()]
    if "status" in ok:
        ok = ok[ok["status"] == "ok"]
    ok = ok.reset_index(drop=True)
    if ok.empty:
        return pd.DataFrame()
    ok["variant"] = results.run_variants(ok)
    ok, group = _alone_apart(ok, _GROUP)
    out = ok[[c for c in ("run", *group, "strategy", "variant") if c in ok]].copy()
    for src, dst in _TRACE_MS.items():
        out[dst] = pd.to_numeric(ok.get(src), errors="coerce") / 1e3
    out["trace_concurrency"] = ok.get("trace_concurrency")
    out["ce_copy_share"] = (pd.to_numeric(ok.get("trace_ce_copy_us"), errors="coerce")
                            / pd.to_numeric(ok.get("trace_comm_busy_us"), errors="coerce"))
    out["device_busy_fraction"] = ok.get("trace_device_busy_fraction")
    ok = ok.assign(trace_compute_busy_us_per_step=pd.to_numeric(ok["trace_compute_busy_us_per_step"]))
    none = _group_median(ok, "none", "trace_compute_busy_us_per_step", group)
    out["compute_interference"] = (ok["trace_compute_busy_us_per_step"] / none - 1).where(ok["strategy"] != "none")
    for cls in KERNEL_CLASSES:  # summed kernel time per step by class (ms): where a strategy's extra time goes
        col = f"trace_{cls}_us_per_step"
        us = pd.to_numeric(ok[col], errors="coerce") if col in ok else None
        if us is not None and us.fillna(0).any():
            out[f"{cls}_ms"] = us / 1e3
    return out.sort_values([*_GROUP, "strategy"], kind="stable").reset_index(drop=True)


def trace_size_table(sizes: pd.DataFrame, summaries: pd.DataFrame) -> pd.DataFrame:
    """Per profiled run and traced step size: the median step's device span and kernel time by class (ms), next
    to the run's strategy; read a strategy's row against none's (or none_mb's) at the same size."""
    if sizes.empty or "run" not in summaries:
        return pd.DataFrame()
    keys = [c for c in ("run", *_GROUP, "strategy") if c in summaries]
    out = summaries[keys].merge(sizes, on="run")
    for col in [c for c in out if c.endswith("_us")]:
        if out[col].fillna(0).any() or col == "span_us":
            out[col[:-3] + "_ms"] = out[col] / 1e3
        out = out.drop(columns=col)
    return out.sort_values([c for c in (*_GROUP, "phase", "tokens", "strategy") if c in out],
                           kind="stable").reset_index(drop=True)


def layer_table(layer: pd.DataFrame) -> pd.DataFrame:
    """Per (arch, tp, unit, phase, tokens): each strategy's time, exposed communication, overlap efficiency and
    (where profiled, on cuda) compute interference."""
    if layer.empty:
        return layer
    keys = [k for k in ("arch", "tp", "unit", "phase", "tokens") if k in layer]
    values = [v for v in ("t_ms", "exposed_comm_ms", "overlap_efficiency", "compute_interference")
              if v in layer and layer[v].notna().any()]
    wide = layer.pivot_table(index=keys, columns="strategy", values=values, aggfunc="median")
    wide.columns = [f"{v}[{s}]" for v, s in wide.columns]
    return wide.reset_index()
