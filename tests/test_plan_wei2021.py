"""Wei, Xie & Ma (2021) experiments as planned units: serial and local worker processes give byte-identical tables;
the plan is every unit the run uses (after an executor computed it, the run computes nothing); ``--dry-run`` counts
the units per kind and sees the models the two experiments share; a tuning unit whose model is not stored yet
computes it (once) through the cache."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ftsim.app.executors import ExecutorConfig, compute_one
from ftsim.app.runner import dry_run, run_experiment
from ftsim.core.cache import UnitCache
from ftsim.core.experiment import RunContext
from simulate.wei2021.experiments import EXP1, EXP1_PRESETS, EXP2, EXP2_PRESETS

# The tiny setting of tests/test_wei2021_pipeline.py (TINY_FLAGS on the quick preset), one HMM seed.
TINY = dict(length=6, hmm_seeds=(0,), task_seeds=(0,), num_train=200, num_val=60, num_test=120, oracle_train=150,
            d_model=16, num_layers=1, num_heads=2, pretrain_steps=20, batch_size=16, corpus_sequences=320,
            eval_every=10, eval_sequences=64, oracle_steps=20, oracle_restarts=1, prompt_steps=10)
# m = 4 has a causal variant too: 3 pretrained models, 2 oracle bundles, 3 tuning runs.
CFG1 = dataclasses.replace(EXP1_PRESETS["quick"], num_states=(4, 12), causal_num_states=(4,), **TINY)
UNITS1 = {"wei2021.pretrain": 3, "wei2021.oracle-exp1": 2, "wei2021.tuning": 3}
TABLES = ("results", "curves", "means", "differences", "diagnostics")


def _ctx(tmp_path) -> RunContext:
    return RunContext(out_dir=tmp_path, cache=UnitCache(tmp_path / "cache"), device="cpu", progress=False)


def _tables(run_dir) -> dict[str, bytes]:
    return {f"{t}.{ext}": (run_dir / f"{t}.{ext}").read_bytes() for t in TABLES for ext in ("jsonl", "csv")}


def _used(run_dir) -> set[str]:
    return {u["digest"] for u in json.loads((run_dir / "units.json").read_text())}


@pytest.mark.slow
def test_serial_and_local_workers_give_byte_identical_tables_and_the_run_computes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("FTSIM_CACHE", raising=False)
    monkeypatch.delenv("FTSIM_THREADS", raising=False)
    out = {}
    for name, exe in (("serial", ExecutorConfig("serial")), ("local", ExecutorConfig("local", jobs=2, threads=1))):
        run_dir, summary = run_experiment(EXP1, CFG1, preset="test", root=tmp_path / name, device="cpu",
                                          progress=False, executor=exe)
        out[name] = _tables(run_dir)
    assert out["serial"] == out["local"]
    # The workers computed every planned unit; the run then used exactly the planned units (a unit missing from
    # the plan would be computed by the run and show up in units.json with a digest the plan lacks).
    ex = summary["executor"]
    assert (ex["planned"], ex["computed"], ex["cached"], ex["failed"]) == (8, 8, 0, [])
    planned = json.loads((run_dir / "units_plan.json").read_text())["units"]
    assert _used(run_dir) == {u["digest"] for u in planned}
    assert [u["kind"] for u in planned[:3]] == ["wei2021.pretrain"] * 3  # dependencies first


def test_dry_run_counts_units_per_kind_and_sees_shared_models(tmp_path):
    cache = UnitCache(tmp_path / "cache")
    plan = dry_run(EXP1, CFG1, device="cpu", cache=cache)
    assert {k: v["units"] for k, v in plan["kinds"].items()} == UNITS1 and plan["units"] == 8
    # Experiment 2: two models (memory, vanilla) per (N, HMM seed), one oracle bundle and three tuning runs
    # (memory + attention, memory + head, vanilla + head) per task.
    cfg2 = dataclasses.replace(EXP2_PRESETS["quick"], num_memory=(1, 2), attention_steps=30,
                               **{**TINY, "hmm_seeds": (0, 1), "task_seeds": (0, 1, 2)})
    plan2 = dry_run(EXP2, cfg2, device="cpu", cache=cache)
    assert {k: v["units"] for k, v in plan2["kinds"].items()} == {
        "wei2021.pretrain": 2 * 2 * 2, "wei2021.oracle-exp2": 2 * 2 * 3, "wei2021.tuning": 3 * 2 * 2 * 3}
    # Repeated seeds name the same units: planned once.
    assert dry_run(EXP1, dataclasses.replace(CFG1, hmm_seeds=(0, 0)), device="cpu", cache=cache)["units"] == 8
    # Experiment 2's vanilla HMM with N * S = 4 states is experiment 1's m = 4 HMM: one checkpoint for both.
    shared = {s.key.digest for s in EXP1.plan(CFG1, _ctx(tmp_path))}
    exp2 = EXP2.plan(dataclasses.replace(cfg2, num_memory=(1,), hmm_seeds=(0,)), _ctx(tmp_path))
    assert [s.key.digest in shared for s in exp2 if s.kind == "wei2021.pretrain"] == [False, True]


def test_a_tuning_unit_computes_its_missing_model_once_through_the_cache(tmp_path):
    cfg = dataclasses.replace(CFG1, num_states=(4,), causal_num_states=())
    ctx = _ctx(tmp_path)
    specs = EXP1.plan(cfg, ctx)
    assert [s.kind for s in specs] == ["wei2021.pretrain", "wei2021.oracle-exp1", "wei2021.tuning"]
    model, _, tuning = specs
    compute_one(tuning.to_json(), str(ctx.cache.root))  # before its model: the worker computes the model first
    assert ctx.cache.get(model.key) is not None and ctx.cache.get(tuning.key) is not None
    stamp = (ctx.cache.path_of(model.key) / "record.json").stat().st_mtime_ns
    compute_one(model.to_json(), str(ctx.cache.root))  # the model's own unit then finds it stored
    assert (ctx.cache.path_of(model.key) / "record.json").stat().st_mtime_ns == stamp
    assert len(list((ctx.cache.root / "wei2021.pretrain").glob("*/*/record.json"))) == 1
