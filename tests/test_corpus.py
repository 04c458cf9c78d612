"""Corpora on disk: exact round trip, manifest contents, checksums that name the bad shard, refusal to
overwrite, and clear errors for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simulate.corpus import (
    CorpusError,
    CorpusSpec,
    default_task,
    load_corpus,
    write_corpus,
)
from simulate.hmm import wei2021_hmm
from simulate.inference import infer
from simulate.sampling import sample
from simulate.tasks import prepend_mask


def _write(path, overwrite=False, **kw):
    args = dict(num_sequences=500, length=12, seed=7, shard_tokens=12 * 120)
    args.update(kw)
    return write_corpus(path, CorpusSpec("wei2021", {"num_states": 5, "vocab_size": 9}, **args), overwrite=overwrite,
                        progress=False)


def test_round_trip_equals_sample_and_manifest_is_complete(tmp_path):
    out = tmp_path / "c"
    manifest = _write(out, states=True, labels=True, text=True)
    corpus = load_corpus(out)
    ref = sample(corpus.model, 500, 12, seed=7)
    assert np.array_equal(corpus.tokens(), ref.tokens) and np.array_equal(corpus.states(), ref.states)
    assert corpus.tokens().dtype == np.uint8
    assert [s["rows"] for s in manifest["shards"]] == [120, 120, 120, 120, 20]
    # The corpus carries everything needed to rebuild the model (as .npy files): the same HMM as the preset.
    hmm = wei2021_hmm(5, 9, seed=7)
    assert np.array_equal(corpus.model.trans, hmm.trans) and np.array_equal(corpus.model.emit, hmm.emit)
    on_disk = json.loads((out / "manifest.json").read_text())
    for key in ("preset", "params", "seed", "dtype", "shards", "ftsim_version", "model"):
        assert key in on_disk
    # Every parameter of the preset is recorded, the defaults filled in.
    assert on_disk["params"] == {"num_states": 5, "vocab_size": 9, "start_temp": 10.0, "trans_temp": 0.1,
                                 "emit_temp": 0.1, "num_permutations": None}
    assert on_disk["format_version"] == 2 and on_disk["dtype"] == "|u1"
    assert len(on_disk["shards"][0]["tokens"]["sha256"]) == 64
    arrays = on_disk["model"]["arrays"]
    assert sorted(arrays) == ["emit", "start", "trans"]
    assert np.array_equal(np.load(out / arrays["emit"]["file"], allow_pickle=False), hmm.emit)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "model-start.npy", "model-trans.npy", "model-emit.npy"]
        + [f"{k}-{i:05d}.{'txt' if k == 'text' else 'npy'}" for i in range(5)
           for k in ("tokens", "states", "labels", "text")])


def test_labels_are_the_exact_task_labels(tmp_path):
    out = tmp_path / "c"
    manifest = _write(out, labels=True)
    corpus = load_corpus(out)
    mu = np.array(manifest["task"]["mu"])
    assert np.count_nonzero(mu) == 5  # support 6 clipped to num_states = 5
    post = infer(corpus.model, prepend_mask(corpus.tokens())).posteriors[:, 0]
    assert np.array_equal(corpus.labels(), (post @ mu >= 0).astype(int))
    task, mu2 = default_task(corpus.model, 6, seed=manifest["hmm_seed"] + 1)
    assert np.array_equal(mu, mu2)
    assert 0.05 < corpus.labels().mean() < 0.95  # both classes occur


def test_text_rendering_matches_tokens(tmp_path):
    out = tmp_path / "c"
    manifest = _write(out, text=True)
    corpus = load_corpus(out)
    lines = "".join((out / s["text"]["file"]).read_text() for s in manifest["shards"]).splitlines()
    assert len(lines) == 500
    parsed = np.array([[int(w[1:]) for w in line.split()] for line in lines])
    assert np.array_equal(parsed, corpus.tokens())


def test_same_seed_same_bytes(tmp_path):
    _write(tmp_path / "a", states=True)
    _write(tmp_path / "b", states=True)
    for f in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_altered_and_truncated_shards_are_named(tmp_path):
    out = tmp_path / "c"
    _write(out)
    shard = out / "tokens-00002.npy"
    data = bytearray(shard.read_bytes())
    data[200] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CorpusError, match=r"tokens-00002\.npy: SHA-256 mismatch"):
        load_corpus(out)
    shard.write_bytes(bytes(data[:-50]))
    with pytest.raises(CorpusError, match=r"tokens-00002\.npy: SHA-256 mismatch.*corrupt, truncated"):
        load_corpus(out)
    # Without verification the header and the size are still checked: a truncated shard is named.
    with pytest.raises(CorpusError, match=r"tokens-00002\.npy: holds .* data bytes.*truncated"):
        load_corpus(out, verify=False)
    shard.unlink()
    with pytest.raises(CorpusError, match=r"tokens-00002\.npy: missing \(listed in manifest shards\[2\]\.tokens\)"):
        load_corpus(out)
    with pytest.raises(CorpusError, match=r"tokens-00002\.npy: missing"):
        load_corpus(out, verify=False)


def test_manifest_errors_name_the_field(tmp_path):
    out = tmp_path / "c"
    _write(out)
    mpath = out / "manifest.json"
    manifest = json.loads(mpath.read_text())

    drop = object()

    def rewrite(**changes):
        m = {k: v for k, v in dict(manifest, **changes).items() if v is not drop}
        mpath.write_text(json.dumps(m))

    rewrite(vocab_size=300, params=dict(manifest["params"], vocab_size=300))
    with pytest.raises(CorpusError, match=r"manifest\.json: dtype: vocab_size 300 does not fit in dtype uint8"):
        load_corpus(out)
    rewrite(seed=drop)
    with pytest.raises(CorpusError, match=r"manifest\.json: seed: missing field"):
        load_corpus(out)
    rewrite(length="12")
    with pytest.raises(CorpusError, match=r"manifest\.json: length: should be int, got str"):
        load_corpus(out)
    mpath.write_text("{not json")
    with pytest.raises(CorpusError, match=r"manifest\.json: invalid JSON at line 1"):
        load_corpus(out)
    mpath.unlink()
    with pytest.raises(CorpusError, match=r"manifest\.json: not found"):
        load_corpus(out)


def test_refuses_non_empty_directory_and_overwrite_replaces(tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    for overwrite in (False, True):  # a directory holding anything but a corpus is refused, overwrite or not
        with pytest.raises(CorpusError, match=r"directory is not empty: 'keep\.txt' is not part of any ftsim corpus"):
            _write(out, overwrite=overwrite)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (out / "keep.txt").unlink()
    _write(out, num_sequences=600)
    assert len(list(out.glob("tokens-*.npy"))) == 5
    with pytest.raises(CorpusError, match=r"directory is not empty: it holds a finished corpus of another spec "
                                          r"\(num_sequences: 600 there, 100 asked\); pass overwrite=True"):
        _write(out, num_sequences=100)
    _write(out, overwrite=True, num_sequences=100)  # fewer shards: the old extra shards must go
    assert sorted(p.name for p in out.glob("tokens-*.npy")) == ["tokens-00000.npy"]
    assert load_corpus(out).num_sequences == 100


def test_vocabulary_too_large_for_dtype(tmp_path):
    with pytest.raises(CorpusError, match=r"vocab_size 300 does not fit in dtype uint8 \(max token id 255\); use uint16"):
        write_corpus(tmp_path / "c", CorpusSpec("random", {"num_states": 3, "vocab_size": 300}, num_sequences=2, length=3,
                     seed=0, dtype="uint8"), progress=False)
    m = write_corpus(tmp_path / "d", CorpusSpec("random", {"num_states": 3, "vocab_size": 300}, num_sequences=2, length=3,
                     seed=0), progress=False)
    assert m["dtype"] == "<u2"  # recorded with its byte order
    with pytest.raises(CorpusError, match="not an unsigned integer type"):
        write_corpus(tmp_path / "e", CorpusSpec("random", {"num_states": 3, "vocab_size": 3}, num_sequences=2, length=3,
                     seed=0, dtype="int8"), progress=False)


def test_failed_write_leaves_no_manifest_and_no_temp_files(tmp_path, monkeypatch):
    import simulate.corpus as corpus_mod

    def boom(*a, **k):
        raise RuntimeError("disk full")

    out = tmp_path / "c"
    original = corpus_mod._NpyStream.close
    calls = {"n": 0}

    def close_then_fail(self):
        calls["n"] += 1
        if calls["n"] == 3:
            boom()
        return original(self)

    monkeypatch.setattr(corpus_mod._NpyStream, "close", close_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        _write(out)
    assert not (out / "manifest.json").exists()
    assert not list(out.glob(".*.tmp"))


def test_memory_preset_corpus(tmp_path):
    m = write_corpus(tmp_path / "m", CorpusSpec("memory", {"num_memory": 3, "num_syntax": 2, "vocab_size": 6},
                                                num_sequences=200, length=8, seed=1, states=True, labels=True),
                     progress=False)
    corpus = load_corpus(tmp_path / "m")
    assert m["model"]["kind"] == "MemoryHMM" and m["num_states"] == 6
    memory, _ = corpus.model.split_state(corpus.states().astype(int))
    assert np.all(memory == memory[:, :1])
    assert set(np.unique(corpus.labels())) <= {0, 1}
