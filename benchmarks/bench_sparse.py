"""Benchmark: the sparse fine-tuning code of ftsim against its peers, and what one ``ftsim run sparse`` task costs.

Measured in one run, each against a peer in the same process (best of ``--repeats``):

* **masked step** -- :func:`theory.finetune.finetune` with ``Params(masks=...)`` (gradients masked, frozen entries
  restored after AdamW's step) against the same method with no mask; target: masked / plain <= 1.3;
* **top-k masks** -- :func:`theory.sparse.top_k_masks` (deterministic, ties to the lower index, via
  ``kthvalue``) against ``torch.topk`` on a tensor the size of SmolLM2's embedding (28.3M entries); target:
  ours / topk <= 3 (determinism is what we pay for);
* **exact leave-one-out** -- :func:`theory.sparse.loo_stability` (Newton, warm starts) against scikit-learn's
  ``LogisticRegression`` refitted n + 1 times (lbfgs, tol 1e-10); target: sklearn / ours >= 2;
* **brute force** -- :func:`theory.sparse.brute_force_drops` (one batched solve) against a Python loop over the
  C(16, 8) = 12870 masks; target: loop / ours >= 10.

With ``--runs DIR ...`` it reads the ``sparse`` unit records those runs used (``units.json`` and the cache
records) and turns them into a cost model: median seconds per unit kind and family, and the estimated wall time of
the quick preset of one task (its unit counts times the medians). With ``--smollm2`` it also times, on the real
SmolLM2-135M, one AdamW step of batch 8 with and without a mask, the SAM burn-in per batch, the Fisher and
Gauss-Newton diagonals per example and an evaluation forward per example (opt-in: minutes on this CPU).

    python benchmarks/bench_sparse.py [--repeats 3] [--runs results/sparse/quick-*] [--smollm2]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ftsim.core.io import write_json  # noqa: E402


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_masked_step(repeats: int, fused: bool = False) -> dict:
    from theory import sparse as sp
    from theory.finetune import Method, Optimizer, Params, TensorData, finetune, restore, snapshot

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 1024),
                              torch.nn.Tanh(), torch.nn.Linear(1024, 2))
    theta0 = snapshot(net)
    g = torch.Generator().manual_seed(1)
    data = TensorData(torch.randn(256, 256, generator=g), torch.randint(0, 2, (256,), generator=g))
    masks = sp.random_masks(theta0, 0.01, seed=0)
    opt = Optimizer("adamw", lr=1e-3, weight_decay=0.01, fused=fused)

    def run(params):
        restore(net, theta0)
        finetune(net, data, Method("b", opt, steps=20, batch_size=32, params=params), seed=0)

    plain = best_of(lambda: run(Params()), repeats)
    masked = best_of(lambda: run(Params(masks=masks)), repeats)
    return {"setting": "MLP 256-1024-1024-2 (1.3M parameters), 20 AdamW steps of 32, mask p = 0.01"
                       + (", torch's fused AdamW" if fused else ", torch's default (for-loop) AdamW"),
            "plain_seconds": plain, "masked_seconds": masked, "ratio": masked / plain, "target": "<= 1.3",
            "met": masked / plain <= 1.3}


def bench_top_k(repeats: int) -> dict:
    from theory import sparse as sp

    g = torch.Generator().manual_seed(0)
    s = torch.randn(49152, 576, generator=g)
    k = sp.budget(s.numel(), 0.01)
    ours = best_of(lambda: sp.top_k_masks({"w": s}, 0.01), repeats)
    peer = best_of(lambda: torch.topk(s.reshape(-1), k), repeats)
    return {"setting": "49152 x 576 scores (SmolLM2's embedding), p = 0.01", "ours_seconds": ours,
            "torch_topk_seconds": peer, "ratio": ours / peer, "target": "<= 3", "met": ours / peer <= 3}


def bench_loo(repeats: int) -> dict:
    from sklearn.linear_model import LogisticRegression

    from theory import sparse as sp

    rng = np.random.default_rng(0)
    n, d, lam = 100, 20, 0.05
    X = rng.standard_normal((n, d))
    y = np.where(X @ rng.standard_normal(d) + rng.standard_normal(n) > 0, 1.0, -1.0)
    prob = sp.LogisticProblem.make(X, y, ridge=lam)

    def sklearn_loo():
        out = []
        full = LogisticRegression(C=1 / (n * lam), fit_intercept=False, tol=1e-10, max_iter=10000).fit(X, y)
        for i in range(n):
            rows = np.delete(np.arange(n), i)
            m = LogisticRegression(C=1 / ((n - 1) * lam), fit_intercept=False, tol=1e-10, max_iter=10000)
            out.append(m.fit(X[rows], y[rows]).coef_[0])
        return full, out

    ours = best_of(lambda: sp.loo_stability(prob), repeats)
    peer = best_of(sklearn_loo, repeats)
    res = sp.loo_stability(prob)
    full, refits = sklearn_loo()
    agree = float(np.max(np.abs(full.coef_[0] - res.theta)))
    return {"setting": f"L2 logistic regression n={n}, d={d}, ridge {lam}: n + 1 exact fits",
            "ours_seconds": ours, "sklearn_seconds": peer, "ratio": peer / ours, "target": ">= 2",
            "met": peer / ours >= 2, "max_abs_difference_full_fit": agree}


def bench_brute_force(repeats: int) -> dict:
    from theory import sparse as sp

    rng = np.random.default_rng(0)
    m, k = 16, 8
    g = rng.standard_normal(m)
    Q, _ = np.linalg.qr(rng.standard_normal((m, m)))
    H = Q @ np.diag(rng.uniform(0.1, 3, m)) @ Q.T

    def loop():
        return max(sp.quadratic_drop(g, H, S) for S in itertools.combinations(range(m), k))

    ours = best_of(lambda: sp.brute_force_drops(g, H, k), repeats)
    peer = best_of(loop, max(1, repeats - 1))
    same = abs(float(sp.brute_force_drops(g, H, k)[1].max()) - loop())
    return {"setting": "m = 16, k = 8: 12870 masks", "ours_seconds": ours, "loop_seconds": peer,
            "ratio": peer / ours, "target": ">= 10", "met": peer / ours >= 10, "max_difference": same}


def cost_model(runs: list[Path]) -> dict:
    """Median seconds per unit kind (and fine-tuning family) from the records of finished sparse runs, and the quick
    preset's estimated wall time for one task."""
    from ftsim.core.cache import UnitCache
    from real_tasks.sparse import PRESETS, _jobs, _perturbed

    per: dict[str, list[float]] = {}
    for run in runs:
        units = json.loads((run / "units.json").read_text())
        cache = UnitCache(Path(os.environ.get("FTSIM_CACHE", ROOT / "results" / "cache")) / "units")
        for u in units:
            if not u["kind"].startswith("sparse."):
                continue
            rec = cache.root / u["kind"] / u["digest"][:2] / u["digest"] / "record.json"
            fam = ""
            if rec.is_file() and u["kind"] == "sparse.finetune":
                fam = json.loads(rec.read_text())["result"].get("family", "")
            per.setdefault(f"{u['kind']}:{fam}" if fam else u["kind"], []).append(float(u["seconds"] or 0.0))
    med = {k: statistics.median(v) for k, v in per.items()}
    cfg = PRESETS["quick"]
    jobs = _jobs(cfg)
    est = 0.0
    missing = []
    for seed in cfg.seeds:
        reps = cfg.perturbations + 1 if seed in (cfg.perturb_seeds or cfg.seeds) else 1
        for r in range(reps):
            for fam, p in jobs:
                if r and not _perturbed(cfg, fam, p):
                    continue
                key = f"sparse.finetune:{fam}"
                if key in med:
                    est += med[key]
                else:
                    missing.append(fam)
    est += len(cfg.seeds) * med.get("sparse.klora", 0.0) + med.get("sparse.kernel-rank", 0.0)
    return {"runs": [str(r) for r in runs], "median_seconds": med, "samples": {k: len(v) for k, v in per.items()},
            "quick_preset_estimate_minutes": est / 60, "families_without_a_measurement": sorted(set(missing)),
            "note": "medians of units measured at the run's settings; a quick-preset unit trains 16 steps where a "
                    "smoke unit may train fewer (scale the finetune medians by the step ratio where it differs)"}


def bench_smollm2(repeats: int) -> dict:
    """Per-operation costs of the sparse families on SmolLM2-135M (prompted SST-2 examples, float32)."""
    from real_tasks.classify import encode_set, make_classifier
    from real_tasks.data import Example
    from real_tasks.models import load_model
    from real_tasks.prompts import get_prompt, label_token_ids
    from theory import sparse as sp
    from theory.finetune import Method, Optimizer, Params, evaluate, finetune, restore, snapshot

    t0 = time.perf_counter()
    lm = load_model("smollm2")
    load = time.perf_counter() - t0
    p = get_prompt("SST-2")
    lt = label_token_ids(lm.tokenizer, p, "causal")
    texts = ["a gorgeous , witty , seductive movie .", "the acting is dreadful .",
             "it 's a charming and often affecting journey .", "a boring mess ."] * 2
    data = encode_set(lm, [Example(t, i % 2 == 0) for i, t in enumerate(texts)], prompt=p, label_tokens=lt)
    clf = make_classifier(lm, use_prompt=True, label_tokens=lt)
    theta0 = snapshot(clf)
    masks = sp.random_masks(theta0, 0.01, seed=0)
    opt = Optimizer("adamw", lr=1e-5, weight_decay=0.01)

    def step(params):
        restore(clf, theta0)
        finetune(clf, data, Method("b", opt, steps=1, batch_size=8, params=params), seed=0)

    out = {"model_load_seconds": load, "adamw_step_batch8": best_of(lambda: step(Params()), repeats),
           "masked_adamw_step_batch8": best_of(lambda: step(Params(masks=masks)), repeats),
           "sam_burn_in_batch8": best_of(lambda: sp.accumulated_gradients(clf, data, steps=1, batch_size=8, seed=0),
                                         repeats),
           "fisher_per_example": best_of(lambda: sp.fisher_diagonal(clf, data), 1) / len(data),
           "gauss_newton_per_example": best_of(lambda: sp.gauss_newton_diagonal(clf, data), 1) / len(data),
           "eval_per_example": best_of(lambda: evaluate(clf, data, "cpu"), repeats) / len(data)}
    restore(clf, theta0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runs", nargs="*", type=Path, default=[], help="sparse run directories for the cost model")
    ap.add_argument("--smollm2", action="store_true", help="also time the per-operation costs on SmolLM2-135M")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_sparse.json")
    args = ap.parse_args()
    from ftsim.core.threads import limit_threads

    load0 = os.getloadavg()
    out = {"benchmark": "bench_sparse", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__}}
    with limit_threads(1):
        out["masked_step"] = bench_masked_step(args.repeats)
        out["masked_step_fused"] = bench_masked_step(args.repeats, fused=True)
        out["top_k_masks"] = bench_top_k(args.repeats)
        out["exact_loo"] = bench_loo(args.repeats)
        out["brute_force"] = bench_brute_force(args.repeats)
    if args.runs:
        out["cost_model"] = cost_model(args.runs)
    if args.smollm2:
        out["smollm2_seconds"] = bench_smollm2(args.repeats)
        out["smollm2_seconds"]["threads"] = torch.get_num_threads()
    out["machine"]["threads"] = 1
    out["machine"]["load_average_before"] = list(load0)
    out["machine"]["load_average_after"] = list(os.getloadavg())
    write_json(args.out, out)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
