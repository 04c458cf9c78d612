"""Benchmark of issue 3 (Wei, Xie & Ma 2021): the quick budgets and the exact leave-one-out outputs.

Measured in one run, written to ``benchmarks/results/bench_wei2021.json``:

* ``ftsim verify wei2021`` (quick) wall time, against its 2-minute budget;
* ``ftsim run wei2021-exp1 --preset quick`` and ``wei2021-exp2 --preset quick`` from a cold cache (corpora and
  checkpoints regenerated), together against the 15-minute budget, and a second, warm run of both (every unit
  reused) to show what the cache saves;
* the exact per-position outputs G_t = P(X_t | x_-t) from one forward-backward pass
  (:func:`simulate.wei2021.oracles.leave_one_out_outputs`) against its peer, T masked forward-backward passes
  (the reference the tests compare with), as a speed ratio.

Usage: ``python benchmarks/bench_wei2021.py [--root DIR] [--skip-runs]``. ``--root`` keeps the run directories
(default: a temporary directory, removed afterwards). Load on the machine is recorded (``os.getloadavg``):
timings taken while other jobs run are slower.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "bench_wei2021.json"
BUDGET_QUICK_S = 15 * 60
BUDGET_VERIFY_S = 2 * 60


def _time(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_leave_one_out() -> dict:
    from simulate.inference import MASK, infer
    from simulate.sampling import sample
    from simulate.wei2021.oracles import leave_one_out_outputs, memory_task

    model, _ = memory_task(5, 4, 10, 0, 0, 12)
    x = sample(model, 2000, 24, 0).tokens.astype(np.int64)

    def masked_passes():
        out = np.empty((x.shape[0], x.shape[1], 10))
        for t in range(x.shape[1]):
            xm = x.copy()
            xm[:, t] = MASK
            out[:, t] = infer(model, xm).posteriors[:, t] @ model.as_hmm().emit
        return out

    ours = _time(lambda: leave_one_out_outputs(model, x))
    peer = _time(masked_passes, repeat=1)
    err = float(np.abs(leave_one_out_outputs(model, x) - masked_passes()).max())
    return {"setting": "memory HMM N=5 x S=4, n=10; 2000 sequences x T=24", "one_pass_s": round(ours, 4),
            "masked_passes_s": round(peer, 4), "speedup": round(peer / ours, 1), "max_abs_diff": err}


def bench_runs(root: Path) -> dict:
    from ftsim.app.cli import run_verifier
    from ftsim.core.experiment import run_experiment
    from simulate.wei2021.experiments import EXP1, EXP2

    os.environ["FTSIM_RESULTS"] = str(root)
    os.environ["FTSIM_CACHE"] = str(root / "cache")
    out: dict = {}
    t0 = time.perf_counter()
    claims = run_verifier("wei2021", quick=True, out=root / "verify" / "wei2021")
    out["verify_s"] = round(time.perf_counter() - t0, 1)
    out["verify_claims"] = f"{sum(c.passed for c in claims)}/{len(claims)}"
    for label in ("cold", "warm"):
        for exp in (EXP1, EXP2):
            t0 = time.perf_counter()
            run_dir, summary = run_experiment(exp, exp.presets["quick"], preset="quick", root=root,
                                              device="cpu", progress=False)
            out[f"{exp.name}_{label}_s"] = round(time.perf_counter() - t0, 1)
            out[f"{exp.name}_headline"] = summary.get("headline", "")
            out[f"{exp.name}_run_dir"] = str(run_dir)
        if label == "cold":
            # Warm run: drop the finished-run markers so every unit is looked up in the store again and every
            # model is loaded from the checkpoint cache, not retrained.
            for exp in (EXP1, EXP2):
                (Path(out[f"{exp.name}_run_dir"]) / "summary.json").unlink()
    out["quick_total_cold_s"] = round(out["wei2021-exp1_cold_s"] + out["wei2021-exp2_cold_s"], 1)
    out["quick_total_warm_s"] = round(out["wei2021-exp1_warm_s"] + out["wei2021-exp2_warm_s"], 1)
    out["quick_budget_s"] = BUDGET_QUICK_S
    out["quick_ratio_to_budget"] = round(out["quick_total_cold_s"] / BUDGET_QUICK_S, 3)
    out["verify_budget_s"] = BUDGET_VERIFY_S
    out["verify_ratio_to_budget"] = round(out["verify_s"] / BUDGET_VERIFY_S, 3)
    out["warm_over_cold"] = round(out["quick_total_warm_s"] / out["quick_total_cold_s"], 3)
    return out


def main() -> None:
    import torch

    from ftsim.core.io import write_json

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=None, help="keep the runs here (must not hold a cache yet)")
    p.add_argument("--skip-runs", action="store_true", help="only the leave-one-out micro-benchmark")
    args = p.parse_args()
    torch.set_num_threads(max(1, int(os.environ.get("FTSIM_THREADS", "1"))))  # as the experiments do
    result = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "torch_threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()},
              "leave_one_out": bench_leave_one_out()}
    if not args.skip_runs:
        root = args.root or Path(tempfile.mkdtemp(prefix="bench_wei2021_"))
        if (root / "cache" / "wei2021").exists():
            raise SystemExit(f"{root / 'cache' / 'wei2021'} exists: the cold timing needs an empty cache")
        try:
            result["runs"] = bench_runs(root)
        finally:
            if args.root is None:
                shutil.rmtree(root, ignore_errors=True)
    result["machine"]["loadavg_end"] = os.getloadavg()
    write_json(OUT, result)
    print(OUT.read_text())


if __name__ == "__main__":
    main()
