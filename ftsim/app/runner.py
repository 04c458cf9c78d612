"""Running experiments and verifiers: run directories, the unit cache, figures drawn after the run, and verifier
claims cached like any unit.

``run_experiment`` builds ``<results>/<name>/<preset>-<config hash>/``, writes ``config.json``, calls the
experiment's run function with a :class:`~ftsim.core.experiment.RunContext` (its units go through the shared
cache under ``$FTSIM_CACHE``, default ``<results>/cache``), draws the experiment's declared figures from the
stored tables (a figure that fails is reported, never loses the tables), and writes ``summary.json``. A rerun
recomputes nothing that is cached; ``overwrite`` recomputes this run's units.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import ftsim
from ftsim.app.registry import load
from ftsim.core.cache import UnitCache, unit_key
from ftsim.core.claims import Claim, claims_markdown
from ftsim.core.config import config_hash
from ftsim.core.errors import InputError
from ftsim.core.experiment import Experiment, RunContext, UnitMissing, Verifier, resolve_device
from ftsim.core.io import atomic_write_text, results_root, write_json, write_table

__all__ = ["cache_for", "run_dir_for", "run_experiment", "draw_figures", "run_verifier", "check_output_dir",
           "code_fingerprint", "UnitsFailed", "dry_run", "status"]


class UnitsFailed(RuntimeError):
    """Some units of a sweep failed in the executor (their records name the errors and logs)."""

_PACKAGES = ("ftsim/core", "theory", "simulate", "real_tasks")


def cache_for(root: Path | None = None) -> UnitCache:
    """The unit cache: ``$FTSIM_CACHE/units`` if set, else ``<root>/cache/units`` (root: ``--out``, else
    ``$FTSIM_RESULTS`` or ``./results``)."""
    env = os.environ.get("FTSIM_CACHE")
    base = Path(env) if env else (Path(root) if root is not None else results_root()) / "cache"
    return UnitCache(base / "units")


def check_output_dir(path: Path, field: str = "out") -> Path:
    """Fail before any work if ``path`` cannot be a writable directory (a parent that is a file, no permission)."""
    path = Path(path)
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{path}: {probe} is a file, not a directory", field=field)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{path}: {probe} is not writable", field=field)
    return path


def run_dir_for(name: str, config: Any, preset: str, root: Path | None = None) -> Path:
    root = results_root() if root is None else Path(root)
    return root / name / f"{preset}-{config_hash(config)}"


def draw_figures(experiment: Experiment, run_dir: Path) -> tuple[list[Path], list[str]]:
    """Draw the experiment's figures from the tables in ``run_dir``; (paths written, errors)."""
    paths: list[Path] = []
    errors: list[str] = []
    for target in experiment.figures:
        try:
            paths.extend(Path(p) for p in load(target)(run_dir))
        except Exception as exc:  # noqa: BLE001 -- a figure must never lose the tables written before it
            errors.append(f"{target}: {type(exc).__name__}: {exc}")
    return paths, errors


def run_experiment(experiment: Experiment, config: Any, *, preset: str = "custom", root: Path | None = None,
                   cache: UnitCache | None = None, overwrite: bool = False, device: str = "auto",
                   progress: bool = True, executor=None, cached_only: bool = False) -> tuple[Path, dict]:
    """Run ``experiment`` with ``config``; return its run directory and summary.

    With an ``executor`` (:class:`ftsim.app.executors.ExecutorConfig`) other than serial, the experiment's planned
    units are computed there first (see :mod:`ftsim.app.executors`); the run then gathers them from the cache.
    ``cached_only`` computes nothing: the tables are built from the units finished so far (a sweep still running,
    or one cut short), for experiments whose run leaves out what is missing (``summary["units_missing"]``); others
    stop with an error naming the first missing unit."""
    if cached_only and (overwrite or (executor is not None and executor.name != "serial")):
        raise InputError("--cached-only reads finished units: drop --overwrite and --executor", field="cached_only")
    if preset in experiment.presets and experiment.presets[preset] != config:
        preset = f"{preset}+custom"
    root = Path(root) if root is not None else results_root()
    check_output_dir(root)
    device = resolve_device(device)
    out_dir = run_dir_for(experiment.name, config, preset, root)
    created = [p for p in [out_dir, *out_dir.parents] if not p.exists()]
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _run_in(experiment, config, preset, out_dir, root, cache, overwrite, device, progress, executor,
                       cached_only)
    except (InputError, FileNotFoundError, NotADirectoryError, MemoryError):
        # bad input found by the run (a data file, a budget): leave no run directory behind
        if created and not (out_dir / "units.json").exists():
            import shutil

            shutil.rmtree(created[-1], ignore_errors=True)
        raise


def _run_in(experiment, config, preset, out_dir, root, cache, overwrite, device, progress, executor,
            cached_only=False):
    write_json(out_dir / "config.json", {"experiment": experiment.name, "preset": preset, "config": config,
                                         "config_hash": config_hash(config), "ftsim_version": ftsim.__version__})
    ctx = RunContext(out_dir=out_dir, cache=cache or cache_for(root), overwrite=overwrite, device=device,
                     progress=progress, preset=preset, cached_only=cached_only)
    t0 = time.perf_counter()
    fanned = None
    if executor is not None and executor.name != "serial":
        from ftsim.app.executors import compute_units

        if experiment.plan is None:
            import warnings

            warnings.warn(f"experiment {experiment.name} has no unit plan: its units are computed in this process",
                          stacklevel=2)
        elif overwrite:
            raise InputError("--overwrite recomputes in this process; drop it or use --executor serial",
                             field="executor")
        else:
            fanned = compute_units(experiment.plan(config, ctx), ctx.cache, executor, run_dir=out_dir,
                                   progress=progress)
            if fanned["failed"]:
                write_json(out_dir / "executor.json", fanned)
                raise UnitsFailed(f"{len(fanned['failed'])} of {fanned['planned']} units failed (first: "
                                  f"{fanned['failed'][0]['label']}: {fanned['failed'][0]['error']}); "
                                  f"see `ftsim status {out_dir}`; a rerun computes only the missing units")
    try:
        summary = dict(experiment.run(config, ctx))
    except UnitMissing as exc:
        raise InputError(f"{exc}; {experiment.name} needs every unit for its tables: run it without --cached-only",
                         field="cached_only") from None
    if ctx.units_missing:
        summary["units_missing"] = ctx.units_missing
    if fanned is not None:
        summary["executor"] = fanned
    figures, errors = draw_figures(experiment, out_dir)
    summary.update({
        "figures": [str(p) for p in figures], "figure_errors": errors,
        "this_run_seconds": round(time.perf_counter() - t0, 3),
        "compute_seconds": round(ctx.compute_seconds, 3), "units": len({u["digest"] for u in ctx.units_used}),
        "device": device,
    })
    write_json(out_dir / "units.json", ctx.units_used)
    write_json(out_dir / "summary.json", summary)
    return out_dir, summary


def code_fingerprint() -> str:
    """SHA-256 over the source of the packages a verifier may run (core, theory, simulate, real_tasks): the code
    version of a cached verifier result, so any change to that code recomputes it."""
    base = Path(ftsim.__file__).resolve().parents[1]
    h = hashlib.sha256()
    for pkg in _PACKAGES:
        for p in sorted((base / pkg).rglob("*.py")):
            h.update(p.relative_to(base).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def run_verifier(verifier: Verifier, *, quick: bool = True, seed: int = 0, out: Path | None = None,
                 cache: UnitCache | None = None, overwrite: bool = False) -> tuple[list[Claim], dict]:
    """Run (or read from the cache) a verifier's claims; write ``claims.jsonl/csv/md`` under ``out``.

    Returns the claims and ``{"seconds": time the claims took when computed, "cached": bool}``."""
    out = Path(out) if out is not None else results_root() / "verify" / verifier.name
    check_output_dir(out)
    cache = cache or cache_for(None)
    key = unit_key(f"verify.{verifier.name}", code_fingerprint(), {"quick": quick, "seed": seed})
    cached = not overwrite and cache.get(key) is not None
    unit = cache.get_or_compute(key, lambda work: {"claims": [c.row() for c in verifier.check(quick, seed)]},
                                overwrite=overwrite)
    claims = [Claim.from_row(r) for r in unit.result["claims"]]
    write_table(out / "claims", [c.row() for c in claims])
    atomic_write_text(out / "claims.md", claims_markdown(claims))
    write_json(out / "timing.json", {"seconds": unit.seconds, "cached": cached})
    return claims, {"seconds": unit.seconds, "cached": cached}



def _median(xs: list[float]) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def _measured(cache: UnitCache, kind: str) -> list[dict]:
    """Seconds, peak memory and stored cost of every finished unit of ``kind`` in the cache."""
    out = []
    for rec in (cache.root / kind).glob("*/*/record.json"):
        try:
            r = json.loads(rec.read_text())
            seconds = float(r["seconds"])
        except (ValueError, KeyError, TypeError, OSError):
            continue
        mem, cost = r.get("memory") or {}, r.get("cost") or {}
        out.append({"seconds": seconds, "rss": mem.get("rss_bytes"), "cuda": mem.get("cuda_bytes"),
                    "flops": cost.get("flops"), "device": str(cost.get("device", "cpu")).split(":")[0]})
    return out


def _rate(measured: list[dict], device: str) -> tuple[float | None, int]:
    """Median seconds per flop of the measured units that stored their flops, on this kind of device."""
    rates = [m["seconds"] / m["flops"] for m in measured if m["flops"] and m["device"] == device]
    return _median(rates), len(rates)


def _gib(xs) -> float | None:
    xs = [x for x in xs if x]
    return round(max(xs) / 2 ** 30, 2) if xs else None


def _estimate_kind(specs: list, cached: list[bool], measured: list[dict], fallback_rate: tuple[float | None, int],
                   device: str) -> dict:
    """Counts, a-priori memory and the time estimate of one kind of unit (see :func:`dry_run`)."""
    pending = [s for s, c in zip(specs, cached) if not c]
    flops = [(s.cost or {}).get("flops") for s in pending]
    k: dict[str, Any] = {"units": len(specs), "cached": sum(cached), "measured_units": len(measured)}
    k["median_seconds"] = _median([m["seconds"] for m in measured])
    k["pending_tflop"] = float(f"{sum(flops) / 1e12:.4g}") if pending and all(flops) else None
    rate, n = _rate(measured, device)
    basis = f"flops x seconds/flop of {n} measured unit(s) of this kind" if rate is not None else None
    if rate is None and fallback_rate[0] is not None:
        rate, basis = fallback_rate[0], f"flops x seconds/flop of {fallback_rate[1]} measured unit(s) of other kinds"
    if not pending:
        est, basis = 0.0, "all cached"
    elif rate is not None and k["pending_tflop"] is not None:
        est = round(rate * sum(flops), 1)
    elif k["median_seconds"] is not None:
        est, basis = round(k["median_seconds"] * len(pending), 1), f"median of {len(measured)} measured unit(s)"
    else:
        est, basis = None, "nothing measured yet"
    k["estimated_seconds"], k["estimate_basis"] = est, basis
    k["estimated_peak_memory_gib"] = _gib((s.cost or {}).get("memory_bytes") for s in specs)
    k["max_peak_rss_gib"] = _gib(m["rss"] for m in measured)
    k["max_peak_cuda_gib"] = _gib(m["cuda"] for m in measured)
    return k


def dry_run(experiment: Experiment, config: Any, *, device: str, cache: UnitCache, out_dir: Path | None = None
            ) -> dict:
    """The planned units of a run: how many per kind, how many are cached, and what the pending ones need.

    Time: when the planned units carry a cost (``UnitSpec.cost["flops"]``), their flops times the seconds per flop
    measured on finished units of the same kind on this kind of device (else of any kind: one machine's
    effective speed); otherwise the median measured time of the kind times the count; None where nothing was
    measured yet. Memory: the a-priori peak device memory of the largest unit (``cost["memory_bytes"]``), and the
    largest peak measured for a unit of that kind (process resident set; CUDA allocations when on a GPU).
    """
    if experiment.plan is None:
        raise InputError(f"experiment {experiment.name} has no unit plan to show", field="dry_run")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ctx = RunContext(out_dir=Path(out_dir or tmp), cache=cache, device=device, progress=False, preset="dry-run")
        specs = experiment.plan(config, ctx)
    by_kind: dict[str, list] = {}
    for s in specs:
        by_kind.setdefault(s.kind, []).append(s)
    dev = device.split(":")[0]
    measured = {kind: _measured(cache, kind) for kind in by_kind}
    any_kind = _rate([m for ms in measured.values() for m in ms], dev)  # one machine's effective speed
    kinds = {}
    for kind, ss in by_kind.items():
        cached = [(cache.path_of(s.key) / "record.json").is_file() for s in ss]
        kinds[kind] = _estimate_kind(ss, cached, measured[kind], any_kind, dev)
    total = [k["estimated_seconds"] for k in kinds.values()]
    return {"experiment": experiment.name, "units": len(specs), "device": device, "kinds": kinds,
            "estimated_seconds": None if any(t is None for t in total) else round(sum(total), 1)}


def status(run_dir: Path) -> dict:
    """How many of a run's planned units are done, running, failed (with the failing unit's error and log) or
    pending: from ``units_plan.json``, which an executor writes when it plans the run."""
    from ftsim.app.executors import unit_state
    from ftsim.core.experiment import UnitSpec

    run_dir = Path(run_dir)
    plan = run_dir / "units_plan.json"
    if not plan.is_file():
        used = run_dir / "units.json"
        if used.is_file():
            units = json.loads(used.read_text())
            return {"run": str(run_dir), "done": len({u["digest"] for u in units}), "running": 0, "failed": [],
                    "pending": 0, "note": "run computed in one process (no executor plan); all its units are done"}
        raise InputError(f"{run_dir}: no units_plan.json or units.json (not a run directory, or it never started)",
                         path=run_dir)
    data = json.loads(plan.read_text())
    cache = UnitCache(data["cache"])
    out: dict[str, Any] = {"run": str(run_dir), "done": 0, "running": 0, "pending": 0, "failed": []}
    for d in data["units"]:
        state, info = unit_state(cache, UnitSpec.from_json(d))
        if state == "failed":
            out["failed"].append({"label": d.get("label"), "error": info.get("error"), "log": info.get("log"),
                                  "record": str(cache.path_of(UnitSpec.from_json(d).key).parent
                                                / f".{d['digest']}.failed.json")})
        else:
            out[state] += 1
    return out
