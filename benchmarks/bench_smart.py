"""Benchmark: the cost of a SMART step against a plain fine-tuning step (the issue's target: <= 2.5x with one
ascent step), measured in one run on this machine.

Per model, every method fine-tunes the same classifier for ``--steps`` optimizer steps (Adam, batch 8, no
validation pass) through :func:`theory.finetune.finetune`; the time of a step is read between consecutive
``on_step`` calls and the median over steps is kept; methods are interleaved over ``--repeats`` rounds so that a
change of machine load hits all of them, and the median over rounds is reported with its ratio to FT:

* FT; FT + R_s with K = 1 and K = 2 ascent steps (each step adds ~one forward-backward through the model to the
  input embeddings, plus the perturbed forward and its share of the backward); FT + R_s + VBPP (S = 4) and
  FT + R_s + MBPP (one more no-grad forward at the anchor); FT + R_s in the public codes' normalised form.

Models: the synthetic bag-of-embeddings network of ``ftsim run smart-synthetic`` (tiny: Python overhead dominates),
the tiny random llama prompt classifier (``tiny-causal``), and with ``--smollm2`` SmolLM2-135M on prompted
SST-2-length sentences (minutes). With ``--runs DIR ...`` the per-step costs that finished ``smart`` runs measured
(their ``cost.jsonl``) are copied in beside. The machine is shared: the load average before and after is recorded.

    python benchmarks/bench_smart.py [--steps 12] [--repeats 3] [--smollm2] [--runs results/smart/quick-*]
"""

from __future__ import annotations

import argparse
import datetime
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

import torch  # noqa: E402

from ftsim.core.io import read_jsonl, write_json  # noqa: E402

SENTENCES = ["a fun and moving film about two friends", "the plot was thin and the acting flat",
             "warm , funny and smart from start to end", "a dull and boring movie that never ends",
             "great acting and a sharp plot", "the worst film of the year , slow and dull",
             "a delight for the whole family", "a mess of a film with nothing to say"] * 2


def _methods(rms: float):
    from theory.finetune import Method, Optimizer
    from theory.smart import Perturbation, momentum_bpp, vanilla_bpp

    eps = 0.1 * rms
    p1 = Perturbation(eps=eps, steps=1, step_size=100 * eps, init_std=eps)
    p2 = Perturbation(eps=eps, steps=2, step_size=100 * eps, init_std=eps)
    pub = Perturbation(eps=eps, steps=1, step_size=100 * eps, init_std=eps, ball="token", variant="normalize")
    return {"FT": (None, None), "FT + R_s (K=1)": (p1, None), "FT + R_s (K=2)": (p2, None),
            "FT + R_s + VBPP (K=1, S=4)": (p1, vanilla_bpp(1.0, every=4)),
            "FT + R_s + MBPP (K=1)": (p1, momentum_bpp(1.0, 0.99, every=4)),
            "FT + R_s public (K=1)": (pub, None)}, Method, Optimizer


def _time_method(make, data, embed, forward_embeds, mask, pert, prox, steps, Method, Optimizer) -> float:
    from theory.finetune import finetune
    from theory.smart import smoothness_regularizer

    regs = () if pert is None else (smoothness_regularizer(pert, weight=1.0, embed=embed,
                                                           forward_embeds=forward_embeds, mask=mask),)
    m = Method("bench", Optimizer("adam", lr=1e-5), steps=steps, batch_size=8, eval_every=0, regularizers=regs,
               proximal=prox)
    stamps: list[float] = []
    finetune(make(), data, m, seed=0, on_step=lambda s, mod: stamps.append(time.perf_counter()))
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def _bench(name, make, data, embed, forward_embeds, mask, rms, steps, repeats) -> dict:
    methods, Method, Optimizer = _methods(rms)
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(repeats):
        for k, (pert, prox) in methods.items():
            times[k].append(_time_method(make, data, embed, forward_embeds, mask, pert, prox, steps, Method,
                                         Optimizer))
    ft = statistics.median(times["FT"])
    out = {}
    for k, v in times.items():
        med = statistics.median(v)
        out[k] = {"seconds_per_step": med, "rounds": v, "ratio_to_ft": med / ft}
    r1 = out["FT + R_s (K=1)"]["ratio_to_ft"]
    print(f"{name}: FT {ft * 1e3:.1f} ms/step; " + ", ".join(f"{k} {v['ratio_to_ft']:.2f}x" for k, v in out.items()))
    return {"methods": out, "target": "FT + R_s (K=1) <= 2.5x FT", "target_met": r1 <= 2.5}


def synthetic(steps, repeats) -> dict:
    from simulate.smart import BagModel, SmartSyntheticConfig, _embed, _forward_embeds
    from theory.finetune import TensorData

    cfg = SmartSyntheticConfig()
    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randint(0, cfg.vocab_size, (64, cfg.seq_len), generator=g), torch.randint(0, 2, (64,),
                                                                                                    generator=g))

    def make():
        torch.manual_seed(0)
        return BagModel(cfg.vocab_size, cfg.embed_dim, cfg.hidden, 2)

    rms = float(make().embed.weight.detach().pow(2).mean().sqrt())
    res = _bench("synthetic", make, data, _embed, _forward_embeds, None, rms, steps, repeats)
    res["setting"] = {"model": f"bag-of-embeddings V={cfg.vocab_size} d={cfg.embed_dim} hidden={cfg.hidden}",
                      "tokens": cfg.seq_len, "batch": 8}
    return res


def prompt_model(spec: str, steps, repeats) -> dict:
    from real_tasks.classify import encode_set, make_classifier
    from real_tasks.data import Example
    from real_tasks.models import load_model
    from real_tasks.prompts import PROMPTS, get_prompt, label_token_ids, words_of
    from real_tasks.smart import prompt_embed, prompt_forward_embeds, prompt_mask
    from theory.finetune import restore

    examples = [Example(s, i % 2) for i, s in enumerate(SENTENCES)]
    vocab = " ".join(SENTENCES).split() + words_of(PROMPTS.values()) if spec.startswith("tiny-") else None
    t0 = time.perf_counter()
    lm = load_model(spec, vocab=vocab)
    load = time.perf_counter() - t0
    prompt = get_prompt("SST-2")
    labels = label_token_ids(lm.tokenizer, prompt, lm.kind)
    data = encode_set(lm, examples, prompt=prompt, label_tokens=labels)
    theta0 = {k: v.detach().clone() for k, v in lm.model.named_parameters()}

    def make():
        restore(lm.model, theta0)
        return make_classifier(lm, use_prompt=True, label_tokens=labels)

    rms = float(lm.model.get_input_embeddings().weight.detach().pow(2).mean().sqrt())
    res = _bench(spec, make, data, prompt_embed, prompt_forward_embeds, prompt_mask, rms, steps, repeats)
    res["setting"] = {"model": spec, "parameters": sum(p.numel() for p in lm.model.parameters()),
                      "mean_tokens": float(data.lengths.double().mean()), "batch": 8, "load_seconds": load}
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per timing (the median step is kept)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds over the methods")
    ap.add_argument("--smollm2", action="store_true", help="also time SmolLM2-135M (minutes on 2 cores)")
    ap.add_argument("--runs", nargs="*", default=[], help="smart run directories whose cost tables to include")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_smart.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    before = os.getloadavg()
    cases = {"synthetic": synthetic(args.steps, args.repeats),
             "tiny-causal": prompt_model("tiny-causal", args.steps, args.repeats)}
    if args.smollm2:
        cases["smollm2"] = prompt_model("smollm2", max(4, args.steps // 3), max(1, args.repeats - 1))
    runs = {}
    for d in args.runs:
        path = Path(d) / "cost.jsonl"
        if path.is_file():
            runs[str(d)] = read_jsonl(path)
    write_json(args.out, {
        "benchmark": "bench_smart",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "load_average_before": list(before),
                    "load_average_after": list(os.getloadavg())},
        "cases": cases, "runs": runs,
    })
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
