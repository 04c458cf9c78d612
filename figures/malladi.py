"""Figure: prompt-based fine-tuning vs its eNTK on real tasks (``ftsim run malladi``).

Drawn from tidy rows only (``results.jsonl`` of one or more runs): (a) test accuracy of every method, mean and
standard deviation over data seeds with the seeds as dots, one group of bars per task; (b) the linearised model
against fine-tuning, per seed (a point on the diagonal means the first-order Taylor expansion around theta_0
recovers the fine-tuned model's accuracy), with zero-shot as the reference and the eNTK movement ||K_FT - K_0||_F / ||K_0||_F in the legend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from figures import style
from ftsim.core.io import read_jsonl

__all__ = ["draw", "redraw", "METHODS"]

# (method, short label) in drawing order; colours pair each fine-tuning method with its kernel.
METHODS: tuple[tuple[str, str], ...] = (
    ("zero-shot", "zero-shot"),
    ("FT-SGD", "FT-SGD"), ("K-SGD", "K-SGD"),
    ("FT-Adam", "FT-Adam"), ("K-A-SignGD", "K-A-SignGD"),
    ("FT (no prompt)", "FT no prompt"), ("K-SGD (no prompt)", "K-SGD no prompt"),
)
_COLORS = {"zero-shot": "0.55", "FT-SGD": style.PALETTE[0], "K-SGD": style.PALETTE[5], "FT-Adam": style.PALETTE[1],
           "K-A-SignGD": style.PALETTE[4], "FT (no prompt)": style.PALETTE[2], "K-SGD (no prompt)": style.PALETTE[3]}
_HATCH = {"K-SGD": "///", "K-A-SignGD": "///", "K-SGD (no prompt)": "///"}


def _acc(rows: Sequence[dict], task: str, method: str) -> np.ndarray:
    return np.array([r["value"] for r in rows if r["task"] == task and r["method"] == method
                     and r["metric"] == "accuracy" and r["value"] is not None], float) * 100


def draw(rows: Sequence[dict], stem: str | Path) -> list[Path]:
    """Draw the two panels from tidy result rows (any number of tasks) and save ``stem.pdf/png``."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    present = [(m, lab) for m, lab in METHODS if any(r["method"] == m and r["metric"] == "accuracy" for r in rows)]
    fig, (a, b) = style.figure(ncols=2, width=style.TEXT_WIDTH, height=2.9,
                               gridspec_kw={"width_ratios": [max(2.2, 1.1 * len(tasks) + 1), 1.25 + 0.25 * len(tasks)]})
    width = 0.8 / max(len(present), 1)
    rng = np.random.default_rng(0)  # jitter of the seed dots only
    for j, (method, label) in enumerate(present):
        for t, task in enumerate(tasks):
            vals = _acc(rows, task, method)
            if vals.size == 0:
                continue
            x = t + (j - (len(present) - 1) / 2) * width
            a.bar(x, vals.mean(), width * 0.92, yerr=vals.std() if vals.size > 1 else None, capsize=1.5,
                  color=_COLORS.get(method, "0.3"), hatch=_HATCH.get(method), edgecolor="white", linewidth=0.3,
                  error_kw={"elinewidth": 0.7}, label=label if t == 0 else None)
            a.scatter(x + rng.uniform(-width * 0.2, width * 0.2, vals.size), vals, s=3, color="k", zorder=3,
                      linewidths=0)
    seeds = len({r["seed"] for r in rows if r["seed"] is not None})
    a.set_xticks(range(len(tasks)))
    a.set_xticklabels(tasks)
    a.set_ylabel("test accuracy (%)")
    lo = min((_acc(rows, t, m).min() for t in tasks for m, _ in present if _acc(rows, t, m).size), default=40)
    a.set_ylim(max(0, min(45, lo - 5)), 100)
    a.axhline(50, color="0.7", lw=0.6, ls=":")
    a.set_title(f"(a) accuracy, mean $\\pm$ sd over {seeds} seeds (hatched: eNTK)")
    a.legend(ncol=4, fontsize=5.5, loc="upper center", bbox_to_anchor=(0.5, -0.1), columnspacing=0.8,
             handlelength=1.2)

    markers = {task: style.MARKERS[i % len(style.MARKERS)] for i, task in enumerate(tasks)}
    drew = False
    for method, color in (("FT-SGD", style.PALETTE[0]), ("FT-Adam", style.PALETTE[1])):
        for task in tasks:
            sel = [r for r in rows if r["task"] == task and r["method"] == method]
            by_seed: dict = {}
            for r in sel:
                by_seed.setdefault(r["seed"], {})[r["metric"]] = r["value"]
            pts = [(d["ft_accuracy_diag"], d["linearized_accuracy"], d.get("zero_shot_accuracy_diag"),
                    d.get("kernel_rel_change")) for d in by_seed.values()
                   if "ft_accuracy_diag" in d and "linearized_accuracy" in d]
            if not pts:
                continue
            ft, lin, zs, kd = (np.array([p[i] if p[i] is not None else np.nan for p in pts], float) for i in range(4))
            kd_txt = (f", $\\|K_{{FT}}-K_0\\|/\\|K_0\\|$ = {np.nanmean(kd):.2f}" if np.isfinite(kd).any()
                      else "")
            b.scatter(100 * ft, 100 * lin, s=10, marker=markers[task], color=color, alpha=0.85,
                      label=f"{method} {task}{kd_txt}")
            if np.isfinite(zs).any():
                b.axhline(100 * np.nanmean(zs), color=color, lw=0.5, ls=":")
            drew = True
    if drew:
        lims = [min(b.get_xlim()[0], b.get_ylim()[0]), max(b.get_xlim()[1], b.get_ylim()[1])]
        b.plot(lims, lims, color="0.4", lw=0.7, ls="--")
        b.set_xlim(lims)
        b.set_ylim(lims)
        b.legend(fontsize=5, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1 if len(tasks) < 2 else 2,
                 handletextpad=0.3, columnspacing=0.8)
    else:
        b.text(0.5, 0.5, "no diagnostics in this run", ha="center", va="center", transform=b.transAxes)
    b.set_xlabel("fine-tuned accuracy (%)")
    b.set_ylabel("linearised-model accuracy (%)")
    b.set_title("(b) linearised model vs FT (dotted: zero-shot)")
    return style.save(fig, stem)


def redraw(run_dir: Path) -> list[Path]:
    """Redraw ``malladi.pdf/png`` of one run from its ``results.jsonl``."""
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "results.jsonl")
    return draw(rows, run_dir / "malladi")


def _latest(rows: list[dict]) -> list[dict]:
    """Rows with a later run's row replacing an earlier one for the same (task, model, k, method, seed, metric)."""
    keep: dict[tuple, dict] = {}
    for r in rows:
        keep[tuple(str(r.get(k)) for k in ("task", "model", "k", "method", "seed", "metric"))] = r
    return list(keep.values())


def combine(run_dirs: Sequence[str | Path], stem: str | Path) -> list[Path]:
    """One figure and one methods x tasks table (``stem.md``: accuracy, then the diagnostics) from several runs
    (e.g. one per task). Rows are read from each run's ``results.jsonl``; nothing is recomputed. A later run
    replaces an earlier one's rows for the same task, model, k, method, seed and metric (e.g. kernels recomputed
    with another engine: ``--methods k-sgd,k-asigngd,k-noprompt``)."""
    from ftsim.core.io import atomic_write_text
    from real_tasks.malladi import task_table_markdown

    rows = _latest([r for d in run_dirs for r in read_jsonl(Path(d) / "results.jsonl")])
    if not rows:
        raise ValueError(f"no result rows in {', '.join(map(str, run_dirs))}")
    stem = Path(stem)
    text = ["Test accuracy % (mean (std) over seeds):", "", task_table_markdown(rows)]
    for metric, scale, digits, label in (("linearized_accuracy", 100, 1, "linearised-model accuracy %"),
                                         ("gain_recovered", 1, 2, "share of FT's gain over zero-shot recovered by "
                                                                  "the linearised model"),
                                         ("lin_output_rel_error", 1, 3, "||f_lin - f_FT|| / ||f_FT - f_0|| on the test "
                                                                        "outputs"),
                                         ("kernel_rel_change", 1, 3, "eNTK movement ||K_FT - K_0||_F / ||K_0||_F")):
        sub = [r for r in rows if r["metric"] == metric]
        if sub:
            text += ["", f"{label}:", "", task_table_markdown(sub, metric=metric, scale=scale, digits=digits)]
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stem.with_suffix(".md"), "\n".join(text))
    return draw(rows, stem) + [stem.with_suffix(".md")]


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Combine malladi runs (e.g. one per task) into one figure and table.")
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (results/malladi/<preset>-<hash>)")
    ap.add_argument("--out", type=Path, default=Path("figures/out/malladi"), help="output stem (.pdf/.png/.md)")
    args = ap.parse_args()
    for p in combine(args.runs, args.out):
        print(p)
