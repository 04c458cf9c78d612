"""The SMART figures (figures/smart.py) drawn from stored tables, checked as tests/test_figures.py checks every
figure: no legend covers data or text, every axes is labelled, spread is stated, no series hides another, redraw
writes a TrueType PDF and a PNG. Fixtures: tests/data/figures/smart-synthetic (the rows of a quick
``smart-synthetic`` run) and tests/data/figures/smart (a tiny-causal ``smart`` run, two tasks)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

from matplotlib.legend import Legend  # noqa: E402

from tests.test_figures import all_text, hidden_series, label_problems, legend_overlaps, shows_spread  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "figures"
CASES = [("build_synthetic", "redraw_synthetic", "smart-synthetic", "smart_synthetic"),
         ("build", "redraw", "smart", "smart")]
IDS = [c[2] for c in CASES]


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def built(request):
    from figures import smart

    build, _, fixture, _ = request.param
    fig = getattr(smart, build)(DATA / fixture)
    fig.canvas.draw()
    return request.param, fig


def test_no_legend_covers_data(built):
    _, fig = built
    assert fig.findobj(Legend)
    assert legend_overlaps(fig) == []


def test_every_axes_is_labelled(built):
    assert label_problems(built[1]) == []


def test_spread_is_stated(built):
    _, fig = built
    assert shows_spread(fig)
    assert re.search(r"mean ± sample s\.d\., \d+(–\d+)? seeds", all_text(fig))


def test_no_series_hides_another(built):
    assert hidden_series(built[1]) == []


def test_four_panels_and_every_method(built):
    (_, _, fixture, _), fig = built
    from ftsim.core.io import read_jsonl

    panels = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title()[:3] for ax in panels] == ["(a)", "(b)", "(c)", "(d)"]
    methods = {r["method"] for r in read_jsonl(DATA / fixture / "results.jsonl")}
    shown = {t.get_text() for t in panels[0].get_yticklabels()}
    assert len(shown) == len(methods)
    sens = [r["value"] for r in read_jsonl(DATA / fixture / "results.jsonl") if r["metric"] == "sensitivity"]
    assert panels[2].get_xscale() == ("log" if max(sens) / min(sens) >= 10 else "linear")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_redraw_writes_pdf_and_png(tmp_path, case):
    from figures import smart

    _, redraw, fixture, stem = case
    run_dir = tmp_path / "run"
    shutil.copytree(DATA / fixture, run_dir)
    paths = getattr(smart, redraw)(run_dir)
    assert sorted(p.name for p in paths) == sorted([f"{stem}.pdf", f"{stem}.png"])
    pdf, png = (run_dir / f"{stem}.pdf").read_bytes(), (run_dir / f"{stem}.png").read_bytes()
    assert pdf.startswith(b"%PDF") and b"/FontFile2" in pdf and b"/Type3" not in pdf
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_empty_rows_are_an_error(tmp_path):
    from figures import smart

    (tmp_path / "results.jsonl").write_text("")
    with pytest.raises(ValueError, match="no result rows"):
        smart.build(tmp_path)
