"""Every figure, drawn from stored tidy tables, as a reviewer would check it.

Each case is a figure target ``"module:function"`` (``function(run_dir) -> Figure``, not saved) and a fixture
directory under ``tests/data/figures/`` holding the tables a run writes (copied from real quick runs; the malladi
ones from tiny random-model runs and one SmolLM2 seed). For every case:

1. no legend covers plotted data: after ``fig.canvas.draw()`` each legend's window extent must contain no line
   vertex or point on a line segment, no scatter point, no band or bar edge of any axes of the figure (display
   coordinates; only what lies inside its axes, i.e. what is drawn), and no axis label, tick label or title;
2. every axes that shows data has an x and a y label, and no axis label runs into another axes;
3. error bars and bands come with a statement of what they are ("sample s.d." with a count, or "no spread");
4. no series lies exactly on top of another with the same marker;
5. the module's ``redraw(run_dir)`` writes ``<stem>.pdf`` (TrueType fonts, fonttype 42) and ``<stem>.png``.

The checks are shown to fail on small synthetic figures built to break them. Figure-specific tests pin the
reviewer's points (two Bonferroni thresholds, K-SGD (logistic) shown, the setting printed, w for width, ...).
"""

from __future__ import annotations

import ast
import importlib
import re
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.container import ErrorbarContainer  # noqa: E402
from matplotlib.legend import Legend  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "figures"

# (figure target, fixture directory, stem that redraw writes): every figure module's build function on a stored
# run directory; "build_x" is redrawn by "redraw_x". Module-specific checks live in tests/test_figures_<module>.py.
CASES = [
    ("figures.hmm:build", "hmm-exactness", "hmm_exactness"),
    ("figures.wei2021:build", "wei2021-exp1", "wei2021_exp1"),
    ("figures.wei2021:build", "wei2021-exp2", "wei2021_exp2"),
    ("figures.ntk:build", "ntk-width", "ntk_width"),
    ("figures.malladi:build", "malladi/tiny-causal", "malladi"),
    ("figures.malladi:build", "malladi/tiny-encoder", "malladi"),
    ("figures.malladi:build", "malladi/smollm2-sst2-seed13", "malladi"),
    ("figures.lpft:build", "lpft-synthetic", "lpft"),
    ("figures.lpft:build", "lpft/tiny-causal", "lpft"),
    ("figures.deng2024:build", "deng2024", "deng2024_transfer"),
    ("figures.deng2024_radreg:build", "deng2024", "deng2024_radreg"),
    ("figures.sparse:build_synthetic", "sparse-synthetic", "sparse_synthetic"),
    ("figures.sparse:build", "sparse/tiny-causal", "sparse"),
    ("figures.smart:build_synthetic", "smart-synthetic", "smart_synthetic"),
    ("figures.smart:build", "smart", "smart"),
]
IDS = [f"{t.split(':')[0].split('.')[-1]}{t.split(':')[1][5:]}-{d.replace('/', '-')}" for t, d, _ in CASES]


def load(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------------------------------------------- geometry

def _densify(xy: np.ndarray, step: float = 1.5) -> np.ndarray:
    """Points along a display-space polyline, at most ``step`` pixels apart (so a legend lying across a segment
    whose end points are both outside it is still seen)."""
    xy = xy[np.all(np.isfinite(xy), axis=1)]
    if len(xy) < 2:
        return xy
    out = [xy[:1]]
    for p, q in zip(xy[:-1], xy[1:]):
        k = int(min(np.ceil(np.hypot(*(q - p)) / step), 4000))
        if k > 0:
            t = np.linspace(0, 1, k + 1)[1:, None]
            out.append(p + t * (q - p))
    return np.concatenate(out)


def data_points(ax) -> np.ndarray:
    """Display coordinates of everything ``ax`` draws as data, limited to the axes' own window (what is drawn)."""
    pts = []
    for line in ax.get_lines():
        if not line.get_visible():
            continue
        xy = line.get_transform().transform(np.asarray(line.get_xydata(), float))
        pts.append(_densify(xy) if line.get_linestyle() not in ("None", "none", "", " ") else xy)
    for coll in ax.collections:
        if not coll.get_visible():
            continue
        if isinstance(coll, PathCollection):  # scatter: the offsets are the points
            offs = np.asarray(coll.get_offsets(), float)
            if offs.size:
                pts.append(coll.get_offset_transform().transform(offs))
            continue
        for path in coll.get_paths():  # line collections (error bars), polygons (bands)
            if len(path.vertices):
                pts.append(_densify(coll.get_transform().transform(path.vertices)))
    for patch in ax.patches:  # bars, histograms
        if patch.get_visible():
            pts.append(_densify(patch.get_transform().transform(patch.get_path().vertices)))
    if not pts:
        return np.zeros((0, 2))
    pts = np.concatenate(pts)
    box = ax.bbox
    inside = (pts[:, 0] >= box.x0 - 0.5) & (pts[:, 0] <= box.x1 + 0.5) & \
             (pts[:, 1] >= box.y0 - 0.5) & (pts[:, 1] <= box.y1 + 0.5)
    return pts[inside]


def drawn_ticklabels(ax) -> list:
    """Tick labels that are drawn: those of ticks inside the view interval (a locator also returns others)."""
    out = []
    for axis, lim, coord in ((ax.xaxis, sorted(ax.get_xlim()), 0), (ax.yaxis, sorted(ax.get_ylim()), 1)):
        for t in axis.get_ticklabels():
            v = t.get_position()[coord]
            if lim[0] - 1e-12 * abs(lim[0]) <= v <= lim[1] + 1e-12 * abs(lim[1]):
                out.append(t)
    return out


def filled_patches(ax):
    return [p for p in ax.patches if p.get_visible() and p.get_fill()]


def _inner(bbox: Bbox, margin: float = 1.0) -> Bbox:
    return Bbox.from_extents(bbox.x0 + margin, bbox.y0 + margin, bbox.x1 - margin, bbox.y1 - margin)


def legend_overlaps(fig) -> list[str]:
    """Every legend of ``fig`` that covers data, an axis label, a tick label or a title; [] when none does."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = [ax for ax in fig.get_axes() if ax.get_visible()]
    problems = []
    for leg in fig.findobj(Legend):
        if not leg.get_visible():
            continue
        box = _inner(leg.get_window_extent(renderer))
        name = (leg.get_title().get_text() or "legend")[:40]
        for i, ax in enumerate(axes):
            pts = data_points(ax)
            hit = (pts[:, 0] > box.x0) & (pts[:, 0] < box.x1) & (pts[:, 1] > box.y0) & (pts[:, 1] < box.y1)
            if hit.any():
                problems.append(f"legend {name!r} covers {int(hit.sum())} data points of axes {i} "
                                f"({ax.get_title()!r})")
            corners = [(box.x0, box.y0), (box.x0, box.y1), (box.x1, box.y0), (box.x1, box.y1),
                       ((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2)]
            for patch in filled_patches(ax):
                path = patch.get_transform().transform_path(patch.get_path())
                if any(path.contains_point(c) for c in corners):
                    problems.append(f"legend {name!r} lies on a filled patch of axes {i}")
                    break
            texts = [ax.xaxis.label, ax.yaxis.label, ax.title, *drawn_ticklabels(ax)]
            for t in texts:
                if t.get_visible() and t.get_text() and box.overlaps(_inner(t.get_window_extent(renderer))):
                    problems.append(f"legend {name!r} covers text {t.get_text()!r} of axes {i}")
    return problems


def _texts_of(ax) -> list:
    return [ax.xaxis.label, ax.yaxis.label, ax.title, *drawn_ticklabels(ax)]


def _span(ax, axis, renderer) -> Bbox:
    """The frame of ``ax`` together with the label and the drawn tick labels of one of its axes."""
    ticks = [t for t in drawn_ticklabels(ax) if t in axis.get_ticklabels()]
    boxes = [ax.bbox] + [t.get_window_extent(renderer) for t in [axis.label, *ticks] if t.get_text()]
    return Bbox.union(boxes)


def label_problems(fig) -> list[str]:
    """Axes without an x or y label, and axis labels that run into another axes: over its frame, its tick or axis
    labels or title, or -- for an x label -- under a neighbour in the same row (a y label: in the same column);
    [] when none."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = [ax for ax in fig.get_axes() if ax.get_visible() and ax.axison]
    problems = []
    for i, ax in enumerate(axes):
        for which, label in (("x", ax.xaxis.label), ("y", ax.yaxis.label)):
            if not label.get_text().strip():
                problems.append(f"axes {i} ({ax.get_title()!r}) has no {which} label")
                continue
            ext = _inner(label.get_window_extent(renderer))
            for j, other in enumerate(axes):
                if j == i:
                    continue
                o = other.bbox
                boxes = [o] + [t.get_window_extent(renderer) for t in _texts_of(other) if t.get_text()]
                if which == "x":  # the neighbour's column: its frame, y label and y tick labels
                    span = _span(other, other.yaxis, renderer)
                    under = o.y0 < ax.bbox.y1 and o.y1 > ax.bbox.y0 and ext.x1 > span.x0 and ext.x0 < span.x1
                else:  # the neighbour's row: its frame, x label and x tick labels
                    span = _span(other, other.xaxis, renderer)
                    under = o.x0 < ax.bbox.x1 and o.x1 > ax.bbox.x0 and ext.y1 > span.y0 and ext.y0 < span.y1
                if under or any(ext.overlaps(bx) for bx in boxes):
                    problems.append(f"{which} label {label.get_text()!r} of axes {i} runs into axes {j}")
    return problems


def hidden_series(fig) -> list[str]:
    """Pairs of line series drawn at the same display points (within half a pixel) where neither marker is drawn
    around the other (one hides the other); [] when none."""
    fig.canvas.draw()
    problems = []
    for ax in fig.get_axes():
        # error-bar caps ('_', '|') of a zero-width bar coincide by construction; they are not series
        lines = [ln for ln in ax.get_lines() if ln.get_visible() and len(ln.get_xydata()) >= 2
                 and ln.get_marker() not in ("_", "|")]
        xy = [ln.get_transform().transform(np.asarray(ln.get_xydata(), float)) for ln in lines]
        for i in range(len(lines)):
            for j in range(i + 1, len(lines)):
                a, b = lines[i], lines[j]
                if xy[i].shape != xy[j].shape or not np.allclose(xy[i], xy[j], atol=0.5):
                    continue
                # A marker at least 1.5x the other's (drawn around it) keeps both visible; otherwise the one on
                # top hides the other, whatever the shape, colour or dash pattern.
                ms = sorted(ln.get_markersize() if ln.get_marker() not in (None, "None", "", " ") else 0.0
                            for ln in (a, b))
                if ms[1] < 1.5 * ms[0] or ms[1] == 0:
                    problems.append(f"{a.get_label()!r} and {b.get_label()!r} coincide in {ax.get_title()!r}")
    return problems


def all_text(fig) -> str:
    parts = [t.get_text() for t in fig.findobj(matplotlib.text.Text)]
    return "\n".join(p for p in parts if p)


def shows_spread(fig) -> bool:
    for ax in fig.get_axes():
        if any(isinstance(c, ErrorbarContainer) for c in ax.containers):
            return True
        if any(type(c).__name__ in ("PolyCollection", "FillBetweenPolyCollection") for c in ax.collections):
            return True
    return False


# ---------------------------------------------------------------------------------------------------- the checks

@pytest.fixture(scope="module", params=CASES, ids=IDS)
def built(request):
    target, fixture, _ = request.param
    fig = load(target)(DATA / fixture)
    fig.canvas.draw()
    return request.param, fig


def test_no_legend_covers_data(built):
    (target, fixture, _), fig = built
    assert fig.findobj(Legend), f"{target} on {fixture}: no legend at all"
    assert legend_overlaps(fig) == []


def test_every_axes_is_labelled(built):
    _, fig = built
    assert label_problems(fig) == []


def test_spread_is_stated(built):
    (target, fixture, _), fig = built
    if not shows_spread(fig):
        return
    text = all_text(fig)
    stated = re.search(r"sample s\.d\., \d+(–\d+)? (data )?(seed|run|HMM|task)s?", text) or "no spread" in text
    assert stated, f"{target} on {fixture} draws error bars or bands without saying what they are:\n{text}"


def test_no_series_hides_another(built):
    _, fig = built
    assert hidden_series(fig) == []


@pytest.mark.parametrize("target, fixture, stem", CASES, ids=IDS)
def test_redraw_writes_pdf_and_png(tmp_path, target, fixture, stem):
    run_dir = tmp_path / "run"
    shutil.copytree(DATA / fixture, run_dir)
    module, _, build = target.partition(":")
    redraw = getattr(importlib.import_module(module), build.replace("build", "redraw", 1))
    paths = [Path(p) for p in redraw(run_dir)]
    assert sorted(p.name for p in paths) == sorted([f"{stem}.pdf", f"{stem}.png"])
    pdf, png = (run_dir / f"{stem}.pdf").read_bytes(), (run_dir / f"{stem}.png").read_bytes()
    assert pdf.startswith(b"%PDF") and b"/FontFile2" in pdf and b"/Type3" not in pdf  # TrueType, fonttype 42
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert not list(run_dir.glob("*.tmp*")), "a temporary file was left behind"


# ------------------------------------------------------------------------------------------ the checks can fail

def _synthetic(legend_loc: str | None = "center", bars: bool = False, hline: bool = False):
    from figures import style

    fig, ax = style.figure(width=3, height=2.4)
    x = np.linspace(0, 1, 11)
    if hline:
        ax.axhline(0.5, color="k")  # vertices only at the axes' edges
        ax.plot([0, 1], [0, 1], alpha=0)  # scale
        ax.plot([], [], label="entry")
    elif bars:
        ax.bar(x, np.ones_like(x), width=0.09, label="bars")
    else:
        ax.plot(x, x, marker="o", label="y = x")
        ax.plot(x, 1 - x, marker="s", label="y = 1 - x")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    if legend_loc:
        ax.legend(loc=legend_loc, frameon=True)
    return fig


def test_overlap_check_catches_a_legend_on_the_data():
    assert legend_overlaps(_synthetic("center")), "a legend placed on the crossing of two lines was not caught"


def test_overlap_check_catches_a_legend_across_a_line_between_vertices():
    assert legend_overlaps(_synthetic("center", hline=True))


def test_overlap_check_catches_a_legend_on_bars():
    assert legend_overlaps(_synthetic("center", bars=True))


def test_overlap_check_passes_a_legend_outside():
    from figures import style

    fig = _synthetic(None)
    ax = fig.axes[0]
    style.legend_below(ax)
    style.finish(fig)
    assert legend_overlaps(fig) == []


def test_label_check_catches_missing_and_colliding_labels():
    from figures import style

    fig, (a, b) = style.figure(ncols=2, width=3.5, height=2)
    for ax in (a, b):
        ax.plot([0, 1], [0, 1])
    a.set_xlabel("x")
    b.set_xlabel("x")
    b.set_ylabel("y")
    assert any("no y label" in p for p in label_problems(fig))
    a.set_ylabel("y")
    assert label_problems(fig) == []
    # the old experiment-2 figure: a long x label centred under (a) runs on under (b)
    a.set_xlabel("total hidden states (memory: 4 syntax x N memory values; n = 10)")
    assert any("runs into axes 1" in p for p in label_problems(fig))


def test_hidden_series_check_catches_identical_curves():
    from figures import style

    fig, ax = style.figure(width=3, height=2)
    ax.plot([1, 2, 3], [1, 2, 3], "o-", label="a")
    ax.plot([1, 2, 3], [1, 2, 3.0005], "s--", label="b")  # the old ntk-width panel (a): a dashed twin on top
    assert hidden_series(fig)
    ax.lines[1].set_markersize(3 * ax.lines[0].get_markersize())  # a large marker around the small one
    assert hidden_series(fig) == []


# --------------------------------------------------------------------------------------- the reviewer's points

def test_hmm_two_bonferroni_thresholds():
    from figures import hmm

    fig = hmm.build(DATA / "hmm-exactness")
    a = fig.axes[0]
    xs = sorted({round(abs(ln.get_xdata()[0]), 6) for ln in a.get_lines()
                 if len(set(np.atleast_1d(ln.get_xdata()))) == 1})
    expected = sorted(round(hmm.bonferroni_threshold(n), 6) for n in (128, 192))
    assert xs == expected and [round(v, 2) for v in expected] == [4.47, 4.56]
    text = all_text(fig)
    assert "4.47" in text and "4.56" in text and "128 cells" in text and "192 cells" in text
    ylabels = [ax.get_ylabel() for ax in fig.axes if ax.axison]
    assert len(set(ylabels)) == len(ylabels)  # one quantity per y label
    assert "relative" in ylabels[1] and "absolute" in ylabels[2]
    assert "(no reference)" in text  # |sum - 1| is not against hmmlearn


def test_wei2021_exp1_series_are_told_apart():
    from figures import wei2021

    fig = wei2021.build(DATA / "wei2021-exp1")
    a, b, c, d = (ax for ax in fig.axes if ax.axison)
    colours = {tuple(np.round(matplotlib.colors.to_rgba(ln.get_color()), 3)) for ln in a.get_lines()
               if ln.get_marker() not in (None, "None", "")}
    assert len(colours) >= 3
    text = all_text(fig)
    assert "mean ± sample s.d., 2 runs (1 HMM × 2 tasks)" in text
    assert any("causal LM" in t.get_text() for t in d.get_legend().get_texts())  # causal named, not a colour
    assert "one HMM per curve: no spread" in text  # (c)-(d): no bands with one HMM, and it says so


def test_wei2021_exp2_axis_and_curves():
    from figures import wei2021

    fig = wei2021.build(DATA / "wei2021-exp2")
    a, b, c, d = (ax for ax in fig.axes if ax.axison)
    assert "×" in a.get_xlabel() and " x " not in a.get_xlabel()
    styles = {(ln.get_color(), ln.get_marker()) for ln in a.get_lines() if ln.get_marker() not in ("None", "")}
    assert len(styles) >= 3  # memory + attention and memory + linear head no longer share colour and marker
    for ax in (c, d):
        cols = [ln.get_color() for ln in ax.get_lines()]
        assert len(set(cols)) == len(cols) and "#F0E442" not in cols
        assert "G_0" not in ax.get_ylabel()


def test_ntk_width_is_w_and_references_are_not_legend_entries():
    from figures import ntk

    fig = ntk.build(DATA / "ntk-width")
    text = all_text(fig)
    assert "hidden width w" in text and "w = 64" in text
    assert not re.search(r"width n\b|\bn = \d|n\^\{-", text)
    for leg in fig.findobj(Legend):
        for t in leg.get_texts():
            assert "propto" not in t.get_text() and "∝" not in t.get_text()


def test_malladi_dot_plot_setting_and_methods():
    from figures import malladi

    fig = malladi.build(DATA / "malladi" / "smollm2-sst2-seed13")
    a = fig.axes[0]
    methods = [t.get_text() for t in a.get_yticklabels()]
    assert "K-SGD (logistic)" in methods
    assert not [p for p in a.patches if p.get_height() > 0]  # no bars
    chance = [ln for ln in a.get_lines() if np.allclose(ln.get_xdata(), 50)]
    assert chance and a.get_xlim()[0] <= 50
    sup = fig._suptitle.get_text()  # noqa: SLF001
    assert "SmolLM2-135M-Instruct" in sup and "k = 16" in sup and "100 test examples" in sup
    text = all_text(fig)
    assert "zero-shot, SST-2" in text and "one data seed per point: no spread" in text

    fig = malladi.build(DATA / "malladi" / "tiny-causal")
    text = all_text(fig)
    assert "value of one data seed" in text and "2 data seeds" in text
    assert "4 test examples" in text  # the diagnostics' test size, not the accuracy test size


def test_malladi_combine_writes_table(tmp_path):
    from figures import malladi

    paths = malladi.combine([DATA / "malladi" / "tiny-causal", DATA / "malladi" / "smollm2-sst2-seed13"],
                            tmp_path / "m")
    assert {p.suffix for p in paths} == {".pdf", ".png", ".md"}
    md = (tmp_path / "m.md").read_text()
    assert "| K-SGD (logistic) |" in md and "| method | SST-2 |" in md


# ---------------------------------------------------------------------------------------------------- layering

FORBIDDEN = ("simulate", "real_tasks", "theory", "torch", "transformers")


def _forbidden(name: str) -> bool:
    top = name.split(".")[0]
    return top in FORBIDDEN or (top == "ftsim" and not (name == "ftsim" or name.startswith("ftsim.core")))


@pytest.mark.parametrize("path", sorted((REPO / "figures").glob("*.py")), ids=lambda p: p.name)
def test_figures_import_only_core_and_plotting(path):
    """figures/ reads tidy tables and draws: ftsim.core, matplotlib, numpy, scipy and the standard library."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    assert [n for n in names if _forbidden(n)] == []
