"""Benchmark: where the time of ``ftsim run malladi`` goes on this machine, per example, for SmolLM2-135M.

Measured in one run, each against the peer that bounds it from below:

* **gradient floor** -- one forward + ``backward()`` of the kernel output f = z_great - z_terrible for one
  prompted SST-2 example (the gradient work any eNTK method needs per example);
* **eNTK per example** -- ``theory.ntk.empirical_ntk`` as the quick preset calls it for the diagnostics
  (count-sketch, k = 16384, float32 accumulation, vmap-ed per-example gradients, 6 GiB budget) on N examples,
  divided by N; ratio to the floor = the engine's overhead (sketching 134.5M coordinates per example);
* **factored eNTK** -- the exact SGD and A-SignGD kernels together, as the quick preset computes the union
  kernels (``implementation="factored"``), on ``--n-factored`` examples (cost per example grows with N);
* **fine-tuning step** -- one Adam step on a batch of 8 (forward, backward, clip, update); ratio to 8 floors;
* **evaluation** -- a no-grad forward per example in batches of 16;
* **linearisation** -- the forward-mode JVP of :func:`real_tasks.finetune.linearized_scores` per example; ratio
  to the no-grad forward.

With ``--runs DIR ...`` it also copies the wall-time breakdown of finished ``malladi`` runs (their
``summary.json``) into the JSON, so the per-task runtimes sit beside the per-example costs that explain them.
The machine is shared: the load average before and after is recorded, and timings are the best of ``--repeats``.

    python benchmarks/bench_malladi.py [--n 8] [--repeats 2] [--runs results/malladi/quick-*]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from ftsim.core.io import cache_root, write_json  # noqa: E402


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=8, help="examples for the eNTK timing")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--n-factored", type=int, default=64, help="examples for the factored-engine timing")
    ap.add_argument("--runs", nargs="*", default=[], help="malladi run directories whose summaries to include")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_malladi.json")
    args = ap.parse_args()

    from real_tasks.data import kshot_split, load_task
    from real_tasks.finetune import (FTConfig, encode_set, evaluate, finetune, functional_outputs,
                                     linearized_scores, make_classifier, restore, snapshot)
    from real_tasks.models import load_model
    from real_tasks.prompts import get_prompt, label_token_ids
    from theory.ntk import empirical_ntk

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    lm = load_model("smollm2", cache_dir=cache_root())
    load_s = time.perf_counter() - t0
    data = load_task("SST-2")
    split = kshot_split(data, 16, 13, max_test=100)
    prompt = get_prompt("SST-2")
    lt = label_token_ids(lm.tokenizer, prompt, "causal")
    train = encode_set(lm, split.train, prompt=prompt, label_tokens=lt)
    test = encode_set(lm, split.test[:32], prompt=prompt, label_tokens=lt)
    clf = make_classifier(lm, use_prompt=True, label_tokens=lt)
    theta0 = snapshot(lm.model)
    n = min(args.n, len(train))
    mean_len = float(train.lengths[:n].float().mean())

    # gradient floor: forward + backward of f for one example at a time (no per-example storage)
    params = [p for p in clf.parameters()]

    def floor():
        for i in range(n):
            s = clf(train.select([i]))[0]
            torch.autograd.grad(s[1] - s[0], params)

    floor_s = best_of(floor, args.repeats) / n

    # the engine as the quick preset calls it
    f = functional_outputs(clf)
    pdict = {k: v.detach() for k, v in clf.named_parameters()}
    sub = {k: v[:n] for k, v in train.batch.items()}
    plan = {}

    def entk():
        res = empirical_ntk(f, pdict, sub, None, kernel="sgd", implementation="sketch", sketch_dim=16384,
                            memory_budget=6 << 30, dtype=torch.float32)
        plan["text"] = res.plan.describe()

    entk_s = best_of(entk, args.repeats) / n

    # the factored engine as the quick preset now calls it for the union kernels: exact, float64 accumulation, the
    # SGD and A-SignGD kernels from one set of captures, on n_f examples (its cost per example grows with N: the
    # Gram product is N^2 P)
    from real_tasks.entk import compute_kernel

    n_f = min(args.n_factored, len(train) + len(test))
    both = encode_set(lm, (list(split.train) + list(split.test))[:n_f], prompt=prompt, label_tokens=lt)
    fplan = {}

    def factored():
        res = compute_kernel(clf, both, kernel=["sgd", "asigngd"], implementation="factored",
                             memory_budget=6 << 30)
        fplan["text"] = res["sgd"]["plan_text"]

    factored_s = best_of(factored, 1)

    # one fine-tuning step (Adam, batch 8)
    def step():
        restore(lm.model, theta0)
        finetune(clf, train, None, FTConfig("adam", 1e-5, 1, 8, max_grad_norm=1.0), seed=0, device="cpu")

    step_s = best_of(step, args.repeats)
    restore(lm.model, theta0)
    clf.eval()

    eval_s = best_of(lambda: evaluate(clf, test, "cpu", batch_size=16), args.repeats) / len(test)
    t1 = {k: v + 1e-4 * torch.randn_like(v) for k, v in snapshot(clf).items()}
    t0_named = {"lm." + k: v for k, v in theta0.items()}
    lin_s = best_of(lambda: linearized_scores(clf, t0_named, t1, test, "cpu"), 1) / len(test)

    runs = {}
    for d in args.runs:
        p = Path(d) / "summary.json"
        if p.is_file():
            s = json.loads(p.read_text())
            runs[str(d)] = {k: s.get(k) for k in ("task", "headline", "seconds", "compute_seconds",
                                                  "this_invocation_seconds", "wall_seconds", "test_size",
                                                  "kernel_union_size", "threads")}
    out = {
        "benchmark": "bench_malladi",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "load_average_before": load_before,
                    "load_average_after": os.getloadavg()},
        "setting": {"model": "smollm2 (SmolLM2-135M-Instruct, GGUF Q4_1 de-quantized to float32)",
                    "parameters": lm.num_parameters, "task": "SST-2 prompts", "examples": n,
                    "mean_tokens": mean_len, "model_load_seconds": load_s},
        "per_example_seconds": {"gradient_floor": floor_s, "entk_sketch": entk_s, "eval_forward": eval_s,
                                "linearize_jvp": lin_s},
        "finetune_step_seconds_batch8": step_s,
        "factored_sgd_and_asigngd": {"examples": n_f, "seconds": factored_s, "per_example": factored_s / n_f,
                                     "per_example_over_gradient_floor": factored_s / n_f / floor_s,
                                     "plan": fplan.get("text")},
        "ratios": {"entk_over_gradient_floor": entk_s / floor_s,
                   "finetune_step_over_8_gradient_floors": step_s / (8 * floor_s),
                   "linearize_over_eval_forward": lin_s / eval_s},
        "entk_plan": plan.get("text"),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, out)
    print(json.dumps({k: out[k] for k in ("per_example_seconds", "finetune_step_seconds_batch8", "ratios")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
