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
from ftsim.core.experiment import Experiment, RunContext, Verifier, resolve_device
from ftsim.core.io import atomic_write_text, results_root, write_json, write_table

__all__ = ["cache_for", "run_dir_for", "run_experiment", "draw_figures", "run_verifier", "check_output_dir",
           "code_fingerprint"]

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
                   progress: bool = True) -> tuple[Path, dict]:
    """Run ``experiment`` with ``config``; return its run directory and summary."""
    if preset in experiment.presets and experiment.presets[preset] != config:
        preset = f"{preset}+custom"
    root = Path(root) if root is not None else results_root()
    check_output_dir(root)
    device = resolve_device(device)
    out_dir = run_dir_for(experiment.name, config, preset, root)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "config.json", {"experiment": experiment.name, "preset": preset, "config": config,
                                         "config_hash": config_hash(config), "ftsim_version": ftsim.__version__})
    ctx = RunContext(out_dir=out_dir, cache=cache or cache_for(root), overwrite=overwrite, device=device,
                     progress=progress, preset=preset)
    t0 = time.perf_counter()
    summary = dict(experiment.run(config, ctx))
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

