"""GPU smoke check: a few units of each experiment on ``cuda`` against the same units on the CPU.

One short command for a machine with a GPU (``python benchmarks/gpu_smoke.py``); it writes
``$OUT/gpu_smoke.json`` (or ``benchmarks/results/gpu_smoke.json``) with every agreement and timing, and exits 1 if an
agreement is outside its stated tolerance:

* eNTK (factored engine, SGD + A-SignGD, float64 accumulation) of the real SmolLM2 on 4 prompts: max relative
  difference <= 1e-3 (float32 gradients on both devices, summed in different orders);
* ntk-width: one network trained in float64 and its kernel gradient-flow distance: relative difference <= 1e-8;
* prompt-based fine-tuning of SmolLM2, 3 SGD steps (fp32), and 3 steps under bf16 autocast on CUDA: training losses
  within 1e-3 (fp32) and 5e-2 (bf16) relative of the CPU's;
* wei2021 pretraining of a tiny transformer, 30 steps: TV to the exact G_0 within 1e-3 absolute;
* exact HMM inference is numpy (CPU) by design: its timing on this machine is recorded for reference.

``--tiny`` uses the tiny random models instead of SmolLM2 (a self-check of the script on any machine, e.g. CPU
against CPU with ``--device cpu``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t0, 3)


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    den = float(b.abs().max())
    return float((a - b).abs().max()) / (den if den > 0 else 1.0)


def check_entk(device: str, tiny: bool) -> dict:
    from real_tasks.classify import encode_set, make_classifier
    from real_tasks.data import Example
    from real_tasks.entk import compute_kernel
    from real_tasks.models import load_model
    from real_tasks.prompts import PROMPTS, get_prompt, label_token_ids, words_of

    exs = [Example("a gorgeous , witty , seductive movie .", 1), Example("the acting is dreadful .", 0),
           Example("a charming and often affecting journey .", 1), Example("a boring mess .", 0)]
    vocab = " ".join(e.text_a for e in exs).split() + words_of(PROMPTS.values())
    out = {}
    for dev in ("cpu", device):
        lm = load_model("tiny-causal" if tiny else "smollm2", device=dev, vocab=vocab)
        p = get_prompt("SST-2")
        lt = label_token_ids(lm.tokenizer, p, lm.kind)
        clf = make_classifier(lm, use_prompt=True, label_tokens=lt).to(dev)
        data = encode_set(lm, exs, prompt=p, label_tokens=lt)
        res, secs = _timed(lambda: compute_kernel(clf, data, kernel=["sgd", "asigngd"], implementation="factored",
                                                  device=dev, memory_budget=4 << 30))
        out[dev] = {"sgd": res["sgd"]["kernel"], "asigngd": res["asigngd"]["kernel"], "seconds": secs}
    diff = max(_rel(out[device][k], out["cpu"][k]) for k in ("sgd", "asigngd"))
    return {"name": "eNTK (factored, SGD + A-SignGD)", "max_rel_diff": diff, "tol": 1e-3, "ok": diff <= 1e-3,
            "seconds": {d: out[d]["seconds"] for d in out}}


def check_ntk_width(device: str) -> dict:
    from simulate.ntk_width import NTKWidthConfig, run_unit

    cfg = NTKWidthConfig(widths=(256,), depth=1, seeds=(0,), num_train=16, num_test=16, steps=100)
    rows = {}
    for dev in ("cpu", device):
        (row, _), secs = _timed(lambda: run_unit(cfg, 256, 0, dev))
        rows[dev] = (row, secs)
    a, b = rows[device][0], rows["cpu"][0]
    diff = max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-300) for k in ("dist_gf_test", "kernel_move", "test_mse_net"))
    return {"name": "ntk-width unit (float64)", "max_rel_diff": diff, "tol": 1e-8, "ok": diff <= 1e-8,
            "seconds": {d: rows[d][1] for d in rows}}


def check_finetune(device: str, tiny: bool) -> list[dict]:
    from real_tasks.classify import encode_set, make_classifier
    from real_tasks.data import Example
    from real_tasks.models import load_model
    from real_tasks.prompts import PROMPTS, get_prompt, label_token_ids, words_of
    from theory.finetune import Method, Optimizer, finetune

    exs = [Example(t, y) for t, y in (("great fun", 1), ("dull and slow", 0), ("a delight", 1), ("a mess", 0))] * 2
    vocab = " ".join(e.text_a for e in exs).split() + words_of(PROMPTS.values())
    results = []
    for amp, tol in ((None, 1e-3), ("bf16", 5e-2)):
        losses = {}
        for dev in ("cpu", device):
            lm = load_model("tiny-causal" if tiny else "smollm2", device=dev, vocab=vocab)
            p = get_prompt("SST-2")
            lt = label_token_ids(lm.tokenizer, p, lm.kind)
            clf = make_classifier(lm, use_prompt=True, label_tokens=lt)
            data = encode_set(lm, exs, prompt=p, label_tokens=lt)
            m = Method("ft", Optimizer("sgd", lr=1e-2), steps=3, batch_size=4, autocast=amp)
            res, secs = _timed(lambda: finetune(clf, data, m, seed=0, device=dev))
            losses[dev] = ([h["train_loss"] for h in res.history], secs)
        diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses[device][0], losses["cpu"][0]))
        results.append({"name": f"prompt-based fine-tuning, 3 SGD steps ({amp or 'fp32'} on {device})",
                        "max_rel_diff": diff, "tol": tol, "ok": diff <= tol,
                        "seconds": {d: losses[d][1] for d in losses}})
    return results


def check_pretrain(device: str) -> dict:
    import tempfile

    from ftsim.core.cache import UnitCache
    from simulate.wei2021.pretrain import HMMSpec, PretrainConfig, pretrain

    spec = HMMSpec.make("wei2021", 0, num_states=4, vocab_size=5)
    cfg = PretrainConfig(d_model=16, num_layers=1, num_heads=2, steps=30, batch_size=16, corpus_sequences=480,
                         eval_every=10, eval_sequences=64)
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dev in ("cpu", device):
            pre, secs = _timed(lambda: pretrain(spec, 7, cfg, UnitCache(Path(tmp) / dev), eval_length=6, device=dev))
            curves[dev] = ([r["tv_mean"] for r in pre.curve], secs)
    diff = max(abs(a - b) for a, b in zip(curves[device][0], curves["cpu"][0]))
    return {"name": "wei2021 pretraining, 30 steps (TV to exact G_0)", "max_abs_diff": diff, "tol": 1e-3,
            "ok": diff <= 1e-3, "seconds": {d: curves[d][1] for d in curves}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny random models instead of SmolLM2")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    info = {"device": args.device, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "checks": []}
    info["checks"].append(check_entk(args.device, args.tiny))
    info["checks"].append(check_ntk_width(args.device))
    info["checks"].extend(check_finetune(args.device, args.tiny))
    info["checks"].append(check_pretrain(args.device))
    out = args.out or Path(os.environ.get("OUT", Path(__file__).parent / "results")) / "gpu_smoke.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=2) + "\n")
    for c in info["checks"]:
        print(f"{'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c.get('max_rel_diff', c.get('max_abs_diff')):.2e} "
              f"(tol {c['tol']:g}); seconds {c['seconds']}")
    print(f"wrote {out}")
    return 0 if all(c["ok"] for c in info["checks"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
