"""``ftsim run smart``'s unit plan (real_tasks/smart.py) on the tiny causal LM and two tiny tasks: worker processes
compute the same units as the serial run (byte-identical tables), the plan covers every unit the run uses (after
the executor the run computes nothing), and ``--dry-run`` counts one zero-shot unit per task and one fine-tuning
unit per task, seed and method."""

from __future__ import annotations

import json

import pytest

from ftsim.app.cli import main
from tests.conftest import NEG, POS

SEEDS, METHODS, TASKS = ("13", "21"), ("ft", "ft-rs-mbpp"), ("SST-2", "MR")
TABLES = ("results.jsonl", "comparison.jsonl", "differences.jsonl", "cost.jsonl", "splits.json", "comparison.md",
          "claims.md")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models: one torch thread."""


@pytest.fixture
def two_tasks(task_dir):
    """conftest's tiny SST-2 plus an MR made of the same sentences (MR holds 2000 examples out as its test set,
    so its one file repeats them past that)."""
    lines = [f"1 {s} .\n" for s in POS] + [f"0 {s} .\n" for s in NEG]
    (task_dir / "rt-polarity.all").write_text("".join(lines[i % len(lines)] for i in range(2032)))
    return task_dir


def _args(data_dir, out, *extra) -> list[str]:
    # eval_every=1: every step has a validation pass, so seconds_per_step (a wall time, different in any two
    # runs) is NaN and every table can be compared byte for byte
    return ["run", "smart", "--tasks", ",".join(TASKS), "--model", "tiny-causal", "--k", "2",
            "--seeds", ",".join(SEEDS), "--methods", ",".join(METHODS), "--data-dir", str(data_dir),
            "--test-size", "4", "--robust-size", "2", "--steps", "2", "--eval-every", "1", "--eval-steps", "1",
            "--prox-every", "1", "--threads", "1", "--no-progress", "--out", str(out), *extra]


def _run_dir(out):
    return next((out / "smart").glob("*/results.jsonl")).parent


def _dry_run(data_dir, out, capsys) -> dict:
    capsys.readouterr()
    assert main(_args(data_dir, out, "--dry-run")) == 0
    return json.loads(capsys.readouterr().out)


def test_dry_run_counts_units_per_kind(two_tasks, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FTSIM_CACHE", raising=False)
    got = _dry_run(two_tasks, tmp_path / "out", capsys)
    kinds = {k: v["units"] for k, v in got["kinds"].items()}
    assert kinds == {"smart.zero-shot": len(TASKS), "smart.finetune": len(TASKS) * len(SEEDS) * len(METHODS)}
    assert got["units"] == sum(kinds.values())
    assert all(v["cached"] == 0 for v in got["kinds"].values())


@pytest.mark.slow
def test_local_workers_equal_the_serial_run_and_the_plan_covers_the_run(two_tasks, tmp_path, capsys, monkeypatch):
    """Serial run, then ``local`` with 2 workers and 1 thread: byte-identical tables. While the workers compute,
    this process may not compute any unit, so a unit the run uses but the plan lacks fails the run; the units the
    run read are exactly the planned ones."""
    import real_tasks.smart as smart

    monkeypatch.delenv("FTSIM_CACHE", raising=False)
    assert main(_args(two_tasks, tmp_path / "serial", "--executor", "serial")) == 0
    # the serial run (no plan) and the plan name the same units: every planned unit is now cached
    again = _dry_run(two_tasks, tmp_path / "serial", capsys)
    assert [v["cached"] for v in again["kinds"].values()] == [v["units"] for v in again["kinds"].values()]

    def computed_here(*args, **kwargs):
        raise AssertionError("the run computed a unit in process: it is missing from the plan")

    monkeypatch.setattr(smart, "_dispatch", computed_here)  # spawned workers import the real one
    assert main(_args(two_tasks, tmp_path / "local", "--executor", "local", "--jobs", "2",
                      "--worker-threads", "1")) == 0
    serial, local = _run_dir(tmp_path / "serial"), _run_dir(tmp_path / "local")
    for name in TABLES:
        assert (serial / name).read_bytes() == (local / name).read_bytes(), name

    summary = json.loads((local / "summary.json").read_text())
    planned = {u["digest"] for u in json.loads((local / "units_plan.json").read_text())["units"]}
    used = {u["digest"] for u in json.loads((local / "units.json").read_text())}
    assert used == planned and len(planned) == again["units"]
    assert summary["executor"]["computed"] == summary["executor"]["planned"] == summary["units"]
    assert summary["executor"]["failed"] == []
