"""The console tables print any cell or header text as it is."""
import pandas as pd

from nanovllm_lab.lab.console import print_table


def test_a_cell_that_looks_like_rich_markup_prints_as_text(capsys):
    """A failed job's error (gloo's names a source file as "[/__w/.../pair.cc:553]") once made rich raise a
    MarkupError while printing the sweep table, hiding the error itself."""
    print_table(pd.DataFrame([{"run": "0_async_tp2", "error": "connect failed [/w/gloo/pair.cc:553] closed"}]), "sweep")
    assert "[/w/gloo/pair.cc:553]" in capsys.readouterr().out


def test_a_header_that_looks_like_rich_markup_prints_as_text(capsys):
    """A per-size column labelled with its variant ("blocking [elementwise_kernels=triton]"): rich once took the
    bracket for a style tag and printed two columns both headed "blocking"."""
    print_table(pd.DataFrame({"tokens": [2048], "blocking [elementwise_kernels=triton]": ["49.540"]}), "per size")
    assert "blocking [elementwise_kernels=triton]" in capsys.readouterr().out


def test_a_wide_sweep_table_folds_variants_and_keeps_run_names_whole(capsys):
    """In a log (160 columns), a sweep with a long variant once squeezed the run column to one character per
    line, "0_none_tp2" printed down the table. Run names now stay whole; the variant folds instead."""
    row = {"run": "3_none_mb_tp2", "status": "ok", "workload": "prefill", "model": "qwen3-8b", "strategy": "none_mb",
           "variant": "elementwise_kernels=triton single_rank=true", "tp": 2, "device": "cuda",
           "throughput_tok_s": 83720.0, "prefill_latency_ms_p50": 96.65, "decode_latency_ms_p50": None,
           "ttft_ms_p50": 1023.0, "tpot_ms_p50": 9.1, "achieved_over_floor": 0.46, "valid_outputs": False}
    print_table(pd.DataFrame([row]), "sweep summary")
    out = capsys.readouterr().out
    assert "3_none_mb_tp2" in out and "single_rank=true" in out
    assert max(len(line) for line in out.splitlines()) <= 160
