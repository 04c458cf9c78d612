"""The unit cache: computed once, verified on every read, recomputed (with a warning naming the file) when
corrupt, never half-written by a killed process, computed once by two processes that ask at the same time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from ftsim.core.cache import CacheWarning, UnitCache, unit_key
from tests.conftest import REPO


def _compute(calls):
    def compute(work):
        calls.append(1)
        work.save_array("kernel", np.arange(12.0).reshape(3, 4))
        (work.path / "notes.txt").write_text("hello")
        return {"accuracy": 0.75, "nan": float("nan")}

    return compute


def test_computed_once_then_read_back_verified(tmp_path):
    cache = UnitCache(tmp_path)
    key = unit_key("test.kernel", 1, {"task": "SST-2", "seed": 13})
    calls: list = []
    u1 = cache.get_or_compute(key, _compute(calls))
    u2 = cache.get_or_compute(key, _compute(calls))
    assert calls == [1]
    assert u1.path == u2.path and u2.result == {"accuracy": 0.75, "nan": "nan"}
    assert np.array_equal(u2.array("kernel"), np.arange(12.0).reshape(3, 4))
    assert (u2.path / "notes.txt").read_text() == "hello"
    assert set(u2.record["files"]) == {"kernel.npy", "notes.txt"}
    assert u2.seconds is not None and u2.seconds >= 0
    # the key depends on every part: kind, version, inputs
    assert unit_key("test.kernel", 2, {"task": "SST-2", "seed": 13}).digest != key.digest
    assert unit_key("test.kernel", 1, {"seed": 13, "task": "SST-2"}).digest == key.digest  # order-free
    assert unit_key("test.kernel", 1, {"task": "SST-2", "seed": 21}).digest != key.digest


def test_a_shuffled_array_is_detected_named_and_recomputed(tmp_path):
    cache = UnitCache(tmp_path)
    key = unit_key("test.kernel", 1, {"x": 1})
    calls: list = []
    unit = cache.get_or_compute(key, _compute(calls))
    path = unit.path / "kernel.npy"
    arr = np.load(path)
    np.save(path, arr[::-1].copy())  # same shape, dtype and size: entries shuffled
    with pytest.warns(CacheWarning, match=r"kernel\.npy: SHA-256 differs"):
        again = cache.get_or_compute(key, _compute(calls))
    assert calls == [1, 1]
    assert np.array_equal(again.array("kernel"), arr)


def test_a_record_of_other_inputs_or_garbage_is_never_read(tmp_path):
    cache = UnitCache(tmp_path)
    key = unit_key("test.kernel", 1, {"x": 1})
    calls: list = []
    unit = cache.get_or_compute(key, _compute(calls))
    record = json.loads((unit.path / "record.json").read_text())
    record["inputs"] = {"x": 2}
    (unit.path / "record.json").write_text(json.dumps(record))
    with pytest.warns(CacheWarning, match="field 'inputs' differs"):
        assert cache.get(key) is None
    cache.get_or_compute(key, _compute(calls))
    (cache.path_of(key) / "record.json").write_text("{not json")
    with pytest.warns(CacheWarning, match="invalid JSON"):
        cache.get_or_compute(key, _compute(calls))
    assert calls == [1, 1, 1]


def test_overwrite_recomputes_and_replaces(tmp_path):
    cache = UnitCache(tmp_path)
    key = unit_key("test.kernel", 1, {"x": 1})
    calls: list = []
    cache.get_or_compute(key, _compute(calls))
    cache.get_or_compute(key, _compute(calls), overwrite=True)
    assert calls == [1, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.get(key) is not None
    assert not [p for p in cache.path_of(key).parent.iterdir() if p.name.startswith((".old", ".tmp"))]


_WORKER = textwrap.dedent("""
    import os, sys, time, signal
    sys.path.insert(0, {repo!r})
    import numpy as np
    from ftsim.core.cache import UnitCache, unit_key
    root, counter, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    cache = UnitCache(root)
    key = unit_key("test.slow", 1, {{"n": 3}})

    def compute(work):
        with open(counter, "a") as fh:
            fh.write(f"{{os.getpid()}}\\n")
        work.save_array("a", np.full(1000, 7.0))
        if mode == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(1.0)
        return {{"pid": os.getpid()}}

    unit = cache.get_or_compute(key, compute)
    print(unit.result["pid"], float(unit.array("a").sum()))
""")


def _worker(tmp_path, mode):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(repo=str(REPO)))
    return [sys.executable, str(script), str(tmp_path / "cache"), str(tmp_path / "counter"), mode]


def test_two_processes_compute_a_shared_unit_once(tmp_path):
    cmd = _worker(tmp_path, "ok")
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1] and outs[0][1] == "7000.0"  # both read the same unit
    assert len((tmp_path / "counter").read_text().split()) == 1  # computed once


def test_a_killed_computation_leaves_no_unit_and_a_rerun_completes(tmp_path):
    r = subprocess.run(_worker(tmp_path, "die"), capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL
    cache = UnitCache(tmp_path / "cache")
    key = unit_key("test.slow", 1, {"n": 3})
    assert cache.get(key) is None  # nothing published
    leftovers = list(cache.path_of(key).parent.glob(".tmp-*"))
    assert leftovers  # the killed process's work directory ...
    os.utime(leftovers[0], (0, 0))
    assert cache.clean_stale(older_than_s=60) == 1  # ... is removed by the clean-up
    r = subprocess.run(_worker(tmp_path, "ok"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split()[1] == "7000.0"
    assert len((tmp_path / "counter").read_text().split()) == 2


def test_files_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        unit = UnitCache(tmp_path).get_or_compute(unit_key("test.kernel", 1, {}), _compute([]))
    finally:
        os.umask(old)
    assert oct((unit.path / "record.json").stat().st_mode & 0o777) == oct(0o644)
    assert oct((unit.path / "kernel.npy").stat().st_mode & 0o777) == oct(0o644)
    assert oct(unit.path.stat().st_mode & 0o777) == oct(0o755)
