"""The sparse fine-tuning figures (figures/sparse.py), drawn from fixture tables copied from real runs
(``sparse-synthetic --preset quick``; ``sparse`` on the tiny random causal LM), with the checks of
tests/test_figures.py: no legend on data, every axes labelled, spread stated, no hidden series, PDF + PNG written."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib.legend import Legend

from tests.test_figures import all_text, hidden_series, label_problems, legend_overlaps, shows_spread

DATA = Path(__file__).resolve().parent / "data" / "figures"
CASES = [("build_synthetic", "redraw_synthetic", "sparse-synthetic", "sparse_synthetic"),
         ("build", "redraw", "sparse/tiny-causal", "sparse")]
IDS = [c[2].replace("/", "-") for c in CASES]


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def built(request):
    from figures import sparse

    build, _, fixture, _ = request.param
    fig = getattr(sparse, build)(DATA / fixture)
    fig.canvas.draw()
    return request.param, fig


def test_no_legend_covers_data(built):
    _, fig = built
    assert fig.findobj(Legend)
    assert legend_overlaps(fig) == []


def test_every_axes_is_labelled(built):
    _, fig = built
    assert label_problems(fig) == []


def test_spread_is_stated(built):
    _, fig = built
    assert shows_spread(fig)
    assert re.search(r"sample s\.d\., \d+(–\d+)? (data )?seeds", all_text(fig))


def test_no_series_hides_another(built):
    _, fig = built
    assert hidden_series(fig) == []


@pytest.mark.parametrize("build, redraw, fixture, stem", CASES, ids=IDS)
def test_redraw_writes_pdf_and_png(tmp_path, build, redraw, fixture, stem):
    from figures import sparse

    run_dir = tmp_path / "run"
    shutil.copytree(DATA / fixture, run_dir)
    paths = [Path(p) for p in getattr(sparse, redraw)(run_dir)]
    assert sorted(p.name for p in paths) == sorted([f"{stem}.pdf", f"{stem}.png"])
    pdf = (run_dir / f"{stem}.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and b"/FontFile2" in pdf and b"/Type3" not in pdf
    assert (run_dir / f"{stem}.png").read_bytes().startswith(b"\x89PNG")


def test_synthetic_panels_show_what_the_tables_hold():
    from figures import sparse
    from ftsim.core.io import read_jsonl

    fig = sparse.build_synthetic(DATA / "sparse-synthetic")
    a, b, c, d = (ax for ax in fig.axes if ax.axison)
    stab = [r for r in read_jsonl(DATA / "sparse-synthetic" / "stability.jsonl") if r["variant"] == "expected"]
    # every measured mean lies below the drawn bound of its setting (the figure shows Thm 1 holding)
    for key, label in sparse.SETTINGS:
        meas = next(cont.lines[0] for cont in a.containers if cont.get_label() == f"{label}: measured")
        bound = next(ln for ln in a.get_lines() if ln.get_label() == f"{label}: Thm 1 bound")
        ps = sorted({r["p"] for r in stab if r["setting"] == key})
        want = [np.mean([r["stability"] for r in stab if r["setting"] == key and r["p"] == p]) for p in ps]
        np.testing.assert_allclose(meas.get_ydata(), want)
        assert (np.asarray(meas.get_ydata()) < np.asarray(bound.get_ydata())).all()
    assert b.get_xscale() == "log" and c.get_xscale() == "log" and "rank" in c.get_xlabel()
    text = all_text(fig)
    assert "r^{-1/2}" in text and "output distance" in text


def test_real_figure_places_families_without_p_at_their_share():
    from figures import sparse
    from ftsim.core.io import read_jsonl

    fig = sparse.build(DATA / "sparse" / "tiny-causal")
    a = fig.axes[0]
    rows = read_jsonl(DATA / "sparse" / "tiny-causal" / "results.jsonl")
    lora = np.mean([r["p_effective"] for r in rows if r["method"] == "LoRA" and r["metric"] == "accuracy"])
    xs = [cont.lines[0].get_xdata() for cont in a.containers if cont.get_label() == "LoRA"][0]
    assert 0.5 * lora < float(xs[0]) < 2 * lora  # at its share of entries (dodged by at most a factor 1.06^6)
    assert "tiny-causal" in fig._suptitle.get_text()  # noqa: SLF001
