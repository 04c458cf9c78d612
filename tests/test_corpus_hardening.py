"""Corpora against bad input and bad luck (issue 11): every refused case names its culprit (field, file) and
leaves the files that were there byte-identical; overwrite replaces exactly what a previous corpus lists;
a killed generation resumes to the same bytes; the manifest is cross-checked against the arrays."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import simulate.corpus as corpus_mod
from ftsim.core.errors import InputError
from simulate.corpus import CorpusError, CorpusSpec, load_corpus, write_corpus
from simulate.sampling import sample

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(num_sequences=500, length=12, seed=7, shard_tokens=12 * 120)  # 5 shards: 4 x 120 rows + 20
PARAMS = {"num_states": 5, "vocab_size": 9}


def _spec(**kw) -> CorpusSpec:
    args = dict(BASE)
    args.update(kw)
    return CorpusSpec(args.pop("preset", "wei2021"), args.pop("params", PARAMS), **args)


def _write(out, overwrite=False, **kw):
    return write_corpus(out, _spec(**kw), overwrite=overwrite, progress=False)


def tree(path: Path) -> dict[str, str]:
    """Every entry under ``path`` (hidden ones too) -> SHA-256 of its bytes (or where a link points)."""
    out = {}
    if not os.path.lexists(path):
        return out
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted corpus with every kind of file, and its bytes."""
    out = tmp_path_factory.mktemp("ref") / "c"
    _write(out, states=True, labels=True, text=True)
    return out, tree(out)


# ----------------------------------------------------------------------------------------------------------
# The spec is validated before anything exists on disk
# ----------------------------------------------------------------------------------------------------------

BAD_SPECS = [
    ({"params": {"num_states": 5, "vocab_size": 0}}, "vocab_size", r"must be an integer >= 1, got 0"),
    ({"params": {"num_states": 0, "vocab_size": 9}}, "num_states", r"must be an integer >= 1, got 0"),
    ({"params": {**PARAMS, "num_permutations": 0}}, "num_permutations", r"must be an integer >= 1 \(or None\)"),
    ({"params": {**PARAMS, "trans_temp": float("nan")}}, "trans_temp", r"positive and finite, got nan"),
    ({"params": {**PARAMS, "emit_temp": -0.1}}, "emit_temp", r"positive and finite, got -0\.1"),
    ({"params": {**PARAMS, "concentration": 1.0}}, "concentration", r"does not apply to preset 'wei2021'"),
    ({"preset": "random", "params": {"concentration": 0.0}}, "concentration", r"positive and finite, got 0\.0"),
    ({"preset": "memory", "params": {"num_memory": 0}}, "num_memory", r"must be an integer >= 1, got 0"),
    ({"preset": "banana", "params": {}}, "preset", r"unknown preset 'banana'"),
    ({"params": ["num_states"]}, "params", r"must be a mapping"),
    ({"num_sequences": 0}, "num_sequences", r"must be >= 1, got 0"),
    ({"num_sequences": "10"}, "num_sequences", r"must be an integer >= 1, got '10'"),
    ({"length": 0}, "length", r"must be >= 1, got 0"),
    ({"seed": -1}, "seed", r"must be >= 0, got -1"),
    ({"hmm_seed": -2}, "hmm_seed", r"must be >= 0, got -2"),
    ({"shard_tokens": 0}, "shard_tokens", r"must be >= 1, got 0"),
    ({"num_sequences": 200_000, "length": 1, "shard_tokens": 1}, "shard_tokens",
     r"give 200,000 shards of 1 sequences; at most 99,999: use shard_tokens >= 3"),
    ({"task_support": 0}, "task_support", r"must be >= 1, got 0"),
    ({"states": "yes"}, "states", r"must be True or False, got 'yes'"),
    ({"dtype": "banana"}, "dtype", r"'banana' is not a dtype numpy knows"),
    ({"dtype": 3.5}, "dtype", r"must be a dtype name such as 'uint16', got float"),
    ({"dtype": "int8"}, "dtype", r"dtype int8 is not an unsigned integer type"),
    ({"dtype": "float32"}, "dtype", r"not an unsigned integer type"),
    ({"params": {"num_states": 3, "vocab_size": 300}, "dtype": "uint8"}, "dtype",
     r"vocab_size 300 does not fit in dtype uint8 \(max token id 255\); use uint16"),
    # Sizes are checked from the parameters alone: nothing of 50,000^2 entries is ever drawn.
    ({"params": {"num_states": 50_000, "vocab_size": 9}}, "num_states", r"int32"),
    ({"params": {"num_states": 3_000, "vocab_size": 1_000_000}}, "vocab_size", r"int32"),
]


@pytest.mark.parametrize("kwargs, field, pattern", BAD_SPECS, ids=[f"{c[1]}-{i}" for i, c in enumerate(BAD_SPECS)])
def test_bad_spec_is_refused_before_anything_is_written(tmp_path, reference, kwargs, field, pattern):
    fresh = tmp_path / "new" / "c"
    with pytest.raises(InputError, match=rf"^{field}: .*{pattern}") as exc:
        write_corpus(fresh, _spec(**kwargs), progress=False)
    assert exc.value.field == field and exc.value.path is None
    # The command line prints it as one line naming the flag.
    assert exc.value.describe(flag_style=True).startswith("--" + field.replace("_", "-") + ": ")
    assert not (tmp_path / "new").exists()  # not even the parent directory
    # Aimed at an existing corpus, with overwrite: the corpus is untouched.
    out, before = reference
    with pytest.raises(InputError, match=pattern):
        write_corpus(out, _spec(**kwargs), overwrite=True, progress=False)
    assert tree(out) == before


def test_spec_validate_normalises_numpy_integers():
    spec = _spec(num_sequences=np.int64(3), seed=np.uint8(2))
    assert type(spec.num_sequences) is int and type(spec.seed) is int
    assert spec.validate() is spec
    assert spec.describe()["num_sequences"] == 3


def test_big_endian_dtype_is_recorded_with_its_byte_order(tmp_path):
    out = tmp_path / "c"
    m = write_corpus(out, _spec(params={"num_states": 3, "vocab_size": 300}, dtype=">u2"), progress=False)
    assert m["dtype"] == ">u2"
    corpus = load_corpus(out)
    assert next(corpus.iter_shards("tokens")).dtype.str == ">u2"  # on disk as asked
    assert np.array_equal(corpus.tokens(), sample(corpus.model, 500, 12, 7).tokens)  # same values


# ----------------------------------------------------------------------------------------------------------
# Directories: overwrite replaces exactly what the previous manifest lists, or refuses
# ----------------------------------------------------------------------------------------------------------


def test_overwrite_refuses_user_files_named_like_shards(tmp_path):
    """The bug of issue 11: `--overwrite` deleted a user's text-notes.md (it starts with `text-`)."""
    out = tmp_path / "c"
    _write(out)
    for name in ("text-notes.md", "tokens-mine.npy", "labels-00000.npy"):  # labels-00000.npy is not listed here
        (out / name).write_text("mine")
        before = tree(out)
        with pytest.raises(CorpusError, match=rf"directory is not empty: '{name}' is not part of the corpus here "
                                              r"\(not listed in its manifest\.json\)") as exc:
            _write(out, overwrite=True, num_sequences=100)
        assert exc.value.path == str(out)
        assert tree(out) == before
        (out / name).unlink()
    _write(out, overwrite=True, num_sequences=100)
    assert load_corpus(out).num_sequences == 100


def test_overwrite_replaces_exactly_the_listed_files_and_stale_temps(tmp_path):
    out = tmp_path / "c"
    _write(out, states=True, text=True)
    (out / ".tokens-00002.npy.k3j4h5g6.tmp").write_bytes(b"half a shard")  # a temp file of ours, from a kill
    _write(out, overwrite=True, num_sequences=130)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["manifest.json", "model-emit.npy", "model-start.npy", "model-trans.npy",
                     "tokens-00000.npy", "tokens-00001.npy"]
    assert np.array_equal(load_corpus(out).tokens(), sample(load_corpus(out).model, 130, 12, 7).tokens)


@pytest.mark.parametrize("content, pattern", [
    ('{"hello": 1}', r"manifest\.json is not an ftsim corpus manifest"),
    ("{not json", r"manifest\.json cannot be read"),
])
def test_a_foreign_manifest_is_the_users_file(tmp_path, content, pattern):
    out = tmp_path / "c"
    out.mkdir()
    (out / "manifest.json").write_text(content)
    (out / "tokens-00000.npy").write_text("theirs")
    before = tree(out)
    for overwrite in (False, True):
        with pytest.raises(CorpusError, match=rf"'manifest\.json', 'tokens-00000\.npy' are not part of any ftsim "
                                              rf"corpus \({pattern}"):
            _write(out, overwrite=overwrite)
    assert tree(out) == before


def test_a_path_that_is_a_file_is_named(tmp_path):
    f = tmp_path / "c"
    f.write_text("x")
    with pytest.raises(CorpusError, match=r"c: exists and is not a directory") as exc:
        _write(f, overwrite=True)
    assert exc.value.path == str(f) and f.read_text() == "x"


def test_rerun_of_a_finished_corpus_verifies_and_keeps_it(tmp_path):
    out = tmp_path / "c"
    m1 = _write(out, labels=True)
    before = tree(out)
    stats = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert _write(out, labels=True) == m1
    assert tree(out) == before and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stats
    # Same spec written differently (defaults spelt out, hmm_seed = seed, other shard_tokens giving the same
    # rows per shard): the same corpus.
    assert _write(out, labels=True, hmm_seed=7, shard_tokens=12 * 120 + 5,
                  params={**PARAMS, "trans_temp": 0.1}) == m1
    # A finished corpus of this spec that fails verification is named, not silently replaced.
    shard = out / "tokens-00001.npy"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x00")
    before = tree(out)
    with pytest.raises(CorpusError, match=r"holds a finished corpus of this spec that fails verification "
                                          r"\(.*tokens-00001\.npy: SHA-256 mismatch"):
        _write(out, labels=True)
    assert tree(out) == before
    _write(out, labels=True, overwrite=True)
    assert tree(out) != before and load_corpus(out).manifest == m1


def test_old_format_is_refused_with_what_to_do_and_overwrite_replaces_it(tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    old = {"format": "ftsim-corpus", "format_version": 1, "preset": "wei2021",
           "model": {"kind": "HMM", "start": [1.0], "trans": [[1.0]], "emit": [[1.0]]},
           "shards": [{"index": 0, "rows": 2, "tokens": {"file": "tokens-00000.npy", "sha256": "0" * 64},
                       "text": {"file": "text-00000.txt", "sha256": "0" * 64}}]}
    (out / "manifest.json").write_text(json.dumps(old, indent=2))
    (out / "tokens-00000.npy").write_bytes(b"old")
    (out / "text-00000.txt").write_bytes(b"old")
    before = tree(out)
    with pytest.raises(CorpusError, match=r"manifest\.json: format_version: is 1, an old corpus format this ftsim "
                                          r"\(2\) no longer reads: regenerate the corpus"):
        load_corpus(out)
    with pytest.raises(CorpusError, match=r"holds a corpus of format_version 1.*pass overwrite=True"):
        _write(out)
    assert tree(out) == before
    _write(out, overwrite=True)
    assert "text-00000.txt" not in os.listdir(out) and load_corpus(out).num_sequences == 500


def test_a_second_writer_is_refused_while_the_first_holds_the_directory(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "c"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(CorpusError, match=r"another process is writing a corpus into this directory"):
            _write(out)
    finally:
        os.close(fd)
    assert os.listdir(out) == []
    _write(out)  # the lock went with the holder


# ----------------------------------------------------------------------------------------------------------
# Killed runs resume to the same bytes
# ----------------------------------------------------------------------------------------------------------


class Killed(BaseException):
    """Stands in for SIGKILL / Ctrl-C (a BaseException, like KeyboardInterrupt)."""


def _kill_after(monkeypatch, shards: int) -> None:
    original = corpus_mod._ProgressLog.append
    calls = {"n": 0}

    def append(self, entry):
        original(self, entry)
        calls["n"] += 1
        if calls["n"] == shards:
            raise Killed

    monkeypatch.setattr(corpus_mod._ProgressLog, "append", append)


def _count_streams(monkeypatch) -> list[str]:
    opened: list[str] = []
    original = corpus_mod._HashedStream.__init__

    def init(self, path):
        opened.append(path.name)
        original(self, path)

    monkeypatch.setattr(corpus_mod._HashedStream, "__init__", init)
    return opened


@pytest.mark.parametrize("k", [1, 3, 5])
def test_resume_after_an_exception_is_byte_identical(tmp_path, monkeypatch, reference, k):
    _, ref_tree = reference
    out = tmp_path / "c"
    with monkeypatch.context() as mp:
        _kill_after(mp, k)
        with pytest.raises(Killed):
            _write(out, states=True, labels=True, text=True)
    names = set(os.listdir(out))
    assert "manifest.json" not in names and "progress.jsonl" in names
    assert not [n for n in names if n.endswith(".tmp")]
    with pytest.raises(CorpusError, match=rf"manifest\.json: not found: the directory holds an unfinished corpus "
                                          rf"\({k} of 5 shards written\); rerun the same ftsim generate"):
        load_corpus(out)
    kept = {n: (out / n).stat().st_mtime_ns for n in names if n[:6] in ("tokens", "states", "labels", "text-0")}
    opened = _count_streams(monkeypatch)
    _write(out, states=True, labels=True, text=True)
    assert tree(out) == ref_tree
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept  # finished shards were kept, not rewritten
    assert sorted({n.split("-")[1][:5] for n in opened}) == [f"{i:05d}" for i in range(k, 5)]


def test_resume_across_sampler_blocks(tmp_path, monkeypatch):
    """Shards that start inside a sampler block (and span several): the resumed run must restart the block
    stream at the right block and row."""
    import simulate.sampling as sampling

    monkeypatch.setattr(sampling, "BLOCK_TOKENS", 100)  # 8 sequences of 12 tokens per block
    monkeypatch.setattr(corpus_mod, "BLOCK_TOKENS", 100)
    spec = dict(num_sequences=300, shard_tokens=12 * 37, states=True)  # 37 rows per shard: 9 shards
    ref = tmp_path / "ref"
    _write(ref, **spec)
    for k in (1, 4, 8):
        out = tmp_path / f"c{k}"
        with monkeypatch.context() as mp:
            _kill_after(mp, k)
            with pytest.raises(Killed):
                _write(out, **spec)
        _write(out, **spec)
        assert tree(out) == tree(ref), k
    corpus = load_corpus(ref)
    assert np.array_equal(corpus.tokens(), sample(corpus.model, 300, 12, 7).tokens)


def test_resume_redoes_what_it_cannot_verify(tmp_path, monkeypatch, reference):
    _, ref_tree = reference
    out = tmp_path / "c"
    with monkeypatch.context() as mp:
        _kill_after(mp, 4)
        with pytest.raises(Killed):
            _write(out, states=True, labels=True, text=True)
    # Shard 2 altered after it was logged, a torn last log line, stale temporary files, a deleted model file.
    (out / "states-00002.npy").write_bytes(b"garbage")
    with open(out / "progress.jsonl", "ab") as fh:
        fh.write(b'{"index": 4, "rows": 2')
    (out / ".tokens-00004.npy.abcd1234.tmp").write_bytes(b"x" * 100)
    (out / ".manifest.json.zz99zz99.tmp").write_bytes(b"{")
    (out / "model-emit.npy").unlink()
    opened = _count_streams(monkeypatch)
    _write(out, states=True, labels=True, text=True)
    assert tree(out) == ref_tree
    assert sorted({n.split("-")[1][:5] for n in opened}) == ["00002", "00003", "00004"]


def test_unfinished_corpus_of_another_spec_is_named(tmp_path, monkeypatch):
    out = tmp_path / "c"
    with monkeypatch.context() as mp:
        _kill_after(mp, 2)
        with pytest.raises(Killed):
            _write(out)
    before = tree(out)
    with pytest.raises(CorpusError, match=r"c: holds an unfinished corpus of another spec \(progress\.jsonl: 2 of 5 "
                                          r"shards written; seed: 7 there, 8 asked; hmm_seed: 7 there, 8 asked\): rerun with that spec to finish "
                                          r"it, or pass overwrite=True \(--overwrite\) to replace it"):
        _write(out, seed=8)
    with pytest.raises(CorpusError, match=r"params\.trans_temp: 0\.1 there, 0\.5 asked"):
        _write(out, params={**PARAMS, "trans_temp": 0.5})
    assert tree(out) == before
    _write(out, seed=8, overwrite=True)
    assert load_corpus(out).manifest["seed"] == 8 and "progress.jsonl" not in os.listdir(out)


def test_resume_after_sigkill_of_a_real_process(tmp_path, reference):
    """A child process writing the corpus is killed with SIGKILL in the middle of a shard (a temporary file
    exists, two shards are logged); the rerun removes the temporary file and finishes byte-identically. Each
    append sleeps in the child only so that the kill lands mid-shard: the writing code is the real one."""
    _, ref_tree = reference
    out = tmp_path / "c"
    child = textwrap.dedent(f"""
        import time
        import simulate.corpus as c
        original = c._NpyStream.append
        def slow(self, block):
            time.sleep(0.3)
            original(self, block)
        c._NpyStream.append = slow
        spec = c.CorpusSpec("wei2021", {PARAMS!r}, states=True, labels=True, text=True, **{BASE!r})
        c.write_corpus({str(out)!r}, spec, progress=False)
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            log = out / "progress.jsonl"
            lines = log.read_bytes().count(b"\n") if log.exists() else 0
            temps = [n for n in os.listdir(out) if n.endswith(".tmp")] if out.exists() else []
            if lines >= 3 and temps:  # header + 2 shards, and a third shard half-written
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.01)
        else:
            pytest.fail("the child never reached the middle of shard 2")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert [n for n in os.listdir(out) if n.endswith(".tmp")] and "manifest.json" not in os.listdir(out)
    with pytest.raises(CorpusError, match=r"unfinished corpus \([2-4] of 5 shards written\)"):
        load_corpus(out)
    _write(out, states=True, labels=True, text=True)
    assert tree(out) == ref_tree  # no temporary file left, every byte as in the uninterrupted run


# ----------------------------------------------------------------------------------------------------------
# The manifest is small, and cross-checked against the arrays
# ----------------------------------------------------------------------------------------------------------


def test_manifest_is_small_for_a_large_model(tmp_path):
    """32 states x 70,000 symbols: format 1 wrote a 70 MB manifest; the model now lives in .npy files."""
    out = tmp_path / "c"
    write_corpus(out, CorpusSpec("random", {"num_states": 32, "vocab_size": 70_000}, num_sequences=1, length=80),
                 progress=False)
    assert (out / "manifest.json").stat().st_size < 4096
    assert (out / "model-emit.npy").stat().st_size == 32 * 70_000 * 8 + 128
    corpus = load_corpus(out)
    assert corpus.model.emit.shape == (32, 70_000) and corpus.tokens().dtype == np.uint32


def _npy(arr) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _replace_file(out, m, name, data, entry):
    """Write ``data`` as ``name`` and record its checksum where the manifest lists it (a consistent forgery:
    the checks that follow must not rely on the checksum alone)."""
    (out / name).write_bytes(data)
    entry["sha256"] = _sha(data)


def _set_shard_value(kind, index, value):
    def tamper(out, m):
        path = out / f"{kind}-{index:05d}.npy"
        arr = np.load(path)
        arr[3, 0] = value
        _replace_file(out, m, path.name, _npy(arr), m["shards"][index][kind])
    return tamper


def _set_model(field, fn, dtype=None):
    def tamper(out, m):
        arr = fn(np.load(out / f"model-{field}.npy"))
        rec = m["model"]["arrays"][field]
        _replace_file(out, m, f"model-{field}.npy", _npy(arr), rec)
        rec["shape"] = list(arr.shape)
        if dtype is not None:
            rec["dtype"] = dtype
    return tamper


def _edit(**changes):
    def tamper(out, m):
        m.update(changes)
    return tamper


def _edit_shard(index, fn):
    def tamper(out, m):
        fn(m["shards"][index])
    return tamper


def _row_sums_5(a):
    a = a.copy()
    a[0] = 1.0
    return a


def _nan(a):
    a = a.copy()
    a[0, 1] = np.nan
    return a


def _negative(a):
    a = a.copy()
    a[1, 0] -= 0.5
    a[1, 1] += 0.5
    return a


def _truncate_shard(out, m):
    path = out / "tokens-00001.npy"
    data = path.read_bytes()[:-12]
    _replace_file(out, m, path.name, data, m["shards"][1]["tokens"])


def _flip_bit(name):
    def tamper(out, m):
        data = bytearray((out / name).read_bytes())
        data[-1] ^= 1
        (out / name).write_bytes(bytes(data))
    return tamper


def _symlink_shard(out, m):
    target = out.parent / "elsewhere.npy"
    target.write_bytes((out / "tokens-00000.npy").read_bytes())
    (out / "tokens-00000.npy").unlink()
    (out / "tokens-00000.npy").symlink_to(target)


def _consistent_length(out, m):
    m.update(length=13, shard_tokens=13 * 120, sequences_per_block=m["block_tokens"] // 13)


def _fortran_shard(out, m):
    arr = np.asfortranarray(np.load(out / "tokens-00000.npy"))
    _replace_file(out, m, "tokens-00000.npy", _npy(arr), m["shards"][0]["tokens"])


def _pickled_shard(out, m):
    # An object array: loading it would need pickle, which is never allowed.
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([[1, 2]], dtype=object), allow_pickle=True)
    _replace_file(out, m, "tokens-00000.npy", buf.getvalue(), m["shards"][0]["tokens"])


MANIFEST = r"manifest\.json: "
BAD_CORPORA = [
    # edited fields
    ("length", _edit(length=13), MANIFEST + r"rows_per_shard: is 120; shard_tokens 1440 // length 13 gives 110"),
    ("length-consistent", _consistent_length,
     (r"tokens-00000\.npy: shape \(120, 12\), expected \(120, 13\) \(rows from manifest shards\[0\]\.rows, columns "
      r"from manifest field 'length'\)")),
    ("vocab_size", _edit(vocab_size=8), MANIFEST + r"vocab_size: is 8, but params\.vocab_size is 9"),
    ("vocab_size+params", lambda out, m: m.update(vocab_size=8, params={**m["params"], "vocab_size": 8}),
     MANIFEST + r"vocab_size: is 8, but the model files have 9 symbols"),
    ("num_states", _edit(num_states=6), MANIFEST + r"num_states: is 6, but the preset's parameters give 5"),
    ("num_sequences", _edit(num_sequences=501), MANIFEST + r"shards\[4\]\.rows: is 20; num_sequences 501 .* gives 21"),
    ("num_sequences-shards", _edit(num_sequences=1000), MANIFEST + r"shards: lists 5 shards; .* needs 9"),
    ("rows", _edit_shard(0, lambda s: s.update(rows=121)), MANIFEST + r"shards\[0\]\.rows: is 121"),
    ("index", _edit_shard(2, lambda s: s.update(index=3)), MANIFEST + r"shards\[2\]\.index: is 3"),
    ("dtype-no-byte-order", _edit(dtype="uint8"), MANIFEST + r"dtype: 'uint8' does not say its byte order"),
    ("dtype-banana", _edit(dtype="banana"), MANIFEST + r"dtype: 'banana' is not a dtype numpy knows"),
    ("dtype-wider", _edit(dtype="<u2"), r"tokens-00000\.npy: dtype \|u1, but manifest field 'dtype' says <u2"),
    ("state_dtype", _edit(state_dtype="<u4"), r"states-00000\.npy: dtype \|u1, but manifest field 'state_dtype'"),
    ("seed", _edit(seed=-1), MANIFEST + r"seed: must be >= 0, got -1"),
    ("params-bad", lambda out, m: m["params"].update(num_permutations=0), MANIFEST + r"params\.num_permutations: must"),
    ("params-missing", lambda out, m: m["params"].pop("emit_temp"), MANIFEST + r"params\.emit_temp: missing"),
    ("preset", _edit(preset="random"), MANIFEST + r"params\.start_temp: does not apply to preset 'random'"),
    ("unexpected-field", _edit(extra=1), MANIFEST + r"extra: unexpected field"),
    ("format", _edit(format="other"), MANIFEST + r"format: is 'other', expected 'ftsim-corpus'"),
    ("format_version-new", _edit(format_version=3), MANIFEST + r"format_version: is 3; this ftsim reads format_version 2"),
    ("shard_kinds", _edit(shard_kinds=["tokens", "tokens"]), MANIFEST + r"shard_kinds: is \['tokens', 'tokens'\]"),
    ("task-null", _edit(task=None), MANIFEST + r"task: is null but the shards have labels"),
    ("task-mu", lambda out, m: m["task"].update(mu=[1.0]), MANIFEST + r"task\.mu: should be a list of 5 finite numbers"),
    ("model-kind", lambda out, m: m["model"].update(kind="MemoryHMM"),
     MANIFEST + r"model\.kind: is 'MemoryHMM'; preset 'wei2021' makes an HMM"),
    # shard entries
    ("no-file", _edit_shard(1, lambda s: s["tokens"].pop("file")), MANIFEST + r"shards\[1\]\.tokens\.file: missing"),
    ("no-sha256", _edit_shard(1, lambda s: s["states"].pop("sha256")),
     MANIFEST + r"shards\[1\]\.states\.sha256: missing"),
    ("no-kind", _edit_shard(1, lambda s: s.pop("labels")), MANIFEST + r"shards\[1\]\.labels: missing"),
    ("bad-sha", _edit_shard(1, lambda s: s["tokens"].update(sha256="xyz")),
     MANIFEST + r"shards\[1\]\.tokens\.sha256: should be 64 lowercase hex digits"),
    ("absolute", _edit_shard(0, lambda s: s["tokens"].update(file="/etc/passwd")),
     MANIFEST + r"shards\[0\]\.tokens\.file: '/etc/passwd' is refused: a corpus file must be a plain file name"),
    ("dotdot", _edit_shard(0, lambda s: s["tokens"].update(file="../c/tokens-00000.npy")),
     MANIFEST + r"shards\[0\]\.tokens\.file: '\.\./c/tokens-00000\.npy' is refused"),
    ("other-shard", _edit_shard(0, lambda s: s["tokens"].update(file="tokens-00001.npy")),
     MANIFEST + r"shards\[0\]\.tokens\.file: is 'tokens-00001\.npy'; this format names it 'tokens-00000\.npy'"),
    ("model-file", lambda out, m: m["model"]["arrays"]["emit"].update(file="/etc/hosts"),
     MANIFEST + r"model\.arrays\.emit\.file: '/etc/hosts' is refused"),
    ("symlink", _symlink_shard, r"tokens-00000\.npy: is a symbolic link"),
    # the arrays themselves, with forged checksums
    ("out-of-vocab", _set_shard_value("tokens", 1, 9),
     r"tokens-00001\.npy: token \[3, 0\] is 9, outside \[0, 9\) \(manifest field 'vocab_size' is 9\)"),
    ("state-range", _set_shard_value("states", 2, 5), r"states-00002\.npy: state \[3, 0\] is 5, outside \[0, 5\)"),
    ("label-range", lambda out, m: _replace_file(
        out, m, "labels-00000.npy", _npy(np.full((120, 1), 2, np.uint8)), m["shards"][0]["labels"]),
     r"labels-00000\.npy: label \[0\] is 2; labels are 0 or 1"),
    ("truncated-forged", _truncate_shard, r"tokens-00001\.npy: holds 1,428 data bytes; its shape \(120, 12\) needs 1,440"),
    ("fortran", _fortran_shard, r"tokens-00000\.npy: is Fortran-ordered"),
    ("pickle", _pickled_shard, r"tokens-00000\.npy: (dtype \|O|not a valid \.npy)"),
    ("text-lines", lambda out, m: _replace_file(out, m, "text-00004.txt", b"t1 t2\n", m["shards"][4]["text"]),
     r"text-00004\.txt: has 1 lines; manifest shards\[4\]\.rows says 20"),
    ("non-stochastic", _set_model("trans", _row_sums_5), r"model-trans\.npy: HMM\.trans row 0: sums to 5"),
    ("nan", _set_model("emit", _nan), r"model-emit\.npy: HMM\.emit row 0: entry 1 is nan"),
    ("negative", _set_model("trans", _negative), r"model-trans\.npy: HMM\.trans row 1: entry 0 is negative"),
    ("shape-mismatch", _set_model("trans", lambda a: a[:, :4]),
     r"model-trans\.npy: HMM\.trans: shape \(5, 4\) does not match num_states=5"),
    ("complex", _set_model("trans", lambda a: a.astype(complex)),
     r"model-trans\.npy: dtype <c16, but manifest model\.arrays\.trans\.dtype says <f8"),
    ("complex-listed", _set_model("trans", lambda a: a.astype(complex), dtype="<c16"),
     MANIFEST + r"model\.arrays\.trans\.dtype: is '<c16'; model arrays are float64"),
    # corruption (checksums not forged)
    ("altered-shard", _flip_bit("labels-00003.npy"), r"labels-00003\.npy: SHA-256 mismatch .* corrupt, truncated or was altered"),
    ("altered-model", _flip_bit("model-trans.npy"), r"model-trans\.npy: SHA-256 mismatch"),
    ("altered-text", _flip_bit("text-00000.txt"), r"text-00000\.txt: SHA-256 mismatch"),
    ("missing-shard", lambda out, m: (out / "states-00003.npy").unlink(),
     r"states-00003\.npy: missing \(listed in manifest shards\[3\]\.states\)"),
    ("missing-model", lambda out, m: (out / "model-start.npy").unlink(),
     r"model-start\.npy: missing \(listed in manifest model\.arrays\.start\)"),
]


@pytest.mark.parametrize("name, tamper, pattern", BAD_CORPORA, ids=[c[0] for c in BAD_CORPORA])
def test_manifest_and_files_are_cross_checked(tmp_path, reference, name, tamper, pattern):
    ref, _ = reference
    out = tmp_path / "c"
    out.mkdir()
    for p in ref.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    m = json.loads((out / "manifest.json").read_text())
    tamper(out, m)
    (out / "manifest.json").write_text(json.dumps(m, indent=2))
    before = tree(out)
    with pytest.raises(CorpusError, match=pattern) as exc:
        load_corpus(out)
    assert exc.value.path is not None and exc.value.path.startswith(str(out))
    # A field of a file is not a command-line flag.
    assert "--" not in exc.value.describe(flag_style=True).split(": ")[1]
    assert tree(out) == before


@pytest.mark.parametrize("setup, pattern", [
    (lambda d: None, r"c/manifest\.json: not found: the directory is empty \(not a corpus\)"),
    (lambda d: (d / "notes.txt").write_text("x"), r"c/manifest\.json: not found \(not a corpus directory\)"),
    (lambda d: (d / "manifest.json").write_text("{not json"), r"c/manifest\.json: invalid JSON at line 1, column 2"),
    (lambda d: (d / "manifest.json").write_text("[1, 2]"), r"c/manifest\.json: top level must be a JSON object"),
    (lambda d: (d / "manifest.json").write_bytes(b'{"a": "\xff"}'), r"c/manifest\.json: is not UTF-8 text"),
    (lambda d: (d / "manifest.json").write_text('{"format": "ftsim-corpus"}'), r"c/manifest\.json: format_version: missing"),
    (lambda d: (d / "manifest.json").symlink_to("/etc/hostname"), r"c/manifest\.json: is a symbolic link"),
])
def test_not_a_corpus_is_named(tmp_path, setup, pattern):
    out = tmp_path / "c"
    out.mkdir()
    setup(out)
    before = tree(out)
    with pytest.raises(CorpusError, match=pattern):
        load_corpus(out)
    assert tree(out) == before
    with pytest.raises(CorpusError, match=r"c: not found"):
        load_corpus(tmp_path / "absent" / "c")


def test_unverified_open_still_checks_values_when_reading(tmp_path, reference):
    ref, _ = reference
    out = tmp_path / "c"
    out.mkdir()
    for p in ref.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    m = json.loads((out / "manifest.json").read_text())
    _set_shard_value("tokens", 2, 200)(out, m)
    (out / "manifest.json").write_text(json.dumps(m))
    corpus = load_corpus(out, verify=False)  # headers and sizes only
    assert not corpus.verified
    with pytest.raises(CorpusError, match=r"tokens-00002\.npy: token \[3, 0\] is 200, outside \[0, 9\)"):
        corpus.tokens()
    with pytest.raises(CorpusError, match=r"tokens-00002\.npy: token"):
        list(corpus.iter_shards("tokens"))
    with pytest.raises(CorpusError, match=r"kind: is 'text'"):
        list(corpus.iter_shards("text"))


def test_errors_are_input_errors_for_the_command_line():
    assert issubclass(CorpusError, InputError) and issubclass(CorpusError, ValueError)
    from simulate.hmm import HMMValidationError

    assert issubclass(HMMValidationError, InputError)
    e = CorpusError("is 8", path="c/manifest.json", field="vocab_size")
    assert str(e) == "c/manifest.json: vocab_size: is 8" and e.describe(flag_style=True) == str(e)
    assert CorpusError("must be >= 1, got 0", field="num_sequences").describe(flag_style=True) == \
        "--num-sequences: must be >= 1, got 0"
