"""Executors: where the units of a sweep are computed before the run gathers them.

A run lists its units (:meth:`~ftsim.core.experiment.Experiment.plan`, each a :class:`UnitSpec`: a pure function of
its key), skips those already in the shared cache, and hands the rest to an executor; every result lands in the
cache through its atomic writer (a crashed, killed, pre-empted or re-submitted unit is recomputed alone and never
leaves a partial unit), and two processes asking for the same unit compute it once (the cache's lock). Then the
experiment's ``run`` reads them all from the cache and builds the tables.

* ``serial``   -- in this process, one unit after the other.
* ``local``    -- ``--jobs N`` worker processes on this machine (``spawn``); with several GPUs visible, worker i
  sees only GPU ``i mod count`` (``CUDA_VISIBLE_DEVICES``); each worker uses ``threads`` intra-op threads.
* ``submitit`` -- submitit's executor (job arrays, per-unit logs under the run's ``submitit/`` folder, requeue on
  pre-emption): ``--slurm-partition/--slurm-gpus/--slurm-time/--slurm-cpus`` on a SLURM cluster, and its
  ``local`` / ``debug`` modes here. submitit is an optional extra (``pip install -e '.[cluster]'``), imported
  only when chosen.

A unit that fails writes ``<cache>/<kind>/<xx>/.<digest>.failed.json`` (error, traceback, log path) for
``ftsim status``; the executor reports every failure after the others finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from ftsim.core.cache import UnitCache
from ftsim.core.errors import InputError
from ftsim.core.experiment import UnitSpec
from ftsim.core.io import atomic_write_text, write_json

__all__ = ["ExecutorConfig", "EXECUTORS", "compute_units", "unit_state", "failure_path", "compute_one", "waves"]

EXECUTORS = ("serial", "local", "submitit")


@dataclasses.dataclass(frozen=True)
class ExecutorConfig:
    """How to compute a sweep's units (see the module docstring)."""

    name: str = "serial"
    jobs: int = 1
    threads: int = 0  # intra-op threads per worker (0: cores // jobs, at least 1)
    cluster: str | None = None  # submitit: None = auto (SLURM when available), "local", "debug"
    slurm_partition: str | None = None
    slurm_gpus: int = 0
    slurm_time: int = 60  # minutes
    slurm_cpus: int = 2
    folder: str | None = None  # submitit logs (default: <run dir>/submitit)

    def __post_init__(self) -> None:
        if self.name not in EXECUTORS:
            raise InputError(f"{self.name!r}: choose from {', '.join(EXECUTORS)}", field="executor")
        if self.jobs < 1:
            raise InputError(f"must be >= 1, got {self.jobs}", field="jobs")
        if self.slurm_gpus < 0 or self.slurm_time < 1 or self.slurm_cpus < 1:
            raise InputError("slurm_gpus >= 0, slurm_time >= 1 and slurm_cpus >= 1 are needed", field="slurm_time")
        if self.cluster not in (None, "local", "debug", "slurm"):
            raise InputError(f"{self.cluster!r}: use local, debug or slurm", field="cluster")


def failure_path(cache: UnitCache, spec: UnitSpec) -> Path:
    key = spec.key
    return cache.path_of(key).parent / f".{key.digest}.failed.json"


def compute_one(spec_json: dict, cache_root: str, log: str | None = None) -> str:
    """Compute (or find) one unit in the cache at ``cache_root``; the entry point of every worker. Returns the
    unit's digest; on failure records it (see the module docstring) and re-raises."""
    spec = UnitSpec.from_json(spec_json)
    cache = UnitCache(cache_root)
    fail = failure_path(cache, spec)
    try:
        cache.get_or_compute(spec.key, spec.compute, cost=spec.cost)
    except BaseException as exc:
        fail.parent.mkdir(parents=True, exist_ok=True)
        write_json(fail, {"label": spec.label, "kind": spec.kind, "error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc(), "log": log, "pid": os.getpid(),
                          "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        raise
    fail.unlink(missing_ok=True)
    return spec.key.digest


def _init_worker(threads: int, gpus: int, counter) -> None:
    """Worker start-up: a GPU of its own when several are visible, a fixed number of intra-op threads."""
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    if gpus > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    os.environ["FTSIM_WORKER"] = str(index)
    import torch

    torch.set_num_threads(threads)


def _visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 -- no torch, no GPUs
        return 0


def compute_units(specs: Sequence[UnitSpec], cache: UnitCache, config: ExecutorConfig, *, run_dir: Path,
                  progress: bool = True) -> dict[str, Any]:
    """Compute every spec not yet in ``cache`` with the chosen executor. Returns counts and the failures
    (``{"planned", "cached", "computed", "failed": [...], "seconds"}``); a failure never stops the others."""
    from ftsim.core.progress import bar

    t0 = time.perf_counter()
    pending = [s for s in specs if not (cache.path_of(s.key) / "record.json").is_file()]
    write_json(run_dir / "units_plan.json", {"cache": str(cache.root), "units": [s.to_json() for s in specs]})
    failed: list[dict] = []
    (run_dir / "submitit_jobs.json").unlink(missing_ok=True)  # this sweep's job ids only
    for wave in waves(pending):
        if config.name == "serial":
            for s in bar(wave, desc="units (serial)", unit="unit", disable=not progress):
                try:
                    compute_one(s.to_json(), str(cache.root))
                except Exception as exc:  # noqa: BLE001 -- recorded; the run's gather step reports it again
                    failed.append({"label": s.label, "error": f"{type(exc).__name__}: {exc}"})
        elif config.name == "local":
            failed += _local(wave, cache, config, progress)
        else:
            failed += _submitit(wave, cache, config, run_dir, progress)
    return {"planned": len(specs), "cached": len(specs) - len(pending), "computed": len(pending) - len(failed),
            "failed": failed, "seconds": round(time.perf_counter() - t0, 3), "executor": config.name}


def waves(specs: Sequence[UnitSpec]) -> list[list[UnitSpec]]:
    """``specs`` in dependency order: wave 0 needs none of them, wave i needs some of wave i - 1 and nothing later
    (``UnitSpec.needs`` outside ``specs`` are cached or fetched by the unit itself). Plan order is kept inside a
    wave. A cycle is an error that names its units."""
    level: dict[str, int] = {}
    by_digest = {s.key.digest: s for s in specs}

    def depth(d: str, path: tuple[str, ...]) -> int:
        if d in path:
            names = [by_digest[x].label or by_digest[x].kind for x in (*path, d)]
            raise ValueError(f"units that need each other: {' -> '.join(names)}")
        if d not in level:
            needs = [n for n in by_digest[d].needs if n in by_digest]
            level[d] = 1 + max((depth(n, (*path, d)) for n in needs), default=-1)
        return level[d]

    out: list[list[UnitSpec]] = []
    for s in specs:
        i = depth(s.key.digest, ())
        out.extend([] for _ in range(i + 1 - len(out)))
        out[i].append(s)
    return [w for w in out if w]


def _local(pending: Sequence[UnitSpec], cache: UnitCache, config: ExecutorConfig, progress: bool) -> list[dict]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from ftsim.core.progress import bar

    ctx = mp.get_context("spawn")
    threads = config.threads or max(1, (os.cpu_count() or 1) // config.jobs)
    counter = ctx.Value("i", 0)
    failed = []
    with ProcessPoolExecutor(max_workers=config.jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(threads, _visible_gpus(), counter)) as pool:
        futures = {pool.submit(compute_one, s.to_json(), str(cache.root)): s for s in pending}
        b = bar(total=len(futures), desc=f"units (local, {config.jobs} workers)", unit="unit", disable=not progress)
        for fut in as_completed(futures):
            s = futures[fut]
            try:
                fut.result()
            except Exception as exc:  # noqa: BLE001
                failed.append({"label": s.label, "error": f"{type(exc).__name__}: {exc}"})
            b.update(1)
        b.close()
    return failed


def _submitit(pending: Sequence[UnitSpec], cache: UnitCache, config: ExecutorConfig, run_dir: Path,
              progress: bool) -> list[dict]:
    try:
        import submitit
    except ImportError:
        raise InputError("submitit is not installed: pip install -e '.[cluster]'", field="executor") from None
    from ftsim.core.progress import bar

    folder = Path(config.folder) if config.folder else run_dir / "submitit"
    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=config.cluster)
    params: dict[str, Any] = {"timeout_min": config.slurm_time, "cpus_per_task": config.slurm_cpus,
                              "name": f"ftsim-{run_dir.name}"}
    if config.slurm_gpus:
        params["gpus_per_node"] = config.slurm_gpus
    if config.slurm_partition:
        params["slurm_partition"] = config.slurm_partition
    if executor.cluster == "local":
        params = {k: v for k, v in params.items() if k in ("timeout_min", "cpus_per_task", "name", "gpus_per_node")}
        params["local_setup"] = [f"export OMP_NUM_THREADS={config.threads or 1}"]
    elif executor.cluster == "debug":
        params = {"timeout_min": config.slurm_time}
    executor.update_parameters(**{k: v for k, v in params.items() if k != "local_setup"})
    jobs = executor.map_array(compute_one, [s.to_json() for s in pending], [str(cache.root)] * len(pending))
    failed = []
    b = bar(total=len(jobs), desc=f"units (submitit {executor.cluster})", unit="unit", disable=not progress)
    for job, s in zip(jobs, pending):
        try:
            job.result()
        except Exception as exc:  # noqa: BLE001
            log = getattr(job.paths, "stderr", None)
            failed.append({"label": s.label, "error": f"{type(exc).__name__}: {str(exc).splitlines()[-1][:200]}",
                           "log": None if log is None else str(log)})
        b.update(1)
    b.close()
    ids_path = run_dir / "submitit_jobs.json"  # every wave's job ids (a sweep with dependencies has several)
    earlier = json.loads(ids_path.read_text()) if ids_path.is_file() else []
    atomic_write_text(ids_path, json.dumps(earlier + [str(j.job_id) for j in jobs]) + "\n")
    return failed


def unit_state(cache: UnitCache, spec: UnitSpec) -> tuple[str, dict | None]:
    """``done``, ``running`` (its lock is held by a process), ``failed`` (with the failure record) or ``pending``."""
    key = spec.key
    if (cache.path_of(key) / "record.json").is_file():
        return "done", None
    fail = failure_path(cache, spec)
    lock = cache.path_of(key).parent / f".{key.digest}.lock"
    if lock.is_file():
        import fcntl

        with open(lock, "a+") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return "running", None
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    if fail.is_file():
        return "failed", json.loads(fail.read_text())
    return "pending", None
