"""Figures of the Wei, Xie & Ma (2021) experiments, drawn from the tidy tables of a run directory.

* :func:`draw_exp1` — (a) test accuracy vs hidden states m: prompt and head tuning on the pretrained masked LM
  (mean ± std over seeds; the causal variant and the best-real-token start of prompt tuning hollow), the exact
  oracles (dashed/dotted), the paper's numbers (stars and crosses); (b) TV(model output, exact G_0) over
  pretraining steps.
* :func:`draw_exp2` — (a) test accuracy vs total hidden states: memory HMM + attention head vs vanilla HMM +
  linear head, learned and exact, with the paper's numbers; (b) the TV curves.
* :func:`redraw` — either figure from ``results.jsonl`` and ``curves.jsonl`` (checks ``config.json``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from figures import style
from ftsim.core.io import read_json, read_jsonl

__all__ = ["draw_exp1", "draw_exp2", "redraw"]

PAPER_EXP1 = {4: (99.7, 94.0), 8: (97.0, 84.0), 10: (92.9, 79.7), 15: (87.0, 74.6), 25: (74.8, 66.1),
              30: (75.1, 66.2)}
PAPER_EXP2 = {8: (99.8, 83.2), 12: (99.9, 80.6), 20: (99.9, 64.4), 28: (97.8, 66.1)}

C_PROMPT, C_HEAD, C_MEMORY = style.color(1), style.color(0), style.color(2)


def _stats(rows: list[dict], x: str, **match) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sel = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    xs = sorted({r[x] for r in sel})
    mean = np.array([np.mean([100 * r["accuracy"] for r in sel if r[x] == v]) for v in xs])
    std = np.array([np.std([100 * r["accuracy"] for r in sel if r[x] == v],
                           ddof=1 if sum(r[x] == v for r in sel) > 1 else 0) for v in xs])
    return np.array(xs), mean, std


def _learned(ax, rows, x, color, marker, label, hollow=False, ls="-", **match):
    xs, mean, std = _stats(rows, x, **match)
    if not len(xs):
        return
    ax.errorbar(xs, mean, yerr=std, color=color, marker=marker, ls=ls, capsize=2.5, lw=1.2, ms=4.5,
                mfc="white" if hollow else color, label=label, zorder=3)


def _ordered(ax):
    """Legend entries grouped: learned curves, then exact oracles, then the paper's numbers."""
    handles, labels = ax.get_legend_handles_labels()
    rank = [0 if not (lab.startswith("exact") or lab.startswith("paper")) else 1 if lab.startswith("exact") else 2
            for lab in labels]
    order = sorted(range(len(labels)), key=lambda i: (rank[i], i))
    return [handles[i] for i in order], [labels[i] for i in order]


def _exact(ax, rows, x, color, ls, label, **match):
    xs, mean, _ = _stats(rows, x, **match)
    if len(xs):
        ax.plot(xs, mean, color=color, ls=ls, lw=1.0, alpha=0.9, label=label, zorder=2)


def _tv_panel(ax, curves, key, label_fmt, style_key=None, styles=None):
    values = sorted({c[key] for c in curves})
    cmap = __import__("matplotlib").colormaps["viridis"]
    for i, v in enumerate(values):
        col = cmap(0.05 + 0.85 * i / max(1, len(values) - 1))
        present = {c.get(style_key) for c in curves if c[key] == v} if style_key else {None}
        groups = [g for g in (styles or {}) if g in present] + sorted(g for g in present if g not in (styles or {}))
        for g in groups:
            sel = [c for c in curves if c[key] == v and (style_key is None or c.get(style_key) == g)]
            seeds = sorted({c.get("hmm_seed", 0) for c in sel})
            steps = sorted({c["step"] for c in sel})
            tv = np.array([[next((c["tv_mean"] for c in sel if c["step"] == s and c.get("hmm_seed", 0) == sd),
                                 np.nan) for s in steps] for sd in seeds])
            ls = styles.get(g, "-") if styles else "-"
            ax.plot(steps, np.nanmean(tv, axis=0), color=col, ls=ls, lw=1.1,
                    label=label_fmt(v) if g == groups[0] else None)
    ax.set_yscale("log")
    ax.set_xlabel("pretraining step")
    ax.set_ylabel(r"E$_x$ TV(model output, exact $G_0(x)$)")


def draw_exp1(results: list[dict], curves: list[dict], stem: str | Path) -> list[Path]:
    """Experiment 1 figure from the tidy rows of ``results`` and ``curves``; writes ``stem``.pdf/.png."""
    fig, (ax, ax2) = style.figure(ncols=2, width=style.TEXT_WIDTH, height=3.4)
    ms = sorted({r["num_states"] for r in results})
    n = 10
    _exact(ax, results, "num_states", C_PROMPT, "--", "exact prompt oracle (prompt reweights $H_0$)",
           model="exact", method="prompt_oracle_identity")
    _exact(ax, results, "num_states", C_PROMPT, ":", "exact prompt oracle (prompt token before $H_0$)",
           model="exact", method="prompt_oracle_reversal")
    _exact(ax, results, "num_states", C_PROMPT, "-.", "exact token prompt (best real token before $H_0$)",
           model="exact", method="prompt_oracle_token")
    _exact(ax, results, "num_states", C_HEAD, "--", "exact head oracle (linear head on $G_0$)",
           model="exact", method="head_oracle")
    _learned(ax, results, "num_states", C_PROMPT, "o", "prompt tuning (masked LM)", model="mlm", method="prompt")
    _learned(ax, results, "num_states", C_HEAD, "s", "head tuning (masked LM)", model="mlm", method="head")
    _learned(ax, results, "num_states", C_PROMPT, "D", "token prompt, no gradient steps (masked LM)", hollow=True,
             ls=(0, (4, 2)), model="mlm", method="token_prompt")
    _learned(ax, results, "num_states", C_PROMPT, "o", "prompt tuning (causal LM)", hollow=True, ls=(0, (1, 1.5)),
             model="causal", method="prompt")
    _learned(ax, results, "num_states", C_HEAD, "s", "head tuning (causal LM)", hollow=True, ls=(0, (1, 1.5)),
             model="causal", method="head")
    pm = [m for m in ms if m in PAPER_EXP1]
    if pm:
        ax.scatter(pm, [PAPER_EXP1[m][0] for m in pm], marker="*", s=36, facecolor="none", edgecolor=C_PROMPT,
                   lw=0.9, label="paper: prompt tuning", zorder=4)
        ax.scatter(pm, [PAPER_EXP1[m][1] for m in pm], marker="X", s=22, facecolor="none", edgecolor=C_HEAD,
                   lw=0.9, label="paper: head tuning", zorder=4)
    if min(ms) <= n < max(ms):
        ax.axvline(n + 0.5, color="0.5", lw=0.7, ls="-", alpha=0.5)
        ax.text(n + 0.8, 51.5, "m > n: W rank-deficient", fontsize=6, color="0.35", va="bottom")
        ax.text(n + 0.2, 51.5, "m <= n", fontsize=6, color="0.35", va="bottom", ha="right")
    ax.set_xticks(ms)
    ax.set_ylim(50, 101)
    ax.set_xlabel("hidden states m (vocabulary n = 10)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("(a) prompt vs head tuning (learned: mean ± std over seeds)")
    fig.legend(*_ordered(ax), loc="outside lower center", ncol=3, fontsize=6.5, handlelength=2.4,
               columnspacing=1.2)
    _tv_panel(ax2, curves, "num_states", lambda v: f"m = {v}", "model", {"mlm": "-", "causal": "--"})
    ax2.set_title("(b) pretraining (solid: masked LM, dashed: causal LM)")
    ax2.legend(fontsize=6, ncol=2)
    return style.save(fig, stem)


def draw_exp2(results: list[dict], curves: list[dict], stem: str | Path) -> list[Path]:
    """Experiment 2 figure from the tidy rows of ``results`` and ``curves``; writes ``stem``.pdf/.png."""
    fig, (ax, ax2) = style.figure(ncols=2, width=style.TEXT_WIDTH, height=3.4)
    ss = sorted({r["total_states"] for r in results})
    _exact(ax, results, "total_states", C_MEMORY, "--", "exact: memory HMM + attention head",
           hmm="memory", model="exact", method="attention")
    _exact(ax, results, "total_states", C_HEAD, "--", "exact: vanilla HMM + linear head",
           hmm="vanilla", model="exact", method="head")
    _exact(ax, results, "total_states", C_MEMORY, ":", "exact: memory HMM + linear head on $G_0$",
           hmm="memory", model="exact", method="head")
    _learned(ax, results, "total_states", C_MEMORY, "o", "memory HMM + attention head", hmm="memory",
             model="mlm", method="attention")
    _learned(ax, results, "total_states", C_HEAD, "s", "vanilla HMM + linear head", hmm="vanilla",
             model="mlm", method="head")
    _learned(ax, results, "total_states", C_MEMORY, "^", "memory HMM + linear head on $G_0$", hollow=True,
             ls=(0, (1, 1.5)), hmm="memory", model="mlm", method="head")
    ps = [s for s in ss if s in PAPER_EXP2]
    if ps:
        ax.scatter(ps, [PAPER_EXP2[s][0] for s in ps], marker="*", s=36, facecolor="none", edgecolor=C_MEMORY,
                   lw=0.9, label="paper: memory + attention", zorder=4)
        ax.scatter(ps, [PAPER_EXP2[s][1] for s in ps], marker="X", s=22, facecolor="none", edgecolor=C_HEAD,
                   lw=0.9, label="paper: vanilla + linear", zorder=4)
    ax.set_xticks(ss)
    ax.set_ylim(50, 101)
    ax.set_xlabel("total hidden states (memory: 4 syntax x N memory values; n = 10)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("(a) memory + attention vs vanilla + linear head")
    fig.legend(*_ordered(ax), loc="outside lower center", ncol=3, fontsize=6.5, handlelength=2.4,
               columnspacing=1.2)
    _tv_panel(ax2, curves, "total_states", lambda v: f"{v} states", "hmm", {"memory": "-", "vanilla": "--"})
    ax2.set_title("(b) pretraining (solid: memory HMM, dashed: vanilla HMM)")
    ax2.legend(fontsize=6, ncol=2)
    return style.save(fig, stem)


def redraw(run_dir: Path) -> list[Path]:
    """Redraw a wei2021-exp1 or wei2021-exp2 run's figure from its tables."""
    run_dir = Path(run_dir)
    meta = read_json(run_dir / "config.json")
    name = meta.get("experiment")
    results = read_jsonl(run_dir / "results.jsonl")
    curves = read_jsonl(run_dir / "curves.jsonl")
    if name == "wei2021-exp1":
        return draw_exp1(results, curves, run_dir / "wei2021_exp1")
    if name == "wei2021-exp2":
        return draw_exp2(results, curves, run_dir / "wei2021_exp2")
    raise ValueError(f"{run_dir / 'config.json'}: field 'experiment' is {name!r}, "
                     "expected 'wei2021-exp1' or 'wei2021-exp2'")
