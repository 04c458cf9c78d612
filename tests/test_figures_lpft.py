"""The LP-FT figure (figures/lpft.py) drawn from small fixture tables copied from runs (``lpft-synthetic`` quick, and
``lpft`` on the tiny random model with real SST-2 -> CR data), checked as tests/test_figures.py checks every figure:
no legend on data, every axes labelled, spread stated, no hidden series, PDF (TrueType) and PNG written."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from ftsim.core.io import read_jsonl  # noqa: E402
from tests.test_figures import all_text, hidden_series, label_problems, legend_overlaps, shows_spread  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "figures"
CASES = ["lpft-synthetic", "lpft/tiny-causal"]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.replace("/", "-"))
def built(request):
    from figures.lpft import build

    fig = build(DATA / request.param)
    fig.canvas.draw()
    return request.param, fig


def test_no_legend_covers_data(built):
    from matplotlib.legend import Legend

    case, fig = built
    assert len(fig.findobj(Legend)) == 4, case
    assert legend_overlaps(fig) == []


def test_every_axes_is_labelled(built):
    assert label_problems(built[1]) == []


def test_spread_is_stated(built):
    case, fig = built
    assert shows_spread(fig)
    text = all_text(fig)
    assert re.search(r"sample s\.d\., \d+ seeds?", text) or "no spread" in text, text


def test_no_series_hides_another(built):
    assert hidden_series(built[1]) == []


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.replace("/", "-"))
def test_redraw_writes_pdf_and_png(tmp_path, case):
    from figures.lpft import redraw

    run_dir = tmp_path / "run"
    shutil.copytree(DATA / case, run_dir)
    paths = [Path(p) for p in redraw(run_dir)]
    assert sorted(p.name for p in paths) == ["lpft.pdf", "lpft.png"]
    pdf = (run_dir / "lpft.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and b"/FontFile2" in pdf and b"/Type3" not in pdf
    assert (run_dir / "lpft.png").read_bytes().startswith(b"\x89PNG")


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
