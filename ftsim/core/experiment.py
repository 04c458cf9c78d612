"""The experiment protocol: a frozen config with presets, a run function, and a run directory per config.

An experiment module exposes an :class:`Experiment`. ``ftsim run NAME --preset P [--field value ...]``
builds the config, derives its run directory ``<results>/<NAME>/<P>-<hash>/`` from the config, writes
``config.json`` there, and calls ``experiment.run(config, ctx)``, which writes tidy results (JSONL + CSV) and
figures (PDF + PNG) into ``ctx.out_dir``. Units of work go through ``ctx.store`` (a :class:`ResultStore`), so
a killed run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import ftsim
from ftsim.core.config import config_hash
from ftsim.core.io import ResultStore, cache_root, read_json, results_root, to_jsonable, write_json

__all__ = ["Experiment", "RunContext", "resolve_device", "run_experiment", "run_dir_for"]


def resolve_device(name: str = "auto") -> str:
    """``auto`` picks ``cuda`` when a GPU is visible, else ``cpu``; other names are checked and returned."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but torch.cuda.is_available() is False")
    return name


@dataclasses.dataclass
class RunContext:
    """What a run function gets besides its config."""

    out_dir: Path
    cache_dir: Path
    overwrite: bool = False
    device: str = "cpu"
    progress: bool = True
    preset: str = "custom"

    @property
    def store(self) -> ResultStore:
        """Per-unit results of this run (resumable)."""
        return ResultStore(self.out_dir / "units")


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    config_cls: type
    presets: Mapping[str, Any]
    run: Callable[[Any, RunContext], Mapping[str, Any]]
    help: str = ""


def run_dir_for(name: str, config: Any, preset: str, root: Path | None = None) -> Path:
    root = results_root() if root is None else Path(root)
    return root / name / f"{preset}-{config_hash(config)}"


def run_experiment(
    experiment: Experiment,
    config: Any,
    *,
    preset: str = "custom",
    root: Path | None = None,
    overwrite: bool = False,
    device: str = "auto",
    progress: bool = True,
) -> tuple[Path, Mapping[str, Any]]:
    """Run ``experiment`` with ``config`` in its run directory; return the directory and the summary.

    A finished run (``summary.json`` present, same config) is reused unless ``overwrite``; an unfinished
    one resumes from its stored units.
    """
    if preset in experiment.presets and experiment.presets[preset] != config:
        preset = f"{preset}+custom"
    out_dir = run_dir_for(experiment.name, config, preset, root)
    summary_path = out_dir / "summary.json"
    if overwrite and out_dir.exists():
        shutil.rmtree(out_dir)
    if summary_path.exists():
        stored = read_json(out_dir / "config.json")
        if stored.get("config") == to_jsonable(config):
            return out_dir, read_json(summary_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "config.json", {
        "experiment": experiment.name, "preset": preset, "config": config,
        "config_hash": config_hash(config), "ftsim_version": ftsim.__version__,
    })
    root_path = results_root() if root is None else Path(root)
    ctx = RunContext(out_dir=out_dir, cache_dir=(cache_root() if root is None else root_path / "cache"),
                     overwrite=overwrite, device=resolve_device(device), progress=progress, preset=preset)
    t0 = time.perf_counter()
    summary = dict(experiment.run(config, ctx))
    summary.setdefault("wall_seconds", round(time.perf_counter() - t0, 3))
    summary.setdefault("device", ctx.device)
    write_json(summary_path, summary)
    return out_dir, summary
