"""What the SMART figures (figures/smart.py) must show beyond the checks tests/test_figures.py runs on every figure
(legends off the data, labelled axes, stated spread, no hidden series, PDF + PNG): four panels with every method of
the tables, a stated spread, the sensitivity axis logarithmic when it spans a decade, and an error on empty tables.
Fixtures: tests/data/figures/smart-synthetic (a quick ``smart-synthetic`` run) and tests/data/figures/smart (a
tiny-causal ``smart`` run, two tasks)."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

from tests.test_figures import all_text, shows_spread  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "figures"
CASES = [("build_synthetic", "smart-synthetic"), ("build", "smart")]


@pytest.mark.parametrize("build, fixture", CASES, ids=[c[1] for c in CASES])
def test_four_panels_every_method_and_a_stated_spread(build, fixture):
    from figures import smart

    fig = getattr(smart, build)(DATA / fixture)
    fig.canvas.draw()
    assert shows_spread(fig) and re.search(r"mean ± sample s\.d\., \d+(–\d+)? seeds", all_text(fig))
    from ftsim.core.io import read_jsonl

    panels = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title()[:3] for ax in panels] == ["(a)", "(b)", "(c)", "(d)"]
    methods = {r["method"] for r in read_jsonl(DATA / fixture / "results.jsonl")}
    shown = {t.get_text() for t in panels[0].get_yticklabels()}
    assert len(shown) == len(methods)
    sens = [r["value"] for r in read_jsonl(DATA / fixture / "results.jsonl") if r["metric"] == "sensitivity"]
    assert panels[2].get_xscale() == ("log" if max(sens) / min(sens) >= 10 else "linear")


def test_empty_rows_are_an_error(tmp_path):
    from figures import smart

    (tmp_path / "results.jsonl").write_text("")
    with pytest.raises(ValueError, match="no result rows"):
        smart.build(tmp_path)
