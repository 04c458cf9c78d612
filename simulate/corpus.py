"""Corpora on disk: streamed, sharded ``.npy`` token files with a manifest and SHA-256 checksums.

Layout of a corpus directory::

    manifest.json            preset, all parameters (full start/trans/emit), seed, dtypes, shard list
    tokens-00000.npy         (rows, length) tokens, smallest unsigned dtype holding the vocabulary
    states-00000.npy         optional hidden states (joint index for the memory preset)
    labels-00000.npy         optional downstream labels (uint8)
    text-00000.txt           optional text rendering: one sequence per line, tokens as ``t<k>`` words

Writing streams block by block (see :mod:`simulate.sampling`), so memory stays flat however many tokens are
asked for; every file is written to a temporary name and renamed into place, and ``manifest.json`` is
written last: a directory without a manifest is an unfinished corpus. The tokens on disk are exactly
``sample(hmm, N, T, seed).tokens``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

import ftsim
from ftsim.core.io import read_json, sha256_file, write_json
from simulate.hmm import HMM, HMMValidationError, MemoryHMM, make_preset
from simulate.sampling import BLOCK_TOKENS, block_sequences, iter_sample_blocks, smallest_uint
from simulate.tasks import PosteriorTask, linear_posterior_task, memory_linear_task, sparse_mu

__all__ = ["CorpusError", "CorpusSpec", "write_corpus", "load_corpus", "Corpus", "default_task", "FORMAT"]

FORMAT = "ftsim-corpus"
FORMAT_VERSION = 1
DEFAULT_SHARD_TOKENS = 1 << 24


class CorpusError(ValueError):
    """A corpus directory is malformed; the message names the file and field."""


class _HashedStream:
    """A file written to a temporary name beside its target, hashed as it is written, and renamed into place
    by :meth:`close` (which returns the SHA-256); :meth:`abort` removes the temporary file."""

    def __init__(self, path: Path):
        self.path = path
        fd, self.tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        self.fh = os.fdopen(fd, "wb")
        self.sha = hashlib.sha256()

    def _write(self, data: bytes | memoryview) -> None:
        self.fh.write(data)
        self.sha.update(data)

    def close(self) -> str:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.path)
        return self.sha.hexdigest()

    def abort(self) -> None:
        if not self.fh.closed:
            self.fh.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


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


def default_task(model: HMM | MemoryHMM, support_size: int, seed: int) -> tuple[PosteriorTask, np.ndarray]:
    """The downstream task stored with a corpus: Wei et al.'s y = 1[mu^T P(H_0 | x) >= 0] (mask prepended)
    for a plain HMM, y = 1[mu^T P(M | x) >= 0] for a memory HMM; mu sparse with ``support_size``
    non-zeros (clipped to the dimension), drawn from ``seed``."""
    if isinstance(model, MemoryHMM):
        mu = sparse_mu(model.num_memory, min(support_size, model.num_memory), seed)
        return memory_linear_task(model, mu), mu
    mu = sparse_mu(model.num_states, min(support_size, model.num_states), seed)
    return linear_posterior_task(mu), mu


def _check_dtype(vocab_size: int, dtype: Any) -> np.dtype:
    dt = np.dtype(dtype) if dtype is not None else smallest_uint(vocab_size - 1)
    if dt.kind != "u":
        raise CorpusError(f"dtype {dt} is not an unsigned integer type")
    if vocab_size - 1 > np.iinfo(dt).max:
        raise CorpusError(
            f"vocab_size {vocab_size} does not fit in dtype {dt} (max token id {np.iinfo(dt).max}); "
            f"use {smallest_uint(vocab_size - 1)} or larger"
        )
    return dt


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """What a corpus is: the HMM preset and its parameters, the size, the seeds, and which files to write.

    Attributes:
        preset: ``wei2021``, ``memory`` or ``random`` (see :mod:`simulate.hmm`).
        params: the preset's keyword parameters (num_states, vocab_size, temperatures, ...).
        num_sequences, length: N sequences of T tokens.
        seed: sampling seed; ``hmm_seed`` (default: ``seed``) draws the HMM parameters.
        states, labels, text: also write hidden states, downstream labels (:func:`default_task`), text.
        task_support: non-zeros of the task's mu (labels only).
        shard_tokens: tokens per shard (rounded to whole blocks of sequences).
        dtype: token dtype; default the smallest unsigned dtype that holds the vocabulary.
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

    @property
    def model_seed(self) -> int:
        return self.seed if self.hmm_seed is None else self.hmm_seed

    def describe(self) -> dict[str, Any]:
        """A JSON form (cache keys, manifests)."""
        d = dataclasses.asdict(self)
        d["params"] = dict(sorted(dict(self.params).items()))
        d["dtype"] = None if self.dtype is None else np.dtype(self.dtype).str
        return d


def write_corpus(out: str | os.PathLike, spec: CorpusSpec, *, overwrite: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Generate the corpus ``spec`` and write it to ``out`` (must be empty or absent unless ``overwrite``);
    return the manifest."""
    preset, params = spec.preset, dict(spec.params)
    num_sequences, length, seed = spec.num_sequences, spec.length, spec.seed
    hmm_seed, states, labels, text = spec.hmm_seed, spec.states, spec.labels, spec.text
    task_support, shard_tokens, dtype = spec.task_support, spec.shard_tokens, spec.dtype
    from ftsim.core.progress import bar as tqdm

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CorpusError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CorpusError(f"{out}: directory is not empty; pass overwrite=True (--overwrite) to replace it")
    if num_sequences < 1 or length < 1:
        raise CorpusError(f"num_sequences={num_sequences} and length={length} must be >= 1")
    out.mkdir(parents=True, exist_ok=True)
    stale_manifest = out / "manifest.json"
    if stale_manifest.exists():
        stale_manifest.unlink()  # the old corpus is being replaced: never leave its manifest over new shards

    hmm_seed = seed if hmm_seed is None else hmm_seed
    model = make_preset(preset, seed=hmm_seed, **params)
    joint = model.as_hmm() if isinstance(model, MemoryHMM) else model
    token_dtype = _check_dtype(joint.vocab_size, dtype)
    state_dtype = smallest_uint(joint.num_states - 1)
    task, mu = default_task(model, task_support, seed=hmm_seed + 1) if labels else (None, None)
    words = np.array([f"t{k}" for k in range(joint.vocab_size)]) if text else None

    rows_per_shard = max(1, shard_tokens // length)
    shard_rows = [min(rows_per_shard, num_sequences - lo) for lo in range(0, num_sequences, rows_per_shard)]

    def pieces() -> Iterator[np.ndarray]:
        """Blocks of the sampler cut at shard boundaries: yields (tokens, states) row ranges."""
        for block in iter_sample_blocks(model, num_sequences, length, seed, workers=min(2, os.cpu_count() or 1)):
            yield block.tokens, block.states

    shards: list[dict[str, Any]] = []
    source = pieces()
    pending: tuple[np.ndarray, np.ndarray] | None = None
    bar = tqdm(total=num_sequences * length, unit="tok", unit_scale=True, desc=f"generate {out.name}",
               disable=not progress, mininterval=0.5, delay=0.5)
    written: list[Path] = []
    try:
        for index, rows in enumerate(shard_rows):
            streams: dict[str, Any] = {"tokens": _NpyStream(out / f"tokens-{index:05d}.npy", (rows, length), token_dtype)}
            if states:
                streams["states"] = _NpyStream(out / f"states-{index:05d}.npy", (rows, length), state_dtype)
            if labels:
                streams["labels"] = _NpyStream(out / f"labels-{index:05d}.npy", (rows, 1), np.uint8)
            if text:
                streams["text"] = _TextStream(out / f"text-{index:05d}.txt")
            try:
                done = 0
                while done < rows:
                    tok, st = pending if pending is not None else next(source)
                    take = min(rows - done, tok.shape[0])
                    pending = (tok[take:], st[take:]) if take < tok.shape[0] else None
                    tok, st = tok[:take], st[:take]
                    streams["tokens"].append(tok)
                    if states:
                        streams["states"].append(st)
                    if labels:
                        streams["labels"].append(task.labels(model, tok)[:, None])
                    if text:
                        streams["text"].append(tok, words)
                    done += take
                    bar.update(tok.size)
                entry = {"index": index, "rows": rows}
                for kind, stream in streams.items():
                    entry[kind] = {"file": stream.path.name, "sha256": stream.close()}
                    written.append(stream.path)
                shards.append(entry)
            except BaseException:
                for stream in streams.values():
                    stream.abort()
                raise
    finally:
        bar.close()

    keep = {p.name for p in written}
    for old in out.iterdir():  # with overwrite: shards of a previous, larger corpus must not linger
        if old.is_file() and old.name.split("-")[0] in ("tokens", "states", "labels", "text") and old.name not in keep:
            old.unlink()

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ftsim_version": ftsim.__version__,
        "preset": preset,
        "params": dict(params),
        "seed": int(seed),
        "hmm_seed": int(hmm_seed),
        "num_sequences": int(num_sequences),
        "length": int(length),
        "num_states": joint.num_states,
        "vocab_size": joint.vocab_size,
        "dtype": token_dtype.name,
        "state_dtype": state_dtype.name,
        "block_tokens": BLOCK_TOKENS,
        "sequences_per_block": block_sequences(length),
        "model": {"kind": type(model).__name__, **model.to_dict()},
        "task": None if task is None else {"name": task.name, "mu": mu.tolist(), "support_size": int(np.count_nonzero(mu)),
                                            "mask_position": task.mask_position},
        "shards": shards,
    }
    write_json(out / "manifest.json", manifest)
    return manifest


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------

_REQUIRED = {
    "format": str, "format_version": int, "preset": str, "params": dict, "seed": int, "num_sequences": int,
    "length": int, "num_states": int, "vocab_size": int, "dtype": str, "model": dict, "shards": list,
}


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A corpus read back from disk (checksums verified on open unless asked not to).

    Attributes:
        path: the directory.
        manifest: the parsed ``manifest.json``.
        model: the :class:`HMM` or :class:`MemoryHMM` that generated it.
    """

    path: Path
    manifest: dict[str, Any]
    model: HMM | MemoryHMM

    @property
    def num_sequences(self) -> int:
        return int(self.manifest["num_sequences"])

    @property
    def length(self) -> int:
        return int(self.manifest["length"])

    def _load(self, kind: str, mmap: bool) -> Iterator[np.ndarray]:
        for shard in self.manifest["shards"]:
            if kind not in shard:
                raise CorpusError(f"{self.path / 'manifest.json'}: shard {shard['index']} has no {kind!r} file "
                                  f"(generate with --{kind})")
            path = self.path / shard[kind]["file"]
            if not path.exists():
                raise CorpusError(f"{path}: missing (listed in manifest shards[{shard['index']}].{kind})")
            arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
            if arr.shape[0] != shard["rows"]:
                raise CorpusError(f"{path}: {arr.shape[0]} rows, manifest says {shard['rows']}")
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


def _manifest_error(path: Path, msg: str) -> CorpusError:
    return CorpusError(f"{path}: {msg}")


def load_corpus(path: str | os.PathLike, verify: bool = True) -> Corpus:
    """Open a corpus directory, validate its manifest and (by default) every shard's SHA-256.

    Raises:
        CorpusError: naming the file and field: missing or malformed manifest, a dtype that cannot hold the
            vocabulary, a missing shard, or a shard whose checksum differs (corrupt, truncated or altered).
    """
    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.exists():
        raise CorpusError(f"{mpath}: not found (not a corpus directory, or its generation did not finish)")
    try:
        manifest = read_json(mpath)
    except ValueError as exc:
        raise CorpusError(str(exc)) from None
    if not isinstance(manifest, dict):
        raise _manifest_error(mpath, "top level must be a JSON object")
    for field, tp in _REQUIRED.items():
        if field not in manifest:
            raise _manifest_error(mpath, f"missing field {field!r}")
        if not isinstance(manifest[field], tp) or (tp is int and isinstance(manifest[field], bool)):
            raise _manifest_error(mpath, f"field {field!r} should be {tp.__name__}, got {type(manifest[field]).__name__}")
    if manifest["format"] != FORMAT:
        raise _manifest_error(mpath, f"field 'format' is {manifest['format']!r}, expected {FORMAT!r}")
    if manifest["format_version"] > FORMAT_VERSION:
        raise _manifest_error(mpath, f"format_version {manifest['format_version']} is newer than this ftsim "
                                     f"reads ({FORMAT_VERSION})")
    try:
        dt = np.dtype(manifest["dtype"])
    except TypeError:
        raise _manifest_error(mpath, f"field 'dtype' is not a numpy dtype: {manifest['dtype']!r}") from None
    try:
        _check_dtype(manifest["vocab_size"], dt)
    except CorpusError as exc:
        raise _manifest_error(mpath, f"field 'dtype': {exc}") from None
    model_spec = dict(manifest["model"])
    kind = model_spec.pop("kind", None)
    try:
        if kind == "HMM":
            model: HMM | MemoryHMM = HMM.from_dict(model_spec)
        elif kind == "MemoryHMM":
            model = MemoryHMM.from_dict(model_spec)
        else:
            raise _manifest_error(mpath, f"field 'model.kind' is {kind!r}, expected 'HMM' or 'MemoryHMM'")
    except HMMValidationError as exc:
        raise _manifest_error(mpath, f"field 'model': {exc}") from None
    total = 0
    for i, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict) or "rows" not in shard or "tokens" not in shard:
            raise _manifest_error(mpath, f"shards[{i}] needs 'rows' and 'tokens'")
        total += int(shard["rows"])
        if verify:
            for k in ("tokens", "states", "labels", "text"):
                if k not in shard:
                    continue
                fpath = path / shard[k]["file"]
                if not fpath.exists():
                    raise CorpusError(f"{fpath}: missing (listed in manifest shards[{i}].{k})")
                digest = sha256_file(fpath)
                if digest != shard[k]["sha256"]:
                    raise CorpusError(
                        f"{fpath}: SHA-256 mismatch (manifest {shard[k]['sha256'][:16]}..., file {digest[:16]}...): "
                        "the shard is corrupt, truncated or was altered"
                    )
    if total != manifest["num_sequences"]:
        raise _manifest_error(mpath, f"shard rows add up to {total}, field 'num_sequences' is {manifest['num_sequences']}")
    return Corpus(path, manifest, model)
