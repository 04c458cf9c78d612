"""Files that are never half-written: atomic writes, content hashes, tidy result tables, run directories.

Every writer here goes through a temporary file in the destination directory followed by ``os.replace``,
so a crash (or Ctrl-C) leaves either the old file or the new one, never a truncated mix.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

__all__ = [
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "write_json",
    "read_json",
    "save_npy",
    "sha256_file",
    "stable_hash",
    "to_jsonable",
    "write_table",
    "read_jsonl",
    "results_root",
    "cache_root",
    "default_file_mode",
    "current_umask",
]


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask would, briefly, for every
    thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            return next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
        return mask


def default_file_mode() -> int:
    """The mode a new file gets from ``open()`` under the current umask (0o666 & ~umask)."""
    return 0o666 & ~current_umask()


def results_root() -> Path:
    """Where runs write by default: ``$FTSIM_RESULTS`` or ``./results``."""
    return Path(os.environ.get("FTSIM_RESULTS", "results"))


def cache_root() -> Path:
    """Where expensive intermediates (corpora, checkpoints, kernels) are cached: ``$FTSIM_CACHE`` or
    ``<results_root>/cache``."""
    env = os.environ.get("FTSIM_CACHE")
    return Path(env) if env else results_root() / "cache"


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[Any]:
    """Open a temporary file beside ``path``; on clean exit fsync it and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open supports modes 'w' and 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, default_file_mode())  # mkstemp makes 0600; a result file gets what open() would give it
        with os.fdopen(fd, mode, encoding=encoding if mode == "w" else None,
                       newline="" if mode == "w" else None) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def to_jsonable(obj: Any) -> Any:
    """Convert dataclasses, numpy scalars/arrays, paths and tuples to plain JSON values.

    Non-finite floats become the strings ``"nan"``, ``"inf"``, ``"-inf"`` so the output is strict JSON.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _dumps(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(to_jsonable(obj), indent=indent, sort_keys=False, allow_nan=False)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as strict JSON (see :func:`to_jsonable`), atomically."""
    atomic_write_text(path, _dumps(obj) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read JSON, turning a syntax error into one that names the file, line and column."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None


def save_npy(path: str | os.PathLike, array: np.ndarray) -> str:
    """Save ``array`` as ``.npy`` atomically and return the SHA-256 of the bytes written."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def stable_hash(obj: Any, length: int = 12) -> str:
    """A short content hash of a JSON-able description (config, parameters): same input, same key."""
    canon = json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canon.encode()).hexdigest()[:length]


def write_table(stem: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Write tidy rows as ``<stem>.jsonl`` and ``<stem>.csv`` (atomically) and return them as dicts."""
    rows = [dict(to_jsonable(dict(r))) for r in rows]
    stem = Path(stem)
    atomic_write_text(stem.with_suffix(".jsonl"), "".join(_dumps(r, indent=None) + "\n" for r in rows))
    columns: list[str] = []
    for r in rows:
        columns.extend(k for k in r if k not in columns)
    sio = io.StringIO()
    writer = csv.DictWriter(sio, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
    atomic_write_text(stem.with_suffix(".csv"), sio.getvalue())
    return rows


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL table; a bad line is an error naming the file and line number."""
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
    return rows
