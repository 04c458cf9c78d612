"""One content-addressed cache for every unit of work: corpora, pretrained checkpoints, kernels, fine-tuning runs,
verifier claims.

A *unit* is a pure function of its inputs. Its key is the SHA-256 of ``{"kind", "version", "inputs"}``: ``kind``
names the computation (``"wei2021.pretrain"``), ``version`` is the code version that made it (bumped by the code
whenever the computation changes), ``inputs`` is a JSON description of everything it depends on. Its value is a
directory::

    <root>/<kind>/<key[:2]>/<key>/
        record.json     kind, version, inputs, the small JSON result, and the SHA-256 and size of every file
        <files>         arrays (.npy, no pickle), safetensors checkpoints, corpus shards, ...

Writing: the unit is built in a temporary directory beside its final place, ``record.json`` is written last, and
the directory is renamed into place -- atomic on POSIX, so a killed process never leaves a half-written unit.
Two processes asking for the same unit take an advisory lock (``fcntl.flock`` on ``<key>.lock``): the second waits
and reads the first's result, so a unit is computed once; if the lock is unavailable (a filesystem without locks)
both compute and the first rename wins -- never a corrupt unit either way.

Reading: every file is checked against its recorded SHA-256 and size (``verify=True``). A unit whose record does
not parse, names another kind/version/inputs, or whose files do not match is moved aside (``.bad-*``), reported
with a warning naming the file, and recomputed. Records of an older ``version`` live under another key and are
never read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from ftsim.core.io import cache_root, current_umask, read_json, save_npy, sha256_file, to_jsonable, write_json

__all__ = ["UnitCache", "Unit", "UnitKey", "CacheWarning", "default_cache", "unit_key"]

RECORD = "record.json"
SCHEMA = "ftsim-unit/1"


def _reset_peak_memory() -> None:
    """Start a unit's memory measurement: reset the process's resident-set high-water mark where Linux allows it
    (``/proc/self/clear_refs``) and torch's CUDA peak counter when torch is already imported and sees a GPU."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_memory() -> dict:
    """The unit's peak memory as far as it can be measured: ``rss_bytes`` is the resident-set high-water mark since
    :func:`_reset_peak_memory` (since process start where it could not be reset: an upper bound, said by
    ``rss_scope``), ``cuda_bytes`` torch's peak allocated CUDA memory (None without a GPU)."""
    out: dict[str, Any] = {"rss_bytes": None, "rss_scope": "unit", "cuda_bytes": None}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    out["rss_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        import resource

        out.update(rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, rss_scope="process")
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        out["cuda_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


class CacheWarning(UserWarning):
    """A cached unit was unreadable or corrupt and is being recomputed."""


@dataclasses.dataclass(frozen=True)
class UnitKey:
    """What identifies a unit: its kind, code version and inputs (and the derived hex digest)."""

    kind: str
    version: int | str
    inputs: Any
    digest: str

    @property
    def short(self) -> str:
        return self.digest[:12]


def _canonical(obj: Any) -> str:
    return json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)


def unit_key(kind: str, version: int | str, inputs: Any) -> UnitKey:
    """The key of a unit (see the module docstring)."""
    if not kind or any(c in kind for c in "/\\ ") or kind.startswith("."):
        raise ValueError(f"unit kind {kind!r}: use letters, digits, '.', '-' and '_'")
    inputs = json.loads(_canonical(inputs))  # the stored form: exactly what was hashed
    digest = hashlib.sha256(_canonical({"kind": kind, "version": version, "inputs": inputs}).encode()).hexdigest()
    return UnitKey(kind, version, inputs, digest)


@dataclasses.dataclass(frozen=True)
class Unit:
    """A finished unit: its directory and its record (``record["result"]`` is the JSON result)."""

    key: UnitKey
    path: Path
    record: Mapping[str, Any]

    @property
    def result(self) -> Any:
        return self.record.get("result")

    def file(self, name: str) -> Path:
        if name not in self.record.get("files", {}):
            raise KeyError(f"{self.path}: unit has no file {name!r} (has {sorted(self.record.get('files', {}))})")
        return self.path / name

    def array(self, name: str) -> np.ndarray:
        """A stored array (``name`` without ``.npy``), loaded without pickle."""
        return np.load(self.file(name + ".npy"), allow_pickle=False)

    @property
    def seconds(self) -> float | None:
        """Wall time of the computation that made it (not of this read)."""
        return self.record.get("seconds")


class _Workdir:
    """Where a unit under construction writes its files."""

    def __init__(self, path: Path):
        self.path = path
        self.arrays: dict[str, str] = {}

    def save_array(self, name: str, array: np.ndarray) -> Path:
        p = self.path / f"{name}.npy"
        self.arrays[name] = save_npy(p, array)
        return p


def _hash_files(root: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != RECORD:
            rel = p.relative_to(root).as_posix()
            files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return files


class UnitCache:
    """The unit cache under ``root`` (default ``$FTSIM_CACHE/units``, see :func:`default_cache`)."""

    def __init__(self, root: str | os.PathLike, verify: bool = True):
        self.root = Path(root)
        self.verify = verify

    # -- paths ----------------------------------------------------------------------------------------------
    def path_of(self, key: UnitKey) -> Path:
        return self.root / key.kind / key.digest[:2] / key.digest

    def _lock_path(self, key: UnitKey) -> Path:
        return self.root / key.kind / key.digest[:2] / f".{key.digest}.lock"

    # -- reading --------------------------------------------------------------------------------------------
    def get(self, key: UnitKey) -> Unit | None:
        """The finished unit, verified, or None (missing, or corrupt: moved aside with a warning)."""
        path = self.path_of(key)
        if not (path / RECORD).is_file():
            return None
        problem = None
        try:
            record = read_json(path / RECORD)
        except (ValueError, OSError) as exc:
            record, problem = None, f"{path / RECORD}: {exc}"
        if record is not None:
            problem = self._check(key, path, record)
        if problem is None:
            return Unit(key, path, record)
        self._discard(path, problem)
        return None

    def _check(self, key: UnitKey, path: Path, record: Any) -> str | None:
        if not isinstance(record, dict) or record.get("schema") != SCHEMA:
            return f"{path / RECORD}: not a unit record of schema {SCHEMA}"
        for field, want in (("kind", key.kind), ("version", key.version), ("inputs", key.inputs)):
            if record.get(field) != want:
                return f"{path / RECORD}: field {field!r} differs from the requested unit"
        files = record.get("files")
        if not isinstance(files, dict):
            return f"{path / RECORD}: field 'files' missing"
        for name, meta in files.items():
            p = path / name
            if not p.is_file():
                return f"{p}: missing (listed in {path / RECORD})"
            if self.verify:
                if p.stat().st_size != meta.get("bytes") or sha256_file(p) != meta.get("sha256"):
                    return f"{p}: SHA-256 differs from the one recorded when the unit was made (corrupt or altered)"
        return None

    def _discard(self, path: Path, problem: str) -> None:
        warnings.warn(f"cached unit is unusable and will be recomputed: {problem}", CacheWarning, stacklevel=3)
        bad = path.parent / f".bad-{path.name}-{int(time.time() * 1e6)}"
        with contextlib.suppress(OSError):
            os.rename(path, bad)
            shutil.rmtree(bad, ignore_errors=True)

    # -- writing --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self, key: UnitKey) -> Iterator[None]:
        lock = self._lock_path(key)
        lock.parent.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # pragma: no cover -- not POSIX: rely on the atomic rename alone
            yield
            return
        with open(lock, "a+") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            except OSError:  # a filesystem without locks: the atomic rename still keeps units whole
                yield
                return
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def get_or_compute(self, key: UnitKey, compute: Callable[[_Workdir], Any], *, overwrite: bool = False,
                       cost: Mapping[str, Any] | None = None) -> Unit:
        """The unit ``key``: read from the cache, or computed by ``compute(workdir)`` and stored.

        ``compute`` returns the JSON-able result and may write files into ``workdir.path`` (``workdir.save_array``
        for arrays); it runs in a fresh temporary directory and only a unit that finished is published.
        ``overwrite`` recomputes even if the unit exists (the new one replaces it). ``cost`` (the a-priori
        estimate of :class:`ftsim.core.experiment.UnitSpec`) is stored beside the measured seconds and memory.
        """
        if not overwrite:
            unit = self.get(key)
            if unit is not None:
                return unit
        with self._lock(key):
            if not overwrite:
                unit = self.get(key)  # computed by another process while we waited
                if unit is not None:
                    return unit
            return self._compute(key, compute, replace=overwrite, cost=cost)

    def _compute(self, key: UnitKey, compute: Callable[[_Workdir], Any], replace: bool,
                 cost: Mapping[str, Any] | None = None) -> Unit:
        final = self.path_of(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key.digest[:16]}-", dir=final.parent))
        try:
            _reset_peak_memory()
            t0 = time.perf_counter()
            result = compute(_Workdir(tmp))
            seconds = time.perf_counter() - t0
            record = {"schema": SCHEMA, "kind": key.kind, "version": key.version, "inputs": key.inputs,
                      "digest": key.digest, "result": to_jsonable(result), "files": _hash_files(tmp),
                      "seconds": round(seconds, 3), "memory": _peak_memory(),
                      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            if cost:
                record["cost"] = to_jsonable(dict(cost))
            write_json(tmp / RECORD, record)
            os.chmod(tmp, 0o777 & ~current_umask())
            if replace and final.exists():
                old = final.parent / f".old-{final.name}-{int(time.time() * 1e6)}"
                os.rename(final, old)
                shutil.rmtree(old, ignore_errors=True)
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / RECORD).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process published it first: keep theirs
            unit = self.get(key)
            if unit is None:
                raise RuntimeError(f"{final}: unit was written but does not verify")
            return unit
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    # -- maintenance ----------------------------------------------------------------------------------------
    def clean_stale(self, older_than_s: float = 24 * 3600) -> int:
        """Remove temporary and discarded directories left by killed processes; returns how many."""
        n = 0
        now = time.time()
        for p in self.root.glob("*/*/.tmp-*"):
            if p.is_dir() and now - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p, ignore_errors=True)
                n += 1
        return n


def default_cache() -> UnitCache:
    """The cache under ``$FTSIM_CACHE/units`` (``$FTSIM_CACHE`` defaults to ``<results>/cache``)."""
    return UnitCache(cache_root() / "units")

