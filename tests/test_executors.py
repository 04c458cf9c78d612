"""Executors: serial, local worker processes and submitit's local mode give byte-identical tables; a worker killed
mid-unit leaves the run resumable (only that unit is recomputed, no partial unit is ever read); two runs that
share units compute each once; ``ftsim status`` counts units by state and names a failure's error."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from ftsim.app.cli import main
from ftsim.app.executors import ExecutorConfig, compute_units
from ftsim.app.runner import run_experiment, status
from ftsim.core.cache import UnitCache
from ftsim.core.errors import InputError
from simulate.ntk_width import EXPERIMENT, NTKWidthConfig
from tests.conftest import REPO

CFG = NTKWidthConfig(widths=(8, 16), depth=1, seeds=(0, 1), num_train=6, num_test=5, steps=20)
FLAGS = ["--widths", "8,16", "--depth", "1", "--seeds", "0,1", "--num-train", "6", "--num-test", "5", "--steps", "20",
         "--no-progress"]


def _ctx(tmp_path):
    from ftsim.core.experiment import RunContext

    return RunContext(out_dir=tmp_path, cache=UnitCache(tmp_path / "unused"), device="cpu", progress=False)


def _tables(run_dir):
    return {n: (run_dir / n).read_bytes() for n in ("results.jsonl", "summary_by_width.jsonl", "predictions.jsonl")}


@pytest.mark.slow
def test_serial_local_and_submitit_give_byte_identical_tables(tmp_path, monkeypatch):
    monkeypatch.delenv("FTSIM_CACHE", raising=False)
    pytest.importorskip("submitit") if os.environ.get("CI", "").lower() != "true" else None
    out = {}
    for name, exe in (("serial", ExecutorConfig("serial")), ("local", ExecutorConfig("local", jobs=2, threads=1)),
                      ("submitit", ExecutorConfig("submitit", cluster="local", threads=1))):
        root = tmp_path / name
        run_dir, summary = run_experiment(EXPERIMENT, CFG, preset="test", root=root, device="cpu", progress=False,
                                          executor=exe)
        out[name] = _tables(run_dir)
        if name != "serial":
            assert summary["executor"]["computed"] == 4 and summary["executor"]["failed"] == []
        assert status(run_dir)["done"] == 4
    assert out["serial"] == out["local"] == out["submitit"]


_KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import simulate.ntk_width as nw
    from ftsim.app.executors import ExecutorConfig
    from ftsim.app.runner import run_experiment
    from simulate.ntk_width import EXPERIMENT, NTKWidthConfig

    original = nw.run_unit
    def dying(config, width, seed, *a, **k):
        if width == 16 and seed == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # killed mid-unit, after the others were stored
        return original(config, width, seed, *a, **k)
    nw.run_unit = dying
    cfg = NTKWidthConfig(widths=(8, 16), depth=1, seeds=(0, 1), num_train=6, num_test=5, steps=20)
    run_experiment(EXPERIMENT, cfg, preset="test", root={root!r}, device="cpu", progress=False,
                   executor=ExecutorConfig("serial"))
""")


def test_a_killed_run_resumes_and_recomputes_only_the_missing_unit(tmp_path, monkeypatch):
    monkeypatch.delenv("FTSIM_CACHE", raising=False)
    root = tmp_path / "r"
    script = tmp_path / "kill.py"
    script.write_text(_KILLER.format(repo=str(REPO), root=str(root)))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    cache = UnitCache(root / "cache" / "units")
    records = sorted((cache.root / "ntk-width.net").glob("*/*/record.json"))
    assert len(records) == 3  # three units stored before the kill, none half-written
    stamps = {p: p.stat().st_mtime_ns for p in records}
    run_dir, _ = run_experiment(EXPERIMENT, CFG, preset="test", root=root, device="cpu", progress=False,
                                executor=ExecutorConfig("local", jobs=2, threads=1))
    after = sorted((cache.root / "ntk-width.net").glob("*/*/record.json"))
    assert len(after) == 4 and all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    fresh, _ = run_experiment(EXPERIMENT, CFG, preset="test", root=tmp_path / "fresh", device="cpu", progress=False)
    assert _tables(run_dir) == _tables(fresh)


def test_two_runs_sharing_units_compute_each_once(tmp_path):
    cache = UnitCache(tmp_path / "cache")
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    first = compute_units(EXPERIMENT.plan(dataclasses.replace(CFG, widths=(8,)), _ctx(tmp_path)), cache,
                          ExecutorConfig("local", jobs=2, threads=1), run_dir=tmp_path / "a", progress=False)
    second = compute_units(EXPERIMENT.plan(CFG, _ctx(tmp_path)), cache, ExecutorConfig("serial"), run_dir=tmp_path / "b",
                           progress=False)
    assert (first["planned"], first["computed"]) == (2, 2)
    assert (second["planned"], second["cached"], second["computed"]) == (4, 2, 2)


def test_status_names_a_failed_unit(tmp_path, monkeypatch, capsys):
    import simulate.ntk_width as nw

    original = nw.run_unit

    def failing(config, width, seed, *a, **k):
        if width == 16:
            raise FloatingPointError("diverged on purpose")
        return original(config, width, seed, *a, **k)

    monkeypatch.setattr(nw, "run_unit", failing)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    info = compute_units(EXPERIMENT.plan(CFG, _ctx(tmp_path)), UnitCache(tmp_path / "cache"), ExecutorConfig("serial"),
                         run_dir=run_dir, progress=False)
    assert len(info["failed"]) == 2 and info["computed"] == 2
    st = status(run_dir)
    assert st["done"] == 2 and st["pending"] == 0 and len(st["failed"]) == 2
    assert "diverged on purpose" in st["failed"][0]["error"]
    assert main(["status", str(run_dir)]) == 1
    assert "2 done, 0 running, 2 failed" in capsys.readouterr().out


def test_executor_config_errors_name_the_flag(capsys):
    with pytest.raises(InputError, match="choose from serial"):
        ExecutorConfig("threads")
    assert main(["run", "ntk-width", "--executor", "local", "--jobs", "0"]) == 2
    assert "--jobs: must be >= 1" in capsys.readouterr().err


def test_dry_run_counts_units_and_estimates_from_measured_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FTSIM_CACHE", raising=False)
    run_experiment(EXPERIMENT, dataclasses.replace(CFG, widths=(8,)), preset="test", root=tmp_path, device="cpu",
                   progress=False)
    assert main(["run", "ntk-width", "--out", str(tmp_path), "--dry-run", *FLAGS]) == 0
    plan = json.loads(capsys.readouterr().out)
    k = plan["kinds"]["ntk-width.net"]
    assert (plan["units"], k["cached"], k["measured_units"]) == (4, 2, 2) and k["estimated_seconds"] >= 0
    # the measured peak memory per unit: this process's resident set holds at least torch's (> 50 MiB), no GPU here
    assert 0.05 < k["max_peak_rss_gib"] < 64 and k["max_peak_cuda_gib"] is None


@pytest.mark.slow
def test_malladi_units_on_local_workers_equal_the_serial_run(tmp_path, monkeypatch, task_dir):
    """The real-task sweep fans out too: each worker loads the task once; with a fixed thread count (float32
    reductions depend on it) the tables are byte-identical to the serial run's."""
    from tests.test_real_malladi import TINY

    monkeypatch.delenv("FTSIM_CACHE", raising=False)
    args = ["run", "malladi", "--preset", "quick", "--model", "tiny-causal", "--data-dir", str(task_dir), *TINY,
            "--threads", "1"]
    for name in ("serial", "local"):
        assert main([*args, "--out", str(tmp_path / name), "--executor", name, "--jobs", "2"]) == 0
    a, b = (next((tmp_path / n / "malladi").glob("*/results.jsonl")).read_bytes() for n in ("serial", "local"))
    assert a == b


def _spec(name, needs=()):
    from ftsim.core.experiment import UnitSpec

    return UnitSpec("test.wave", 1, {"name": name}, "json:dumps", {}, label=name,
                    needs=tuple(n.key.digest for n in needs))


def test_waves_start_a_unit_after_the_units_it_needs():
    """A diamond a -> (b, c) -> d plus an independent e and a need outside the sweep (cached: ignored)."""
    from ftsim.app.executors import waves

    outside = _spec("outside")
    a = _spec("a")
    b, c = _spec("b", (a,)), _spec("c", (a, outside))
    d, e = _spec("d", (c, b)), _spec("e")
    got = [[s.label for s in w] for w in waves([d, b, a, e, c])]
    assert got == [["a", "e"], ["b", "c"], ["d"]]
    # JSON round trip keeps the needs (what a worker or a SLURM job receives)
    from ftsim.core.experiment import UnitSpec

    assert UnitSpec.from_json(d.to_json()) == d


def test_units_that_need_each_other_are_refused_by_name():
    import dataclasses

    from ftsim.app.executors import waves

    a = _spec("a")
    b = _spec("b", (a,))
    a_needs_b = dataclasses.replace(a, needs=(b.key.digest,))
    with pytest.raises(ValueError, match="a -> b -> a|b -> a -> b"):
        waves([a_needs_b, b])


def test_every_registered_experiment_plans_its_units():
    """A sweep of any experiment fans out: none computes its units only in process."""
    from ftsim.app.registry import EXPERIMENTS, experiment

    assert [name for name in EXPERIMENTS if experiment(name).plan is None] == []


@pytest.mark.slow
def test_cached_only_builds_tables_from_finished_units_and_computes_nothing(tmp_path, monkeypatch, task_dir,
                                                                          capsys):
    """A sweep cut short (here: its kernel units deleted) still gives tables of what finished; nothing is computed.
    An experiment that needs every unit refuses, naming the missing unit."""
    import shutil

    from ftsim.core.io import read_jsonl
    from tests.test_real_malladi import TINY

    monkeypatch.delenv("FTSIM_CACHE", raising=False)
    args = ["run", "malladi", "--preset", "quick", "--model", "tiny-causal", "--data-dir", str(task_dir), *TINY,
            "--threads", "1", "--methods", "zero-shot,ft-sgd,k-sgd", "--out", str(tmp_path)]
    assert main(args) == 0
    kernels = tmp_path / "cache" / "units" / "malladi.kernels"
    assert any(kernels.glob("*/*/record.json"))
    shutil.rmtree(kernels)
    capsys.readouterr()
    assert main([*args, "--cached-only"]) == 0
    assert not kernels.exists()  # nothing was computed
    run_dir = next((tmp_path / "malladi").glob("*/summary.json")).parent
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [u["kind"] for u in summary["units_missing"]] == ["malladi.kernels"]
    assert "partial: 1 units not computed yet" in summary["headline"]
    methods = {r["method"] for r in read_jsonl(run_dir / "results.jsonl") if r["metric"] == "accuracy"}
    assert methods == {"zero-shot", "FT-SGD"}  # K-SGD left out, the rest from the cache
    assert main(["run", "ntk-width", *FLAGS, "--out", str(tmp_path / "nw"), "--cached-only"]) == 2
    assert "ntk-width.net" in capsys.readouterr().err
