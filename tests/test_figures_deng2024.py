"""What the deng2024 figures must show beyond the checks tests/test_figures.py runs on every figure (legends off
the data, labelled axes, stated spread, no hidden series, PDF + PNG): a spread stated with the fixture's number of
seeds, the fit, the bound and the proven line where they belong, one tick per RadReg weight."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from tests.test_figures import all_text, shows_spread

DATA = Path(__file__).resolve().parent / "data" / "figures" / "deng2024"


@pytest.mark.parametrize("module", ["figures.deng2024", "figures.deng2024_radreg"])
def test_spread_is_stated_with_the_fixtures_seed_count(module):
    from ftsim.core.io import read_jsonl

    fig = importlib.import_module(module).build(DATA)
    seeds = len({r["seed"] for r in read_jsonl(DATA / "checkpoints.jsonl")})
    assert shows_spread(fig)
    assert re.search(rf"sample s\.d\., {seeds} seeds", all_text(fig))


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
