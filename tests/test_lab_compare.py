"""End-to-end overlap metrics in the comparison table (research guide definitions, T = 1 / throughput)."""
import math

import pandas as pd
import pytest

from nanovllm_lab.comm.layerbench import efficiency
from nanovllm_lab.lab.compare import comparison_table, overlap_efficiency, scaling_table, step_table
from nanovllm_lab.lab.console import sweep_frame


def _runs() -> pd.DataFrame:
    rows = [("a", 2, "blocking", 100.0), ("b", 2, "none", 125.0), ("c", 2, "overlap", 110.0),
            ("d", 4, "blocking", 100.0), ("e", 4, "async", 90.0)]
    return pd.DataFrame([dict(run=r, status="ok", workload="bench", model="m", tp=tp, strategy=s, throughput_tok_s=x)
                         for r, tp, s, x in rows])


def test_overlap_efficiency_one_rule_for_series_and_scalars():
    """Where none is not faster than blocking there is no penalty to recover: NaN, not a sign-flipped number."""
    t, tb, tn = [9.0, 9.0, 9.0], [10.0, 10.0, 10.0], [8.0, 10.0, 11.0]
    got = overlap_efficiency(pd.Series(t), pd.Series(tb), pd.Series(tn)).tolist()
    want = [efficiency(a, b, c) for a, b, c in zip(t, tb, tn)]
    assert got[0] == want[0] == 0.5
    assert all(math.isnan(x) for x in got[1:] + want[1:])


def test_overlap_efficiency_and_exposed_share_against_none():
    t = comparison_table(_runs()).set_index("run")
    # T_blocking = 10 ms/token, T_none = 8, T_overlap = 9.09: 45% of the 2 ms penalty recovered, 12% exposed.
    assert math.isclose(t.loc["c", "overlap_efficiency"], (0.01 - 1 / 110) / 0.002)
    assert math.isclose(t.loc["c", "exposed_comm_share"], (1 / 110 - 0.008) / (1 / 110))
    assert t.loc["a", "overlap_efficiency"] == 0.0 and math.isclose(t.loc["a", "exposed_comm_share"], 0.2)
    assert math.isnan(t.loc["b", "overlap_efficiency"])  # the bound itself
    assert math.isnan(t.loc["e", "overlap_efficiency"])  # no `none` run at tp=4: no efficiency


def test_per_phase_step_efficiency():
    """Where the gain is: each phase's median step against blocking's and none's (overlap: decode 10 -> 9 ms of
    a 2 ms penalty, prefill unchanged); groups without a none run get none."""
    runs = _runs()
    runs["decode_latency_ms_p50"] = runs["strategy"].map({"blocking": 10.0, "none": 8.0, "overlap": 9.0, "async": 11.0})
    runs["prefill_latency_ms_p50"] = runs["strategy"].map({"blocking": 200.0, "none": 160.0, "overlap": 202.0,
                                                           "async": 190.0})
    t = comparison_table(runs).set_index("run")
    assert math.isclose(t.loc["c", "decode_step_efficiency"], 0.5)
    assert math.isclose(t.loc["c", "prefill_step_efficiency"], -2.0 / 40.0)
    assert t.loc["a", "decode_step_efficiency"] == 0.0 and math.isnan(t.loc["b", "decode_step_efficiency"])
    assert math.isnan(t.loc["e", "prefill_step_efficiency"])  # tp=4 has no none run


def test_sweep_console_shows_the_efficiency():
    df = sweep_frame(_runs()).set_index("run")
    assert math.isclose(df.loc["c", "overlap_efficiency"], (0.01 - 1 / 110) / 0.002)


def test_step_table_per_size_against_blocking_and_none():
    """Decode workload steps: warm-up and the KV-filling prefill steps are left out; T is the median step."""
    rows = []
    for strategy, lat in (("blocking", {8: 10.0, 128: 20.0}), ("none", {8: 8.0, 128: 16.0}),
                          ("overlap", {8: 9.0, 128: 19.0})):
        for size, t in lat.items():
            rows += [dict(workload="decode", model="m", tp=2, strategy=strategy, phase="decode", num_tokens=size,
                          latency_ms=t + d, warmup=False) for d in (-0.1, 0.0, 0.1)]
            rows.append(dict(workload="decode", model="m", tp=2, strategy=strategy, phase="decode",
                             num_tokens=size, latency_ms=99.0, warmup=True))  # a warm-up step: left out
        rows.append(dict(workload="decode", model="m", tp=2, strategy=strategy, phase="prefill", num_tokens=512,
                         latency_ms=50.0, warmup=False))  # filling the KV cache: not a decode step
    rows.append(dict(workload="bench", model="m", tp=2, strategy="blocking", phase="decode", num_tokens=8,
                     latency_ms=1.0, warmup=False))  # bench steps are not a step sweep
    t = step_table(pd.DataFrame(rows)).set_index(["num_tokens", "strategy"])
    assert sorted(set(t.index.get_level_values(0))) == [8, 128]
    assert t.loc[(8, "overlap"), "t_ms"] == 9.0 and t.loc[(8, "overlap"), "steps"] == 3
    assert math.isclose(t.loc[(8, "overlap"), "overlap_efficiency"], 0.5)   # (10 - 9) / (10 - 8)
    assert math.isclose(t.loc[(128, "overlap"), "overlap_efficiency"], 0.25)  # (20 - 19) / (20 - 16)
    assert math.isclose(t.loc[(128, "overlap"), "exposed_comm_ms"], 3.0)
    assert t.loc[(8, "blocking"), "overlap_efficiency"] == 0.0
    assert math.isnan(t.loc[(8, "none"), "overlap_efficiency"])
    assert "host_share" not in t  # steps recorded before host_ms existed


def test_step_table_host_share():
    """With host_ms recorded: the median host time per size and strategy, and its share of the median step."""
    rows = [dict(workload="prefill", model="m", tp=2, strategy=s, phase="prefill", num_tokens=2048,
                 latency_ms=t, host_ms=h, warmup=False)
            for s, t, h in (("none", 30.0, 29.0), ("none", 32.0, 31.0), ("none", 31.0, 30.0),
                            ("blocking", 60.0, 12.0), ("blocking", 62.0, 11.0), ("blocking", 61.0, 13.0))]
    t = step_table(pd.DataFrame(rows)).set_index("strategy")
    assert t.loc["none", "host_ms"] == 30.0 and math.isclose(t.loc["none", "host_share"], 30.0 / 31.0)
    assert math.isclose(t.loc["blocking", "host_share"], 12.0 / 61.0)


def test_step_table_keeps_graph_and_eager_steps_apart():
    """A sweep of prefill_graphs=0,4: each strategy's graph-replayed and eager steps get their own row, and its
    efficiency uses blocking and none of the same mode."""
    rows = [dict(workload="prefill", model="m", tp=2, strategy=s, phase="prefill", num_tokens=2048,
                 latency_ms=t, cuda_graph=g, warmup=False)
            for s, eager, graph in (("blocking", 60.0, 32.0), ("none", 40.0, 27.0), ("async_ce", 50.0, 29.5))
            for g, t in ((False, eager), (True, graph))]
    t = step_table(pd.DataFrame(rows)).set_index(["strategy", "cuda_graph"])
    assert t.loc[("async_ce", False), "t_ms"] == 50.0 and t.loc[("async_ce", True), "t_ms"] == 29.5
    assert math.isclose(t.loc[("async_ce", False), "overlap_efficiency"], 0.5)  # (60 - 50) / (60 - 40)
    assert math.isclose(t.loc[("async_ce", True), "overlap_efficiency"], 0.5)   # (32 - 29.5) / (32 - 27)
    from nanovllm_lab.lab.console import step_frame
    wide = step_frame(step_table(pd.DataFrame(rows)))
    assert list(wide["graph"]) == [False, True] and list(wide["async_ce"]) == ["50.000 (0.50)", "29.500 (0.50)"]


def test_overlap_table_from_step_latencies(tmp_path):
    """`report --write-table`'s path: decode step latencies -> an overlap table whose rule for each size picks
    the fastest strategy (with its parameters) and keeps blocking as the fallback."""
    from nanovllm_lab.comm.overlap import load_table, match_entry
    from nanovllm_lab.models.arch import load_arch
    from nanovllm_lab.lab.compare import overlap_rows_from_steps
    runs = {"r0": ("blocking", {}), "r1": ("none", {}), "r2": ("chunked", {"chunks": 3}),
            "r3": ("symm", {"one_shot_max_bytes": 1024})}
    lat = {"blocking": {8: 10.0, 128: 20.0}, "none": {8: 8.0, 128: 16.0}, "chunked": {8: 11.0, 128: 18.0},
           "symm": {8: 9.0, 128: 21.0}}
    rows = [dict(run=run, workload="decode", model="qwen3-8b", tp=2, strategy=s, phase="decode", num_tokens=n,
                 latency_ms=t + d, warmup=False)
            for run, (s, _) in runs.items() for n, t in lat[s].items() for d in (-0.05, 0.0, 0.05)]
    summaries = pd.DataFrame([dict(run=r, strategy=s, strategy_params=p) for r, (s, p) in runs.items()])
    table = step_table(pd.DataFrame(rows), summaries)
    assert table.set_index(["num_tokens", "strategy"]).loc[(128, "chunked"), "params"] == '{"chunks": 3}'
    path = tmp_path / "t.json"
    from nanovllm_lab.comm.overlap_write import write_table
    write_table(overlap_rows_from_steps(table), str(path), card="NVIDIA H200")
    a = load_arch("qwen3-8b")
    entry = match_entry(load_table(str(path)), 2, "NVIDIA H200", (a.hidden_size, a.intermediate_size))
    assert entry["model"] == "qwen3-8b"
    rules = entry["rules"]["decode"]
    assert [c["strategy"] for c in rules[0]["choices"]] == ["symm", "blocking"]
    assert rules[0]["choices"][0]["params"] == {"one_shot_max_bytes": 1024}
    assert [c["strategy"] for c in rules[-1]["choices"]] == ["chunked", "blocking"]
    assert rules[-1]["choices"][0]["params"] == {"chunks": 3}


def test_step_summary_console_and_report_figure(tmp_path):
    """The sweep-end console table (one column per strategy, parameters that differ from the defaults in the
    label) and the report's step-overlap figure, from a decode sweep's step rows."""
    from nanovllm_lab.lab import plots
    from nanovllm_lab.lab.console import step_frame
    from nanovllm_lab.comm.chunked import ChunkedConfig
    default = ChunkedConfig()
    runs = {"r0": ("blocking", {}), "r1": ("none", {}),
            "r2": ("chunked", {"chunks": 3, "min_tokens_per_chunk": default.min_tokens_per_chunk}),
            "r3": ("chunked", {"chunks": default.chunks, "min_tokens_per_chunk": default.min_tokens_per_chunk})}
    lat = {"r0": 10.0, "r1": 8.0, "r2": 9.0, "r3": 9.5}
    rows = [dict(run=r, workload="decode", model="m", tp=2, strategy=s, phase="decode", num_tokens=8,
                 latency_ms=lat[r], warmup=False) for r, (s, _) in runs.items()]
    summaries = pd.DataFrame([dict(run=r, strategy=s, strategy_params=p) for r, (s, p) in runs.items()])
    table = step_table(pd.DataFrame(rows), summaries)
    frame = step_frame(table).iloc[0]
    assert frame["blocking"] == "10.000 (0.00)" and frame["none"] == "8.000"
    assert frame["chunked[chunks=3]"] == "9.000 (0.50)" and frame["chunked"] == "9.500 (0.25)"
    # the report draws the per-size efficiency when step rows exist
    fig = plots.layer_overlap(table[table["strategy"] != "none"].rename(
        columns={"model": "arch", "num_tokens": "tokens"}).assign(unit="step"))
    assert fig is not None and len(fig.axes) == 2


def test_scaling_against_linear_from_tp1():
    runs = pd.DataFrame([dict(workload="bench", model="m", strategy=s, tp=tp, throughput_tok_s=x)
                         for s, tp, x in [("blocking", 1, 100.0), ("blocking", 2, 150.0), ("blocking", 4, 200.0),
                                          ("overlap", 2, 170.0), ("none", 1, 110.0), ("none", 2, 200.0)]])
    t = scaling_table(runs).set_index(["strategy", "tp"])
    assert math.isclose(t.loc[("blocking", 2), "linear_scaling_fraction"], 0.75)  # 1.5x on 2 GPUs
    assert math.isclose(t.loc[("blocking", 4), "linear_scaling_fraction"], 0.5)
    # No overlap run at tp=1: blocking's tp=1 run is the reference (every strategy is blocking at tp=1).
    assert math.isclose(t.loc[("overlap", 2), "linear_scaling_fraction"], 0.85)
    assert t.loc[("overlap", 2), "tp1_strategy"] == "blocking"
    # A strategy's own tp=1 run wins over blocking's.
    assert math.isclose(t.loc[("none", 2), "speedup_vs_tp1"], 200 / 110) and t.loc[("none", 2), "tp1_strategy"] == "none"
    assert scaling_table(runs[runs["tp"] == 2]).empty  # one tp size: nothing to scale against


def test_trace_table_gives_compute_interference_against_none():
    """Traced runs of one sweep: per-step busy times in ms, and compute interference = compute busy time over
    the traced `none` run's, minus one; a group without a traced `none` gets NaN."""
    from nanovllm_lab.lab.compare import trace_table

    def run(strategy, compute_us, comm_us, exposed_us, tp=2, ce_us=0.0):
        return {"run": f"{strategy}_tp{tp}", "status": "ok", "workload": "prefill", "model": "qwen3-8b", "tp": tp,
                "strategy": strategy, "trace_compute_busy_us_per_step": compute_us,
                "trace_comm_busy_us_per_step": comm_us, "trace_exposed_comm_us_per_step": exposed_us,
                "trace_comm_busy_us": 3 * comm_us, "trace_ce_copy_us": 3 * ce_us, "trace_concurrency": 0.5,
                "trace_device_busy_fraction": 0.9}
    summaries = pd.DataFrame([run("none", 200_000, 800, 800),
                              {**run("async_ce", 212_000, 65_000, 4_400, ce_us=27_000),
                               "trace_gemm_us_per_step": 151_000, "trace_sum_norm_us_per_step": 12_000},
                              run("blocking", 196_000, 38_000, 38_000), run("blocking", 100_000, 9_000, 9_000, tp=4),
                              {"run": "untraced", "status": "ok", "workload": "prefill", "model": "qwen3-8b",
                               "tp": 2, "strategy": "async", "trace_compute_busy_us_per_step": float("nan")}])
    t = trace_table(summaries).set_index(["tp", "strategy"])
    assert ("2", "async") not in t.index and (2, "async") not in t.index  # not profiled
    assert t.loc[(2, "async_ce"), "compute_interference"] == pytest.approx(0.06)
    assert t.loc[(2, "blocking"), "compute_interference"] == pytest.approx(-0.02)
    assert pd.isna(t.loc[(2, "none"), "compute_interference"]) and pd.isna(t.loc[(4, "blocking"), "compute_interference"])
    assert t.loc[(2, "async_ce"), "exposed_comm_ms"] == pytest.approx(4.4)
    assert t.loc[(2, "async_ce"), "ce_copy_share"] == pytest.approx(27 / 65)
    assert t.loc[(2, "async_ce"), "gemm_ms"] == pytest.approx(151) and t.loc[(2, "async_ce"), "sum_norm_ms"] == 12
    assert pd.isna(t.loc[(2, "none"), "gemm_ms"]) and "barrier_ms" not in t  # a class no run had: no column


def test_wandb_report_carries_every_table(tmp_path, monkeypatch):
    """The report's wandb run holds the runs, steps and traces tables (NaN cells as None, which wandb accepts),
    not only what was there before the Traces table existed."""
    import sys
    import types

    from nanovllm_lab.lab.reporting import Report, log_report_to_wandb
    logged: dict = {}

    class FakeRun:
        def log(self, payload):
            logged.update(payload)

        def finish(self):
            pass

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: FakeRun()
    fake.Settings = lambda **kw: kw
    fake.Table = lambda dataframe: ("table", dataframe)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    frame = pd.DataFrame({"strategy": ["none", "async_ce"], "compute_interference": [float("nan"), 0.06]})
    rep = Report(root=tmp_path, runs=frame, failed=pd.DataFrame(), layer=pd.DataFrame(), steps=frame, traces=frame)
    log_report_to_wandb(rep)
    assert {"runs", "steps", "traces"} <= set(logged) and "layer" not in logged
    assert logged["traces"][1]["compute_interference"].tolist() == [None, 0.06]


def test_report_splits_traced_steps_by_size(tmp_path):
    """Two profiled runs whose trace summaries hold per-size step rows (lab/trace.py `steps_by_size`): the report's
    'Traced steps by size' table puts each run's strategy beside its rows, in ms, sizes apart; a run without
    per-size rows adds none."""
    import json

    from nanovllm_lab.lab.reporting import build_report, write_report
    sizes = {"none_mb": [(2048, 28.0, 19.0), (16384, 205.0, 150.0)], "async_rsag_ce": [(16384, 212.5, 157.5)],
             "blocking": []}
    for i, (strategy, rows) in enumerate(sizes.items()):
        d = tmp_path / f"{i}_{strategy}"
        d.mkdir()
        (d / "summary.json").write_text(json.dumps(dict(status="ok", workload="prefill", model="m", tp=2,
                                                        strategy=strategy, throughput_tok_s=1.0)))
        (d / "trace_summary.json").write_text(json.dumps({"num_kernels": 1, "steps_by_size": [
            {"phase": "prefill", "tokens": t, "steps": 2, "span_us": span * 1e3, "gemm_us": gemm * 1e3,
             "nccl_us": 0.0} for t, span, gemm in rows]}))
    rep = build_report(tmp_path)
    t = rep.trace_sizes.set_index(["tokens", "strategy"])
    assert len(t) == 3 and set(t.index) == {(2048, "none_mb"), (16384, "none_mb"), (16384, "async_rsag_ce")}
    assert t.loc[(16384, "async_rsag_ce"), "span_ms"] == 212.5 and t.loc[(16384, "none_mb"), "gemm_ms"] == 150.0
    assert "nccl_ms" not in t  # a class that never ran is left out
    assert "## Traced steps by size" in write_report(rep, tmp_path / "r.md").read_text()


def _step_sweep(root, lat: dict, card: str | None = None) -> None:
    """A decode sweep on disk: one run dir per strategy with its summary, steps (three per size) and env."""
    import json
    for i, (strategy, by_size) in enumerate(lat.items()):
        d = root / f"{i}_{strategy}_tp2"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps(dict(status="ok", workload="decode", model="qwen3-8b", tp=2,
                                                        strategy=strategy, strategy_params={})))
        (d / "env.json").write_text(json.dumps({"gpus": [card] if card else []}))
        pd.DataFrame([dict(workload="decode", model="qwen3-8b", tp=2, strategy=strategy, phase="decode",
                           num_tokens=n, latency_ms=t + dt, warmup=False)
                      for n, t in by_size.items() for dt in (-0.05, 0.0, 0.05)]).to_parquet(d / "steps.parquet")


def test_multirun_end_writes_the_overlap_table(tmp_path, caplog):
    """With `overlap_table` set (the overlap_tuning study), the sweep-end callback writes overlap's table from the
    sweep's steps, for the sweep's card; a sweep without a blocking run writes none and says why."""
    from omegaconf import OmegaConf

    from nanovllm_lab.comm.overlap import load_table
    from nanovllm_lab.lab.runner import SweepEndCallback
    sweep, table = tmp_path / "sweep", tmp_path / "tables" / "overlap.json"
    _step_sweep(sweep, {"blocking": {8: 10.0, 128: 20.0}, "none": {8: 8.0, 128: 16.0},
                        "symm_norm": {8: 9.0, 128: 17.0}}, card="NVIDIA H200")
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}, "overlap_table": str(table)})
    SweepEndCallback().on_multirun_end(cfg)
    entry = load_table(str(table))["entries"][0]
    assert (entry["model"], entry["tp"], entry["card"]) == ("qwen3-8b", 2, "NVIDIA H200")
    assert [c["strategy"] for c in entry["rules"]["decode"][0]["choices"]] == ["symm_norm", "blocking"]
    assert not list(table.parent.glob("*.tmp*"))  # written whole, through a temporary file

    no_ref, other = tmp_path / "no_ref", tmp_path / "other.json"
    _step_sweep(no_ref, {"none": {8: 8.0}, "symm_norm": {8: 9.0}})
    SweepEndCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(no_ref)}},
                                                         "overlap_table": str(other)}))
    assert not other.exists() and "needs decode/prefill step sweeps with a blocking run" in caplog.text


# -- variants: runs of one workload, model and tp that differ in an engine setting ------------------------------
_BASE = ["workload=prefill", "model=qwen3-8b", "tp=2", "prefill_graphs=4", "results_dir=/root/out/lab",
         "progress=False"]


def _variant_sweep() -> tuple[pd.DataFrame, pd.DataFrame]:
    """`-m +strategy=blocking,none,async_ce elementwise_kernels=torch,triton` (prefill, two sizes), plus an
    async_ce run with elementwise_kernels=auto and no blocking or none beside it. Latencies per kernel differ so
    that pooled references would give other numbers than per-variant ones."""
    lat = {("blocking", "torch"): {2048: 60.0, 8192: 240.0}, ("none", "torch"): {2048: 40.0, 8192: 160.0},
           ("async_ce", "torch"): {2048: 50.0, 8192: 220.0},
           ("blocking", "triton"): {2048: 50.0, 8192: 200.0}, ("none", "triton"): {2048: 30.0, 8192: 120.0},
           ("async_ce", "triton"): {2048: 35.0, 8192: 180.0},
           ("async_ce", "auto"): {2048: 45.0, 8192: 190.0}}
    summaries, steps = [], []
    for i, ((strategy, kernel), by_size) in enumerate(lat.items()):
        run = f"{i}_{strategy}_tp2"
        summaries.append(dict(run=run, status="ok", workload="prefill", model="qwen3-8b", tp=2, strategy=strategy,
                              strategy_params={}, throughput_tok_s=1e4 / by_size[8192],
                              prefill_latency_ms_p50=by_size[8192],
                              overrides=[*_BASE, f"+strategy={strategy}", f"elementwise_kernels={kernel}"]))
        steps += [dict(run=run, workload="prefill", model="qwen3-8b", tp=2, strategy=strategy, phase="prefill",
                       num_tokens=n, latency_ms=t + d, cuda_graph=True, warmup=False)
                  for n, t in by_size.items() for d in (-0.1, 0.0, 0.1)]
    return pd.DataFrame(summaries), pd.DataFrame(steps)


def test_run_variants_are_the_overrides_a_run_does_not_share():
    """What tells runs of one group apart, without what the report has columns for (strategy, its params) or
    what does not change what ran (results_dir, progress, tag, logger, overlap_table); trace stays (it slows the
    steps). Another group (tp=4) decides its own; a run without recorded overrides gets ""."""
    from nanovllm_lab.lab.results import run_variants
    keep = ["workload=decode", "model=m", "results_dir=/x", "progress=False", "overlap_table=/t.json"]
    rows = [(2, [*keep, "tp=2", "+strategy=blocking", "tag=a", "elementwise_kernels=torch", "trace=true"]),
            (2, [*keep, "tp=2", "+strategy=chunked", "strategy.chunks=3", "tag=b", "logger=wandb",
                 "logger.project=p", "elementwise_kernels=triton", "trace=true"]),
            (2, [*keep, "tp=2", "+strategy=none", "tag=c", "elementwise_kernels=triton", "trace=false",
                 "torch_compile=false"]),
            (2, None),
            (4, [*keep, "tp=4", "elementwise_kernels=torch"]), (4, [*keep, "tp=4", "elementwise_kernels=torch"])]
    summaries = pd.DataFrame([dict(workload="decode", model="m", tp=tp, overrides=o) for tp, o in rows])
    assert run_variants(summaries).tolist() == [
        "elementwise_kernels=torch trace=true", "elementwise_kernels=triton trace=true",
        "elementwise_kernels=triton torch_compile=false trace=false", "", "", ""]
    assert run_variants(summaries.drop(columns="overrides")).tolist() == [""] * 6


def test_step_table_keeps_engine_variants_apart_with_their_own_references():
    """A sweep over an engine setting with blocking and none per setting: a row per size, strategy and variant,
    each against the blocking and none of its own variant (pooling both kernels would give
    (55 - 50) / (55 - 35) = 0.25 and (55 - 35) / 20 = 1.0 at 2048 instead of 0.5 and 0.75). A variant without
    blocking/none runs (elementwise_kernels=auto) is measured against the median over the variants, as before."""
    summaries, steps = _variant_sweep()
    table = step_table(steps, summaries)
    t = table.set_index(["num_tokens", "strategy", "variant"])
    assert len(t) == 14 and t.index.is_unique  # 2 sizes x 7 runs: nothing pooled
    torch, triton, auto = "elementwise_kernels=torch", "elementwise_kernels=triton", "elementwise_kernels=auto"
    assert t.loc[(2048, "async_ce", torch), "t_ms"] == 50.0 and t.loc[(2048, "async_ce", triton), "t_ms"] == 35.0
    assert t.loc[(2048, "async_ce", torch), "t_blocking_ms"] == 60.0
    assert t.loc[(2048, "async_ce", triton), "t_none_ms"] == 30.0
    assert math.isclose(t.loc[(2048, "async_ce", torch), "overlap_efficiency"], 0.5)     # (60 - 50) / (60 - 40)
    assert math.isclose(t.loc[(2048, "async_ce", triton), "overlap_efficiency"], 0.75)   # (50 - 35) / (50 - 30)
    assert math.isclose(t.loc[(8192, "async_ce", triton), "overlap_efficiency"], 0.25)   # (200 - 180) / 80
    assert math.isclose(t.loc[(8192, "async_ce", triton), "exposed_comm_ms"], 60.0)
    assert t.loc[(2048, "blocking", triton), "overlap_efficiency"] == 0.0
    assert math.isnan(t.loc[(2048, "none", torch), "overlap_efficiency"])
    # no blocking or none with elementwise_kernels=auto: the medians over the variants (55 and 35 ms at 2048)
    assert t.loc[(2048, "async_ce", auto), "t_blocking_ms"] == 55.0
    assert t.loc[(2048, "async_ce", auto), "t_none_ms"] == 35.0
    assert math.isclose(t.loc[(2048, "async_ce", auto), "overlap_efficiency"], 0.5)     # (55 - 45) / (55 - 35)
    # the sweep-end / report table: a column per strategy and variant
    from nanovllm_lab.lab.console import step_frame
    wide = step_frame(table).set_index("tokens")
    assert wide.loc[2048, "async_ce [elementwise_kernels=torch]"] == "50.000 (0.50)"
    assert wide.loc[2048, "async_ce [elementwise_kernels=triton]"] == "35.000 (0.75)"
    assert wide.loc[2048, "blocking [elementwise_kernels=triton]"] == "50.000 (0.00)"
    assert wide.loc[2048, "none [elementwise_kernels=torch]"] == "40.000"
    assert "blocking" not in wide and "async_ce" not in wide


def test_run_table_shows_the_variant_and_compares_with_its_own_blocking():
    """The run table: each run's variant, speedup over the blocking run of its own variant (else the group's
    median blocking), and per-phase efficiency against the blocking and none of its variant."""
    summaries, _ = _variant_sweep()
    t = comparison_table(summaries).set_index(["strategy", "variant"])
    torch, triton, auto = "elementwise_kernels=torch", "elementwise_kernels=triton", "elementwise_kernels=auto"
    assert math.isclose(t.loc[("async_ce", torch), "speedup_vs_blocking"], 240.0 / 220.0)
    assert math.isclose(t.loc[("async_ce", triton), "speedup_vs_blocking"], 200.0 / 180.0)
    assert t.loc[("blocking", triton), "speedup_vs_blocking"] == 1.0  # not against the pooled median
    pooled = (1 / 240 + 1 / 200) / 2  # the median of the two blocking runs' throughputs (x 1e4)
    assert math.isclose(t.loc[("async_ce", auto), "speedup_vs_blocking"], (1 / 190) / pooled)
    assert math.isclose(t.loc[("async_ce", triton), "prefill_step_efficiency"], 0.25)    # (200 - 180) / 80
    assert math.isclose(t.loc[("async_ce", torch), "overlap_efficiency"], 0.25)          # T = 1 / throughput
    df = sweep_frame(summaries).set_index("run")  # the sweep-end console table shows it too
    assert df.loc["3_blocking_tp2", "variant"] == triton


def test_results_without_overrides_are_compared_as_before():
    """summary.json from before `overrides` was recorded: variant "" everywhere, runs of one strategy pooled and
    the references as they always were."""
    summaries, steps = _variant_sweep()
    old = summaries.drop(columns="overrides")
    t = step_table(steps, old).set_index(["num_tokens", "strategy"])
    assert set(t["variant"]) == {""} and len(t) == 6
    assert t.loc[(2048, "blocking"), "t_ms"] == 55.0 and t.loc[(2048, "async_ce"), "t_ms"] == 45.0
    runs = comparison_table(old)
    assert set(runs["variant"]) == {""}
    pooled = (1 / 240 + 1 / 200) / 2
    assert math.isclose(runs.set_index("run").loc["3_blocking_tp2", "speedup_vs_blocking"], (1 / 200) / pooled)
    assert "variant" not in sweep_frame(old)  # nothing to tell apart: no column
    mixed = summaries.astype(object)
    mixed.loc[0, "overrides"] = float("nan")  # one old run among new ones (a NaN cell from concatenated frames)
    v = comparison_table(mixed).set_index("run")["variant"]
    assert v["0_blocking_tp2"] == "" and v["3_blocking_tp2"] == "elementwise_kernels=triton"


def test_report_of_an_engine_setting_sweep_without_none(tmp_path, capsys):
    """The report on disk of a blocking-only sweep over elementwise_kernels (results/gpu/2026-11-28m_h200/call2):
    no efficiency anywhere (no none run) used to crash the step-overlap figure at layout; the per-size table gets
    a column per kernel."""
    import json

    from nanovllm_lab.lab.reporting import build_report, write_report
    for i, kernel in enumerate(("torch", "triton")):
        d = tmp_path / f"{i}_blocking_tp1"
        d.mkdir()
        (d / "summary.json").write_text(json.dumps(dict(
            status="ok", workload="prefill", model="qwen3-8b", tp=1, strategy="blocking", strategy_params={},
            throughput_tok_s=4e4 + i, overrides=["workload=prefill", "tp=1", f"elementwise_kernels={kernel}"])))
        pd.DataFrame([dict(workload="prefill", model="qwen3-8b", tp=1, strategy="blocking", phase="prefill",
                           num_tokens=n, latency_ms=n / 40 - 10 * i, cuda_graph=True, warmup=False)
                      for n in (2048, 8192)]).to_parquet(d / "steps.parquet")
    rep = build_report(tmp_path)
    assert "step_overlap" not in rep.figures and "latency_vs_tokens" in rep.figures
    text = write_report(rep, tmp_path / "r.md").read_text()
    assert "| blocking [elementwise_kernels=torch] | blocking [elementwise_kernels=triton] |" in text
    assert "| 8192 | True | 204.800 | 194.800 |" in text
    from nanovllm_lab.report import main  # the CLI prints the same per-size table
    assert main([str(tmp_path), "--out", str(tmp_path / "cli.md")]) == 0
    assert "blocking [elementwise_kernels=triton]" in capsys.readouterr().out


def test_overlap_table_refuses_a_sweep_of_several_engine_settings(tmp_path):
    """overlap's table has one entry per model, tp and card: a sweep that ran two engine settings cannot say
    which one the winners are for, so the table is refused (report exit status 2) and nothing is written."""
    from nanovllm_lab.lab.tuning import TuningError, write_table_from_sweep
    summaries, steps = _variant_sweep()
    table = tmp_path / "t.json"
    with pytest.raises(TuningError, match="several engine settings") as err:
        write_table_from_sweep(tmp_path, table, card="H200", steps=step_table(steps, summaries))
    assert err.value.code == 2 and not table.exists()
    one = summaries[summaries["overrides"].map(lambda o: "elementwise_kernels=torch" in o)]
    write_table_from_sweep(tmp_path, table, card="H200", steps=step_table(steps[steps["run"].isin(one["run"])], one))
    assert table.exists()


def test_a_variant_with_only_one_reference_gets_no_efficiency():
    """A variant that ran blocking but not none (elementwise_kernels=triton here) must not be measured against
    another variant's none: its exposed communication would come out negative (33 - 40 ms). It gets NaN; the
    variant that ran both keeps its own pair, in the step table and the run table alike."""
    lat = {("blocking", "torch"): 60.0, ("none", "torch"): 40.0, ("async_ce", "torch"): 50.0,
           ("blocking", "triton"): 38.0, ("async_ce", "triton"): 33.0}
    summaries, steps = [], []
    for i, ((strategy, kernel), t) in enumerate(lat.items()):
        run = f"{i}_{strategy}_tp2"
        summaries.append(dict(run=run, status="ok", workload="prefill", model="qwen3-8b", tp=2, strategy=strategy,
                              strategy_params={}, throughput_tok_s=1e4 / t, prefill_latency_ms_p50=t,
                              overrides=[*_BASE, f"+strategy={strategy}", f"elementwise_kernels={kernel}"]))
        steps.append(dict(run=run, workload="prefill", model="qwen3-8b", tp=2, strategy=strategy, phase="prefill",
                          num_tokens=2048, latency_ms=t, cuda_graph=True, warmup=False))
    summaries, steps = pd.DataFrame(summaries), pd.DataFrame(steps)
    t = step_table(steps, summaries).set_index(["strategy", "variant"])
    tri, tor = "elementwise_kernels=triton", "elementwise_kernels=torch"
    assert t.loc[("async_ce", tri), "t_blocking_ms"] == 38.0 and math.isnan(t.loc[("async_ce", tri), "t_none_ms"])
    assert math.isnan(t.loc[("async_ce", tri), "overlap_efficiency"])
    assert math.isnan(t.loc[("async_ce", tri), "exposed_comm_ms"])
    assert math.isclose(t.loc[("async_ce", tor), "overlap_efficiency"], 0.5)
    runs = comparison_table(summaries).set_index(["strategy", "variant"])
    assert math.isnan(runs.loc[("async_ce", tri), "prefill_step_efficiency"])
    assert math.isclose(runs.loc[("async_ce", tri), "speedup_vs_blocking"], 38.0 / 33.0)  # its own blocking
    assert math.isclose(runs.loc[("async_ce", tor), "prefill_step_efficiency"], 0.5)
