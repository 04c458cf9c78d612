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

import collections
import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ftsim.core.cache import Unit, UnitCache, unit_key
from ftsim.core.claims import Claim

__all__ = ["Experiment", "Verifier", "RunContext", "UnitSpec", "resolve_device", "DeviceError", "loaded_once",
           "UnitMissing"]


class DeviceError(ValueError):
    """A device was requested that this machine does not have."""


class UnitMissing(LookupError):
    """A unit a run asked for is not in the cache and the run may only read (``--cached-only``)."""

    def __init__(self, kind: str, digest: str):
        super().__init__(f"unit {kind} {digest[:12]} is not computed yet")
        self.kind, self.digest = kind, digest


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


_LOADED: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()
LOADED_CAPACITY = 4  # objects kept per process (a real LM is ~1 GB): a long `ftsim reproduce` does not grow


def loaded_once(key: tuple, load: Callable[[], Any]) -> Any:
    """``load()`` once per process for ``key`` (e.g. ``(experiment, config hash, device, cache root)``), then the
    same object, while it is among the :data:`LOADED_CAPACITY` most recently used.

    An executor's worker computes many units of one run: the task, model and data a planned unit needs are loaded
    by the first unit and shared by the rest, and the planning process shares them with ``run`` likewise.
    """
    if key in _LOADED:
        _LOADED.move_to_end(key)
        return _LOADED[key]
    value = load()
    _LOADED[key] = value
    while len(_LOADED) > LOADED_CAPACITY:
        _LOADED.popitem(last=False)
    return value


@dataclasses.dataclass(frozen=True)
class UnitSpec:
    """A unit of work described by data alone, so that another process (a local worker, a SLURM job) can compute
    it: the cache key (kind, version, inputs) and the function that computes it, ``target(work, **args)``
    (a ``"module:function"`` name; ``args`` JSON). The run function asks for the same unit with
    :meth:`RunContext.unit` and finds it in the cache.

    Attributes:
        label: a short human name for progress and ``ftsim status``.
        cost: an a-priori estimate of what the unit needs, not part of its key: ``flops`` (arithmetic it does,
            e.g. 2 x parameters x tokens per forward pass, 3x that with the backward pass), ``memory_bytes``
            (peak device memory) and ``device``. It is stored in the unit's record, so ``--dry-run`` turns the
            flops of pending units into seconds at the rate measured on units computed before (see
            :func:`ftsim.app.runner.dry_run`).
        needs: digests of the units this one reads (a pretrained body, a fitted probe); it fetches them itself
            (:meth:`fetch`), and executors start it only after those of the same sweep finished.
    """

    kind: str
    version: int | str
    inputs: Any
    target: str
    args: Mapping[str, Any]
    label: str = ""
    cost: Mapping[str, Any] | None = None
    needs: tuple[str, ...] = ()

    @property
    def key(self):
        return unit_key(self.kind, self.version, self.inputs)

    def fetch(self, cache_root: str | os.PathLike) -> Unit:
        """This unit from the cache at ``cache_root``, computed here when missing (the cache's lock makes another
        process that is computing it a wait): how a unit gets a unit it needs, in whichever process it runs."""
        return UnitCache(cache_root).get_or_compute(self.key, self.compute, cost=self.cost)

    def compute(self, work) -> Any:
        import importlib

        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)(work, **dict(self.args))

    def to_json(self) -> dict:
        return {"kind": self.kind, "version": self.version, "inputs": self.inputs, "target": self.target,
                "args": dict(self.args), "label": self.label, "digest": self.key.digest,
                "cost": None if self.cost is None else dict(self.cost), "needs": list(self.needs)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "UnitSpec":
        return cls(d["kind"], d["version"], d["inputs"], d["target"], d["args"], d.get("label", ""), d.get("cost"),
                   tuple(d.get("needs", ())))


@dataclasses.dataclass
class RunContext:
    """What a run function gets besides its config: where to write tables, the unit cache, and how to run."""

    out_dir: Path
    cache: UnitCache
    overwrite: bool = False
    device: str = "cpu"
    progress: bool = True
    preset: str = "custom"
    cached_only: bool = False  # read finished units only: a unit not in the cache raises UnitMissing
    units_used: list[dict] = dataclasses.field(default_factory=list)
    units_missing: list[dict] = dataclasses.field(default_factory=list)

    def unit_of(self, spec: UnitSpec) -> Unit:
        """The unit of a :class:`UnitSpec` (computed here if no executor computed it already)."""
        return self.unit(spec.kind, spec.version, spec.inputs, spec.compute, cost=spec.cost)

    def unit(self, kind: str, version: int | str, inputs: Any, compute: Callable[[Any], Any], *,
             cost: Mapping[str, Any] | None = None) -> Unit:
        """The unit (kind, version, inputs) from the cache, or computed by ``compute(workdir)`` and stored
        (see :meth:`ftsim.core.cache.UnitCache.get_or_compute`). ``--overwrite`` recomputes the units of this run
        once (a unit asked for twice in one run is computed the first time only)."""
        key = unit_key(kind, version, inputs)
        if self.cached_only:
            found = self.cache.get(key)
            if found is None:
                if key.digest not in {u["digest"] for u in self.units_missing}:
                    self.units_missing.append({"kind": kind, "digest": key.digest})
                raise UnitMissing(kind, key.digest)
            self.units_used.append({"kind": kind, "digest": key.digest, "seconds": found.seconds,
                                    "read_seconds": 0.0})
            return found
        fresh = self.overwrite and key.digest not in {u["digest"] for u in self.units_used}
        t0 = time.perf_counter()
        unit = self.cache.get_or_compute(key, compute, overwrite=fresh, cost=cost)
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
