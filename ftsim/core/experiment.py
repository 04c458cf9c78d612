"""The experiment protocol: what an experiment or a verifier declares, and what a run function gets.

An experiment module declares one :class:`Experiment` value: its config dataclass and named presets, the run
function, the figures drawn from its tables, the verifier of its line of theory, and the presets that
``ftsim reproduce`` runs. A verifier module declares one :class:`Verifier`: a tuple of claim functions, each
``claim(quick: bool, seed: int) -> Claim | list[Claim]``, used by ``ftsim verify`` and by the tests alike.
The application (:mod:`ftsim.app.runner`) builds the run directory from the config, calls ``run(config, ctx)``,
then draws the declared figures from the stored tables; experiments never import figure code.

A run function splits its work into units (:meth:`RunContext.unit`), each a pure function of a JSON description of
its inputs, stored in the shared content-addressed cache (:mod:`ftsim.core.cache`): a killed run resumes where it
stopped, and runs that share units compute them once.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ftsim.core.cache import Unit, UnitCache, unit_key
from ftsim.core.claims import Claim

__all__ = ["Experiment", "Verifier", "RunContext", "UnitSpec", "resolve_device", "DeviceError"]


class DeviceError(ValueError):
    """A device was requested that this machine does not have."""


def resolve_device(name: str = "auto") -> str:
    """``auto`` picks ``cuda`` when a GPU is visible, else ``cpu``; other names are checked and returned."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: no CUDA device is visible (torch.cuda.is_available() is False); "
                              f"use --device cpu or auto")
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise DeviceError(f"--device {name}: {torch.cuda.device_count()} CUDA device(s) visible")
        return name
    if name != "cpu":
        raise DeviceError(f"--device {name!r}: use auto, cpu, cuda or cuda:<index>")
    return name


@dataclasses.dataclass(frozen=True)
class UnitSpec:
    """A unit of work described by data alone, so that another process (a local worker, a SLURM job) can compute
    it: the cache key (kind, version, inputs) and the function that computes it, ``target(work, **args)``
    (a ``"module:function"`` name; ``args`` JSON). The run function asks for the same unit with
    :meth:`RunContext.unit` and finds it in the cache.

    Attributes:
        label: a short human name for progress and ``ftsim status``.
    """

    kind: str
    version: int | str
    inputs: Any
    target: str
    args: Mapping[str, Any]
    label: str = ""

    @property
    def key(self):
        return unit_key(self.kind, self.version, self.inputs)

    def compute(self, work) -> Any:
        import importlib

        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)(work, **dict(self.args))

    def to_json(self) -> dict:
        return {"kind": self.kind, "version": self.version, "inputs": self.inputs, "target": self.target,
                "args": dict(self.args), "label": self.label, "digest": self.key.digest}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "UnitSpec":
        return cls(d["kind"], d["version"], d["inputs"], d["target"], d["args"], d.get("label", ""))


@dataclasses.dataclass
class RunContext:
    """What a run function gets besides its config: where to write tables, the unit cache, and how to run."""

    out_dir: Path
    cache: UnitCache
    overwrite: bool = False
    device: str = "cpu"
    progress: bool = True
    preset: str = "custom"
    units_used: list[dict] = dataclasses.field(default_factory=list)

    def unit_of(self, spec: UnitSpec) -> Unit:
        """The unit of a :class:`UnitSpec` (computed here if no executor computed it already)."""
        return self.unit(spec.kind, spec.version, spec.inputs, spec.compute)

    def unit(self, kind: str, version: int | str, inputs: Any, compute: Callable[[Any], Any]) -> Unit:
        """The unit (kind, version, inputs) from the cache, or computed by ``compute(workdir)`` and stored
        (see :meth:`ftsim.core.cache.UnitCache.get_or_compute`). ``--overwrite`` recomputes the units of this run
        once (a unit asked for twice in one run is computed the first time only)."""
        key = unit_key(kind, version, inputs)
        fresh = self.overwrite and key.digest not in {u["digest"] for u in self.units_used}
        t0 = time.perf_counter()
        unit = self.cache.get_or_compute(key, compute, overwrite=fresh)
        self.units_used.append({"kind": kind, "digest": key.digest, "seconds": unit.seconds,
                                "read_seconds": round(time.perf_counter() - t0, 3)})
        return unit

    @property
    def compute_seconds(self) -> float:
        """Seconds the units of this run took when they were computed (by this run or an earlier one)."""
        seen: dict[str, float] = {}
        for u in self.units_used:
            seen.setdefault(u["digest"], float(u["seconds"] or 0.0))
        return sum(seen.values())


@dataclasses.dataclass(frozen=True)
class Experiment:
    """An experiment: config and presets, run function, figures, verifier, and its place in ``ftsim reproduce``.

    Attributes:
        name: the name on the command line (``ftsim run NAME``).
        config_cls: a frozen dataclass; its fields become flags.
        presets: name -> config (the first is the default; ``quick`` runs on a 2-core CPU, ``paper`` is the
            paper's setting).
        run: ``run(config, ctx) -> summary`` writes tidy tables into ``ctx.out_dir`` and returns a JSON summary
            with a one-line ``headline``.
        figures: ``"module:function"`` targets ``fn(run_dir) -> list[Path]`` that draw from the stored tables.
        plan: ``plan(config, ctx) -> list[UnitSpec]``, the run's units described by data, so an executor can
            compute them in other processes before ``run`` gathers them (None: ``run`` computes its units itself).
        verifier: the name of the verifier of this line of theory (``ftsim verify NAME``), if any.
        reproduce: presets of this experiment that ``ftsim reproduce --preset P`` runs.
        help: a paragraph for ``ftsim run NAME --help``; the first line is its one-line summary.
    """

    name: str
    config_cls: type
    presets: Mapping[str, Any]
    run: Callable[[Any, RunContext], Mapping[str, Any]]
    figures: tuple[str, ...] = ()
    verifier: str | None = None
    reproduce: tuple[str, ...] = ()
    help: str = ""
    plan: Callable[[Any, RunContext], Sequence[UnitSpec]] | None = None

    @property
    def summary_line(self) -> str:
        return self.help.strip().splitlines()[0] if self.help.strip() else self.name


@dataclasses.dataclass(frozen=True)
class Verifier:
    """A line of theory's numerical checks: claim functions shared by ``ftsim verify`` and the tests.

    Attributes:
        name: ``ftsim verify NAME``.
        claims: functions ``claim(quick: bool, seed: int) -> Claim | list[Claim]``.
        reproduce: presets of ``ftsim reproduce`` that run it.
        help: one paragraph; the first line is the summary.
    """

    name: str
    claims: tuple[Callable[[bool, int], Claim | Sequence[Claim]], ...]
    reproduce: tuple[str, ...] = ("quick", "paper")
    help: str = ""

    @property
    def summary_line(self) -> str:
        return self.help.strip().splitlines()[0] if self.help.strip() else self.name

    def check(self, quick: bool = True, seed: int = 0) -> list[Claim]:
        """Every claim, in order."""
        out: list[Claim] = []
        for fn in self.claims:
            got = fn(quick, seed)
            out.extend([got] if isinstance(got, Claim) else list(got))
        return out
