"""Figures of the Wei, Xie & Ma (2021) experiments, drawn from the tidy tables of a run directory.

Both figures have four panels: (a) the learned pipeline (pretrained transformer, then head or prompt tuning) with
the paper's numbers, (b) the exact oracles on the same HMMs and tasks (no training), (c)-(d) pretraining curves.
Every point of (a) and (b) is the mean over the (HMM, task) pairs of the run, with the sample standard deviation
(:func:`ftsim.core.tables.summarize`) as error bar; curves in (c)-(d) are means over HMM seeds with a +-1 s.d.
band, and the figure says how many of each there are.

* :func:`build_exp1` / :func:`draw_exp1` -- experiment 1: accuracy vs hidden states m; masked LM by m; masked vs
  causal LM at the m where the causal variant ran.
* :func:`build_exp2` / :func:`draw_exp2` -- experiment 2: memory HMM + attention head vs vanilla HMM + linear head;
  pretraining on the memory HMMs and on the vanilla HMMs.
* :func:`build` / :func:`redraw` -- either figure from ``config.json``, ``results.jsonl`` and ``curves.jsonl``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from figures import style
from ftsim.core.io import read_json, read_jsonl

__all__ = ["build_exp1", "build_exp2", "draw_exp1", "draw_exp2", "build", "redraw", "PAPER_EXP1", "PAPER_EXP2"]

# The paper's reported mean test accuracies (%). The run's tables do not carry them (yet): rows with
# model == "paper" take precedence when present.
PAPER_EXP1 = {4: (99.7, 94.0), 8: (97.0, 84.0), 10: (92.9, 79.7), 15: (87.0, 74.6), 25: (74.8, 66.1),
              30: (75.1, 66.2)}
PAPER_EXP2 = {8: (99.8, 83.2), 12: (99.9, 80.6), 20: (99.9, 64.4), 28: (97.8, 66.1)}

# One colour and marker per method family, the same in the learned and the exact panel.
C_PROMPT, C_HEAD, C_TOKEN, C_IDENTITY = style.PALETTE[1], style.PALETTE[0], style.PALETTE[2], style.PALETTE[4]
C_CERT = "0.35"
C_MEMORY, C_VANILLA, C_MEMHEAD = style.PALETTE[2], style.PALETTE[0], style.PALETTE[3]
# Pretraining curves: one colour per HMM size (no yellow: it vanishes on white), markers as a second cue.
CURVE_COLORS = [style.PALETTE[i] for i in (0, 1, 2, 3, 4, 5, 7)]
DODGE = 0.1  # horizontal offset between series at one x (categorical axis units)
MASKED_TV = r"E$_x$ TV(model, exact $P(X_0 \mid x_{1:T})$)"


# ---------------------------------------------------------------------------------------------------- statistics

def _select(rows: Sequence[dict], **match) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def _accuracy_by(rows: Sequence[dict], x: str, **match):
    """(xs, mean %, sample s.d. %, n) of ``accuracy`` over the rows matching ``match``, per value of ``x``."""
    sel = _select(rows, **match)
    xs = sorted({r[x] for r in sel})
    mean, sd, n = style.stats_of(([r.get("accuracy") for r in sel if r[x] == v] for v in xs), scale=100)
    return np.array(xs, float), mean, sd, n


def _replicates(rows: Sequence[dict]) -> str:
    """'1 HMM × 2 tasks' from the seeds in the rows (what one point averages over)."""
    hmms = sorted({r.get("hmm_seed", 0) for r in rows})
    tasks = {r.get("task_seed", 0) for r in rows}
    h = f"{len(hmms)} HMM" + ("s" if len(hmms) > 1 else "")
    t = f"{len(tasks)} task" + ("s" if len(tasks) > 1 else "")
    return f"{h} × {t}" + (" each" if len(hmms) > 1 else "")


def _accuracy_note(rows: Sequence[dict], specs: Sequence[tuple[dict, dict]], x: str) -> str:
    """The legend title of an accuracy panel: what the error bars are, over how many (HMM, task) pairs."""
    ns = [int(n) for match, _ in specs for n in _accuracy_by(rows, x, **match)[3]]
    note = style.spread_note(ns, "run")
    return f"{note} ({_replicates(rows)})" if "sample s.d." in note else note


def _paper_last(ax) -> tuple[list, list]:
    """Legend entries of ``ax`` with the paper's numbers after the run's own series."""
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: (labels[i].startswith("paper"), i))
    return [handles[i] for i in order], [labels[i] for i in order]


def _paper(rows: Sequence[dict], x: str, method: str, table: dict, column: int) -> tuple[np.ndarray, np.ndarray]:
    sel = _select(rows, model="paper", method=method)
    if sel:
        pts = sorted((r[x], 100 * r["accuracy"]) for r in sel)
    else:
        xs = sorted({r[x] for r in rows if r.get("model") != "paper"})
        pts = [(v, table[v][column]) for v in xs if v in table]
    return np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)


# ---------------------------------------------------------------------------------------------------- drawing

def _errorbars(ax, xs, mean, sd, *, color, marker, label, hollow=False, ls="-", lw=1.1, ms=4.2, zorder=3):
    if not len(xs):
        return None
    return ax.errorbar(xs, mean, yerr=np.where(np.isfinite(sd), sd, 0.0), color=color, marker=marker, ls=ls,
                       lw=lw, ms=ms, capsize=2, elinewidth=0.8, mfc="white" if hollow else color, mew=1.0,
                       label=label, zorder=zorder)


def _series(ax, rows, x, specs, pos: dict, step: float = DODGE):
    """Draw ``specs`` = [(match, style kwargs), ...] at categorical positions ``pos[x value]``, with a common
    dodge so that markers at one x stay apart."""
    for i, (match, kw) in enumerate(specs):
        xs, mean, sd, _ = _accuracy_by(rows, x, **match)
        _errorbars(ax, style.dodge([pos[v] for v in xs], i, len(specs), step), mean, sd, **kw)


def _rank_boundary(ax, ms: Sequence[int], vocab_size: int | None) -> None:
    """Mark m = n: for m > n the emission matrix W (n x m) cannot have full column rank."""
    if vocab_size is None or not (min(ms) <= vocab_size < max(ms)):
        return
    xb = max(i for i, m in enumerate(ms) if m <= vocab_size) + 0.5
    ax.axvline(xb, color="0.55", lw=0.7, zorder=1)
    ax.text(xb + 0.08, 0.02, "m > n", transform=ax.get_xaxis_transform(), fontsize=6, color="0.3", ha="left")
    ax.text(xb - 0.08, 0.02, "m ≤ n", transform=ax.get_xaxis_transform(), fontsize=6, color="0.3", ha="right")


def _accuracy_axes(ax, xs, xlabel: str, ylo: float = 50, ticklabels: Sequence[str] | None = None) -> None:
    """Categorical x: one tick per setting of the sweep, evenly spaced."""
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels(ticklabels if ticklabels is not None else [str(v) for v in xs])
    ax.set_xlim(-0.5, len(xs) - 0.5)
    ax.set_ylim(ylo, 101)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")


def _curve_stats(curves: Sequence[dict], **match):
    """(steps, mean, s.d., n) of ``tv_mean`` over HMM seeds at each pretraining step."""
    sel = _select(curves, **match)
    steps = sorted({c["step"] for c in sel})
    mean, sd, n = style.stats_of([c.get("tv_mean") for c in sel if c["step"] == s] for s in steps)
    return np.array(steps, float), mean, sd, n


def _tv_curve(ax, curves, *, color, marker, label, ls="-", hollow=False, **match):
    steps, mean, sd, n = _curve_stats(curves, **match)
    if not len(steps):
        return []
    ok = np.isfinite(sd)
    if ok.any():
        ax.fill_between(steps[ok], (mean - sd)[ok], (mean + sd)[ok], color=color, alpha=0.18, lw=0, zorder=1)
    ax.plot(steps, mean, color=color, ls=ls, marker=marker, markevery=max(1, len(steps) // 5), ms=3.5,
            mfc="white" if hollow else color, lw=1.1, label=label, zorder=2)
    return list(n)


def _tv_axes(ax, ns: Sequence[int], title: str, **legend) -> None:
    ax.set_yscale("log")
    ax.set_xlabel("pretraining step")
    ax.set_ylabel(MASKED_TV)
    ax.set_title(title)
    note = style.spread_note(ns, "HMM")
    note = note.replace("per point", "per curve") if "no spread" in note else note + " (band)"
    style.legend_below(ax, title=note, **legend)


# ---------------------------------------------------------------------------------------------------- experiment 1

def _paper_points(ax, rows, x, pos, entries, table, nspecs) -> None:
    """The paper's numbers as black-edged stars / crosses, at the dodge slot of the method they belong to."""
    for column, (method, color, marker, label, slot) in enumerate(entries):
        px, py = _paper(rows, x, method, table, column)
        keep = [i for i, v in enumerate(px) if v in pos]
        if keep:
            ax.scatter(style.dodge([pos[px[i]] for i in keep], slot, nspecs, DODGE), py[keep], marker=marker, s=34,
                       color=color, edgecolor="k", linewidth=0.4, label=label, zorder=4)


def build_exp1(results: Sequence[dict], curves: Sequence[dict], vocab_size: int | None = None) -> Figure:
    """Experiment 1 figure from the tidy rows of ``results`` and ``curves`` (``vocab_size`` from the config, for
    the m = n boundary)."""
    fig = style.new_figure(style.TEXT_WIDTH, 6.4)
    (a, b), (c, d) = fig.subplots(2, 2)
    x = "num_states"
    ms = sorted({r[x] for r in results if r.get("model") != "paper"})
    pos = {m: i for i, m in enumerate(ms)}
    xlabel = "hidden states m" + (f" (vocabulary n = {vocab_size})" if vocab_size else "")

    # (a) learned: one colour and marker per method; masked LM filled, causal LM hollow (where it ran).
    learned = [({"model": "mlm", "method": "prompt"}, dict(color=C_PROMPT, marker="o", label="prompt tuning")),
               ({"model": "mlm", "method": "token_prompt"},
                dict(color=C_TOKEN, marker="D", ls="--", label="best real token, no steps")),
               ({"model": "mlm", "method": "head"}, dict(color=C_HEAD, marker="s", label="head tuning"))]
    causal = [({"model": "causal", "method": match["method"]}, dict(kw, hollow=True, ls="none", label=None))
              for match, kw in learned]
    has_causal = any(r.get("model") == "causal" for r in results)
    specs = learned + (causal if has_causal else [])
    _series(a, results, x, specs, pos)
    _paper_points(a, results, x, pos, (("prompt", C_PROMPT, "*", "paper: prompt tuning", 0),
                                       ("head", C_HEAD, "X", "paper: head tuning", 2)), PAPER_EXP1, len(specs))
    handles, labels = _paper_last(a)
    if has_causal:
        cm = sorted({r[x] for r in results if r.get("model") == "causal"})
        at = sum(not lab.startswith("paper") for lab in labels)
        handles.insert(at, Line2D([], [], color="0.3", marker="o", mfc="white", ls="none", ms=4.2))
        labels.insert(at, f"hollow: causal LM (m = {', '.join(map(str, cm))})")
    _rank_boundary(a, ms, vocab_size)
    _accuracy_axes(a, ms, xlabel)
    a.set_title("(a) learned: frozen masked LM + tuning")
    style.legend_below(a, handles, labels, title=_accuracy_note(results, specs, x))

    # (b) exact oracles: the colour of the learned method each one bounds; the theorems' certificates in grey.
    exact = [({"model": "exact", "method": "prompt_oracle_reversal"},
              dict(color=C_PROMPT, marker="o", label="soft prompt before $x_0$ (as learned)")),
             ({"model": "exact", "method": "prompt_oracle_identity"},
              dict(color=C_IDENTITY, marker="v", ls="-.", label="soft prompt reweighting $H_0$")),
             ({"model": "exact", "method": "prompt_oracle_token"},
              dict(color=C_TOKEN, marker="D", ls="--", label="best real token before $x_0$")),
             ({"model": "exact", "method": "head_oracle"},
              dict(color=C_HEAD, marker="s", label="linear head on $G_0(x)$")),
             ({"model": "exact", "method": "prompt_certificate"},
              dict(color=C_CERT, marker="^", ls=":", hollow=True, ms=3.5,
                   label=r"prompt certificate $u = 1_{\mathrm{supp}\,\mu}$")),
             ({"model": "exact", "method": "head_certificate"},
              dict(color=C_CERT, marker="p", ls=":", hollow=True, ms=3.5, label=r"head certificate $W^{+T}\mu$"))]
    exact = [sp for sp in exact if _select(results, **sp[0])]
    _series(b, results, x, exact, pos)
    _rank_boundary(b, ms, vocab_size)
    _accuracy_axes(b, ms, xlabel)
    b.set_title("(b) exact oracles (no training)")
    style.legend_below(b, title=_accuracy_note(results, exact, x))

    # (c) pretraining of the masked LM, one curve per m; (d) masked vs causal LM where both ran.
    ns: list[int] = []
    for i, m in enumerate(ms):
        ns += _tv_curve(c, curves, color=CURVE_COLORS[i % len(CURVE_COLORS)], marker=style.MARKERS[i % 8],
                        label=f"m = {m}", num_states=m, model="mlm")
    _tv_axes(c, ns, "(c) pretraining, masked LM", ncol=3)
    cms = sorted({cv[x] for cv in curves if cv.get("model") == "causal"})
    ns = []
    for m in cms:
        i = pos.get(m, 0)
        ns += _tv_curve(d, curves, color=CURVE_COLORS[i % len(CURVE_COLORS)], marker=style.MARKERS[i % 8],
                        label=f"m = {m}, masked LM", num_states=m, model="mlm")
        ns += _tv_curve(d, curves, color="k", marker="o", hollow=True, ls="--", label=f"m = {m}, causal LM",
                        num_states=m, model="causal")
    if cms:
        _tv_axes(d, ns, "(d) masked vs causal (right-to-left) LM", ncol=1)
    else:
        d.text(0.5, 0.5, "no causal LM in this run", ha="center", va="center", transform=d.transAxes)
        d.set_xlabel("pretraining step")
        d.set_ylabel(MASKED_TV)
    return style.finish(fig)


# ---------------------------------------------------------------------------------------------------- experiment 2

def build_exp2(results: Sequence[dict], curves: Sequence[dict], vocab_size: int | None = None,
               num_syntax: int | None = None) -> Figure:
    """Experiment 2 figure from the tidy rows of ``results`` and ``curves`` (``num_syntax`` from the config, for
    the axis label)."""
    fig = style.new_figure(style.TEXT_WIDTH, 6.0)
    (a, b), (c, d) = fig.subplots(2, 2)
    x = "total_states"
    ss = sorted({r[x] for r in results if r.get("model") != "paper"})
    pos = {v: i for i, v in enumerate(ss)}
    num_memory = {r[x]: r.get("num_memory") for r in results if r.get("num_memory") is not None}
    ticks = [f"{v}\n(N = {num_memory[v]})" if v in num_memory else str(v) for v in ss]
    xlabel = "hidden states (" + (f"{num_syntax} syntax × " if num_syntax else "") + "N memory values)"

    families = [({"hmm": "memory", "method": "attention"},
                 dict(color=C_MEMORY, marker="o", label="memory HMM + attention head")),
                ({"hmm": "memory", "method": "head"},
                 dict(color=C_MEMHEAD, marker="^", ls="--", label="memory HMM + linear head on $G_0$")),
                ({"hmm": "vanilla", "method": "head"},
                 dict(color=C_VANILLA, marker="s", label="vanilla HMM + linear head"))]
    learned = [({**m, "model": "mlm"}, kw) for m, kw in families]
    _series(a, results, x, learned, pos)
    _paper_points(a, results, x, pos, (("attention", C_MEMORY, "*", "paper: memory + attention", 0),
                                       ("head", C_VANILLA, "X", "paper: vanilla + linear", 2)), PAPER_EXP2,
                  len(learned))
    _accuracy_axes(a, ss, xlabel, ticklabels=ticks)
    a.set_title("(a) learned: frozen masked LM + head")
    style.legend_below(a, *_paper_last(a), title=_accuracy_note(results, learned, x), ncol=2)

    exact = [({**m, "model": "exact"}, kw) for m, kw in families]
    _series(b, results, x, exact, pos)
    _accuracy_axes(b, ss, xlabel, ticklabels=ticks)
    b.set_title("(b) exact oracles (no training)")
    style.legend_below(b, title=_accuracy_note(results, exact, x), ncol=1)

    for ax, hmm, title in ((c, "memory", "(c) pretraining on memory HMMs"),
                           (d, "vanilla", "(d) pretraining on vanilla HMMs")):
        ns: list[int] = []
        for i, v in enumerate(ss):
            ns += _tv_curve(ax, curves, color=CURVE_COLORS[i % len(CURVE_COLORS)], marker=style.MARKERS[i % 8],
                            label=f"{v} states", total_states=v, hmm=hmm)
        _tv_axes(ax, ns, title, ncol=2)
    lo = min(ax.get_ylim()[0] for ax in (c, d))
    hi = max(ax.get_ylim()[1] for ax in (c, d))
    for ax in (c, d):  # one scale, so the two HMM families compare at a glance
        ax.set_ylim(lo, hi)
    return style.finish(fig)


# ---------------------------------------------------------------------------------------------------- entry points

def draw_exp1(results: list[dict], curves: list[dict], stem: str | Path, vocab_size: int | None = None) -> list[Path]:
    """Experiment 1 figure; writes ``stem``.pdf/.png."""
    return style.save(build_exp1(results, curves, vocab_size), stem)


def draw_exp2(results: list[dict], curves: list[dict], stem: str | Path, vocab_size: int | None = None,
              num_syntax: int | None = None) -> list[Path]:
    """Experiment 2 figure; writes ``stem``.pdf/.png."""
    return style.save(build_exp2(results, curves, vocab_size, num_syntax), stem)


def _load(run_dir: Path) -> tuple[str, Callable[[], Figure]]:
    meta = read_json(run_dir / "config.json")
    name, cfg = meta.get("experiment"), meta.get("config", {})
    results = read_jsonl(run_dir / "results.jsonl")
    curves = read_jsonl(run_dir / "curves.jsonl")
    if name == "wei2021-exp1":
        return "wei2021_exp1", lambda: build_exp1(results, curves, cfg.get("vocab_size"))
    if name == "wei2021-exp2":
        return "wei2021_exp2", lambda: build_exp2(results, curves, cfg.get("vocab_size"), cfg.get("num_syntax"))
    raise ValueError(f"{run_dir / 'config.json'}: field 'experiment' is {name!r}, "
                     "expected 'wei2021-exp1' or 'wei2021-exp2'")


def build(run_dir: str | Path) -> Figure:
    """The wei2021-exp1 or wei2021-exp2 figure of a run directory (by its ``config.json``), not saved."""
    return _load(Path(run_dir))[1]()


def redraw(run_dir: str | Path) -> list[Path]:
    """Redraw a wei2021-exp1 or wei2021-exp2 run's figure (``<run_dir>/wei2021_exp{1,2}.pdf/png``)."""
    run_dir = Path(run_dir)
    stem, make = _load(run_dir)
    return style.save(make(), run_dir / stem)
