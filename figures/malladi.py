"""Figure: prompt-based fine-tuning vs its eNTK on real tasks (``ftsim run malladi``).

Drawn from tidy rows only (``results.jsonl`` of one or more runs; columns task, model, k, seed, method, metric,
value, n_test):

* (a) a dot plot of test accuracy, one row per method and one colour and marker per task: the mean over data
  seeds with +-1 sample standard deviation (:func:`ftsim.core.tables.summarize`), every seed's value as a small
  dot, and the chance level 1/C marked. Dots, not bars: a bar's length would read as accuracy above an arbitrary
  baseline.
* (b) the linearised model f(theta_0) + <grad f(theta_0), theta_FT - theta_0> against fine-tuning, one point per
  seed (on the diagonal: the first-order Taylor expansion around theta_0 recovers the fine-tuned model's
  accuracy), with zero-shot, where every model starts, marked per task on the diagonal, and the eNTK movement
  ||K_FT - K_0||_F / ||K_0||_F in the legend.

The model, k (examples per class) and the test-set sizes are read from the rows and printed on the figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from figures import style
from ftsim.core.io import atomic_write_text, read_jsonl
from ftsim.core.tables import aggregate, markdown_table, mean_std, summarize

__all__ = ["METHODS", "build_figure", "build", "draw", "redraw", "combine", "table_markdown"]

# (method, label) in drawing order, top to bottom: each fine-tuning method next to its eNTK solutions.
METHODS: tuple[tuple[str, str], ...] = (
    ("zero-shot", "zero-shot"),
    ("FT-SGD", "FT-SGD"), ("K-SGD", "K-SGD"), ("K-SGD (logistic)", "K-SGD (logistic)"),
    ("FT-Adam", "FT-Adam"), ("K-A-SignGD", "K-A-SignGD"),
    ("FT (no prompt)", "FT, no prompt"), ("K-SGD (no prompt)", "K-SGD, no prompt"),
    ("K-SGD (no prompt, logistic)", "K-SGD (logistic), no prompt"),
)
KERNEL_METHODS = {"K-SGD", "K-SGD (logistic)", "K-A-SignGD", "K-SGD (no prompt)", "K-SGD (no prompt, logistic)"}
# The papers' task order (LM-BFF), for tables and legends; unknown tasks follow in order of appearance.
TASK_ORDER = ("SST-2", "SST-5", "MR", "CR", "MPQA", "Subj", "TREC", "AG News", "MNLI", "SNLI", "QNLI", "RTE",
              "MRPC", "QQP")
# Classes per task, for the chance level 1/C when the rows carry no ``num_classes`` column (they do not yet).
NUM_CLASSES = {"SST-2": 2, "SST-5": 5, "MR": 2, "CR": 2, "MPQA": 2, "Subj": 2, "TREC": 6, "AG News": 4,
               "MNLI": 3, "SNLI": 3, "QNLI": 2, "RTE": 2, "MRPC": 2, "QQP": 2}
# Display names of ftsim's model aliases (anything else is printed as the rows have it).
MODEL_NAMES = {"smollm2": "SmolLM2-135M-Instruct", "minilm": "all-MiniLM-L6-v2"}

_FT_COLORS = {"FT-SGD": style.PALETTE[0], "FT-Adam": style.PALETTE[1]}


# ---------------------------------------------------------------------------------------------------- rows

def _tasks(rows: Sequence[dict]) -> list[str]:
    seen = list(dict.fromkeys(r["task"] for r in rows))
    order = {t: i for i, t in enumerate(TASK_ORDER)}
    return sorted(seen, key=lambda t: (order.get(t, len(order)), seen.index(t)))


def _values(rows: Sequence[dict], task: str, method: str, metric: str = "accuracy") -> list[float]:
    return [float(r["value"]) for r in rows if r["task"] == task and r["method"] == method
            and r["metric"] == metric and r.get("value") is not None]


def _chance(rows: Sequence[dict], task: str) -> float | None:
    c = next((r["num_classes"] for r in rows if r["task"] == task and r.get("num_classes")), None)
    c = c or NUM_CLASSES.get(task)
    return 100.0 / c if c else None


def _join(values) -> str:
    vals = list(dict.fromkeys(str(v) for v in values if v is not None))
    return ", ".join(vals) if vals else "?"


def _setting(rows: Sequence[dict], tasks: Sequence[str]) -> str:
    """'SmolLM2-135M-Instruct, k = 16 per class, test sets: 100 (SST-2), ...' from the rows."""
    models = _join(MODEL_NAMES.get(r.get("model"), r.get("model")) for r in rows)
    ks = _join(r.get("k") for r in rows)
    acc = [r for r in rows if r["metric"] == "accuracy"]
    per_task = {t: _join(r.get("n_test") for r in acc if r["task"] == t) for t in tasks}
    if len(set(per_task.values())) == 1:
        test = f"{next(iter(per_task.values()))} test examples per task"
    else:
        test = "test examples: " + ", ".join(f"{n} ({t})" for t, n in per_task.items())
    return f"{models}; k = {ks} examples per class; {test}"


# ---------------------------------------------------------------------------------------------------- panels

def _accuracy_panel(ax, rows: Sequence[dict], tasks: Sequence[str], present: Sequence[tuple[str, str]]):
    """Dot plot: methods down the y axis, accuracy (%) along x; returns the legend entries."""
    rng = np.random.default_rng(0)  # vertical jitter of the per-seed dots only
    band = 0.7 / max(len(tasks), 1)
    ns: list[int] = []
    lo = 100.0
    for t, task in enumerate(tasks):
        col, mk = style.color(t), style.MARKERS[t % len(style.MARKERS)]
        for j, (method, _) in enumerate(present):
            vals = 100 * np.array(_values(rows, task, method))
            if not vals.size:
                continue
            y = j + (t - (len(tasks) - 1) / 2) * band
            st = summarize(vals)
            if method != "zero-shot":  # one value without a seed; said in the legend title
                ns.append(st.n)
            lo = min(lo, float(vals.min()))
            if st.n > 1:
                ax.scatter(vals, y + rng.uniform(-0.25, 0.25, vals.size) * band, s=5, color=col, alpha=0.45,
                           linewidths=0, zorder=2)
            ax.errorbar([st.mean], [y], xerr=[st.std] if np.isfinite(st.std) else None, fmt=mk, color=col,
                        ms=4.5, mfc="white" if method in KERNEL_METHODS else col, mew=1.1, capsize=2,
                        elinewidth=0.9, zorder=3)
    chances = {task: _chance(rows, task) for task in tasks}
    drawn = sorted({c for c in chances.values() if c is not None})
    for c in drawn:
        ax.axvline(c, color="0.35", ls=":", lw=0.9, zorder=1)
    ax.set_yticks(range(len(present)))
    ax.set_yticklabels([label for _, label in present])
    ax.set_ylim(len(present) - 0.5, -0.5)  # first method on top
    ax.grid(False, axis="y")
    for j in range(1, len(present)):
        ax.axhline(j - 0.5, color="0.9", lw=0.5, zorder=0)
    left = min([lo] + drawn) - 5
    ax.set_xlim(max(0.0, 10 * np.floor(left / 10)), 100)
    ax.set_xlabel("test accuracy (%)")
    ax.set_ylabel("method")

    handles = [Line2D([], [], color=style.color(t), marker=style.MARKERS[t % len(style.MARKERS)], ls="none",
                      ms=4.5) for t in range(len(tasks))]
    labels = list(tasks)
    if any(m in KERNEL_METHODS for m, _ in present):
        handles.append(Line2D([], [], color="0.4", marker="o", mfc="white", ls="none", ms=4.5))
        labels.append("hollow: eNTK solution (K-*)")
    if any(n > 1 for n in ns):
        handles.append(Line2D([], [], color="0.4", marker="o", ls="none", ms=2.5, alpha=0.6))
        labels.append("value of one data seed")
    for c in drawn:
        handles.append(Line2D([], [], color="0.35", ls=":", lw=0.9))
        labels.append(f"chance {c:.0f}% (" + ", ".join(t for t in tasks if chances[t] == c) + ")")
    note = style.spread_note(ns, "data seed")
    if any(m == "zero-shot" for m, _ in present):
        note += " (zero-shot: one value)"
    return handles, labels, note


def _linearised_panel(ax, rows: Sequence[dict], tasks: Sequence[str]):
    """Linearised-model accuracy vs fine-tuned accuracy, per seed; returns legend entries and title."""
    markers = {task: style.MARKERS[i % len(style.MARKERS)] for i, task in enumerate(tasks)}
    pts, n_tests, methods, shown_tasks = [], set(), [], []
    zero_shot: dict[str, list[float]] = {}
    movement: dict[str, list[str]] = {}
    for method, color in _FT_COLORS.items():
        for task in tasks:
            by_seed: dict = {}
            for r in rows:
                if r["task"] == task and r["method"] == method:
                    by_seed.setdefault(r.get("seed"), {})[r["metric"]] = r
            got = [d for d in by_seed.values() if "ft_accuracy_diag" in d and "linearized_accuracy" in d]
            if not got:
                continue
            ft = 100 * np.array([d["ft_accuracy_diag"]["value"] for d in got], float)
            lin = 100 * np.array([d["linearized_accuracy"]["value"] for d in got], float)
            n_tests.update(d["linearized_accuracy"].get("n_test") for d in got)
            zero_shot.setdefault(task, []).extend(100 * d["zero_shot_accuracy_diag"]["value"] for d in got
                                                  if d.get("zero_shot_accuracy_diag", {}).get("value") is not None)
            kd = summarize(d["kernel_rel_change"]["value"] for d in got if "kernel_rel_change" in d)
            if kd.n:
                movement.setdefault(method, []).append(f"{mean_std(kd, 1, 2)} ({task})")
            # FT-SGD large, FT-Adam small on top: equal points stay visible as a marker in a marker.
            big = method == "FT-SGD"
            ax.scatter(ft, lin, s=30 if big else 11, marker=markers[task], color=color, alpha=0.9,
                       zorder=3 if big else 4, linewidths=0)
            methods += [method] if method not in methods else []
            shown_tasks += [task] if task not in shown_tasks else []
            pts += [*ft, *lin]
    for task, zs in zero_shot.items():
        z = summarize(zs).mean
        ax.scatter([z], [z], s=44, marker=markers[task], facecolor="none", edgecolor="k", lw=0.9, zorder=5)
        pts.append(z)
    if not pts:
        ax.text(0.5, 0.5, "no diagnostics in this run", ha="center", va="center", transform=ax.transAxes)
        return [], [], None
    lo, hi = min(pts), max(pts)
    pad = max(2.0, 0.08 * (hi - lo))
    lims = [max(0.0, lo - pad), min(100.0, hi + pad)]  # accuracies: never past 0 or 100
    if lims[1] - lims[0] < 2 * pad:
        lims = [lims[1] - 2 * pad, lims[1]] if lims[1] >= 100.0 else [lims[0], lims[0] + 2 * pad]
    for coll in ax.collections:
        coll.set_clip_on(False)  # a point at 100% sits on the frame
    ax.plot(lims, lims, color="0.5", lw=0.7, ls="--", zorder=1)
    ax.set_xlim(lims)
    ax.set_ylim(lims)
    ax.set_aspect("equal", adjustable="box")

    handles = [Line2D([], [], color=_FT_COLORS[m], marker="o", ls="none", ms=5 if m == "FT-SGD" else 3.2)
               for m in methods]
    labels = list(methods)
    for task in shown_tasks:
        if len(shown_tasks) > 1:
            handles.append(Line2D([], [], color="0.45", marker=markers[task], ls="none", ms=4))
            labels.append(task)
        if task in zero_shot:
            handles.append(Line2D([], [], color="k", marker=markers[task], mfc="none", ls="none", ms=6))
            labels.append(f"zero-shot, {task}: start of FT")
    seeds = len({r.get("seed") for r in rows if r["metric"] == "linearized_accuracy"})
    title = (f"one point per data seed ({seeds} seed{'s' if seeds != 1 else ''}), "
             f"{_join(sorted(n_tests))} test examples")
    if movement:
        title += "\neNTK movement $\\|K_{FT} - K_0\\|_F / \\|K_0\\|_F$:\n" + "\n".join(
            f"{m}: " + ", ".join(v) for m, v in movement.items())
    return handles, labels, title


def build_figure(rows: Sequence[dict]) -> Figure:
    """The two-panel figure from tidy result rows (any number of tasks)."""
    rows = [r for r in rows if r.get("metric") is not None]
    tasks = _tasks(rows)
    present = [(m, lab) for m, lab in METHODS if any(r["method"] == m and r["metric"] == "accuracy" for r in rows)]
    present += [(m, m) for m in dict.fromkeys(r["method"] for r in rows if r["metric"] == "accuracy")
                if m not in dict(present)]
    diagnostics = any(r["metric"] == "linearized_accuracy" for r in rows)
    h_a = 0.75 + 0.19 * len(present) * max(1.0, len(tasks) / 2)
    h_b = 2.6 if diagnostics else 0.0
    fig = style.new_figure(style.TEXT_WIDTH, h_a + 0.7 + h_b)
    if diagnostics:
        axes = fig.subplot_mosaic([["a", "a"], ["b", "key"]], height_ratios=[h_a + 0.7, h_b],
                                  width_ratios=[1, 1.35])
    else:
        axes = fig.subplot_mosaic([["a"]])
    fig.suptitle(_setting(rows, tasks), fontsize=7.5)

    a = axes["a"]
    handles, labels, note = _accuracy_panel(a, rows, tasks, present)
    a.set_title("(a) test accuracy" if diagnostics else "test accuracy")
    style.legend_below(a, handles, labels, title=note, ncol=min(4, len(labels)))

    if diagnostics:
        b, key = axes["b"], axes["key"]
        handles, labels, title = _linearised_panel(b, rows, tasks)
        b.set_xlabel("fine-tuned accuracy (%)")
        b.set_ylabel("linearised-model accuracy (%)")
        b.set_title("(b) linearised model vs fine-tuning")
        key.axis("off")  # holds the legend of (b), beside it
        if handles:
            key.legend(handles, labels, title=title, loc="center left", ncol=1, fontsize=6.5, title_fontsize=6.5,
                       alignment="left", borderaxespad=0.0)
    return style.finish(fig)


# ---------------------------------------------------------------------------------------------------- tables

def _latest(rows: list[dict]) -> list[dict]:
    """Rows with a later run's row replacing an earlier one for the same (task, model, k, method, seed, metric)."""
    keep: dict[tuple, dict] = {}
    for r in rows:
        keep[tuple(str(r.get(k)) for k in ("task", "model", "k", "method", "seed", "metric"))] = r
    return list(keep.values())


def table_markdown(rows: Sequence[dict], metric: str = "accuracy", scale: float = 100.0, digits: int = 1) -> str:
    """Methods x tasks table of ``metric``: mean (sample std) over seeds, or the value alone for one seed."""
    tasks = _tasks([r for r in rows if r["metric"] == metric])
    comp = aggregate([r for r in rows if r["metric"] == metric], ("method", "task"))
    cell = {(r["method"], r["task"]): r for r in comp}
    methods = [m for m, _ in METHODS if any(k[0] == m for k in cell)]
    methods += [m for m in dict.fromkeys(r["method"] for r in comp) if m not in methods]
    return markdown_table(["method", *tasks], [[m, *(mean_std(cell[(m, t)], scale, digits) if (m, t) in cell
                                                     else "" for t in tasks)] for m in methods])


def combine(run_dirs: Sequence[str | Path], stem: str | Path) -> list[Path]:
    """One figure and one methods x tasks table (``stem.md``: accuracy, then the diagnostics) from several runs
    (e.g. one per task). Rows are read from each run's ``results.jsonl``; nothing is recomputed. A later run
    replaces an earlier one's rows for the same task, model, k, method, seed and metric (e.g. kernels recomputed
    with another engine: ``--methods k-sgd,k-asigngd,k-noprompt``)."""
    rows = _latest([r for d in run_dirs for r in read_jsonl(Path(d) / "results.jsonl")])
    if not rows:
        raise ValueError(f"no result rows in {', '.join(map(str, run_dirs))}")
    stem = Path(stem)
    text = ["Test accuracy % (mean (std) over seeds):", "", table_markdown(rows)]
    for metric, scale, digits, label in (("linearized_accuracy", 100, 1, "linearised-model accuracy %"),
                                         ("gain_recovered", 1, 2, "share of FT's gain over zero-shot recovered by "
                                                                  "the linearised model"),
                                         ("lin_output_rel_error", 1, 3, "||f_lin - f_FT|| / ||f_FT - f_0|| on the test "
                                                                        "outputs"),
                                         ("kernel_rel_change", 1, 3, "eNTK movement ||K_FT - K_0||_F / ||K_0||_F")):
        if any(r["metric"] == metric for r in rows):
            text += ["", f"{label}:", "", table_markdown(rows, metric=metric, scale=scale, digits=digits)]
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stem.with_suffix(".md"), "\n".join(text))
    return draw(rows, stem) + [stem.with_suffix(".md")]


# ---------------------------------------------------------------------------------------------------- entry points

def build(run_dir: str | Path) -> Figure:
    """The figure of one run directory (its ``results.jsonl``), not saved."""
    return build_figure(read_jsonl(Path(run_dir) / "results.jsonl"))


def draw(rows: Sequence[dict], stem: str | Path) -> list[Path]:
    """Draw from tidy rows and write ``stem.pdf`` / ``stem.png``."""
    return style.save(build_figure(rows), stem)


def redraw(run_dir: str | Path) -> list[Path]:
    """Redraw ``<run_dir>/malladi.{pdf,png}`` of one run from its ``results.jsonl``."""
    run_dir = Path(run_dir)
    return style.save(build(run_dir), run_dir / "malladi")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Combine malladi runs (e.g. one per task) into one figure and table.")
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (results/malladi/<preset>-<hash>)")
    ap.add_argument("--out", type=Path, default=Path("figures/out/malladi"), help="output stem (.pdf/.png/.md)")
    args = ap.parse_args()
    for p in combine(args.runs, args.out):
        print(p)
