"""The deng2024 figures, drawn from fixture tables of a quick run (tests/data/figures/deng2024/), checked as
tests/test_figures.py checks every figure (no legend on data or text, labelled axes, stated spread, no hidden
series, PDF with TrueType fonts and PNG written), plus what each figure must show."""

from __future__ import annotations

import importlib
import re
import shutil
from pathlib import Path

import pytest

from tests.test_figures import all_text, hidden_series, label_problems, legend_overlaps, shows_spread

DATA = Path(__file__).resolve().parent / "data" / "figures" / "deng2024"
CASES = [("figures.deng2024", "deng2024_transfer"), ("figures.deng2024_radreg", "deng2024_radreg")]


@pytest.fixture(scope="module", params=CASES, ids=[c[1] for c in CASES])
def built(request):
    module, _ = request.param
    fig = importlib.import_module(module).build(DATA)
    fig.canvas.draw()
    return request.param, fig


def test_no_legend_covers_data(built):
    _, fig = built
    assert fig.legends or any(ax.get_legend() for ax in fig.axes)
    assert legend_overlaps(fig) == []


def test_every_axes_is_labelled(built):
    _, fig = built
    assert label_problems(fig) == []


def test_spread_is_stated(built):
    from ftsim.core.io import read_jsonl

    _, fig = built
    seeds = len({r["seed"] for r in read_jsonl(DATA / "checkpoints.jsonl")})
    assert shows_spread(fig)
    assert re.search(rf"sample s\.d\., {seeds} seeds", all_text(fig))


def test_no_series_hides_another(built):
    _, fig = built
    assert hidden_series(fig) == []


@pytest.mark.parametrize("module, stem", CASES)
def test_redraw_writes_pdf_and_png(tmp_path, module, stem):
    run_dir = tmp_path / "run"
    shutil.copytree(DATA, run_dir)
    paths = importlib.import_module(module).redraw(run_dir)
    assert sorted(p.name for p in paths) == sorted([f"{stem}.pdf", f"{stem}.png"])
    pdf, png = (run_dir / f"{stem}.pdf").read_bytes(), (run_dir / f"{stem}.png").read_bytes()
    assert pdf.startswith(b"%PDF") and b"/FontFile2" in pdf and b"/Type3" not in pdf
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_transfer_figure_shows_fit_bound_and_theorem():
    from figures import deng2024
    from ftsim.core.io import read_jsonl

    fig = deng2024.build(DATA)
    text = all_text(fig)
    fits = {r["rep"]: r for r in read_jsonl(DATA / "transfer_fit.jsonl")}
    for rep in ("hidden", "output"):
        assert f"= {fits[rep]['pooled_beta']:.2f}" in text  # the fitted beta is printed in its legend
    assert "proven" in text and "Pinsker" in text and "bound, all terms" in text
    a, b = fig.axes[:2]
    assert a.get_xscale() == "log" and a.get_yscale() == "log"
    # the proven line E_pre / 2 appears on the output panel only
    assert any("proven" in ln.get_label() for ln in b.get_lines())
    assert not any("proven" in ln.get_label() for ln in a.get_lines())


def test_radreg_figure_has_one_tick_per_weight():
    from figures import deng2024_radreg
    from ftsim.core.io import read_jsonl

    lams = sorted({r["radreg"] for r in read_jsonl(DATA / "checkpoints.jsonl")})
    fig = deng2024_radreg.build(DATA)
    for ax in fig.axes[:3]:
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert labels[0] == "0 (MLM)" and len(labels) == len(lams)
