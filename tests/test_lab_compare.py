"""End-to-end overlap metrics in the comparison table (research guide definitions, T = 1 / throughput)."""
import math

import pandas as pd

from nanovllm_lab.lab.compare import comparison_table
from nanovllm_lab.lab.console import sweep_frame


def _runs() -> pd.DataFrame:
    rows = [("a", 2, "blocking", 100.0), ("b", 2, "none", 125.0), ("c", 2, "overlap", 110.0),
            ("d", 4, "blocking", 100.0), ("e", 4, "async", 90.0)]
    return pd.DataFrame([dict(run=r, status="ok", workload="bench", model="m", tp=tp, strategy=s, throughput_tok_s=x)
                         for r, tp, s, x in rows])


def test_overlap_efficiency_and_exposed_share_against_none():
    t = comparison_table(_runs()).set_index("run")
    # T_blocking = 10 ms/token, T_none = 8, T_overlap = 9.09: 45% of the 2 ms penalty recovered, 12% exposed.
    assert math.isclose(t.loc["c", "overlap_efficiency"], (0.01 - 1 / 110) / 0.002)
    assert math.isclose(t.loc["c", "exposed_comm_share"], (1 / 110 - 0.008) / (1 / 110))
    assert t.loc["a", "overlap_efficiency"] == 0.0 and math.isclose(t.loc["a", "exposed_comm_share"], 0.2)
    assert math.isnan(t.loc["b", "overlap_efficiency"])  # the bound itself
    assert math.isnan(t.loc["e", "overlap_efficiency"])  # no `none` run at tp=4: no efficiency


def test_sweep_console_shows_the_efficiency():
    df = sweep_frame(_runs()).set_index("run")
    assert math.isclose(df.loc["c", "overlap_efficiency"], (0.01 - 1 / 110) / 0.002)
