"""``ftsim run sparse``: parameter-efficient fine-tuning as sparse fine-tuning on a real LM (Fu et al., AAAI 2023),
and LoRA's kernel (Malladi et al. 2023, Sec. 7).

Every family is a :class:`theory.finetune.Method` value run by :func:`theory.finetune.finetune` on the prompt-based
classifier (label-word logits; :mod:`real_tasks.classify`):

* **FullTuning** (every parameter); **Random** (Bernoulli(p) mask per entry); **MagPruning** (the floor(p n) entries
  of largest |theta_0| per tensor); **SAM** (the authors' rule: gradients accumulated over a burn-in without
  updates, then the top p of |sum| per tensor); **SAM (g^2/h)** (Theorem 3's exact rule with the Gauss-Newton
  diagonal as Hessian estimate, per tensor); **ChildPruning** (Child-Tuning_D: the top p of the empirical Fisher
  information over all tensors); **DiffPruning** (a hard-concrete relaxation of the mask trained with an L0 penalty
  for a burn-in, then projected onto the top p of log-alpha per tensor, the moving entries starting from
  theta_0 + w) -- all as ``Params(masks=...)``: the other entries stay bit-identical to theta_0;
* **BitFit** (bias terms; SmolLM2's llama layers have none, so its norm gains, the only vectors of the
  architecture -- the rule is a name pattern and the run records the share it moves);
* **MixOut** (:class:`theory.sparse.Mixout`, mixing probability q = 1 - p, for 0.1 <= p < 1: below, the 1/p
  rescaling of the kept deltas makes one learning rate meaningless);
* **Adapter** and **LoRA** through peft (``inject_adapter_in_model``; not hand-written). peft 0.21 ships no
  Houlsby/Pfeiffer bottleneck adapter, so the adapter row is peft's (IA)^3 (Liu et al. 2022: learned rescaling of
  keys, values and the feed-forward activations), the adapter family peft has -- said wherever it is reported;
* **K-LoRA**: the eNTK restricted to LoRA's parameters at the initialisation the LoRA runs start from (same seed,
  same A), solved as kernel regression / logistic regression (SGD kernel) and the asymmetric LS-SVM (A-SignGD
  kernel), beside LoRA fine-tuned with AdamW and with SGD;
* the **kernel distance vs LoRA rank** (scaled LoRA kernel against the eNTK of the adapted weights) on a
  class-balanced part of the first seed's training set.

Stability: Fu et al.'s is the spread over seeds (reported); the data-perturbation stability reruns a family on
training sets with 10% of the examples removed (``perturbations`` per seed, each a seeded draw) -- the whole
algorithm, mask selection included -- and reports the sample std of test accuracy over the perturbed sets and the
share of test predictions that change against the unperturbed run.

Tables: ``results.jsonl`` (tidy: task, model, k, seed, family, method, p, p_effective, perturbation, metric,
value), ``comparison.csv/md`` (mean and sample std over seeds), ``stability.jsonl``, ``kernel_rank.jsonl``,
``klora.jsonl``; the runner draws ``sparse.pdf/png``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from typing import Literal, Optional

import numpy as np

from ftsim.core.config import config_hash
from ftsim.core.errors import InputError
from ftsim.core.experiment import Experiment, RunContext, UnitSpec, loaded_once
from ftsim.core.io import atomic_write_text, stable_hash, write_json, write_table
from ftsim.core.tables import aggregate, markdown_table, mean_std, summarize

__all__ = ["SparseConfig", "PRESETS", "EXPERIMENT", "FAMILIES", "ALL_METHODS", "NAMES", "PAPER_AVERAGE", "run",
           "plan", "compute_unit", "family_method", "perturbed_train", "UNIT_VERSIONS"]

FAMILIES = ("full", "random", "mixout", "bitfit", "magnitude", "sam", "sam-exact", "diffpruning", "childpruning",
            "adapter", "lora")
ALL_METHODS = FAMILIES + ("lora-sgd", "k-lora", "kernel-rank")
SWEPT = ("random", "magnitude", "sam", "sam-exact", "diffpruning", "childpruning", "mixout")  # run at every p

NAMES = {"full": "FullTuning", "random": "Random", "mixout": "MixOut", "bitfit": "BitFit", "magnitude": "MagPruning",
         "sam": "SAM", "sam-exact": "SAM (g^2/h)", "diffpruning": "DiffPruning", "childpruning": "ChildPruning",
         "adapter": "Adapter ((IA)^3)", "lora": "LoRA", "lora-sgd": "LoRA (SGD)"}

KLORA_NAMES = {"K-SGD": "K-LoRA (SGD)", "K-SGD (logistic)": "K-LoRA (SGD, logistic)",
               "K-A-SignGD": "K-LoRA (A-SignGD)"}

# Fu et al. (AAAI 2023), Table 1, column AVG: RoBERTa-base, 7 GLUE/SuperGLUE tasks, mean +- std over 10 seeds.
PAPER_AVERAGE = {"FullTuning": (74.78, 2.60), "Random": (74.55, 2.46), "MixOut": (75.12, 2.88),
                 "BitFit": (74.31, 2.43), "MagPruning": (73.85, 1.99), "Adapter": (76.03, 2.35),
                 "LoRA": (75.11, 2.24), "DiffPruning": (72.65, 3.57), "ChildPruning": (74.93, 3.15),
                 "SAM": (77.12, 1.51)}


def _f(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """Settings of one ``sparse`` run. Defaults are the paper-scale ones (RoBERTa-base, long training, a learning-
    rate grid, 1000 test examples); ``quick`` is what a shared 2-core CPU affords for one task."""

    task: str = _f("SST-2", "task name (SST-2, SST-5, MR, CR, MPQA, Subj, TREC, ...)")
    model: str = _f("roberta-base", "smollm2 | tiny-causal | tiny-masked | GGUF path | local dir | HF id")
    k: int = _f(16, "training (and validation) examples per class")
    seeds: tuple[int, ...] = _f((13, 21, 42, 87, 100), "data seeds (LM-BFF's five); also the mask/LoRA seeds")
    data_dir: Optional[str] = _f(None, "data folder (default $FTSIM_DATA or ../shared/data/text_classification)")
    test_size: int = _f(1000, "test examples (a seeded draw shared by every seed)")
    label_mode: Literal["first", "sum"] = _f("first", "multi-token label words: first token, or summed log-prob")
    p: tuple[float, ...] = _f((0.001, 0.01, 0.1, 1.0), "sparsity levels p (share of entries that move); p = 1 is "
                                                        "FullTuning for every mask family")
    methods: tuple[str, ...] = _f(ALL_METHODS, "subset of " + ",".join(ALL_METHODS))
    lrs: tuple[float, ...] = _f((1e-5, 1e-4, 1e-3), "AdamW learning-rate grid, chosen on the validation set per "
                                                   "family, p and seed (the authors: 1e-4)")
    sgd_lr: float = _f(1e-2, "learning rate of LoRA (SGD)")
    weight_decay: float = _f(0.01, "AdamW weight decay (masked entries are guarded against it)")
    steps: int = _f(1000, "fine-tuning steps (LM-BFF: 1000)")
    batch_size: int = _f(8, "mini-batch size")
    eval_every: int = _f(100, "validate every this many steps, keep the best checkpoint")
    max_grad_norm: Optional[float] = _f(1.0, "gradient-norm clipping")
    burn_in: int = _f(0, "SAM burn-in mini-batches (gradients accumulated without updates; 0: one epoch -- with "
                         "no dropout and no update more epochs only rescale the sum)")
    diffpruning_steps: int = _f(100, "steps of DiffPruning's relaxed stage (before the projection)")
    diffpruning_lr: float = _f(1e-4, "learning rate of DiffPruning's diff vector w (log-alpha: 0.1)")
    diffpruning_l0: float = _f(1.0, "weight of DiffPruning's expected-L0 penalty (share of open gates)")
    bitfit_patterns: tuple[str, ...] = _f(("*bias", "*norm*weight"), "name patterns BitFit moves (biases; norm "
                                                                      "gains for models without biases)")
    lora_rank: int = _f(8, "LoRA rank r")
    lora_alpha: float = _f(16.0, "LoRA alpha (scaling alpha / r)")
    perturbations: int = _f(3, "training sets with 10% of the examples removed, per seed (0: none)")
    perturb_fraction: float = _f(0.1, "share of training examples removed per perturbation")
    perturb_seeds: Optional[tuple[int, ...]] = _f(None, "seeds that get perturbation runs (None: all)")
    perturb_p: Optional[tuple[float, ...]] = _f(None, "p of the swept families that get perturbation runs (None: all)")
    perturb_methods: Optional[tuple[str, ...]] = _f(None, "families that get perturbation runs (None: all)")
    kernel_ranks: tuple[int, ...] = _f((1, 2, 4, 8, 16, 32, 64), "LoRA ranks of the kernel-distance curve")
    kernel_seeds: tuple[int, ...] = _f((0, 1), "LoRA initialisations per rank of the kernel-distance curve")
    kernel_examples: int = _f(32, "training examples (class-balanced, first seed) of the kernel-distance curve")
    memory_budget_gb: Optional[float] = _f(None, "memory the eNTK engine may use (default: half of what is free)")
    threads: int = _f(0, "torch CPU threads (0: torch's default)")

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(ALL_METHODS)
        if unknown:
            raise InputError(f"unknown {sorted(unknown)}; choose from {', '.join(ALL_METHODS)}", field="methods")
        if not self.p or any(not 0.0 < p <= 1.0 for p in self.p):
            raise InputError(f"every p must lie in (0, 1], got {list(self.p)}", field="p")
        for name in ("k", "test_size", "steps", "batch_size", "lora_rank", "diffpruning_steps", "kernel_examples"):
            if getattr(self, name) < 1:
                raise InputError(f"must be >= 1, got {getattr(self, name)}", field=name)
        for name in ("eval_every", "burn_in", "perturbations", "threads"):
            if getattr(self, name) < 0:
                raise InputError(f"must be >= 0, got {getattr(self, name)}", field=name)
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise InputError(f"need seeds >= 0, got {list(self.seeds)}", field="seeds")
        if not self.lrs or any(not lr > 0 for lr in self.lrs):
            raise InputError(f"every learning rate must be > 0, got {list(self.lrs)}", field="lrs")
        if not 0.0 < self.perturb_fraction < 1.0:
            raise InputError(f"must lie in (0, 1), got {self.perturb_fraction}", field="perturb_fraction")
        if self.perturb_seeds is not None and set(self.perturb_seeds) - set(self.seeds):
            raise InputError(f"{sorted(set(self.perturb_seeds) - set(self.seeds))} are not in --seeds",
                             field="perturb_seeds")
        if self.perturb_methods is not None and set(self.perturb_methods) - set(self.methods):
            raise InputError(f"{sorted(set(self.perturb_methods) - set(self.methods))} are not in --methods",
                             field="perturb_methods")
        if self.perturb_p is not None and set(self.perturb_p) - set(self.p):
            raise InputError(f"{sorted(set(self.perturb_p) - set(self.p))} are not in --p", field="perturb_p")
        if not self.kernel_ranks or min(self.kernel_ranks) < 1:
            raise InputError(f"need ranks >= 1, got {list(self.kernel_ranks)}", field="kernel_ranks")
        for name in ("sgd_lr", "diffpruning_lr", "lora_alpha"):
            if not getattr(self, name) > 0:
                raise InputError(f"must be > 0, got {getattr(self, name)}", field=name)
        if self.weight_decay < 0 or self.diffpruning_l0 < 0:
            raise InputError("weight_decay and diffpruning_l0 must be >= 0",
                             field="weight_decay" if self.weight_decay < 0 else "diffpruning_l0")


PRESETS = {
    # What one task costs on a shared 2-core CPU (benchmarks/bench_sparse.py; notes/issue-13.md has the arithmetic):
    # SmolLM2-135M, 3 seeds, 100 test examples, 16 AdamW steps of batch 8 at the authors' learning rate 1e-4
    # (their scripts/train.sh), validation every 8 steps; every family at p in {0.001, 0.01, 0.1} plus FullTuning
    # (p = 1); data-perturbation stability on seed 13 with two perturbed training sets for one family of each kind
    # (FullTuning, Random, BitFit, SAM, DiffPruning, LoRA; at p = 0.01); K-LoRA on every seed; kernel distance vs
    # rank on 16 examples, ranks 1-64, two LoRA seeds. About 81 fine-tuning units of ~1 min each plus ~13 min of
    # mask scores and kernels. LoRA (SGD) is left to the paper preset (K-LoRA's A-SignGD kernel pairs with AdamW).
    "quick": SparseConfig(model="smollm2", seeds=(13, 21, 42), test_size=100, lrs=(1e-4,), steps=16, batch_size=8,
                          eval_every=8, diffpruning_steps=8, perturbations=2, perturb_seeds=(13,), perturb_p=(0.01,),
                          perturb_methods=("full", "random", "bitfit", "sam", "diffpruning", "lora"),
                          methods=tuple(m for m in ALL_METHODS if m != "lora-sgd"), kernel_ranks=(1, 4, 16, 64),
                          kernel_examples=16, memory_budget_gb=6.0),
    "paper": SparseConfig(),
}

UNIT_VERSIONS = {"finetune": 1, "klora": 1, "kernel-rank": 1}


def _timer():
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------------
# The task: data, model, encoded sets
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class World:
    """Data, k-shot splits, the model at theta_0, prompt and label words, and the inputs every unit key shares.

    Attributes:
        cache_root: the unit cache's folder, passed to the units' workers (they load their own World).
        scores: the mask scores of the last training set a fine-tuning unit used, ``((seed, perturbation),
            _Scores)``: units of one training set share them; the next training set replaces them.
    """

    cfg: SparseConfig
    device: str
    progress: bool
    data: object
    splits: dict
    lm: object
    prompt: object
    label_tokens: object
    theta0: dict
    key_common: dict
    cache_root: str = ""
    encoded_sets: dict = dataclasses.field(default_factory=dict)
    scores: Optional[tuple] = None

    def classifier(self):
        """The prompt-based classifier at theta_0 (parameters restored; the LM object is shared)."""
        from real_tasks.classify import make_classifier
        from theory.finetune import restore

        restore(self.lm.model, self.theta0)
        return make_classifier(self.lm, use_prompt=True, label_tokens=self.label_tokens,
                               label_mode=self.cfg.label_mode).to(self.device)

    def encoded(self, name: str, examples):
        from real_tasks.classify import encode_set

        if name not in self.encoded_sets:
            self.encoded_sets[name] = encode_set(self.lm, list(examples), prompt=self.prompt,
                                                 label_tokens=self.label_tokens, label_mode=self.cfg.label_mode,
                                                 max_length=self.prompt.max_length)
        return self.encoded_sets[name]

    def test_set(self):
        return self.encoded("test", next(iter(self.splits.values())).test)

    def inputs(self, **settings) -> dict:
        return {**self.key_common, **settings}

    def train_dev(self, seed: int, perturbation: int):
        """The encoded training set of ``seed`` (perturbation ``perturbation``: see :func:`perturbed_train`) and its
        validation set."""
        split = self.splits[seed]
        keep = perturbed_train(len(split.train), self.cfg.perturb_fraction, seed, perturbation)
        train = self.encoded(f"train-{seed}-{perturbation}", [split.train[i] for i in keep])
        return train, self.encoded(f"dev-{seed}", split.dev)

    def scores_of(self, seed: int, perturbation: int, train) -> "_Scores":
        """The mask scores of one training set: kept while units of that set follow each other, then replaced
        (one set's scores are several copies of the model)."""
        if self.scores is None or self.scores[0] != (seed, perturbation):
            self.scores = ((seed, perturbation), _Scores(self, train, seed))
        return self.scores[1]


def load_world(cfg: SparseConfig, *, device: str, cache, progress: bool = False) -> World:
    """Data, k-shot splits and the model at theta_0 (a tiny model's vocabulary is drawn from the task's texts)."""
    from real_tasks.data import kshot_split, load_task, texts
    from real_tasks.models import load_model
    from real_tasks.prompts import PROMPTS, get_prompt, label_token_ids, words_of

    data = load_task(cfg.task, cfg.data_dir)
    splits = {s: kshot_split(data, cfg.k, s, max_test=cfg.test_size) for s in cfg.seeds}
    vocab = None
    if cfg.model.startswith("tiny-"):
        pool = [e for s in splits.values() for e in (*s.train, *s.dev, *s.test)]
        vocab = " ".join(texts(pool)).split() + words_of(PROMPTS.values())
    lm = load_model(cfg.model, device=device, cache=cache, vocab=vocab)
    if not lm.has_lm_head:
        raise InputError(f"{cfg.model} has no LM head: the prompt-based classifier needs one", field="model")
    prompt = get_prompt(data.spec.name)
    label_tokens = label_token_ids(lm.tokenizer, prompt, lm.kind)
    theta0 = {k: v.detach().to("cpu", copy=True) for k, v in lm.model.named_parameters()}
    test_index = list(next(iter(splits.values())).test_index)
    key_common = {"model": lm.fingerprint, "task": data.spec.name, "k": cfg.k, "data_files": data.files,
                  "test_index": stable_hash(test_index), "label_mode": cfg.label_mode,
                  "prompt": dataclasses.asdict(prompt), "device": device.split(":")[0]}
    return World(cfg, device, progress, data, splits, lm, prompt, label_tokens, theta0, key_common,
                 cache_root=str(cache.root) if cache is not None else "")


def _world(cfg: SparseConfig, ctx: RunContext) -> World:
    """The World of this process for ``cfg`` (loaded once; ``plan``, ``run`` and in-process units share it)."""
    return loaded_once(("sparse", config_hash(cfg), ctx.device, str(ctx.cache.root)),
                       lambda: load_world(cfg, device=ctx.device, cache=ctx.cache, progress=ctx.progress))


def perturbed_train(n: int, fraction: float, seed: int, index: int) -> list[int]:
    """Positions kept in perturbation ``index`` (>= 1) of a training set of n examples: all but round(fraction n)
    (at least one) drawn without replacement from a generator seeded with (seed, index). Index 0: all."""
    if index == 0:
        return list(range(n))
    drop = max(1, int(round(fraction * n)))
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, 1013]))
    removed = set(rng.choice(n, drop, replace=False).tolist())
    return [i for i in range(n) if i not in removed]


def _architecture(lm) -> dict:
    """peft targets by architecture: LoRA on the query/value projections, (IA)^3 on keys, values and the
    feed-forward output (peft's defaults for llama and BERT)."""
    names = {n.split(".")[-1] for n, _ in lm.model.named_modules()}
    if "q_proj" in names:
        return {"lora": ["q_proj", "v_proj"], "ia3": ["k_proj", "v_proj", "down_proj"], "ia3_ff": ["down_proj"]}
    if "query" in names:
        return {"lora": ["query", "value"], "ia3": ["key", "value", "output.dense"], "ia3_ff": ["output.dense"]}
    raise InputError(f"{lm.name}: no q_proj/query modules to put LoRA or (IA)^3 on", field="model")


# ---------------------------------------------------------------------------------------------------------------
# Families as methods
# ---------------------------------------------------------------------------------------------------------------

class _Scores:
    """Mask scores of one training set, computed once and shared by every p (gradients, Fisher, Gauss-Newton,
    DiffPruning's relaxed stage); dropped when the next training set starts."""

    def __init__(self, world: World, train, seed: int):
        self.world, self.train, self.seed, self.memo = world, train, seed, {}

    def get(self, what: str):
        if what not in self.memo:
            self.memo[what] = self._compute(what)
        return self.memo[what]

    def _compute(self, what: str):
        from theory import sparse as sp

        cfg, clf = self.world.cfg, self.world.classifier()
        steps = cfg.burn_in or math.ceil(len(self.train) / cfg.batch_size)
        if what == "gradient":
            g = sp.accumulated_gradients(clf, self.train, steps=steps, batch_size=cfg.batch_size, seed=self.seed,
                                         device=self.world.device)
            return {k: v.float() for k, v in g.items()}
        if what == "gauss-newton":
            return {k: v.float() for k, v in sp.gauss_newton_diagonal(clf, self.train, device=self.world.device).items()}
        if what == "fisher":
            return {k: v.float() for k, v in sp.fisher_diagonal(clf, self.train, device=self.world.device).items()}
        if what == "diffpruning":
            dp = sp.DiffPruning(steps=cfg.diffpruning_steps, batch_size=cfg.batch_size, lr=cfg.diffpruning_lr,
                                l0_weight=cfg.diffpruning_l0)
            return sp.diffpruning_relax(clf, self.train, dp, seed=self.seed, device=self.world.device)
        raise KeyError(what)


def family_masks(family: str, p: float, world: World, scores: _Scores, seed: int):
    """(masks, start) of a mask family at p; start is the DiffPruning projection (else None)."""
    from theory import sparse as sp

    theta0 = {"lm." + k: v for k, v in world.theta0.items()}
    if family == "random":
        return sp.random_masks(theta0, p, seed=seed), None
    if family == "magnitude":
        return sp.magnitude_masks(theta0, p), None
    if family == "bitfit":
        return sp.name_masks(theta0, world.cfg.bitfit_patterns), None
    if family == "sam":
        return sp.sam_masks(scores.get("gradient"), p), None
    if family == "sam-exact":
        return sp.sam_exact_masks(scores.get("gradient"), scores.get("gauss-newton"), p), None
    if family == "childpruning":
        return sp.childpruning_masks(scores.get("fisher"), p), None
    if family == "diffpruning":
        log_alpha, w, _ = scores.get("diffpruning")
        return sp.diffpruning_project(theta0, log_alpha, w, p)
    raise KeyError(family)


def family_method(cfg: SparseConfig, family: str, lr: float, masks=None, arch: dict | None = None):
    """The :class:`theory.finetune.Method` of a family at one learning rate (AdamW, linear decay, clipping, best
    validation checkpoint); LoRA (SGD) uses SGD at ``sgd_lr``."""
    from theory.finetune import Method, Optimizer, Params

    if family in ("lora", "lora-sgd"):
        from peft import LoraConfig

        params = Params.lora(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=arch["lora"],
                                        lora_dropout=0.0), scope="lm")
    elif family == "adapter":
        from peft import IA3Config

        params = Params(include=("*ia3_*",), adapter=IA3Config(target_modules=arch["ia3"],
                                                               feedforward_modules=arch["ia3_ff"]), adapter_scope="lm")
    elif masks is not None:
        params = Params(masks=masks)
    else:
        params = Params()
    if family == "lora-sgd":
        opt = Optimizer("sgd", lr=cfg.sgd_lr, schedule="linear")
    else:
        opt = Optimizer("adamw", lr=lr, weight_decay=cfg.weight_decay, schedule="linear")
    return Method(name=f"{NAMES.get(family, family)} lr={opt.lr:g}", optimizer=opt, steps=cfg.steps,
                  batch_size=cfg.batch_size, params=params, eval_every=cfg.eval_every,
                  max_grad_norm=cfg.max_grad_norm, loss="ce")


def _module_for(world: World, family: str, p: float):
    """The module to fine-tune: the classifier (a deep copy for peft families, which change the model's structure;
    wrapped in Mixout for MixOut)."""
    from theory import sparse as sp

    clf = world.classifier()
    if family in ("adapter", "lora", "lora-sgd"):
        return copy.deepcopy(clf)
    if family == "mixout":
        return sp.Mixout(clf, 1.0 - p)
    return clf


def _run_family(world: World, family: str, p: float, seed: int, train, dev, scores: _Scores) -> dict:
    import torch

    from theory.finetune import evaluate, finetune, restore, snapshot
    from theory.metrics import accuracy, predict

    cfg = world.cfg
    t_all = _timer()
    arch = _architecture(world.lm)
    t = _timer()
    masks, start = (family_masks(family, p, world, scores, seed) if family in SWEPT and family != "mixout"
                    or family == "bitfit" else (None, None))
    mask_seconds = t()
    if masks is not None and not any(bool(m.any()) for m in masks.values()):
        return {"family": family, "p": p, "seed": seed, "skipped": "the mask keeps no entry"}
    lrs = (cfg.sgd_lr,) if family == "lora-sgd" else cfg.lrs
    grid, best = [], None
    for lr in lrs:
        module = _module_for(world, family, p)
        if start is not None:
            with torch.no_grad():
                for n, prm in module.named_parameters():
                    prm.copy_(start[n].to(prm.device, prm.dtype))
        method = family_method(cfg, family, lr, masks, arch)
        tt = _timer()
        try:
            res = finetune(module, train, method, seed=seed, device=world.device, dev=dev, progress=world.progress,
                           desc=f"{family} p={p:g} s{seed} lr={lr:g}")
        except FloatingPointError as exc:
            grid.append({"lr": lr, "dev_acc": float("nan"), "error": str(exc), "seconds": tt()})
            continue
        entry = {"lr": lr, "dev_acc": res.best_dev_acc, "best_step": res.best_step, "seconds": tt(),
                 "final_train_loss": res.final_train_loss, "trainable_entries": res.trainable_entries}
        grid.append(entry)
        if best is None or res.best_dev_acc > best[0]["dev_acc"]:
            best = (entry, module, snapshot(module) if len(lrs) > 1 else None)
    if best is None:
        return {"family": family, "p": p, "seed": seed, "grid": grid, "accuracy": float("nan"),
                "error": "every learning rate diverged"}
    entry, module, state = best
    if state is not None:
        restore(module, state)
    scores_test = evaluate(module, world.test_set(), world.device)
    base_entries = sum(v.numel() for v in world.theta0.values())
    # the share of entries that move: Mixout moves all but keeps a share 1 - q = p of the deltas in each pass; peft
    # families count their added entries against the base model (p in the enlarged, equivalent model)
    p_eff = p if family == "mixout" else entry["trainable_entries"] / base_entries
    rec = {"family": family, "p": p, "seed": seed, "grid": grid, "lr": entry["lr"], "dev_acc": entry["dev_acc"],
           "accuracy": accuracy(scores_test, world.test_set().labels),
           "predictions": predict(scores_test).tolist(), "trainable_entries": entry["trainable_entries"],
           "p_effective": p_eff, "mask_seconds": mask_seconds,
           "seconds": t_all()}
    del module
    return rec


def _ft_settings(cfg: SparseConfig, family: str, p: float) -> dict:
    s = {"family": family, "p": p if family in SWEPT else None, "lrs": list(cfg.lrs), "steps": cfg.steps,
         "batch_size": cfg.batch_size, "eval_every": cfg.eval_every, "max_grad_norm": cfg.max_grad_norm,
         "weight_decay": cfg.weight_decay}
    if family in ("sam", "sam-exact"):
        s["burn_in"] = cfg.burn_in
    if family == "diffpruning":
        s["diffpruning"] = [cfg.diffpruning_steps, cfg.diffpruning_lr, cfg.diffpruning_l0]
    if family == "bitfit":
        s["patterns"] = list(cfg.bitfit_patterns)
    if family in ("lora", "lora-sgd"):
        s["lora"] = [cfg.lora_rank, cfg.lora_alpha]
    if family == "lora-sgd":
        s["lrs"] = [cfg.sgd_lr]
    return s


def finetune_spec(world: World, family: str, p: float, seed: int, perturbation: int) -> UnitSpec:
    """One family at one p on one training set of ``seed`` (``perturbation`` 0: the whole set), learning rates
    chosen on the validation set."""
    inputs = world.inputs(unit="finetune", seed=seed, perturbation=perturbation,
                          perturb_fraction=world.cfg.perturb_fraction if perturbation else None,
                          **_ft_settings(world.cfg, family, p))
    label = f"{NAMES[family]}" + (f" p={p:g}" if family in SWEPT else "") + f" seed {seed}" + (
        f" perturbed set {perturbation}" if perturbation else "")
    return _spec(world, "finetune", inputs, label, family=family, p=p, seed=seed, perturbation=perturbation)


def _finetune(world: World, family: str, p: float, seed: int, perturbation: int) -> dict:
    """The fine-tuning unit: its training set rebuilt from the config, mask scores shared with the units of the
    same set that this process computes next."""
    train, dev = world.train_dev(seed, perturbation)
    return _run_family(world, family, p, seed, train, dev, world.scores_of(seed, perturbation, train))


# ---------------------------------------------------------------------------------------------------------------
# LoRA's kernel
# ---------------------------------------------------------------------------------------------------------------

def _lora_f(module):
    from real_tasks.classify import functional_outputs

    return functional_outputs(module.eval(), trim=True)


def _ntk_options(cfg: SparseConfig) -> dict:
    import torch

    return {"memory_budget": None if cfg.memory_budget_gb is None else int(cfg.memory_budget_gb * 2 ** 30),
            "dtype": torch.float64, "device": None}


def klora_spec(world: World, seed: int) -> UnitSpec:
    """K-LoRA for one seed: the SGD and A-SignGD kernels of LoRA's parameters at the initialisation ``finetune``
    draws for this seed, over the seed's training set and the test set; kernel machines as in Malladi et al."""
    cfg = world.cfg
    inputs = world.inputs(unit="klora", seed=seed, lora=[cfg.lora_rank, cfg.lora_alpha])
    return _spec(world, "klora", inputs, f"K-LoRA seed {seed}", seed=seed)


def _klora(world: World, seed: int) -> dict:
    """The K-LoRA unit (see :func:`klora_spec`): test accuracy of each kernel machine and of zero-shot prompting."""
    import torch

    from real_tasks.entk import solve_seed
    from theory import sparse as sp
    from theory.metrics import accuracy
    from theory.ntk import empirical_ntks

    cfg = world.cfg
    t = _timer()
    split = world.splits[seed]
    union = world.encoded(f"klora-{seed}", list(split.train) + list(split.test))
    lora = sp.inject_lora(world.classifier(), cfg.lora_rank, cfg.lora_alpha, _architecture(world.lm)["lora"],
                          seed, scope="lm")
    params = {k: v.detach() for k, v in lora.named_parameters()}
    names = [n for n in params if "lora_" in n]
    res = empirical_ntks(_lora_f(lora), params, union.batch, kernels=("sgd", "asigngd"), params_subset=names,
                         **_ntk_options(cfg))
    n_tr = len(split.train)
    c = res["sgd"].kernel.shape[1]
    N = len(union)
    outputs = res["sgd"].outputs1.double().reshape(N, c).numpy()  # (N, C)
    labels = union.labels.numpy()
    out = solve_seed(res["sgd"].kernel.reshape(N * c, N * c).numpy(),
                     res["asigngd"].kernel.reshape(N * c, N * c).numpy(), outputs, labels,
                     list(range(n_tr)), list(range(n_tr, N)))
    test_labels = labels[n_tr:]
    del lora
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"seed": seed, "seconds": t(), "zero_shot": accuracy(outputs[n_tr:], test_labels),
            "accuracy": {KLORA_NAMES[k]: accuracy(v, test_labels) for k, v in out.items()},
            "plan": res["sgd"].plan.describe()}


def _kernel_positions(cfg: SparseConfig, labels: list[int]) -> list[int]:
    """The first ``kernel_examples // C`` training positions of each class (at least one each)."""
    per = max(1, cfg.kernel_examples // len(set(labels)))
    pos, seen = [], {}
    for i, y in enumerate(labels):
        if seen.get(y, 0) < per:
            pos.append(i)
            seen[y] = seen.get(y, 0) + 1
    return pos


def kernel_rank_spec(world: World) -> UnitSpec:
    """Kernel distance vs LoRA rank on a class-balanced part of the first seed's training set."""
    cfg = world.cfg
    seed = cfg.seeds[0]
    pos = _kernel_positions(cfg, [e.label for e in world.splits[seed].train])
    inputs = world.inputs(unit="kernel-rank", seed=seed, positions=pos, ranks=list(cfg.kernel_ranks),
                          lora_seeds=list(cfg.kernel_seeds), alpha=cfg.lora_alpha)
    return _spec(world, "kernel-rank", inputs, f"kernel distance vs LoRA rank, seed {seed}", seed=seed,
                 positions=pos)


def _kernel_rank(world: World, seed: int, positions: list[int]) -> dict:
    """The kernel-distance unit (see :func:`kernel_rank_spec`): one row per (rank, LoRA seed)."""
    from theory import sparse as sp

    cfg = world.cfg
    t = _timer()
    split = world.splits[seed]
    sub = world.encoded(f"kernel-rank-{seed}-{len(positions)}", [split.train[i] for i in positions])
    rows = sp.lora_rank_rows(_lora_f, world.classifier(), sub.batch, cfg.kernel_ranks, cfg.kernel_seeds,
                             _architecture(world.lm)["lora"], cfg.lora_alpha, scope="lm", **_ntk_options(cfg))
    return {"rows": [{**r, "n": len(positions)} for r in rows], "seconds": t()}


# ---------------------------------------------------------------------------------------------------------------
# Units as data: what an executor computes in other processes, and what ``run`` gathers
# ---------------------------------------------------------------------------------------------------------------

def _spec(world: World, kind: str, inputs: dict, label: str, **params) -> UnitSpec:
    """A unit of this run as data: its key, and :func:`compute_unit` with the config and the unit's parameters."""
    return UnitSpec(f"sparse.{kind}", UNIT_VERSIONS[kind], inputs, "real_tasks.sparse:compute_unit",
                    {"config": dataclasses.asdict(world.cfg), "device": world.device,
                     "cache_root": world.cache_root, "unit": kind, **params}, label=label)


def compute_unit(work, config: dict, device: str, cache_root: str, unit: str, **params):
    """Compute one unit (in this process or an executor's worker) from the config alone.

    The World is loaded once per process; a fine-tuning unit rebuilds its training set and recomputes the mask
    scores it needs from the config and the seed (same seed, same bytes), shared with the next units of that set.

    Args:
        work: the unit's work folder (unused: every sparse unit is a JSON record).
        config: ``dataclasses.asdict`` of the :class:`SparseConfig`.
        device: where the model runs (the planning process's device).
        cache_root: the unit cache's folder (a GGUF model's de-quantized copy is read from there).
        unit: ``finetune``, ``klora`` or ``kernel-rank``.
        **params: the unit's own parameters (see :func:`finetune_spec`, :func:`klora_spec`,
            :func:`kernel_rank_spec`).

    Returns:
        The unit's JSON record.
    """
    from ftsim.core.cache import UnitCache
    from ftsim.core.config import config_from_dict
    from ftsim.core.threads import threads_if

    cfg = config_from_dict(SparseConfig, config)
    world = loaded_once(("sparse", config_hash(cfg), device, str(cache_root)),
                        lambda: load_world(cfg, device=device, cache=UnitCache(cache_root)))
    # float32 reductions depend on the thread count: fixed, a unit is the same in every process
    with threads_if(cfg.threads):
        return _dispatch(world, unit, params)


def _dispatch(world: World, unit: str, params: dict):
    """The unit named ``unit`` with its parameters."""
    if unit == "finetune":
        return _finetune(world, **params)
    if unit == "klora":
        return _klora(world, params["seed"])
    if unit == "kernel-rank":
        return _kernel_rank(world, params["seed"], list(params["positions"]))
    raise ValueError(f"unknown sparse unit {unit!r}")


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------

def _jobs(cfg: SparseConfig) -> list[tuple[str, float]]:
    """(family, p) pairs: swept families at every p < 1 (p = 1 is FullTuning), the others once."""
    out = []
    methods = set(cfg.methods)
    for fam in FAMILIES + ("lora-sgd",):
        if fam not in methods:
            continue
        if fam in SWEPT:
            for p in cfg.p:
                if p >= 1.0 or (fam == "mixout" and p < 0.1):
                    continue
                out.append((fam, p))
        else:
            out.append((fam, 1.0))
    return out


def _perturbed(cfg: SparseConfig, family: str, p: float) -> bool:
    """Whether (family, p) gets perturbation runs."""
    if cfg.perturb_methods is not None and family not in cfg.perturb_methods:
        return False
    return not (family in SWEPT and cfg.perturb_p is not None and p not in cfg.perturb_p)


def _finetune_specs(world: World) -> list[UnitSpec]:
    """The fine-tuning units in run order: per seed and training set (the whole one, then the perturbed ones),
    every (family, p) -- so the units of one training set follow each other and share its mask scores."""
    cfg = world.cfg
    perturb_seeds = cfg.seeds if cfg.perturb_seeds is None else cfg.perturb_seeds
    jobs = _jobs(cfg)
    out = []
    for seed in cfg.seeds:
        for r in range(cfg.perturbations + 1 if seed in perturb_seeds else 1):
            out += [finetune_spec(world, fam, p, seed, r) for fam, p in jobs if not r or _perturbed(cfg, fam, p)]
    return out


def _specs(world: World) -> dict[str, list[UnitSpec]]:
    """Every unit of the run by kind (``finetune``, ``klora``, ``kernel-rank``): what ``plan`` hands to an
    executor and what ``run`` gathers, from one list."""
    cfg = world.cfg
    return {"finetune": _finetune_specs(world),
            "klora": [klora_spec(world, s) for s in cfg.seeds] if "k-lora" in cfg.methods else [],
            "kernel-rank": [kernel_rank_spec(world)] if "kernel-rank" in cfg.methods else []}


def plan(cfg: SparseConfig, ctx: RunContext) -> list[UnitSpec]:
    """Every unit of the run, as data, for an executor to compute before :func:`run` gathers them.

    Loads the data and the model once in this process (the keys name the model's fingerprint); ``run`` reuses them.

    Returns:
        The fine-tuning units (grouped by training set), then K-LoRA per seed, then the kernel-distance curve.
    """
    return [spec for specs in _specs(_world(cfg, ctx)).values() for spec in specs]


def run(cfg: SparseConfig, ctx: RunContext) -> dict:
    """Every unit (read from the cache when an executor or an earlier run computed it), then the tables."""
    from ftsim.core.threads import threads_if

    with threads_if(cfg.threads):
        return _run(cfg, ctx)


def _run(cfg: SparseConfig, ctx: RunContext) -> dict:
    import torch

    from ftsim.core.progress import bar

    t_total = _timer()
    world = _world(cfg, ctx)
    write_json(ctx.out_dir / "splits.json", {"data": world.data.describe(),
                                             "splits": [s.record() for s in world.splits.values()]})
    base = {"task": world.data.spec.name, "model": cfg.model, "k": cfg.k}
    skipped = [f"mixout at p={p:g}: the 1/p rescaling of the kept deltas (p < 0.1)" for p in cfg.p
               if "mixout" in cfg.methods and p < 0.1]
    specs = _specs(world)
    records = [{**ctx.unit_of(spec).result, "perturbation": spec.args["perturbation"]}
               for spec in bar(specs["finetune"], desc=f"sparse {world.data.spec.name}", disable=not ctx.progress)]
    world.scores = None  # the last training set's mask scores: several copies of the model
    klora = [ctx.unit_of(spec).result for spec in specs["klora"]]
    krank = next((ctx.unit_of(spec).result for spec in specs["kernel-rank"]), None)
    world.classifier()  # leave the shared model at theta_0
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return _tables(cfg, ctx, world, base, records, klora, krank, skipped, t_total())


def _rows(base: dict, records: list[dict], klora: list[dict]) -> list[dict]:
    rows = []
    for rec in records:
        if "accuracy" not in rec:
            continue
        fam = rec["family"]
        common = {**base, "seed": rec["seed"], "family": fam, "method": NAMES[fam], "p": rec["p"] if fam in SWEPT else
                  None, "p_effective": rec.get("p_effective"), "perturbation": rec["perturbation"], "lr": rec.get("lr")}
        rows.append({**common, "metric": "accuracy", "value": rec["accuracy"]})
        rows.append({**common, "metric": "dev_accuracy", "value": rec.get("dev_acc")})
    for k in klora:
        for method, acc in k["accuracy"].items():
            rows.append({**base, "seed": k["seed"], "family": "k-lora", "method": method, "p": None,
                         "p_effective": None, "perturbation": 0, "lr": None, "metric": "accuracy", "value": acc})
        rows.append({**base, "seed": k["seed"], "family": "zero-shot", "method": "zero-shot", "p": None,
                     "p_effective": 0.0, "perturbation": 0, "lr": None, "metric": "accuracy", "value": k["zero_shot"]})
    return rows


def stability_rows(base: dict, records: list[dict]) -> list[dict]:
    """Per (family, p, seed) with perturbation runs: the sample std of test accuracy over the perturbed training
    sets, the mean |accuracy change| and the mean share of test predictions that change against the unperturbed
    run."""
    groups: dict[tuple, dict[int, dict]] = {}
    for rec in records:
        if "accuracy" in rec:
            groups.setdefault((rec["family"], rec["p"], rec["seed"]), {})[rec["perturbation"]] = rec
    out = []
    for (fam, p, seed), runs in groups.items():
        if 0 not in runs or len(runs) < 2:
            continue
        ref = runs[0]
        pert = [runs[r] for r in sorted(runs) if r > 0]
        st = summarize(r["accuracy"] for r in pert)
        flips = [float(np.mean(np.asarray(r["predictions"]) != np.asarray(ref["predictions"]))) for r in pert]
        out.append({**base, "family": fam, "method": NAMES[fam], "p": p if fam in SWEPT else None, "seed": seed,
                    "p_effective": ref.get("p_effective"), "perturbations": len(pert), "accuracy_std": st.std,
                    "accuracy_change": float(np.mean([abs(r["accuracy"] - ref["accuracy"]) for r in pert])),
                    "prediction_flips": float(np.mean(flips))})
    return out


def _tables(cfg, ctx, world, base, records, klora, krank, skipped, seconds) -> dict:
    rows = _rows(base, records, klora)
    write_table(ctx.out_dir / "results", rows)
    main = [r for r in rows if r["perturbation"] == 0 and r["metric"] == "accuracy"]
    comp = aggregate(main, ("method", "p"))
    write_table(ctx.out_dir / "comparison", comp)
    stab = stability_rows(base, records)
    write_table(ctx.out_dir / "stability", stab)
    if krank is not None:
        write_table(ctx.out_dir / "kernel_rank", krank["rows"])
    write_table(ctx.out_dir / "klora", [{**base, "seed": k["seed"], "seconds": k["seconds"], **k["accuracy"],
                                          "zero_shot": k["zero_shot"]} for k in klora])
    atomic_write_text(ctx.out_dir / "comparison.md", comparison_markdown(comp, stab, base))
    order = {NAMES[f]: i for i, f in enumerate(FAMILIES + ("lora-sgd",))}
    best = sorted((r for r in comp if r["method"] in order), key=lambda r: -r["mean"])[:3]
    seconds_ft = sum(r.get("seconds", 0.0) for r in records)
    return {"headline": f"{base['task']} k={cfg.k} {cfg.model} ({len(cfg.seeds)} seeds, test accuracy %): best "
                        + ", ".join(f"{r['method']}" + (f" p={r['p']:g}" if r["p"] is not None else "")
                                    + f" {mean_std(r, 100, 1)}" for r in best),
            "units": len(records), "skipped": skipped + [f"{r['family']} p={r['p']} seed {r['seed']}: {r['skipped']}"
                                                          for r in records if "skipped" in r],
            "seconds": {"finetune": round(seconds_ft, 1),
                        "klora": round(sum(k["seconds"] for k in klora), 1),
                        "kernel_rank": None if krank is None else round(krank["seconds"], 1),
                        "this_invocation": round(seconds, 1)},
            "threads": __import__("torch").get_num_threads(), "cpu_count": os.cpu_count()}


def comparison_markdown(comp: list[dict], stab: list[dict], base: dict) -> str:
    """Accuracy per method and p (percent, mean (sample std) over seeds), the paper's averages beside, and the
    data-perturbation stability."""
    out = [f"Test accuracy %, {base['task']}, {base['model']}, k = {base['k']}, mean (sample std) over seeds:", "",
           markdown_table(["method", "p", "accuracy %", "seeds", "paper avg (RoBERTa-base, 7 tasks, 10 seeds)"],
                          [[r["method"], "" if r["p"] is None else f"{r['p']:g}", mean_std(r, 100, 1), r["n"],
                            _paper(r["method"])] for r in comp])]
    if stab:
        agg = {}
        for key in ("accuracy_std", "prediction_flips"):
            for r in aggregate(stab, ("method", "p"), key):
                agg.setdefault((r["method"], r["p"]), {})[key] = r
        out += ["", "Data-perturbation stability (10% of the training examples removed), mean over the seeds with "
                "perturbation runs:", "",
                markdown_table(["method", "p", "std of accuracy over perturbed sets (points)",
                                "share of test predictions that change", "seeds"],
                               [[m, "" if p is None else f"{p:g}", mean_std(v["accuracy_std"], 100, 1),
                                 mean_std(v["prediction_flips"], 1, 3), v["accuracy_std"]["n"]]
                                for (m, p), v in agg.items()])]
    return "\n".join(out) + "\n"


def _paper(method: str) -> str:
    key = method.split(" (")[0] if method.startswith("Adapter") else method
    if key in PAPER_AVERAGE:
        m, s = PAPER_AVERAGE[key]
        return f"{m:.2f} ± {s:.2f}"
    return ""


EXPERIMENT = Experiment(
    name="sparse",
    config_cls=SparseConfig,
    presets=PRESETS,
    run=run,
    plan=plan,
    figures=("figures.sparse:redraw",),
    verifier="sparse",
    reproduce=(),
    help=("Fu et al. 2023, 'On the Effectiveness of Parameter-Efficient Fine-Tuning': every sparse family (Random, "
          "MixOut, BitFit, MagPruning, SAM and its g^2/h variant, DiffPruning, ChildPruning, Adapter, LoRA) on a real "
          "LM at several p, with seed spread and data-perturbation stability; K-LoRA and LoRA's kernel vs rank "
          "(Malladi et al. 2023, Sec. 7).\n\nexample:\n"
          "  ftsim run sparse --preset quick --model smollm2 --task SST-2 --k 16 --p 0.001,0.01,0.1,1"),
)
