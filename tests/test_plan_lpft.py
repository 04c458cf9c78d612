"""``ftsim run lpft``'s unit plan on real SST-2 -> CR data with the tiny model: local worker processes give the
serial run's tables byte for byte (fine-tuning units read the features and the probe they need from the cache, in
whichever worker computes them), the run after the executor computes no unit outside the plan, and ``--dry-run``
counts the units per kind. CI runs these: they fail there when the data directory is missing."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ftsim.app.cli import main

TABLES = ("results", "head_norm_history", "reliability", "head_norm_curves", "comparison")


def _config(data_dir):
    from real_tasks.lpft import PRESETS

    # threads 1: float32 reductions depend on the thread count, so both executors must use the same one
    return dataclasses.replace(PRESETS["quick"], model="tiny-causal", data_dir=str(data_dir), k=4, seeds=(13,),
                               test_size=16, ood_test_size=16, epochs=1.0, kernel_examples=2, max_length=24,
                               lp_curve_steps=50, threads=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny run with the serial executor and with 2 local workers, each in a cache of its own:
    name -> (run directory, summary, cache)."""
    from ftsim.app.executors import ExecutorConfig
    from ftsim.app.runner import run_experiment
    from ftsim.core.cache import UnitCache
    from real_tasks.lpft import EXPERIMENT
    from tests.conftest import require, shared_data_dir

    data_dir = shared_data_dir()
    require(data_dir.is_dir() and any(data_dir.iterdir()), f"the real data directory {data_dir}")
    cfg = _config(data_dir)
    out = {}
    for name, exe in (("serial", ExecutorConfig("serial")), ("local", ExecutorConfig("local", jobs=2, threads=1))):
        root = tmp_path_factory.mktemp(name)
        cache = UnitCache(root / "units")
        run_dir, summary = run_experiment(EXPERIMENT, cfg, root=root, cache=cache, progress=False, device="cpu",
                                          executor=exe)
        out[name] = (run_dir, summary, cache)
    return out


@pytest.mark.real_data
@pytest.mark.slow
def test_local_workers_give_the_serial_tables_byte_for_byte(runs):
    for name in TABLES:
        for ext in ("jsonl", "csv"):
            a, b = ((runs[n][0] / f"{name}.{ext}").read_bytes() for n in ("serial", "local"))
            assert a == b, f"{name}.{ext} differs between the serial and the local executor"
    methods = {r["method"] for r in map(json.loads, (runs["local"][0] / "results.jsonl").read_text().splitlines())}
    assert methods == {"LP", "FT", "LP-FT", "LoRA-FT", "LP-LoRA-FT"}


@pytest.mark.real_data
@pytest.mark.slow
def test_the_run_after_the_executor_uses_exactly_the_planned_units(runs):
    """Every unit the run used was planned (else the run would have computed it itself), and the cache holds no
    lpft unit but the planned ones (a dependency a worker asked for under another key would show up there)."""
    from ftsim.app.runner import status

    run_dir, summary, cache = runs["local"]
    planned = {u["digest"] for u in json.loads((run_dir / "units_plan.json").read_text())["units"]}
    used = {u["digest"] for u in json.loads((run_dir / "units.json").read_text())}
    made = {p.parent.name for p in cache.root.glob("lpft.*/*/*/record.json")}
    assert used == planned and made == planned
    ex = summary["executor"]
    assert (ex["planned"], ex["cached"], ex["computed"], ex["failed"]) == (len(planned), 0, len(planned), [])
    assert status(run_dir)["done"] == len(planned) == summary["units"]


@pytest.mark.real_data
@pytest.mark.parametrize("methods, kinds", [
    # per seed: training and validation features, a probe, one unit per fine-tuning method; test and OOD features
    ("LP,FT,LP-FT,LoRA-FT,LP-LoRA-FT", {"lpft.features": 6, "lpft.probe": 2, "lpft.finetune": 8}),
    ("FT,LoRA-FT", {"lpft.features": 6, "lpft.finetune": 4}),  # no LP method: no probe
])
def test_dry_run_counts_the_units_per_kind(tmp_path, monkeypatch, capsys, real_data_dir, methods, kinds):
    monkeypatch.delenv("FTSIM_CACHE", raising=False)
    args = ["run", "lpft", "--model", "tiny-causal", "--data-dir", str(real_data_dir), "--k", "4", "--seeds", "13,21",
            "--test-size", "16", "--ood-test-size", "16", "--max-length", "24", "--methods", methods,
            "--out", str(tmp_path), "--dry-run"]
    assert main(args) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {k: v["units"] for k, v in plan["kinds"].items()} == kinds
    assert plan["units"] == sum(kinds.values()) and all(v["cached"] == 0 for v in plan["kinds"].values())
    assert not list(tmp_path.rglob("lpft.*"))  # planning computes nothing
