"""Figures of sparse fine-tuning (Fu et al. 2023) and LoRA's kernel (Malladi et al. 2023, Sec. 7).

Drawn from the runs' tidy tables only, means and sample standard deviations from :func:`ftsim.core.tables.summarize`
(through :func:`figures.style.stats_of`):

* ``sparse-synthetic`` (``redraw_synthetic`` -> ``sparse_synthetic.pdf/png``): (a) measured leave-one-out stability
  against the Thm 1 bound vs p (logistic regression, the linearised network, the non-convex network); (b) the
  U-curve of test error vs p (SAM and random masks; training error dotted); (c) distance of the scaled LoRA kernel
  to the eNTK of the adapted weights vs rank, with the r^{-1/2} rate; (d) LoRA fine-tuning vs GD with its kernel.
* ``sparse`` (``redraw`` -> ``sparse.pdf/png``): (a) test accuracy vs p per family (families without a p at the share
  of entries they move); (b) data-perturbation stability (share of test predictions that change when 10% of the
  training examples are removed) vs p; (c) kernel distance vs LoRA rank on the real LM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from figures import style
from ftsim.core.io import read_json, read_jsonl

__all__ = ["build_synthetic", "redraw_synthetic", "build", "redraw", "STEM", "STEM_SYNTHETIC"]

STEM = "sparse"
STEM_SYNTHETIC = "sparse_synthetic"


def _read(run_dir: Path, name: str) -> list[dict]:
    path = Path(run_dir) / f"{name}.jsonl"
    return read_jsonl(path) if path.exists() else []


def _yerr(sd: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(sd), sd, 0.0)


def _series(rows: Sequence[dict], x: str, y: str, scale: float = 1.0):
    """(xs, mean, sample s.d., n) of ``y`` grouped by ``x`` (sorted)."""
    xs = sorted({r[x] for r in rows if r.get(y) is not None and r.get(x) is not None})
    mean, sd, n = style.stats_of(([r.get(y) for r in rows if r.get(x) == v] for v in xs), scale)
    return np.array(xs, float), mean, sd, n


# --------------------------------------------------------------------------------------------------- synthetic

SETTINGS = (("logistic", "logistic regression"), ("linearized", "linearised network"),
            ("tanh network (non-convex)", "non-convex network"))


def _stability_panel(ax, rows: list[dict]) -> list[int]:
    ns = []
    exp = [r for r in rows if r.get("variant") == "expected"]
    for i, (key, label) in enumerate(SETTINGS):
        sub = [r for r in exp if r["setting"] == key]
        if not sub:
            continue
        x, m, s, n = _series(sub, "p", "stability")
        xb, mb, sb, _ = _series([r for r in sub if np.isfinite(r["bound"])], "p", "bound")
        ns += list(n)
        xd = style.dodge(x, i, len(SETTINGS), 0.012)
        ax.errorbar(xd, m, yerr=_yerr(s), marker=style.MARKERS[i], ms=3.5, capsize=2, color=style.color(i),
                    label=f"{label}: measured")
        ax.plot(xb, mb, ls="--", lw=1.0, color=style.color(i), label=f"{label}: Thm 1 bound")
    ax.set_yscale("log")
    ax.set_xlabel("p (share of coordinates that move)")
    ax.set_ylabel(r"E$_i\,|\ell(A(S^i), z_i) - \ell(A(S), z_i)|$")
    ax.set_title("(a) leave-one-out stability vs Thm 1")
    return ns


def _ucurve_panel(ax, rows: list[dict]) -> list[int]:
    ns = []
    rules = sorted({r["rule"] for r in rows}, key=lambda r: (r != "SAM (top |g|)", r))
    for i, rule in enumerate(rules):
        sub = [r for r in rows if r["rule"] == rule]
        x, m, s, n = _series(sub, "p", "test_error", 100.0)
        ns += list(n)
        ax.errorbar(style.dodge(x, i, len(rules), 1.08, log=True), m, yerr=_yerr(s), marker=style.MARKERS[i],
                    ms=3.5, capsize=2, color=style.color(3 + i), label=f"{rule}: test")
        if i == 0:
            x, m, _, _ = _series(sub, "p", "train_error", 100.0)
            ax.plot(x, m, ls=":", marker=style.MARKERS[i], mfc="none", ms=4, color=style.color(3 + i),
                    label=f"{rule}: training")
    base = [r["theta0_error"] for r in rows]
    if base:
        level = 100 * float(np.mean(base))
        ax.axhline(level, color="0.5", lw=0.8, ls="-.")
        ax.annotate(r"$\theta_0$", (1.0, level), xycoords=("axes fraction", "data"), xytext=(2, 0),
                    textcoords="offset points", fontsize=6.5, color="0.3", va="center", annotation_clip=False)
    ax.set_xscale("log")
    ax.set_xlabel("p (SAM: top floor(p d) of |g|)")
    ax.set_ylabel("error % (test: exact)")
    ax.set_title("(b) the U-curve (sparse-shift task)")
    return ns


def _rank_panel(ax, rows: list[dict], title: str) -> list[int]:
    x, m, s, n = _series(rows, "rank", "rel_error")
    ax.errorbar(x, m, yerr=_yerr(s), marker="o", ms=3.5, capsize=2, color=style.color(0),
                label=r"$\|K_{LoRA}/(s^2 r\sigma^2) - K_W\|_F / \|K_W\|_F$")
    x2, m2, s2, n2 = _series(rows, "rank", "kernel_distance")
    ax.errorbar(x2, m2, yerr=_yerr(s2), marker="s", ms=3.5, capsize=2, color=style.color(1),
                label="Fort distance to $K_W$ (scale-free)")
    x3, m3, s3, _ = _series(rows, "rank", "kernel_distance_full")
    ax.errorbar(x3, m3, yerr=_yerr(s3), marker="^", ms=3.5, capsize=2, color=style.color(2), ls="--",
                label="Fort distance to the full eNTK")
    if len(x):
        ref = m[0] * (x / x[0]) ** -0.5
        ax.plot(x, ref, color="0.5", ls=":", lw=0.9)
        ax.annotate(r"$\propto r^{-1/2}$", (x[-1], ref[-1]), xytext=(3, 0), textcoords="offset points", fontsize=6.5,
                    color="0.3", va="center", annotation_clip=False)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("kernel distance")
    ax.set_title(title)
    return list(n) + list(n2)


def _klora_panel(ax, rows: list[dict]) -> None:
    keys = (("acc_zero_shot", "zero-shot"), ("acc_lora_ft", "LoRA GD"), ("acc_kernel_gd", "GD with the LoRA kernel"),
            ("acc_klora", "K-LoRA (kernel regression)"))
    seeds = sorted({r["seed"] for r in rows})
    for i, (key, label) in enumerate(keys):
        ys = [100 * next(r[key] for r in rows if r["seed"] == s) for s in seeds]
        ax.plot(style.dodge(np.arange(len(seeds), dtype=float), i, len(keys), 0.12), ys, ls="none",
                marker=style.MARKERS[i], ms=4.5, color=style.color(i), label=label)
    dist = np.mean([r["output_distance"] for r in rows]) if rows else float("nan")
    ax.set_xticks(range(len(seeds)), [str(s) for s in seeds])
    ax.set_xlim(-0.6, len(seeds) - 0.4)
    ax.set_xlabel("LoRA seed")
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"(d) LoRA GD vs kernel GD (output distance {dist:.2f})")


def build_synthetic(run_dir: str | Path) -> Figure:
    """The four-panel figure of a ``sparse-synthetic`` run directory, not saved."""
    run_dir = Path(run_dir)
    fig = style.new_figure(style.TEXT_WIDTH, 6.2)
    (a, b), (c, d) = fig.subplots(2, 2)
    ns = _stability_panel(a, _read(run_dir, "stability"))
    style.legend_below(a, title=style.spread_note(ns, "seed") + " (problem seeds)", ncol=2)
    ns = _ucurve_panel(b, _read(run_dir, "ucurve"))
    style.legend_below(b, title=style.spread_note(ns, "seed"), ncol=2)
    ns = _rank_panel(c, _read(run_dir, "kernel_rank"), "(c) LoRA kernel vs rank (HMM transformer)")
    style.legend_below(c, title=style.spread_note(ns, "seed") + " (LoRA initialisations)", ncol=1)
    kl = _read(run_dir, "klora")
    _klora_panel(d, kl)
    style.legend_below(d, title="one value per LoRA seed: no spread", ncol=2)
    return style.finish(fig)


def redraw_synthetic(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    return style.save(build_synthetic(run_dir), run_dir / STEM_SYNTHETIC)


# --------------------------------------------------------------------------------------------------- real LM

FAMILY_ORDER = ("FullTuning", "Random", "MixOut", "BitFit", "MagPruning", "SAM", "SAM (g^2/h)", "DiffPruning",
                "ChildPruning", "Adapter ((IA)^3)", "LoRA", "LoRA (SGD)")


def _look(i: int) -> dict:
    """Colour, marker and line style of series i: 8 colours, the marker shifted and the line dashed on the second
    round, so no two of up to 16 series look alike."""
    return {"color": style.color(i), "marker": style.MARKERS[(i + i // len(style.PALETTE)) % len(style.MARKERS)],
            "ls": "-" if i < len(style.PALETTE) else "--"}


def _accuracy_panel(ax, rows: list[dict]) -> list[int]:
    acc = [r for r in rows if r["metric"] == "accuracy" and r.get("perturbation", 0) == 0]
    methods = [m for m in FAMILY_ORDER if any(r["method"] == m for r in acc)]
    ns = []
    for i, m in enumerate(methods):
        sub = [r for r in acc if r["method"] == m]
        swept = any(r.get("p") is not None for r in sub)
        key = "p" if swept else "p_effective"
        if not swept:
            pe = float(np.mean([r["p_effective"] for r in sub]))
            sub = [{**r, "p_effective": pe} for r in sub]
        x, mu, sd, n = _series(sub, key, "value", 100.0)
        ns += list(n)
        look = _look(i)
        ax.errorbar(style.dodge(x, i, len(methods), 1.06, log=True), mu, yerr=_yerr(sd), color=look["color"],
                    marker=look["marker"], ms=3.5, capsize=1.5, lw=1.0, ls=look["ls"] if swept else "none", label=m)
    zs = [r["value"] for r in acc if r["method"] == "zero-shot"]
    if zs:
        ax.axhline(100 * float(np.mean(zs)), color="0.5", lw=0.8, ls="-.", label="zero-shot")
    ax.set_xscale("log")
    ax.set_xlabel("share p of entries that move (1: full)")
    ax.set_ylabel("test accuracy %")
    ax.set_title("(a) accuracy vs p")
    return ns


def _perturbation_panel(ax, stab: list[dict]) -> list[int]:
    ns = []
    methods = [m for m in FAMILY_ORDER if any(r["method"] == m for r in stab)]
    for i, m in enumerate(methods):
        sub = [r for r in stab if r["method"] == m]
        pe = [{**r, "x": r["p"] if r.get("p") is not None else r.get("p_effective", 1.0)} for r in sub]
        x, mu, sd, n = _series(pe, "x", "prediction_flips", 100.0)
        ns += list(n)
        look = _look(i)
        ax.errorbar(style.dodge(x, i, len(methods), 1.06, log=True), mu, yerr=_yerr(sd), color=look["color"],
                    marker=look["marker"], ms=3.5, capsize=1.5, ls="none", label=m)
    if not stab:
        ax.text(0.5, 0.5, "no perturbation runs", ha="center", va="center", transform=ax.transAxes)
    ax.set_xscale("log")
    ax.set_xlabel("share p of entries that move")
    ax.set_ylabel("test predictions that change %")
    ax.set_title("(b) stability: 10% of training removed")
    return ns


def build(run_dir: str | Path) -> Figure:
    """The figure of a ``sparse`` run directory, not saved."""
    run_dir = Path(run_dir)
    rows = _read(run_dir, "results")
    stab = _read(run_dir, "stability")
    kr = _read(run_dir, "kernel_rank")
    cfg = read_json(run_dir / "config.json")["config"] if (run_dir / "config.json").exists() else {}
    fig = style.new_figure(style.TEXT_WIDTH, 3.9)
    a, b, c = fig.subplots(1, 3)
    ns = _accuracy_panel(a, rows)
    style.legend_below(a, title=style.spread_note(ns, "data seed"), ncol=2)
    ns = _perturbation_panel(b, stab)
    style.legend_below(b, title=style.spread_note(ns, "data seed"), ncol=2)
    if kr:
        ns = _rank_panel(c, kr, "(c) LoRA kernel vs rank")
        style.legend_below(c, title=style.spread_note(ns, "seed") + " (LoRA initialisations)", ncol=1)
    else:
        c.text(0.5, 0.5, "no kernel-rank run", ha="center", va="center", transform=c.transAxes)
        c.set_xlabel("LoRA rank r")
        c.set_ylabel("kernel distance")
        c.set_title("(c) LoRA kernel vs rank")
    if cfg:
        fig.suptitle(f"{cfg.get('task')}, {cfg.get('model')}, k = {cfg.get('k')}, {cfg.get('test_size')} test "
                     f"examples, {cfg.get('steps')} steps", fontsize=8)
    return style.finish(fig)


def redraw(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    return style.save(build(run_dir), run_dir / STEM)
