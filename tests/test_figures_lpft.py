"""What the LP-FT figure (figures/lpft.py) must show beyond the checks tests/test_figures.py runs on every figure
(legends off the data, labelled axes, stated spread, no hidden series, PDF + PNG): its four legends and a drawn
spread on both fixtures, the pooled ECE of the tables, one point per method without a head-scale sweep."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
from matplotlib.legend import Legend  # noqa: E402

from ftsim.core.io import read_jsonl  # noqa: E402
from tests.test_figures import all_text, shows_spread  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "figures"


@pytest.mark.parametrize("case", ["lpft-synthetic", "lpft/tiny-causal"], ids=lambda c: c.replace("/", "-"))
def test_four_legends_and_a_stated_spread(case):
    from figures.lpft import build

    fig = build(DATA / case)
    fig.canvas.draw()
    assert len(fig.findobj(Legend)) == 4
    text = all_text(fig)
    assert shows_spread(fig) and (re.search(r"sample s\.d\., \d+ seeds?", text) or "no spread" in text), text


def test_reliability_legend_shows_the_pooled_ece_of_the_tables():
    """Panel (c)'s ECE is recomputed from the pooled bins; with one seed it must equal the run's LP-FT ECE."""
    from figures.lpft import build

    case = DATA / "lpft" / "tiny-causal"
    seeds = {r["seed"] for r in read_jsonl(case / "results.jsonl")}
    assert len(seeds) == 1
    rows = {r["metric"]: r["value"] for r in read_jsonl(case / "results.jsonl") if r["method"] == "LP-FT"}
    text = all_text(build(case))
    assert f"before TS: pooled ECE {100 * rows['ece']:.1f}%" in text
    assert f"after TS: pooled ECE {100 * rows['ece_ts']:.1f}%" in text


def test_feature_panel_without_a_sweep_shows_one_point_per_method():
    from figures.lpft import build

    fig = build(DATA / "lpft" / "tiny-causal")
    ax = fig.axes[1]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["FT", "LP-FT", "LoRA-FT", "LP-LoRA-FT"]
