"""README tables that cannot go stale: generated from stored results, checked by the tests.

Measured tables in README.md sit between markers::

    <!-- ftsim:block verify-hmm -->
    ...generated...
    <!-- ftsim:end -->

and single measured numbers in prose between ``<!-- ftsim:value NAME -->`` and ``<!-- /ftsim -->``. Each name is
a renderer below that reads the stored results in ``docs/measured/`` (small tidy tables copied from a results
directory by ``ftsim docs --collect RESULTS``) or ``benchmarks/results/`` (the benchmarks' JSON).
``ftsim docs`` rewrites the blocks; ``ftsim docs --check`` (and ``tests/test_docs.py``) fails when README.md
differs from what the stored results give, and the tests also check that the stored exact claims are what the
code computes now.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Callable

from ftsim.core.io import atomic_write_text, read_json, read_jsonl, write_table
from ftsim.core.tables import markdown_table, mean_std, summarize

__all__ = ["REPO", "MEASURED", "render_readme", "collect", "RENDERERS", "VALUES", "render_block"]

REPO = Path(__file__).resolve().parents[2]
MEASURED = REPO / "docs" / "measured"
BENCH = REPO / "benchmarks" / "results"

_BLOCK = re.compile(r"(<!-- ftsim:block (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- ftsim:end -->)", re.S)
_VALUE = re.compile(r"(<!-- ftsim:value (?P<name>[\w.-]+) -->)(?P<body>.*?)(<!-- /ftsim -->)", re.S)


def _missing(what: str) -> str:
    return f"*(no stored results for {what}: run it, then `ftsim docs --collect results`)*\n"


def _rows(path: Path) -> list[dict] | None:
    return read_jsonl(path) if path.is_file() else None


# ---------------------------------------------------------------------------------------------------------------
# Renderers: name -> function() -> markdown
# ---------------------------------------------------------------------------------------------------------------

def _claims_block(name: str) -> str:
    rows = _rows(MEASURED / "verify" / f"{name}.jsonl")
    if rows is None:
        return _missing(f"`ftsim verify {name}`")
    timing = MEASURED / "verify" / f"{name}.timing.json"
    secs = read_json(timing).get("seconds") if timing.is_file() else None
    body = markdown_table(["claim", "setting", "measured", "verdict"],
                          [[r["claim"], r["setting"], r["measured"], r["verdict"]] for r in rows])
    n_pass = sum(r["verdict"] == "PASS" for r in rows)
    tail = f"\n{n_pass}/{len(rows)} claims hold" + (f"; the claims took {secs:.1f} s to compute." if secs else ".")
    return body + tail + "\n"


def _quick_summary() -> str:
    rows = _rows(MEASURED / "quick" / "summary.jsonl")
    if rows is None:
        return _missing("`ftsim reproduce --preset quick`")
    return markdown_table(["step", "verdict", "headline", "compute s"],
                          [[r["step"], r["verdict"], r["headline"], r["compute_seconds"]] for r in rows])


def _quick_minutes() -> str:
    rows = _rows(MEASURED / "quick" / "summary.jsonl")
    if rows is None:
        return "?"
    return f"{sum(float(r['compute_seconds'] or 0) for r in rows) / 60:.1f}"


def _quick_claims() -> str:
    total = passed = 0
    for p in sorted((MEASURED / "verify").glob("*.jsonl")):
        rows = read_jsonl(p)
        total += len(rows)
        passed += sum(r["verdict"] == "PASS" for r in rows)
    return f"{passed}/{total}"


def _fmt_ci(r: dict) -> str:
    if r.get("n", 0) < 2 or r.get("ci_low") is None or not math.isfinite(float(r["ci_low"])):
        return ""
    return f"{float(r['mean']):+.1f} [{float(r['ci_low']):+.1f}, {float(r['ci_high']):+.1f}]"


def _exp1() -> str:
    means = _rows(MEASURED / "wei2021-exp1" / "means.jsonl")
    if means is None:
        return _missing("`ftsim run wei2021-exp1 --preset quick`")
    diffs = {r["num_states"]: r for r in _rows(MEASURED / "wei2021-exp1" / "differences.jsonl") or []}
    get = {(r["num_states"], r["model"], r["method"]): r for r in means}
    ms = sorted({r["num_states"] for r in means})
    cols = [("mlm", "prompt"), ("mlm", "head"), ("exact", "head_oracle"), ("exact", "prompt_oracle_identity"),
            ("exact", "prompt_oracle_token")]
    out = []
    for m in ms:
        cells = [m] + [mean_std(get[(m, *c)], 1, 1) if (m, *c) in get else "" for c in cols]
        d = diffs.get(m)
        n = get.get((m, "mlm", "prompt"), {}).get("n", "")
        out.append(cells + [_fmt_ci(d) if d else "", n])
    for regime in ("m<=n", "m>n"):
        d = diffs.get(regime)
        if d:
            out.append([f"pooled {regime.replace('<=', ' ≤ ').replace('>', ' > ')}"] + [""] * len(cols)
                       + [_fmt_ci(d), d.get("n", "")])
    return markdown_table(["m", "prompt tuning (MLM)", "head tuning (MLM)", "head oracle (exact)",
                           "prompt oracle (exact)", "best real-token prompt (exact)",
                           "prompt - head, mean [95% CI]", "HMM x task pairs"], out)


def _exp2() -> str:
    means = _rows(MEASURED / "wei2021-exp2" / "means.jsonl")
    if means is None:
        return _missing("`ftsim run wei2021-exp2 --preset quick`")
    get = {(r["total_states"], r["hmm"], r["model"], r["method"]): r for r in means}
    cols = [("memory", "mlm", "attention"), ("memory", "mlm", "head"), ("vanilla", "mlm", "head"),
            ("memory", "exact", "attention"), ("vanilla", "exact", "head")]
    rows = [[s] + [mean_std(get[(s, *c_)], 1, 1) if (s, *c_) in get else "" for c_ in cols]
            for s in sorted({r["total_states"] for r in means})]
    table = markdown_table(["states", "memory + attention (learned)", "memory + linear (learned)",
                            "vanilla + linear (learned)", "memory + attention (exact)", "vanilla + linear (exact)"],
                           rows)
    for d in _rows(MEASURED / "wei2021-exp2" / "differences.jsonl") or []:
        table += (f"\nLearned {d['a']} − {d['b']}, paired over {d['n']} (states × HMM) pairs: {_fmt_ci(d)} "
                  f"(mean [95% t interval]).\n")
    return table


def _ntk_width() -> str:
    rows = _rows(MEASURED / "ntk-width" / "summary_by_width.jsonl")
    if rows is None:
        return _missing("`ftsim run ntk-width --preset quick`")
    return markdown_table(["hidden width", "parameters", "seeds", "net vs kernel GF (test)", "net vs linearised net",
                           "kernel movement"],
                          [[r["width"], f"{r['num_params']:,}", r["num_seeds"],
                            mean_std({"mean": r["dist_gf_test_mean"], "std": r["dist_gf_test_std"],
                                      "n": r["num_seeds"]}, 1, 3),
                            mean_std({"mean": r["dist_lin_test_mean"], "std": r["dist_lin_test_std"],
                                      "n": r["num_seeds"]}, 1, 3),
                            mean_std({"mean": r["kernel_move_mean"], "std": r["kernel_move_std"],
                                      "n": r["num_seeds"]}, 1, 3)] for r in rows])


_TASK_ORDER = ("SST-2", "SST-5", "MR", "CR", "MPQA", "Subj", "TREC")
_MALLADI_METHODS = ("zero-shot", "FT-SGD", "K-SGD", "K-SGD (logistic)", "FT-Adam", "K-A-SignGD", "FT (no prompt)",
                    "K-SGD (no prompt)", "K-SGD (no prompt, logistic)")


def _malladi_rows() -> list[dict]:
    rows: list[dict] = []
    for p in sorted((MEASURED / "malladi").glob("*.jsonl")):
        rows.extend(read_jsonl(p))
    return rows


def _pivot(rows: list[dict], metric: str, methods, scale: float, digits: int) -> str:
    sel = [r for r in rows if r["metric"] == metric]
    tasks = sorted({r["task"] for r in sel}, key=lambda t: (_TASK_ORDER.index(t) if t in _TASK_ORDER else 99, t))
    out = []
    for m in [m for m in methods if any(r["method"] == m for r in sel)]:
        cells = []
        for t in tasks:
            st = summarize(r["value"] for r in sel if r["method"] == m and r["task"] == t)
            cells.append(mean_std(st, scale, digits))
        out.append([m] + cells)
    return markdown_table(["method"] + tasks, out)


def _malladi_accuracy() -> str:
    rows = _malladi_rows()
    if not rows:
        return _missing("`ftsim run malladi`")
    return _pivot(rows, "accuracy", _MALLADI_METHODS, 100, 1)


def _malladi_diagnostics() -> str:
    rows = _malladi_rows()
    if not rows:
        return _missing("`ftsim run malladi`")
    out = []
    for metric, label, scale, digits in (("linearized_accuracy", "linearised-model accuracy %", 100, 1),
                                         ("gain_recovered", "share of FT gain recovered by the linearised model", 1, 2),
                                         ("lin_output_rel_error", "||f_lin - f_FT|| / ||f_FT - f_0|| (test)", 1, 3),
                                         ("kernel_rel_change", "eNTK movement ||K_FT - K_0||_F / ||K_0||_F", 1, 3)):
        if not any(r["metric"] == metric for r in rows):
            continue  # not measured in any stored run (e.g. a kernel that was not computed)
        table = _pivot(rows, metric, ("FT-SGD", "FT-Adam"), scale, digits)
        out.append(f"{label}:\n\n{table}")
    return "\n".join(out)


def _bench(name: str) -> dict | None:
    p = BENCH / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


# Markdown tables an experiment writes into its run directory (rendered there, with its tables), shown in README as
# block ``<experiment>.<stem>``: experiment -> (stems, figure stems to copy into figures/out/). Synthetic experiments
# are collected from their newest quick run, real-LM ones from their newest run of any preset on a real model.
# A figure stem is "name" (copied as figures/out/name.*) or "name>stored" (copied as figures/out/stored.*).
MD_TABLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "lpft-synthetic": (("comparison",), ("lpft>lpft_synthetic",)),
    "sparse-synthetic": (("tables",), ("sparse_synthetic",)),
    "smart-synthetic": (("comparison", "claims"), ("smart_synthetic",)),
    "deng2024": (("tables",), ("deng2024_transfer", "deng2024_radreg")),
    "lpft": (("comparison",), ("lpft",)),
    "sparse": (("comparison",), ("sparse",)),
    "smart": (("comparison", "claims"), ("smart",)),
}
_REAL = ("lpft", "sparse", "smart")


def _strip_title(text: str) -> str:
    lines = text.strip().splitlines()
    while lines and (lines[0].startswith("# ") or not lines[0].strip()):  # the file's own title: README has one
        lines.pop(0)
    return "\n".join(lines) + "\n"


def _md_block(exp: str, stem: str) -> str:
    """A synthetic experiment's table from its stored quick run; for a real-model experiment, the table of every
    stored run (each a directory under docs/measured/<exp>/), oldest first, each with the settings it changed."""
    if exp in _REAL:
        runs = sorted((d for d in (MEASURED / exp).glob("*") if (d / f"{stem}.md").is_file()),
                      key=lambda d: read_json(d / "source.json").get("order", 0) if (d / "source.json").is_file()
                      else 0)
        if not runs:
            return _missing(f"`ftsim run {exp}`")
        out = []
        for d in runs:
            info = read_json(d / "source.json") if (d / "source.json").is_file() else {}
            changed = info.get("changed") or {}
            what = ", ".join(f"`{k}={_short_value(v)}`" for k, v in changed.items())
            out.append(f"Run `{info.get('run', d.name)}` (preset `{info.get('base', '?')}`"
                       + (f" with {what}" if what else "") + "):\n\n"
                       + _strip_title((d / f"{stem}.md").read_text(encoding="utf-8")))
        return "\n".join(out)
    p = MEASURED / exp / f"{stem}.md"
    if not p.is_file():
        return _missing(f"`ftsim run {exp}`")
    text = _strip_title(p.read_text(encoding="utf-8"))
    src = MEASURED / exp / "source.json"
    if src.is_file():
        info = read_json(src)
        text += f"\n*(run `{info['run']}`, preset `{info['preset']}`.)*\n"
    return text


def _short_value(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def _changed_fields(exp: str, config: dict, base: str) -> dict:
    """The config fields of a stored run that differ from its base preset (what its caption says)."""
    from ftsim.app.registry import experiment as get_experiment
    from ftsim.core.io import to_jsonable

    try:
        preset = get_experiment(exp).presets[base]
    except Exception:  # noqa: BLE001 - an unknown experiment or preset: no caption
        return {}
    ref = to_jsonable(preset)
    ref = ref if isinstance(ref, dict) else {}
    return {k: v for k, v in config.items() if k in ref and ref[k] != v and k != "threads"}


def _bench_block(name: str) -> str:
    data = _bench(name)
    if data is None:
        return f"*(no stored benchmark: run `python benchmarks/{name}.py`)*\n"
    return _BENCH_RENDERERS[name](data)


def _hmm_bench(d: dict) -> str:
    rows = []
    for cond in ("idle", "loaded"):
        c = d.get("conditions", {}).get(cond)
        if not c:
            continue
        for what in ("sampling", "posteriors"):
            r = c[what]
            rows.append([cond, what, f"{r['ours_tokens_per_s']:.3g}", f"{r['hmmlearn_tokens_per_s']:.3g}",
                         f"{r['dynamax_tokens_per_s']:.3g}" if r.get("dynamax_tokens_per_s") else "—",
                         f"**{r['ratio_vs_hmmlearn']:.0f}×**",
                         f"**{r['ratio_vs_dynamax']:.1f}×**" if r.get("ratio_vs_dynamax") else "—"])
        if c["posteriors"].get("ours_workers2_tokens_per_s"):
            rows.append([cond, "posteriors, workers=2", f"{c['posteriors']['ours_workers2_tokens_per_s']:.3g}",
                         "", "", "", ""])
    out = markdown_table(["condition", "measure (tokens/s)", "ftsim", "hmmlearn", "dynamax", "vs hmmlearn",
                          "vs dynamax"], rows)
    cw, ag = d.get("corpus_writing"), d.get("agreement")
    if cw:
        out += (f"\nCorpus writing, {cw['tokens']:.0e} tokens to checksummed shards: {cw['tokens_per_s']:.3g} tokens/s, "
                f"peak RSS {cw['peak_rss_mb']:.0f} MB (targets >= 1e7 tokens/s, < 1 GB).")
    if ag:
        out += (f" Posteriors agree with hmmlearn to {ag['hmmlearn']['max_abs_posterior_diff']:.1e} and with dynamax to "
                f"{ag['dynamax']['max_abs_posterior_diff']:.1e}; workers=2 bitwise equal to workers=1: "
                f"{ag['workers2_bitwise_equal']}.")
    loads = ", ".join(f"{k} {v['load_average_1min_before']:.1f}" for k, v in d.get("conditions", {}).items())
    return out + (f" Load average (1 min) before each condition: {loads}.\n" if loads else "\n")


def _ntk_bench(d: dict) -> str:
    models = d.get("models") or {"gpt_style": d}
    rows = []
    for name, m in models.items():
        t, r, cov = m["times_s"], m["ratios"], m.get("coverage", {})
        covered = (f"{cov['covered_params']:,} / {cov['num_params']:,}" if "covered_params" in cov else "")
        la = m.get("load_average_start")
        rows.append([name.replace("_", "-"), covered, f"{t['ours']:.2f}", f"{t['floor']:.2f}", f"{t['naive']:.2f}",
                     f"{t['paper']:.1f}" if "paper" in t else "—",
                     f"**{r['ours_over_floor']:.2f}**", f"**{r['naive_over_ours']:.2f}**",
                     f"**{r['paper_over_ours']:.1f}**" if "paper_over_ours" in r else "—",
                     f"{m['relative_frobenius_error']['ours_vs_reference']:.1e}",
                     f"{la[0]:.1f}" if la else ""])
    return markdown_table(["model", "parameters covered by the factored engine", "ours (s)", "floor (s)", "naive (s)",
                           "LM-Kernel-FT (s)", "ours / floor (≤ 2)", "naive / ours (≥ 2)", "paper / ours (≥ 10)",
                           "rel. error vs float64 reference", "load avg at start"], rows)


def _executors_bench(d: dict) -> str:
    w, la = d["wall_s"], d["load_average_1min_before"]
    rows = [[m, f"{w[m]:.1f}", f"{la[m]:.1f}"] for m in w]
    proj = ", ".join(f"{n}: {t:.1f} s" for n, t in d["projected_wall_s"].items())
    return (markdown_table(["executor", "wall time (s)", "load avg before"], rows)
            + f"\nlocal --jobs 2 / serial speed-up **{d['speedup_local2_over_serial']:.2f}×**; tables byte-identical: "
              f"{d['tables_byte_identical']}; {d['num_units']} units, {d['sum_unit_seconds']:.1f} s of unit compute "
              f"(largest {d['max_unit_seconds']:.1f} s), {d['gather_overhead_s']:.1f} s outside units. Projected wall "
              f"time on N workers: {proj}.\n")


_BENCH_RENDERERS: dict[str, Callable[[dict], str]] = {"bench_hmm": _hmm_bench, "bench_ntk": _ntk_bench,
                                                      "bench_executors": _executors_bench}


RENDERERS: dict[str, Callable[[], str]] = {
    "quick-summary": _quick_summary,
    "wei2021-exp1": _exp1,
    "wei2021-exp2": _exp2,
    "ntk-width": _ntk_width,
    "malladi-accuracy": _malladi_accuracy,
    "malladi-diagnostics": _malladi_diagnostics,
}

for _exp, (_stems, _figs) in MD_TABLES.items():
    for _stem in _stems:
        RENDERERS[f"{_exp}.{_stem}"] = (lambda e=_exp, t=_stem: _md_block(e, t))
RENDERERS["bench-hmm"] = lambda: _bench_block("bench_hmm")
RENDERERS["bench-ntk"] = lambda: _bench_block("bench_ntk")
RENDERERS["bench-executors"] = lambda: _bench_block("bench_executors")


def _verify_renderers() -> None:
    """``verify-<name>`` for every registered verifier."""
    from ftsim.app.registry import VERIFIERS

    for name in VERIFIERS:
        RENDERERS.setdefault(f"verify-{name}", lambda n=name: _claims_block(n))


_verify_renderers()

VALUES: dict[str, Callable[[], str]] = {
    "quick-minutes": _quick_minutes,
    "quick-claims": _quick_claims,
}


def register(name: str, fn: Callable[[], str], value: bool = False) -> None:
    """Add a renderer (used by lines of theory that add their own README tables)."""
    (VALUES if value else RENDERERS)[name] = fn


def render_block(name: str) -> str:
    if name not in RENDERERS:
        raise KeyError(f"README block {name!r} has no renderer; known: {', '.join(sorted(RENDERERS))}")
    text = RENDERERS[name]()
    return text if text.endswith("\n") else text + "\n"


def render_text(text: str) -> str:
    """``text`` with every block and value regenerated."""
    text = _BLOCK.sub(lambda m: m.group(1) + render_block(m.group("name")) + m.group(4), text)
    return _VALUE.sub(lambda m: m.group(1) + VALUES[m.group("name")]() + m.group(4), text)


def render_readme(check: bool = False, path: Path | None = None) -> bool:
    """Regenerate README.md's blocks (or, with ``check``, only compare). Returns True if the file differs."""
    path = path or REPO / "README.md"
    old = path.read_text(encoding="utf-8")
    new = render_text(old)
    if new != old and not check:
        atomic_write_text(path, new)
    return new != old


# ---------------------------------------------------------------------------------------------------------------
# Collecting stored results from a results directory
# ---------------------------------------------------------------------------------------------------------------

def _newest(paths: list[Path]) -> Path | None:
    paths = [p for p in paths if (p / "summary.json").is_file()]
    return max(paths, key=lambda p: (p / "summary.json").stat().st_mtime) if paths else None


def _copy_table(src: Path, dst: Path) -> Path:
    write_table(dst.with_suffix(""), read_jsonl(src))
    dst.with_suffix(".csv").unlink(missing_ok=True)  # the JSONL is the stored form
    return dst


def collect(results: Path) -> list[Path]:
    """Copy the measured tables of ``results`` (a results root) into ``docs/measured/`` and the figures the README
    shows into ``figures/out/``; return the files written."""
    results = Path(results)
    written: list[Path] = []
    quick = results / "reproduce" / "quick"
    if (quick / "summary.jsonl").is_file():
        written.append(_copy_table(quick / "summary.jsonl", MEASURED / "quick" / "summary.jsonl"))
        for claims in sorted((quick / "verify").glob("*/claims.jsonl")):
            name = claims.parent.name
            written.append(_copy_table(claims, MEASURED / "verify" / f"{name}.jsonl"))
            if (claims.parent / "timing.json").is_file():
                t = read_json(claims.parent / "timing.json")
                (MEASURED / "verify").mkdir(parents=True, exist_ok=True)
                atomic_write_text(MEASURED / "verify" / f"{name}.timing.json",
                                  json.dumps({"seconds": t.get("seconds")}) + "\n")
    for exp, tables, figure in (("wei2021-exp1", ("means", "differences"), "wei2021_exp1"),
                                ("wei2021-exp2", ("means", "differences"), "wei2021_exp2"),
                                ("ntk-width", ("summary_by_width",), "ntk_width"),
                                ("hmm-exactness", (), "hmm_exactness")):
        run = _newest(list((results / exp).glob("quick-*")))
        if run is None:
            continue
        for t in tables:
            if (run / f"{t}.jsonl").is_file():
                written.append(_copy_table(run / f"{t}.jsonl", MEASURED / exp / f"{t}.jsonl"))
        for ext in ("png", "pdf"):
            if (run / f"{figure}.{ext}").is_file():
                shutil.copyfile(run / f"{figure}.{ext}", REPO / "figures" / "out" / f"{figure}.{ext}")
                written.append(REPO / "figures" / "out" / f"{figure}.{ext}")
    for exp, (stems, figs) in MD_TABLES.items():
        runs = list((results / exp).glob("*-*" if exp in _REAL else "quick-*"))
        if exp in _REAL:
            runs = [r for r in runs if not _is_tiny(r)]
            done = sorted((r for r in runs if (r / "summary.json").is_file()
                           and all((r / f"{t}.md").is_file() for t in stems)),
                          key=lambda r: (r / "summary.json").stat().st_mtime)
            for order, run in enumerate(done):
                c = read_json(run / "config.json")
                base = str(c.get("preset", "quick")).split("+")[0]
                dst_dir = MEASURED / exp / run.name
                dst_dir.mkdir(parents=True, exist_ok=True)
                for t in stems:
                    atomic_write_text(dst_dir / f"{t}.md", (run / f"{t}.md").read_text(encoding="utf-8"))
                    written.append(dst_dir / f"{t}.md")
                atomic_write_text(dst_dir / "source.json", json.dumps(
                    {"run": f"{exp}/{run.name}", "base": base, "order": (run / "summary.json").stat().st_mtime,
                     "changed": _changed_fields(exp, c.get("config", {}), base)}, default=str) + "\n")
            if done:
                fig_run = max(done, key=lambda r: (r / "results.jsonl").stat().st_size
                              if (r / "results.jsonl").is_file() else 0)  # the figure of the largest run
                for fig in figs:
                    src, _, dst = fig.partition(">")
                    for ext in ("png", "pdf"):
                        if (fig_run / f"{src}.{ext}").is_file():
                            shutil.copyfile(fig_run / f"{src}.{ext}", REPO / "figures" / "out" / f"{dst or src}.{ext}")
                            written.append(REPO / "figures" / "out" / f"{dst or src}.{ext}")
            continue
        run = _newest(runs)
        if run is None or not all((run / f"{t}.md").is_file() for t in stems):
            continue
        for t in stems:
            dst = MEASURED / exp / f"{t}.md"
            dst.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(dst, (run / f"{t}.md").read_text(encoding="utf-8"))
            written.append(dst)
        preset = read_json(run / "config.json").get("preset", run.name.split("-")[0]) \
            if (run / "config.json").is_file() else run.name.split("-")[0]
        atomic_write_text(MEASURED / exp / "source.json",
                          json.dumps({"run": f"{exp}/{run.name}", "preset": preset}) + "\n")
        for fig in figs:
            src, _, dst = fig.partition(">")
            for ext in ("png", "pdf"):
                if (run / f"{src}.{ext}").is_file():
                    shutil.copyfile(run / f"{src}.{ext}", REPO / "figures" / "out" / f"{dst or src}.{ext}")
                    written.append(REPO / "figures" / "out" / f"{dst or src}.{ext}")
    written.extend(collect_malladi(sorted((results / "malladi").glob("*/results.jsonl"))))
    return written


def _is_tiny(run: Path) -> bool:
    """A run on a random tiny model (a test run), not a real pretrained LM."""
    cfg = run / "config.json"
    if not cfg.is_file():
        return True
    c = read_json(cfg)
    model = str(c.get("config", c).get("model", ""))
    return model.startswith("tiny-")


def collect_malladi(tables: list[Path]) -> list[Path]:
    """Store the malladi rows of real models (tiny models are test runs) per (task, model, k); a later run's
    row replaces an earlier one with the same (method, seed, metric)."""
    groups: dict[tuple, dict[tuple, dict]] = {}
    for table in sorted(tables, key=lambda p: p.stat().st_mtime):
        for r in read_jsonl(table):
            if str(r.get("model", "")).startswith("tiny-"):
                continue
            g = groups.setdefault((r["task"], r["model"], r["k"]), {})
            g[(r["method"], r.get("seed"), r["metric"])] = r
    out = []
    for (task, model, k), rows in groups.items():
        path = MEASURED / "malladi" / f"{task}-{model}-k{k}.jsonl"
        write_table(path.with_suffix(""), list(rows.values()))
        path.with_suffix(".csv").unlink(missing_ok=True)
        out.append(path)
    return out
