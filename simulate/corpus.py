"""Corpora on disk: streamed, sharded ``.npy`` token files, the model as checksummed ``.npy`` files, a small
manifest, and a progress log that makes generation resumable.

Layout of a corpus directory (format_version 2)::

    manifest.json            what the corpus is (preset, every parameter, seeds, dtypes with byte order, sizes)
                             and the SHA-256 of every file below; written last: its presence means "finished"
    model-start.npy ...      the HMM parameters, one float64 array per field (HMM: start, trans, emit;
                             MemoryHMM: memory_prior, syntax_start, syntax_trans, emit)
    tokens-00000.npy         (rows, length) tokens, smallest unsigned dtype holding the vocabulary
    states-00000.npy         optional hidden states (joint index for the memory preset)
    labels-00000.npy         optional downstream labels, (rows, 1) uint8
    text-00000.txt           optional text rendering: one sequence per line, tokens as ``t<k>`` words
    progress.jsonl           only while unfinished: the spec, then one line per finished shard

Writing streams block by block (see :mod:`simulate.sampling`), so memory stays flat however many tokens are
asked for, and the model's arrays are written as ``.npy`` (memory proportional to the parameters: no JSON
rendering of a 32 x 70,000 emission matrix). Every file goes to a temporary name and is renamed into place.
A killed run leaves ``progress.jsonl``; rerunning the same spec verifies the finished shards against it, keeps
them, removes its own stale temporary files and continues -- the result is byte-identical to an uninterrupted
run. The tokens on disk are exactly ``sample(hmm, N, T, seed).tokens``.

Reading trusts nothing in the manifest: every field is checked against the others and against the arrays
(shapes, dtypes including byte order, token values below ``vocab_size``, states below ``num_states``, rows per
shard, totals), file names must be the plain names this module writes (never a path outside the directory,
never a symbolic link), and every error names the file and the field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import numbers
import os
import re
import stat
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

import ftsim
from ftsim.core.errors import InputError
from ftsim.core.io import (
    atomic_open,
    atomic_write_bytes,
    atomic_write_text,
    sha256_file,
    to_jsonable,
    write_json,
)
from simulate.hmm import (
    HMM,
    HMM_FIELDS,
    MEMORY_HMM_FIELDS,
    PRESETS,
    HMMValidationError,
    MemoryHMM,
    make_preset,
    preset_size,
    validate_preset_params,
)
from simulate.sampling import BLOCK_TOKENS, block_sequences, smallest_uint
from simulate.tasks import (
    PosteriorTask,
    linear_posterior_task,
    memory_linear_task,
    sparse_mu,
)

__all__ = ["CorpusError", "CorpusSpec", "write_corpus", "load_corpus", "Corpus", "default_task", "FORMAT",
           "FORMAT_VERSION", "MANIFEST", "PROGRESS", "shard_file", "model_file"]

FORMAT = "ftsim-corpus"
FORMAT_VERSION = 2
DEFAULT_SHARD_TOKENS = 1 << 24
MAX_SHARDS = 99_999  # five-digit shard names; also bounds the manifest (about 0.3 kB per shard)
MAX_MANIFEST_BYTES = 64 << 20  # a format-2 manifest of MAX_SHARDS shards with every kind is ~40 MB
MANIFEST = "manifest.json"
PROGRESS = "progress.jsonl"
SHARD_KINDS = ("tokens", "states", "labels", "text")
_SUFFIX = {"tokens": ".npy", "states": ".npy", "labels": ".npy", "text": ".txt"}
_MODEL_FIELDS = {"HMM": HMM_FIELDS, "MemoryHMM": MEMORY_HMM_FIELDS}
_INT32_MAX = 2**31 - 1  # the sampler's flat alias-table index is int32
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Names this module writes, and the temporary names ftsim.core.io.atomic_open gives them (".NAME.XXXXXXXX.tmp").
_OUR_NAME = re.compile(r"^(?:(?:tokens|states|labels)-\d{5}\.npy|text-\d{5}\.txt|model-[a-z_]+\.npy"
                       r"|manifest\.json|progress\.jsonl)$")
_TEMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp$")


def shard_file(kind: str, index: int) -> str:
    """The file name of shard ``index`` of ``kind`` (``tokens-00003.npy``, ``text-00003.txt``)."""
    return f"{kind}-{index:05d}{_SUFFIX[kind]}"


def model_file(field: str) -> str:
    """The file name of a model array (``model-trans.npy``)."""
    return f"model-{field}.npy"


class CorpusError(InputError):
    """A corpus spec, directory or file is wrong. ``path`` names the file, ``field`` the spec or manifest field
    (``shards[2].tokens.file``); the message says what is wrong and, where there is one, what to do."""

    def describe(self, flag_style: bool = False) -> str:
        # A field of a file (manifest.json's "length") is not a command-line flag: only spec fields are.
        return super().describe(flag_style and self.path is None)


def _is_our_temp(name: str) -> bool:
    m = _TEMP.match(name)
    return bool(m and _OUR_NAME.match(m.group("name")))


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _dtype_text(dt: np.dtype) -> str:
    return dt.name if dt.byteorder in ("=", "|") or dt.str == np.dtype(dt.name).str else f"{dt.str} ({dt.name})"


# ----------------------------------------------------------------------------------------------------------
# Streams
# ----------------------------------------------------------------------------------------------------------


class _HashedStream:
    """A file written through :func:`ftsim.core.io.atomic_open` (temporary name beside the target, the umask's
    mode), hashed as it is written; :meth:`close` renames it into place and returns the SHA-256, :meth:`abort`
    removes the temporary file."""

    def __init__(self, path: Path):
        self.path = path
        self._cm = atomic_open(path, "wb")
        self.fh = self._cm.__enter__()
        self.sha = hashlib.sha256()
        self._open = True

    def _write(self, data: bytes | memoryview) -> None:
        self.fh.write(data)
        self.sha.update(data)

    def close(self) -> str:
        self._open = False
        self._cm.__exit__(None, None, None)  # flush, fsync, rename
        return self.sha.hexdigest()

    def abort(self) -> None:
        if self._open:
            self._open = False
            err = RuntimeError("aborted")
            self._cm.__exit__(RuntimeError, err, None)  # atomic_open removes the temporary file


class _NpyStream(_HashedStream):
    """A 2-d ``.npy`` of known shape, written row-block by row-block."""

    def __init__(self, path: Path, shape: tuple[int, int], dtype: np.dtype):
        super().__init__(path)
        self.shape, self.dtype, self.rows = shape, np.dtype(dtype), 0
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape})
        self._write(header.getvalue())

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.ndim != 2 or block.shape[1] != self.shape[1]:
            raise ValueError(f"{self.path.name}: block shape {block.shape} does not match {self.shape}")
        self._write(memoryview(block).cast("B"))
        self.rows += block.shape[0]

    def close(self) -> str:
        if self.rows != self.shape[0]:
            self.abort()
            raise RuntimeError(f"{self.path.name}: wrote {self.rows} rows, header says {self.shape[0]}")
        return super().close()


class _TextStream(_HashedStream):
    """One sequence per line, tokens rendered as ``t<k>`` words."""

    def append(self, tokens: np.ndarray, words: np.ndarray) -> None:
        self._write(("\n".join(" ".join(row) for row in words[tokens]) + "\n").encode("ascii"))


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------
# The spec
# ----------------------------------------------------------------------------------------------------------


def default_task(model: HMM | MemoryHMM, support_size: int, seed: int) -> tuple[PosteriorTask, np.ndarray]:
    """The downstream task stored with a corpus: Wei et al.'s y = 1[mu^T P(H_0 | x) >= 0] (mask prepended)
    for a plain HMM, y = 1[mu^T P(M | x) >= 0] for a memory HMM; mu sparse with ``support_size``
    non-zeros (clipped to the dimension), drawn from ``seed``."""
    if isinstance(model, MemoryHMM):
        mu = sparse_mu(model.num_memory, min(support_size, model.num_memory), seed)
        return memory_linear_task(model, mu), mu
    mu = sparse_mu(model.num_states, min(support_size, model.num_states), seed)
    return linear_posterior_task(mu), mu


def _parse_dtype(value: Any, field: str, path: Path | None = None) -> np.dtype:
    if isinstance(value, np.dtype):
        dt = value
    elif isinstance(value, str) or (isinstance(value, type) and issubclass(value, np.generic)):
        try:
            dt = np.dtype(value)
        except (TypeError, ValueError, SyntaxError):
            raise CorpusError(f"{value!r} is not a dtype numpy knows (use e.g. 'uint16', or '<u2' with a byte "
                              "order)", field=field, path=path) from None
    else:
        raise CorpusError(f"must be a dtype name such as 'uint16', got {type(value).__name__}", field=field,
                          path=path)
    if dt.kind != "u" or dt.fields is not None or dt.subdtype is not None:
        raise CorpusError(f"dtype {dt} is not an unsigned integer type", field=field, path=path)
    return dt


def _check_dtype(vocab_size: int, dtype: Any, field: str = "dtype", path: Path | None = None,
                 what: str = "vocab_size", item: str = "token") -> np.dtype:
    dt = smallest_uint(vocab_size - 1) if dtype is None else _parse_dtype(dtype, field, path)
    if vocab_size - 1 > np.iinfo(dt).max:
        raise CorpusError(
            f"{what} {vocab_size} does not fit in dtype {_dtype_text(dt)} (max {item} id {np.iinfo(dt).max}); "
            f"use {smallest_uint(vocab_size - 1)} or larger", field=field, path=path)
    return dt


def _int_field(name: str, value: Any, minimum: int, optional: bool = False, path: Path | None = None) -> int | None:
    if optional and value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise CorpusError(f"must be an integer >= {minimum}{' or None' if optional else ''}, got {value!r}",
                          field=name, path=path)
    if value < minimum:
        raise CorpusError(f"must be >= {minimum}, got {value}", field=name, path=path)
    return int(value)


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """What a corpus is: the HMM preset and its parameters, the size, the seeds, and which files to write.

    Validated on construction (:meth:`validate`), so a bad spec is refused before anything exists on disk.

    Attributes:
        preset: ``wei2021``, ``memory`` or ``random`` (see :mod:`simulate.hmm`).
        params: the preset's keyword parameters (num_states, vocab_size, temperatures, ...).
        num_sequences, length: N sequences of T tokens.
        seed: sampling seed (>= 0); ``hmm_seed`` (default: ``seed``) draws the HMM parameters.
        states, labels, text: also write hidden states, downstream labels (:func:`default_task`), text.
        task_support: non-zeros of the task's mu (labels only).
        shard_tokens: tokens per shard (rounded down to whole sequences; at most 99,999 shards).
        dtype: token dtype name (``uint16``, ``>u2``); default the smallest unsigned dtype that holds the
            vocabulary.
    """

    preset: str
    params: Mapping[str, Any]
    num_sequences: int
    length: int
    seed: int = 0
    hmm_seed: int | None = None
    states: bool = False
    labels: bool = False
    text: bool = False
    task_support: int = 6
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    dtype: Any = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> CorpusSpec:
        """Check every field; raise :class:`CorpusError` (or the preset's :class:`InputError`) naming it.

        Integer fields given as numpy integers are stored as Python ints. Returns ``self``.
        """
        full = validate_preset_params(self.preset, self.params)  # field = the preset parameter at fault
        for name, minimum, optional in (("num_sequences", 1, False), ("length", 1, False), ("seed", 0, False),
                                        ("hmm_seed", 0, True), ("task_support", 1, False),
                                        ("shard_tokens", 1, False)):
            object.__setattr__(self, name, _int_field(name, getattr(self, name), minimum, optional))
        for name in ("states", "labels", "text"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise CorpusError(f"must be True or False, got {getattr(self, name)!r}", field=name)
            object.__setattr__(self, name, bool(getattr(self, name)))
        num_states, vocab_size = preset_size(self.preset, full)
        if num_states * num_states > _INT32_MAX:
            raise CorpusError(f"{num_states:,} hidden states give {num_states ** 2:,} transition entries; the "
                              f"sampler indexes them with int32 (at most {_INT32_MAX:,})",
                              field="num_memory" if self.preset == "memory" else "num_states")
        if num_states * vocab_size > _INT32_MAX:
            raise CorpusError(f"{num_states:,} states x {vocab_size:,} symbols = {num_states * vocab_size:,} "
                              f"emission entries; the sampler indexes them with int32 (at most {_INT32_MAX:,})",
                              field="vocab_size")
        _check_dtype(vocab_size, self.dtype)
        rows = self.rows_per_shard
        count = -(-self.num_sequences // rows)
        if count > MAX_SHARDS:
            need = -(-self.num_sequences // MAX_SHARDS) * self.length
            raise CorpusError(f"{self.shard_tokens:,} tokens per shard give {count:,} shards of {rows} "
                              f"sequences; at most {MAX_SHARDS:,}: use shard_tokens >= {need:,}",
                              field="shard_tokens")
        return self

    @property
    def model_seed(self) -> int:
        return self.seed if self.hmm_seed is None else self.hmm_seed

    @property
    def rows_per_shard(self) -> int:
        return max(1, self.shard_tokens // self.length)

    @property
    def shard_kinds(self) -> tuple[str, ...]:
        return ("tokens",) + tuple(k for k in ("states", "labels", "text") if getattr(self, k))

    def describe(self) -> dict[str, Any]:
        """A JSON form (cache keys)."""
        d = dataclasses.asdict(self)
        d["params"] = dict(sorted(dict(self.params).items()))
        d["dtype"] = None if self.dtype is None else np.dtype(self.dtype).str
        return d


def _spec_key(preset: str, params: Mapping[str, Any], num_sequences: int, length: int, seed: int, hmm_seed: int,
              kinds: Any, task_support: int | None, rows_per_shard: int, dtype: str) -> dict[str, Any]:
    """What decides a corpus's bytes, normalised (defaults filled in, hmm_seed resolved, shard_tokens as rows
    per shard, task_support only with labels): two specs with the same key write the same files."""
    return to_jsonable({
        "preset": preset, "params": dict(sorted(dict(params).items())), "num_sequences": num_sequences,
        "length": length, "seed": seed, "hmm_seed": hmm_seed, "shard_kinds": list(kinds),
        "task_support": task_support if "labels" in kinds else None, "rows_per_shard": rows_per_shard,
        "dtype": dtype})


def _key_diff(there: Mapping[str, Any], asked: Mapping[str, Any]) -> str:
    diffs = []
    for k in asked:
        a, b = there.get(k), asked[k]
        if k == "params" and isinstance(a, dict):
            diffs += [f"params.{p}: {a.get(p)!r} there, {b.get(p)!r} asked" for p in sorted(set(a) | set(b))
                      if a.get(p) != b.get(p)]
        elif a != b:
            diffs.append(f"{k}: {a!r} there, {b!r} asked")
    return "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything a spec will write, computed before the disk is touched."""

    spec: CorpusSpec
    params: dict[str, Any]
    model: HMM | MemoryHMM
    token_dtype: np.dtype
    state_dtype: np.dtype
    num_states: int
    vocab_size: int
    shard_rows: tuple[int, ...]
    task: PosteriorTask | None
    mu: np.ndarray | None
    model_npy: dict[str, bytes]
    model_record: dict[str, Any]
    key: dict[str, Any]

    @property
    def kinds(self) -> tuple[str, ...]:
        return self.spec.shard_kinds

    def files(self) -> set[str]:
        return {shard_file(k, i) for i in range(len(self.shard_rows)) for k in self.kinds} | \
            {model_file(f) for f in self.model_npy}


def _plan(spec: CorpusSpec) -> _Plan:
    params = validate_preset_params(spec.preset, spec.params)
    model = make_preset(spec.preset, seed=spec.model_seed, **params)
    joint = model.as_hmm()
    token_dtype = _check_dtype(joint.vocab_size, spec.dtype)
    task, mu = default_task(model, spec.task_support, seed=spec.model_seed + 1) if spec.labels else (None, None)
    rows = spec.rows_per_shard
    shard_rows = tuple(min(rows, spec.num_sequences - lo) for lo in range(0, spec.num_sequences, rows))
    model_npy = {name: _npy_bytes(arr) for name, arr in model.arrays().items()}
    record = {"kind": type(model).__name__, "arrays": {
        name: {"file": model_file(name), "sha256": hashlib.sha256(data).hexdigest(),
               "shape": list(arr.shape), "dtype": arr.dtype.str}
        for name, arr in model.arrays().items() for data in (model_npy[name],)}}
    key = _spec_key(spec.preset, params, spec.num_sequences, spec.length, spec.seed, spec.model_seed,
                    spec.shard_kinds, spec.task_support, rows, token_dtype.str)
    return _Plan(spec, params, model, token_dtype, smallest_uint(joint.num_states - 1), joint.num_states,
                 joint.vocab_size, shard_rows, task, mu, model_npy, record, key)


def _manifest(plan: _Plan, shards: list[dict[str, Any]]) -> dict[str, Any]:
    spec = plan.spec
    task = None if plan.task is None else {
        "name": plan.task.name, "mu": plan.mu.tolist(), "support_size": int(np.count_nonzero(plan.mu)),
        "mask_position": plan.task.mask_position}
    return to_jsonable({
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ftsim_version": ftsim.__version__,
        "preset": spec.preset,
        "params": plan.params,
        "seed": spec.seed,
        "hmm_seed": spec.model_seed,
        "num_sequences": spec.num_sequences,
        "length": spec.length,
        "num_states": plan.num_states,
        "vocab_size": plan.vocab_size,
        "dtype": plan.token_dtype.str,
        "state_dtype": plan.state_dtype.str,
        "shard_tokens": spec.shard_tokens,
        "rows_per_shard": spec.rows_per_shard,
        "block_tokens": BLOCK_TOKENS,
        "sequences_per_block": block_sequences(spec.length),
        "shard_kinds": list(plan.kinds),
        "task_support": spec.task_support if spec.labels else None,
        "model": plan.model_record,
        "task": task,
        "shards": shards,
    })


def _key_of_manifest(m: Mapping[str, Any]) -> dict[str, Any] | None:
    """The spec key of a (format-2) manifest, or None when its fields do not make one."""
    try:
        return _spec_key(m["preset"], validate_preset_params(m["preset"], m["params"]), m["num_sequences"],
                         m["length"], m["seed"], m["hmm_seed"], list(m["shard_kinds"]), m["task_support"],
                         m["rows_per_shard"], m["dtype"])
    except (KeyError, TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------------------
# What a directory holds
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Found:
    """A survey of an output directory before writing into it."""

    entries: list[str]
    manifest: dict[str, Any] | None = None
    manifest_problem: str | None = None
    progress: dict[str, Any] | None = None  # the progress log's header
    progress_entries: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    progress_problem: str | None = None
    listed: set[str] = dataclasses.field(default_factory=set)
    temps: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)


def _lstat_kind(path: Path) -> str:
    st = os.lstat(path)
    return "link" if stat.S_ISLNK(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"


def _listed_by_manifest(m: Mapping[str, Any]) -> set[str]:
    """The file names a manifest (format 1 or 2) lists: only names this module writes, so a manifest can never
    make ``overwrite`` delete anything else."""
    names: set[str] = set()
    shards = m.get("shards")
    for sh in shards if isinstance(shards, list) else []:
        for kind in SHARD_KINDS:
            ent = sh.get(kind) if isinstance(sh, dict) else None
            if isinstance(ent, dict) and isinstance(ent.get("file"), str):
                names.add(ent["file"])
    model = m.get("model")
    arrays = model.get("arrays") if isinstance(model, dict) else None
    for rec in arrays.values() if isinstance(arrays, dict) else []:
        if isinstance(rec, dict) and isinstance(rec.get("file"), str):
            names.add(rec["file"])
    return {n for n in names if _OUR_NAME.match(n)}


def _listed_by_progress(header: Mapping[str, Any]) -> set[str]:
    try:
        kinds = [k for k in header["shard_kinds"] if k in SHARD_KINDS]
        count = min(int(header["shards"]), MAX_SHARDS)
        fields = _MODEL_FIELDS[header["model"]["kind"]]
    except (KeyError, TypeError, ValueError):
        return set()
    return {shard_file(k, i) for i in range(count) for k in kinds} | {model_file(f) for f in fields}


def _read_progress(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]], str | None]:
    """The progress log: its header (written atomically, so whole or absent) and the shard lines that parse
    (a kill can tear only the last line; anything after a bad line is dropped and redone)."""
    try:
        lines = path.read_bytes().split(b"\n")
        header = json.loads(lines[0])
    except (OSError, ValueError) as exc:
        return None, [], f"{PROGRESS} cannot be read ({exc})"
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("record") != "progress":
        return None, [], f"{PROGRESS} is not an ftsim corpus progress log"
    entries = []
    for line in lines[1:]:
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            break
        if not isinstance(entry, dict):
            break
        entries.append(entry)
    return header, entries, None


def _read_manifest_for_survey(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    try:
        if path.stat().st_size > 4 * MAX_MANIFEST_BYTES:
            return None, f"{MANIFEST} is {path.stat().st_size:,} bytes, too large to be a corpus manifest"
        with open(path, encoding="utf-8") as fh:
            m = json.load(fh)  # a format-1 manifest can be large (full matrices): read once, to list its files
    except (OSError, ValueError) as exc:
        return None, f"{MANIFEST} cannot be read ({exc})"
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        return None, f"{MANIFEST} is not an ftsim corpus manifest"
    return m, None


def _survey(out: Path) -> _Found:
    """What ``out`` holds. A ``manifest.json`` or ``progress.jsonl`` that is not a readable ftsim record (or is
    a link) counts as the user's file: nothing it might list is ever ours to delete."""
    found = _Found(entries=sorted(os.listdir(out)))
    ours = set()
    if MANIFEST in found.entries and _lstat_kind(out / MANIFEST) == "file":
        found.manifest, found.manifest_problem = _read_manifest_for_survey(out / MANIFEST)
        if found.manifest is not None:
            found.listed |= _listed_by_manifest(found.manifest)
            ours.add(MANIFEST)
    if PROGRESS in found.entries and _lstat_kind(out / PROGRESS) == "file":
        found.progress, found.progress_entries, found.progress_problem = _read_progress(out / PROGRESS)
        if found.progress is not None:
            found.listed |= _listed_by_progress(found.progress)
            ours.add(PROGRESS)
    for name in found.entries:
        if name in ours:
            continue
        if _is_our_temp(name) and _lstat_kind(out / name) != "other":
            found.temps.append(name)
        elif name in (MANIFEST, PROGRESS) or name not in found.listed or _lstat_kind(out / name) == "other":
            found.unexpected.append(name)
    return found


def _remove_ours(out: Path, found: _Found) -> None:
    """Remove exactly what the previous corpus lists (and our temporary files); the manifest goes last, so a
    kill half-way leaves a directory whose remaining files are still listed by it."""
    for name in [n for n in found.entries if n in found.listed and n not in (MANIFEST, PROGRESS)] + found.temps:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out / name)
    for name in (PROGRESS, MANIFEST):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out / name)


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """An advisory lock on the directory itself (released by the kernel if the process dies): two writers
    into one directory are refused rather than interleaved."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): single writer assumed
        yield
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CorpusError("another process is writing a corpus into this directory; wait for it to finish "
                              "or choose another directory", path=out) from None
        except OSError:
            pass  # a filesystem without locks
        yield
    finally:
        os.close(fd)


def _entry_matches(out: Path, entry: Mapping[str, Any], index: int, plan: _Plan) -> bool:
    """Whether a progress-log line describes shard ``index`` of this plan and its files still hash to it."""
    if entry.get("index") != index or entry.get("rows") != plan.shard_rows[index] or \
            set(entry) != {"index", "rows", *plan.kinds}:
        return False
    for kind in plan.kinds:
        ent = entry[kind]
        path = out / shard_file(kind, index)
        if not isinstance(ent, dict) or ent.get("file") != path.name or not os.path.lexists(path) or \
                _lstat_kind(path) != "file" or sha256_file(path) != ent.get("sha256"):
            return False
    return True


def _refuse_unexpected(out: Path, found: _Found) -> None:
    what = ("the corpus here (not listed in its manifest.json)" if found.manifest is not None else
            "the unfinished corpus here (not planned by its progress.jsonl)" if found.progress is not None else
            "any ftsim corpus")
    problem = "; ".join(p for p in (found.manifest_problem, found.progress_problem) if p)
    one = len(found.unexpected) == 1
    raise CorpusError(
        f"directory is not empty: {_names(found.unexpected)} {'is' if one else 'are'} not part of {what}"
        + (f" ({problem})" if problem else "")
        + "; ftsim generate writes only into an empty directory or one holding an ftsim corpus, and overwrite "
        f"(--overwrite) replaces only the files a previous corpus lists: move {'it' if one else 'them'} away or "
        "choose another directory", path=out)


def _prepare(out: Path, plan: _Plan, found: _Found, overwrite: bool) -> tuple[str, Any]:
    """Decide what to do with what the directory holds: ("done", manifest) for a finished corpus of this spec,
    ("resume", kept progress entries), or ("fresh", None) after removing a previous corpus (overwrite only).
    Refuses, naming what it found, whenever the user's files or another spec's work would be lost."""
    if found.unexpected:
        _refuse_unexpected(out, found)
    again = "pass overwrite=True (--overwrite) to replace it, or choose another directory"
    if found.manifest is not None:
        m = found.manifest
        version = m.get("format_version")
        if overwrite:
            _remove_ours(out, found)
            return "fresh", None
        if version != FORMAT_VERSION:
            raise CorpusError(f"directory is not empty: it holds a corpus of format_version {version!r}, which "
                              f"this ftsim (format_version {FORMAT_VERSION}) no longer reads; pass overwrite=True "
                              "(--overwrite) to regenerate it", path=out)
        key = _key_of_manifest(m)
        if key != plan.key:
            diff = _key_diff(key, plan.key) if key is not None else "its spec fields cannot be read"
            raise CorpusError(f"directory is not empty: it holds a finished corpus of another spec ({diff}); "
                              + again, path=out)
        try:
            corpus = load_corpus(out)
        except CorpusError as exc:
            raise CorpusError(f"holds a finished corpus of this spec that fails verification ({exc}); pass "
                              "overwrite=True (--overwrite) to regenerate it", path=out) from None
        for name in found.temps + ([PROGRESS] if PROGRESS in found.entries else []):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(out / name)
        return "done", corpus.manifest
    if found.progress is not None:
        if overwrite:
            _remove_ours(out, found)
            return "fresh", None
        header = found.progress
        done = f"{PROGRESS}: {len(found.progress_entries)} of {header.get('shards')} shards written"
        finish = "rerun with that spec to finish it, or pass overwrite=True (--overwrite) to replace it"
        if header.get("format_version") != FORMAT_VERSION or header.get("ftsim_version") != ftsim.__version__:
            raise CorpusError(f"holds an unfinished corpus written by ftsim {header.get('ftsim_version')} "
                              f"(format_version {header.get('format_version')}; {done}); this is ftsim "
                              f"{ftsim.__version__}, whose samples may differ: pass overwrite=True (--overwrite) "
                              "to regenerate it", path=out)
        if header.get("spec") != plan.key:
            spec = header.get("spec")
            diff = _key_diff(spec, plan.key) if isinstance(spec, dict) else "its spec cannot be read"
            raise CorpusError(f"holds an unfinished corpus of another spec ({done}; {diff}): {finish}", path=out)
        if header.get("model") != plan.model_record or header.get("shards") != len(plan.shard_rows):
            raise CorpusError(f"holds an unfinished corpus of this spec whose model differs from the one this "
                              f"ftsim draws from it ({done}; numpy's generator changed?): pass overwrite=True "
                              "(--overwrite) to regenerate it", path=out)
        kept = []
        for i, entry in enumerate(found.progress_entries[:len(plan.shard_rows)]):
            if not _entry_matches(out, entry, i, plan):
                break
            kept.append(entry)
        for name in found.temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(out / name)
        return "resume", kept
    _remove_ours(out, found)  # nothing but our temporary files (a kill before the first record)
    return "fresh", None


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


class _ProgressLog:
    """``progress.jsonl``: a header (the spec key, the planned shards, the model's checksums) written
    atomically, then one line per finished shard, appended and fsync-ed. Appending keeps a long run linear
    (rewriting a growing JSON file per shard would be quadratic); a torn last line is dropped on resume."""

    def __init__(self, path: Path, header: Mapping[str, Any], entries: list[dict[str, Any]]):
        lines = [json.dumps(to_jsonable(header), separators=(",", ":"))]
        lines += [json.dumps(e, separators=(",", ":")) for e in entries]
        atomic_write_text(path, "\n".join(lines) + "\n")
        self.path = path
        self.fh = open(path, "ab")

    def append(self, entry: Mapping[str, Any]) -> None:
        self.fh.write((json.dumps(entry, separators=(",", ":")) + "\n").encode("ascii"))
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()


def _sample_blocks(model: HMM | MemoryHMM, num_sequences: int, length: int, seed: int, first_block: int,
                   workers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens, states) of blocks ``first_block, first_block + 1, ...`` exactly as
    :func:`simulate.sampling.iter_sample_blocks` draws them (block i from ``SeedSequence(seed, spawn_key=(i,))``),
    so a resumed corpus is byte-identical to an uninterrupted one. ``iter_sample_blocks`` starts at block 0
    only; the round-trip tests (corpus == ``sample``) and the resume tests keep the two in step."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from simulate import sampling

    hmm = model.as_hmm()
    per = block_sequences(length)
    tabs = sampling._tables(hmm)
    count = -(-num_sequences // per)

    def block(i: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(i,)))
        return sampling._sample_block(tabs, min(per, num_sequences - i * per), length, rng)

    if workers <= 1 or count - first_block <= 1:
        for i in range(first_block, count):
            yield block(i)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        nxt = first_block
        while nxt < count or pending:
            while nxt < count and len(pending) < workers:
                pending.append(pool.submit(block, nxt))
                nxt += 1
            yield pending.popleft().result()


def _write_shards(out: Path, plan: _Plan, first: int, log: _ProgressLog, bar: Any) -> list[dict[str, Any]]:
    spec = plan.spec
    length, rows_per_shard = spec.length, spec.rows_per_shard
    words = np.array([f"t{k}" for k in range(plan.vocab_size)]) if spec.text else None
    start_row = first * rows_per_shard
    first_block, skip = divmod(start_row, block_sequences(length))
    source = _sample_blocks(plan.model, spec.num_sequences, length, spec.seed, first_block,
                            workers=min(2, os.cpu_count() or 1))
    pending: tuple[np.ndarray, np.ndarray] | None = None
    if first < len(plan.shard_rows) and skip:
        tok, st = next(source)
        pending = (tok[skip:], st[skip:])
    entries = []
    for index in range(first, len(plan.shard_rows)):
        rows = plan.shard_rows[index]
        streams: dict[str, Any] = {}
        try:
            streams["tokens"] = _NpyStream(out / shard_file("tokens", index), (rows, length), plan.token_dtype)
            if spec.states:
                streams["states"] = _NpyStream(out / shard_file("states", index), (rows, length), plan.state_dtype)
            if spec.labels:
                streams["labels"] = _NpyStream(out / shard_file("labels", index), (rows, 1), np.uint8)
            if spec.text:
                streams["text"] = _TextStream(out / shard_file("text", index))
            done = 0
            while done < rows:
                tok, st = pending if pending is not None else next(source)
                take = min(rows - done, tok.shape[0])
                pending = (tok[take:], st[take:]) if take < tok.shape[0] else None
                tok, st = tok[:take], st[:take]
                streams["tokens"].append(tok)
                if spec.states:
                    streams["states"].append(st)
                if spec.labels:
                    streams["labels"].append(plan.task.labels(plan.model, tok)[:, None])
                if spec.text:
                    streams["text"].append(tok, words)
                done += take
                bar.update(tok.size)
            entry: dict[str, Any] = {"index": index, "rows": rows}
            for kind, stream in streams.items():
                entry[kind] = {"file": stream.path.name, "sha256": stream.close()}
        except BaseException:
            for stream in streams.values():
                stream.abort()
            raise
        log.append(entry)
        entries.append(entry)
    return entries


def write_corpus(out: str | os.PathLike, spec: CorpusSpec, *, overwrite: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Generate the corpus ``spec`` into the directory ``out`` and return its manifest.

    ``out`` may be absent or empty. If it holds a finished corpus of the same spec, that corpus is verified and
    its manifest returned (nothing is written). If it holds an unfinished one of the same spec (a killed run),
    the finished shards are verified and kept and generation continues; the result is byte-identical to an
    uninterrupted run. With ``overwrite`` a previous corpus -- exactly the files its manifest or progress log
    lists, and its temporary files -- is replaced. Anything else in ``out`` (a user's file, a corpus of another
    spec without ``overwrite``) is refused with a message naming it, before anything is written.

    Raises:
        CorpusError: naming the spec field, the directory or the unexpected files (see above).
    """
    from ftsim.core.progress import bar as progress_bar
    from ftsim.core.progress import say

    spec = spec.validate()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CorpusError("exists and is not a directory", path=out)
    plan = _plan(spec)  # the model is drawn and checked before the disk is touched
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        action, state = _prepare(out, plan, _survey(out), overwrite)
        if action == "done":
            if progress:
                say(f"{out}: the corpus is already complete (verified); nothing to do")
            return state
        kept: list[dict[str, Any]] = state if action == "resume" else []
        header = {"format": FORMAT, "format_version": FORMAT_VERSION, "record": "progress",
                  "ftsim_version": ftsim.__version__, "spec": plan.key, "shards": len(plan.shard_rows),
                  "shard_kinds": list(plan.kinds), "model": plan.model_record}
        log = _ProgressLog(out / PROGRESS, header, kept)
        try:
            for name, data in plan.model_npy.items():
                path = out / model_file(name)
                if not (os.path.lexists(path) and _lstat_kind(path) == "file"
                        and sha256_file(path) == plan.model_record["arrays"][name]["sha256"]):
                    atomic_write_bytes(path, data)
            if kept and progress:
                say(f"{out}: resuming an unfinished corpus: {len(kept)} of {len(plan.shard_rows)} shards "
                    "verified and kept")
            total = spec.num_sequences * spec.length
            bar = progress_bar(total=total, unit="tok", unit_scale=True, desc=f"generate {out.name}",
                               disable=not progress, mininterval=0.5, delay=0.5)
            try:
                bar.update(sum(e["rows"] for e in kept) * spec.length)
                shards = kept + _write_shards(out, plan, len(kept), log, bar)
            finally:
                bar.close()
            manifest = _manifest(plan, shards)
            write_json(out / MANIFEST, manifest)
        finally:
            log.close()
        os.unlink(out / PROGRESS)
    return manifest


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------

_NONE = type(None)
_FIELDS: dict[str, Any] = {
    "format": str, "format_version": int, "ftsim_version": str, "preset": str, "params": dict, "seed": int,
    "hmm_seed": int, "num_sequences": int, "length": int, "num_states": int, "vocab_size": int, "dtype": str,
    "state_dtype": str, "shard_tokens": int, "rows_per_shard": int, "block_tokens": int,
    "sequences_per_block": int, "shard_kinds": list, "task_support": (int, _NONE), "model": dict,
    "task": (dict, _NONE), "shards": list,
}


def _type_name(tp: Any) -> str:
    names = [t.__name__ for t in (tp if isinstance(tp, tuple) else (tp,))]
    return " or ".join("null" if n == "NoneType" else n for n in names)


@dataclasses.dataclass(frozen=True)
class _Expect:
    """What one shard file must be: dtype and shape from its header, values below ``bound``."""

    kind: str
    dtype: np.dtype | None
    shape: tuple[int, ...]
    bound: int | None
    bound_field: str

    def header_problem(self, dtype: np.dtype, shape: tuple, fortran: bool, where: str) -> str | None:
        field = {"tokens": "dtype", "states": "state_dtype"}.get(self.kind)
        if dtype != self.dtype or dtype.str != self.dtype.str:
            src = f"manifest field {field!r}" if field else "the format (labels are uint8)"
            return f"dtype {dtype.str}, but {src} says {self.dtype.str}"
        if fortran:
            return "is Fortran-ordered; corpus shards are C-ordered"
        if tuple(shape) != self.shape:
            return (f"shape {tuple(shape)}, expected {self.shape} (rows from manifest {where}.rows"
                    + (", columns from manifest field 'length')" if self.kind != "labels" else ", one label each)"))
        return None


def _expect(manifest: Mapping[str, Any], kind: str, rows: int) -> _Expect:
    if kind == "tokens":
        return _Expect(kind, np.dtype(manifest["dtype"]), (rows, manifest["length"]), manifest["vocab_size"],
                       "vocab_size")
    if kind == "states":
        return _Expect(kind, np.dtype(manifest["state_dtype"]), (rows, manifest["length"]), manifest["num_states"],
                       "num_states")
    if kind == "labels":
        return _Expect(kind, np.dtype(np.uint8), (rows, 1), 2, "labels")
    return _Expect(kind, None, (rows,), None, "")


def _check_regular(path: Path) -> None:
    kind = _lstat_kind(path)
    if kind == "link":
        raise CorpusError("is a symbolic link; a corpus holds regular files only (a link could point anywhere)",
                          path=path)
    if kind != "file":
        raise CorpusError("is not a regular file", path=path)


def _check_name(mpath: Path, field: str, value: Any, expected: str) -> None:
    if not isinstance(value, str):
        raise CorpusError(f"should be a file name (str), got {type(value).__name__}", path=mpath, field=field)
    if value in ("", ".", "..") or os.path.isabs(value) or "/" in value or "\\" in value or "\0" in value:
        raise CorpusError(f"{value!r} is refused: a corpus file must be a plain file name inside the corpus "
                          "directory (a manifest must not point outside it)", path=mpath, field=field)
    if value != expected:
        raise CorpusError(f"is {value!r}; this format names it {expected!r}", path=mpath, field=field)


def _check_sha(mpath: Path, field: str, value: Any) -> None:
    if not isinstance(value, str) or not _SHA256.match(value):
        raise CorpusError(f"should be 64 lowercase hex digits, got {value!r}", path=mpath, field=field)


def _sha_error(path: Path, expected: str, actual: str, where: str) -> CorpusError:
    return CorpusError(f"SHA-256 mismatch (manifest {where} {expected[:16]}..., file {actual[:16]}...): the file is "
                       "corrupt, truncated or was altered", path=path)


def _read_npy_header(fh: Any, path: Path) -> tuple[np.dtype, tuple, bool]:
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f".npy version {version[0]}.{version[1]} is not one this reader takes")
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise CorpusError(f"not a valid .npy file ({exc})", path=path) from None
    return dtype, tuple(shape), bool(fortran)


def _value_error(path: Path, expect: _Expect, flat: int, value: int, manifest: Mapping[str, Any]) -> CorpusError:
    r, c = divmod(flat, expect.shape[1])
    if expect.kind == "labels":
        return CorpusError(f"label [{r}] is {value}; labels are 0 or 1", path=path)
    what = "token" if expect.kind == "tokens" else "state"
    return CorpusError(f"{what} [{r}, {c}] is {value}, outside [0, {expect.bound}) (manifest field "
                       f"{expect.bound_field!r} is {manifest[expect.bound_field]})", path=path)


def _verify_npy(path: Path, expect: _Expect, sha: str, where: str, manifest: Mapping[str, Any]) -> None:
    """One pass over the file: SHA-256 of every byte, and the values checked against their bound. A checksum
    mismatch is reported first (the likely cause of any other problem); then header, size and values."""
    h = hashlib.sha256()
    header_error, problem, bad = None, None, None
    data_bytes = items = 0
    with open(path, "rb") as fh:
        try:
            dtype, shape, fortran = _read_npy_header(fh, path)
            offset = fh.tell()
            problem = expect.header_problem(dtype, shape, fortran, where.rsplit(".", 1)[0])
        except CorpusError as exc:
            header_error, offset = exc, 0
        fh.seek(0)
        h.update(fh.read(offset))
        check = header_error is None and problem is None
        itemsize = dtype.itemsize if check else 1
        chunk = max(1, (1 << 22) // itemsize) * itemsize
        while block := fh.read(chunk):
            h.update(block)
            data_bytes += len(block)
            if check and bad is None:
                arr = np.frombuffer(block, dtype=dtype, count=len(block) // itemsize)
                if arr.size and arr.max() >= expect.bound:
                    j = int(np.argmax(arr >= expect.bound))
                    bad = (items + j, int(arr[j]))
                items += arr.size
    digest = h.hexdigest()
    if digest != sha:
        raise _sha_error(path, sha, digest, f"{where}.sha256")
    if header_error is not None:
        raise header_error
    if problem is not None:
        raise CorpusError(problem, path=path)
    need = math.prod(expect.shape) * itemsize
    if data_bytes != need:
        raise CorpusError(f"holds {data_bytes:,} data bytes; its shape {expect.shape} needs {need:,}", path=path)
    if bad is not None:
        raise _value_error(path, expect, bad[0], bad[1], manifest)


def _verify_text(path: Path, rows: int, sha: str, where: str) -> None:
    h, lines, last = hashlib.sha256(), 0, b"\n"
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
            lines += block.count(b"\n")
            last = block[-1:]
    digest = h.hexdigest()
    if digest != sha:
        raise _sha_error(path, sha, digest, f"{where}.sha256")
    if lines != rows or last != b"\n":
        raise CorpusError(f"has {lines} lines; manifest {where.rsplit('.', 1)[0]}.rows says {rows}", path=path)


def _check_npy_header(path: Path, expect: _Expect, where: str) -> None:
    """Without verification: the header and the file size (cheap; a truncated shard is still caught)."""
    with open(path, "rb") as fh:
        dtype, shape, fortran = _read_npy_header(fh, path)
        offset = fh.tell()
        size = os.fstat(fh.fileno()).st_size
    problem = expect.header_problem(dtype, shape, fortran, where.rsplit(".", 1)[0])
    if problem is not None:
        raise CorpusError(problem, path=path)
    need = math.prod(expect.shape) * dtype.itemsize
    if size - offset != need:
        raise CorpusError(f"holds {size - offset:,} data bytes; its shape {expect.shape} needs {need:,} "
                          "(truncated?)", path=path)


def _peek_format_version(mpath: Path) -> int | None:
    """``format_version`` from the first bytes, so an old manifest (format 1 held the full matrices as JSON:
    70 MB for a 32 x 70,000 model) is refused without parsing it."""
    with open(mpath, "rb") as fh:
        head = fh.read(4096).decode("utf-8", errors="replace")
    m = re.search(r'"format_version"\s*:\s*(-?\d+)', head)
    return int(m.group(1)) if m else None


def _format_version_error(mpath: Path, version: Any) -> CorpusError:
    if isinstance(version, int) and not isinstance(version, bool) and version < FORMAT_VERSION:
        return CorpusError(f"is {version}, an old corpus format this ftsim ({FORMAT_VERSION}) no longer reads: "
                           "regenerate the corpus (ftsim generate ... --overwrite, or write_corpus(..., "
                           "overwrite=True))", path=mpath, field="format_version")
    return CorpusError(f"is {version!r}; this ftsim reads format_version {FORMAT_VERSION} (newer ftsim?)",
                       path=mpath, field="format_version")


def _read_manifest(mpath: Path) -> dict[str, Any]:
    _check_regular(mpath)
    size = mpath.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise CorpusError(f"is {size:,} bytes; a manifest of format_version {FORMAT_VERSION} is at most "
                          f"{MAX_MANIFEST_BYTES:,}", path=mpath)
    version = _peek_format_version(mpath)
    if version is not None and version != FORMAT_VERSION:
        raise _format_version_error(mpath, version)
    try:
        with open(mpath, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except json.JSONDecodeError as exc:
        raise CorpusError(f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}", path=mpath) from None
    except UnicodeDecodeError as exc:
        raise CorpusError(f"is not UTF-8 text ({exc.reason} at byte {exc.start})", path=mpath) from None
    if not isinstance(manifest, dict):
        raise CorpusError("top level must be a JSON object", path=mpath)
    return manifest


def _check_fields(mpath: Path, m: dict[str, Any]) -> None:
    """Presence, JSON types and ranges of every top-level field, and how they constrain each other."""
    def bad(field: str, msg: str) -> CorpusError:
        return CorpusError(msg, path=mpath, field=field)

    for field, tp in _FIELDS.items():
        if field not in m:
            raise bad(field, "missing field")
        v = m[field]
        if not isinstance(v, tp) or (isinstance(v, bool) and (int in (tp if isinstance(tp, tuple) else (tp,)))):
            raise bad(field, f"should be {_type_name(tp)}, got {type(v).__name__}")
    for field in m:
        if field not in _FIELDS:
            raise bad(field, f"unexpected field (not part of format_version {FORMAT_VERSION})")
    if m["format"] != FORMAT:
        raise bad("format", f"is {m['format']!r}, expected {FORMAT!r}")
    if m["format_version"] != FORMAT_VERSION:
        raise _format_version_error(mpath, m["format_version"])
    for field, minimum in (("seed", 0), ("hmm_seed", 0), ("num_sequences", 1), ("length", 1), ("num_states", 1),
                           ("vocab_size", 1), ("shard_tokens", 1), ("block_tokens", 1), ("rows_per_shard", 1),
                           ("sequences_per_block", 1)):
        _int_field(field, m[field], minimum, path=mpath)
    if m["preset"] not in PRESETS:
        raise bad("preset", f"is {m['preset']!r}; presets are {sorted(PRESETS)}")
    try:
        full = validate_preset_params(m["preset"], m["params"])
    except InputError as exc:
        raise bad(f"params.{exc.field}" if exc.field else "params", exc.message) from None
    for name in full:
        if name not in m["params"]:
            raise bad(f"params.{name}", "missing (a manifest lists every parameter of its preset)")
    states, vocab = preset_size(m["preset"], full)
    if m["num_states"] != states:
        raise bad("num_states", f"is {m['num_states']}, but the preset's parameters give {states}")
    if m["vocab_size"] != vocab:
        raise bad("vocab_size", f"is {m['vocab_size']}, but params.vocab_size is {vocab}")
    for field, size, what, item in (("dtype", m["vocab_size"], "vocab_size", "token"),
                                    ("state_dtype", m["num_states"], "num_states", "state")):
        dt = _check_dtype(size, m[field], field=field, path=mpath, what=what, item=item)
        if dt.str != m[field]:
            raise bad(field, f"{m[field]!r} does not say its byte order; this format writes {dt.str!r}")
    if m["rows_per_shard"] != max(1, m["shard_tokens"] // m["length"]):
        raise bad("rows_per_shard", f"is {m['rows_per_shard']}; shard_tokens {m['shard_tokens']} // length "
                                    f"{m['length']} gives {max(1, m['shard_tokens'] // m['length'])}")
    if m["sequences_per_block"] != max(1, m["block_tokens"] // m["length"]):
        raise bad("sequences_per_block", f"is {m['sequences_per_block']}; block_tokens {m['block_tokens']} // "
                                         f"length {m['length']} gives {max(1, m['block_tokens'] // m['length'])}")
    kinds = m["shard_kinds"]
    if "tokens" not in kinds or len(set(kinds)) != len(kinds) or not set(kinds) <= set(SHARD_KINDS) or \
            not all(isinstance(k, str) for k in kinds):
        raise bad("shard_kinds", f"is {kinds!r}; expected 'tokens' and any of 'states', 'labels', 'text', once each")
    labels = "labels" in kinds
    if (m["task_support"] is None) == labels:
        raise bad("task_support", f"is {m['task_support']!r} but the shards {'have' if labels else 'have no'} labels")
    if m["task_support"] is not None:
        _int_field("task_support", m["task_support"], 1, path=mpath)
    if (m["task"] is None) == labels:
        raise bad("task", f"is {'null' if m['task'] is None else 'set'} but the shards "
                          f"{'have' if labels else 'have no'} labels")
    count = -(-m["num_sequences"] // m["rows_per_shard"])
    if len(m["shards"]) != count:
        raise bad("shards", f"lists {len(m['shards'])} shards; num_sequences {m['num_sequences']} in shards of "
                            f"rows_per_shard {m['rows_per_shard']} needs {count}")


def _load_model(path: Path, mpath: Path, m: dict[str, Any]) -> HMM | MemoryHMM:
    """The model from its ``.npy`` files, each checked against its SHA-256 (always: it is as small as the
    parameters), its listed dtype and shape, then validated as an HMM; sizes checked against the manifest."""
    def bad(field: str, msg: str) -> CorpusError:
        return CorpusError(msg, path=mpath, field=field)

    rec = m["model"]
    want = "MemoryHMM" if m["preset"] == "memory" else "HMM"
    if rec.get("kind") != want:
        raise bad("model.kind", f"is {rec.get('kind')!r}; preset {m['preset']!r} makes {'an' if want == 'HMM' else 'a'} "
                                f"{want}")
    if set(rec) != {"kind", "arrays"}:
        raise bad("model", f"has keys {sorted(rec)}; expected ['arrays', 'kind']")
    fields = _MODEL_FIELDS[want]
    arrays_rec = rec["arrays"]
    if not isinstance(arrays_rec, dict) or set(arrays_rec) != set(fields):
        got = sorted(arrays_rec) if isinstance(arrays_rec, dict) else type(arrays_rec).__name__
        raise bad("model.arrays", f"lists {got}; a {want} has {list(fields)}")
    arrays = {}
    for name in fields:
        r, where = arrays_rec[name], f"model.arrays.{name}"
        if not isinstance(r, dict) or set(r) != {"file", "sha256", "shape", "dtype"}:
            raise bad(where, "should be an object with keys file, sha256, shape, dtype")
        _check_name(mpath, f"{where}.file", r["file"], model_file(name))
        _check_sha(mpath, f"{where}.sha256", r["sha256"])
        if not isinstance(r["shape"], list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                       for d in r["shape"]):
            raise bad(f"{where}.shape", f"should be a list of non-negative integers, got {r['shape']!r}")
        try:
            dt = np.dtype(r["dtype"]) if isinstance(r["dtype"], str) else None
        except (TypeError, ValueError, SyntaxError):
            dt = None
        if dt is None or dt.kind != "f" or dt.itemsize != 8:
            raise bad(f"{where}.dtype", f"is {r['dtype']!r}; model arrays are float64 ('<f8')")
        fpath = path / r["file"]
        if not os.path.lexists(fpath):
            raise CorpusError(f"missing (listed in manifest {where})", path=fpath)
        _check_regular(fpath)
        digest = sha256_file(fpath)
        if digest != r["sha256"]:
            raise _sha_error(fpath, r["sha256"], digest, f"{where}.sha256")
        try:
            arr = np.load(fpath, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise CorpusError(f"not a valid .npy file ({exc})", path=fpath) from None
        if arr.dtype.str != dt.str:
            raise CorpusError(f"dtype {arr.dtype.str}, but manifest {where}.dtype says {dt.str}", path=fpath)
        if list(arr.shape) != r["shape"]:
            raise CorpusError(f"shape {arr.shape}, but manifest {where}.shape says {tuple(r['shape'])}", path=fpath)
        arrays[name] = arr
    try:
        model: HMM | MemoryHMM = HMM(**arrays) if want == "HMM" else MemoryHMM(**arrays)
    except HMMValidationError as exc:
        where = path / model_file(exc.field) if exc.field in fields else mpath
        raise CorpusError(exc.message, path=where) from None
    del arrays
    if model.num_states != m["num_states"]:
        raise bad("num_states", f"is {m['num_states']}, but the model files have {model.num_states} states")
    if model.vocab_size != m["vocab_size"]:
        raise bad("vocab_size", f"is {m['vocab_size']}, but the model files have {model.vocab_size} symbols")
    return model


def _check_task(mpath: Path, m: dict[str, Any], model: HMM | MemoryHMM) -> None:
    task = m["task"]
    if task is None:
        return

    def bad(field: str, msg: str) -> CorpusError:
        return CorpusError(msg, path=mpath, field=field)

    if set(task) != {"name", "mu", "support_size", "mask_position"}:
        raise bad("task", f"has keys {sorted(task)}; expected ['mask_position', 'mu', 'name', 'support_size']")
    if not isinstance(task["name"], str):
        raise bad("task.name", "should be a string")
    dim = model.num_memory if isinstance(model, MemoryHMM) else model.num_states
    mu = task["mu"]
    if not isinstance(mu, list) or len(mu) != dim or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in mu):
        raise bad("task.mu", f"should be a list of {dim} finite numbers (one per "
                             f"{'memory value' if isinstance(model, MemoryHMM) else 'state'})")
    support = min(m["task_support"], dim)
    if task["support_size"] != int(np.count_nonzero(mu)) or task["support_size"] != support:
        raise bad("task.support_size", f"is {task['support_size']!r}; mu has {np.count_nonzero(mu)} non-zeros and "
                                       f"task_support {m['task_support']} clipped to {dim} gives {support}")
    want = None if isinstance(model, MemoryHMM) else 0
    if task["mask_position"] != want or isinstance(task["mask_position"], bool):
        raise bad("task.mask_position", f"is {task['mask_position']!r}; expected {want!r} for a {type(model).__name__}")


def _check_shards(path: Path, mpath: Path, m: dict[str, Any], verify: bool) -> None:
    kinds = list(m["shard_kinds"])
    rows_per, total = m["rows_per_shard"], m["num_sequences"]
    count = len(m["shards"])
    for i, shard in enumerate(m["shards"]):
        where = f"shards[{i}]"
        if not isinstance(shard, dict):
            raise CorpusError("should be an object", path=mpath, field=where)
        for key in ("index", "rows", *kinds):
            if key not in shard:
                raise CorpusError("missing", path=mpath, field=f"{where}.{key}")
        for key in shard:
            if key not in ("index", "rows", *kinds):
                raise CorpusError(f"unexpected key (shard_kinds is {kinds})", path=mpath, field=f"{where}.{key}")
        if shard["index"] != i or isinstance(shard["index"], bool):
            raise CorpusError(f"is {shard['index']!r}; shards are listed in order from 0", path=mpath,
                              field=f"{where}.index")
        rows = rows_per if i < count - 1 else total - rows_per * (count - 1)
        if shard["rows"] != rows or isinstance(shard["rows"], bool):
            raise CorpusError(f"is {shard['rows']!r}; num_sequences {total} in shards of rows_per_shard {rows_per} "
                              f"gives {rows}", path=mpath, field=f"{where}.rows")
        for kind in kinds:
            ent, field = shard[kind], f"{where}.{kind}"
            if not isinstance(ent, dict):
                raise CorpusError("should be an object with keys file and sha256", path=mpath, field=field)
            for key in ("file", "sha256"):
                if key not in ent:
                    raise CorpusError("missing", path=mpath, field=f"{field}.{key}")
            if set(ent) != {"file", "sha256"}:
                raise CorpusError(f"has keys {sorted(ent)}; expected ['file', 'sha256']", path=mpath, field=field)
            _check_name(mpath, f"{field}.file", ent["file"], shard_file(kind, i))
            _check_sha(mpath, f"{field}.sha256", ent["sha256"])
            fpath = path / ent["file"]
            if not os.path.lexists(fpath):
                raise CorpusError(f"missing (listed in manifest {field})", path=fpath)
            _check_regular(fpath)
            expect = _expect(m, kind, rows)
            if kind == "text":
                if verify:
                    _verify_text(fpath, rows, ent["sha256"], field)
            elif verify:
                _verify_npy(fpath, expect, ent["sha256"], field, m)
            else:
                _check_npy_header(fpath, expect, field)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A corpus read back from disk, every manifest field cross-checked (and, by default, every file's SHA-256
    and every value's range verified on open).

    Attributes:
        path: the directory.
        manifest: the parsed ``manifest.json``.
        model: the :class:`HMM` or :class:`MemoryHMM` that generated it.
        verified: whether checksums and value ranges were verified on open (otherwise values are checked as
            shards are read).
    """

    path: Path
    manifest: dict[str, Any]
    model: HMM | MemoryHMM
    verified: bool = True

    @property
    def num_sequences(self) -> int:
        return int(self.manifest["num_sequences"])

    @property
    def length(self) -> int:
        return int(self.manifest["length"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    def _load(self, kind: str, mmap: bool) -> Iterator[np.ndarray]:
        if kind not in ("tokens", "states", "labels"):
            raise CorpusError(f"is {kind!r}; shards are read as 'tokens', 'states' or 'labels'", field="kind")
        if kind not in self.manifest["shard_kinds"]:
            raise CorpusError(f"has no {kind!r} files (generate with --{kind})", path=self.path / MANIFEST,
                              field="shard_kinds")
        for i, shard in enumerate(self.manifest["shards"]):
            path = self.path / shard[kind]["file"]
            if not os.path.lexists(path):
                raise CorpusError(f"missing (listed in manifest shards[{i}].{kind})", path=path)
            _check_regular(path)
            try:
                arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise CorpusError(f"not a valid .npy file ({exc})", path=path) from None
            expect = _expect(self.manifest, kind, shard["rows"])
            problem = expect.header_problem(arr.dtype, arr.shape, False, f"shards[{i}]")
            if problem is not None:
                raise CorpusError(problem, path=path)
            if not self.verified and arr.size and arr.max() >= expect.bound:
                flat = int(np.argmax((arr >= expect.bound).reshape(-1)))
                raise _value_error(path, expect, flat, int(arr.reshape(-1)[flat]), self.manifest)
            yield arr

    def iter_shards(self, kind: str = "tokens", mmap: bool = True) -> Iterator[np.ndarray]:
        """Yield each shard's array (memory-mapped by default): ``tokens``, ``states`` or ``labels``."""
        return self._load(kind, mmap)

    def tokens(self) -> np.ndarray:
        """All tokens, (N, T), in memory."""
        return np.concatenate(list(self._load("tokens", mmap=False)))

    def states(self) -> np.ndarray:
        return np.concatenate(list(self._load("states", mmap=False)))

    def labels(self) -> np.ndarray:
        return np.concatenate(list(self._load("labels", mmap=False)))[:, 0].astype(np.int64)


def load_corpus(path: str | os.PathLike, verify: bool = True) -> Corpus:
    """Open a corpus directory and check everything its manifest claims.

    Always: every manifest field (presence, type, range, agreement with the others), the model files (SHA-256,
    dtype, shape, stochastic rows), file names (the plain names this format writes: never a path outside the
    directory, never a symbolic link), and each shard's header (dtype with byte order, shape) and size. With
    ``verify`` (default) also each shard's SHA-256 and its values (tokens below ``vocab_size``, states below
    ``num_states``, labels 0/1), in one pass per file.

    Raises:
        CorpusError: naming the file and the field: missing or malformed manifest, an old format_version, an
            unfinished corpus (with what to do), a field that disagrees with another or with the arrays, a
            missing, altered, truncated or out-of-range shard.
    """
    path = Path(path)
    mpath = path / MANIFEST
    if not path.exists():
        raise CorpusError("not found", path=path)
    if not path.is_dir():
        raise CorpusError("is not a directory (a corpus is a directory holding manifest.json)", path=path)
    if not os.path.lexists(mpath):
        if os.path.lexists(path / PROGRESS):
            header, entries, _ = _read_progress(path / PROGRESS)
            of = f" ({len(entries)} of {header.get('shards')} shards written)" if header else ""
            raise CorpusError(f"not found: the directory holds an unfinished corpus{of}; rerun the same ftsim "
                              "generate (write_corpus with the same spec) to finish it", path=mpath)
        if not any(path.iterdir()):
            raise CorpusError("not found: the directory is empty (not a corpus)", path=mpath)
        raise CorpusError("not found (not a corpus directory)", path=mpath)
    manifest = _read_manifest(mpath)
    _check_fields(mpath, manifest)
    model = _load_model(path, mpath, manifest)
    _check_task(mpath, manifest, model)
    _check_shards(path, mpath, manifest, verify)
    return Corpus(path, manifest, model, verified=verify)
