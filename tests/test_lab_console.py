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
