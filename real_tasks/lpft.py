"""``ftsim run lpft``: LP, FT, LP-FT, LoRA-FT and LP-LoRA-FT on a real LM, in and out of distribution
(Tomihari & Sato 2024; Kumar et al. 2022).

The classifier is :class:`real_tasks.models.LinearHeadClassifier`: a linear head ``V phi(x) + b`` on the pooled
representation phi(x) (the last token's final hidden state for causal LMs), no prompt -- the authors' setting
(``RobertaForSequenceClassification`` / ``GPT2ForSequenceClassification`` heads). For one ID task (e.g. SST-2), an OOD
task with the same label space (e.g. CR) and several seeds:

* **LP**: a multinomial logistic regression on the frozen features, L2 strength by cross-validation
  (:func:`theory.lpft.fit_linear_probe`, the authors' ``LogisticRegressionCV``). The features phi_0(x) of every
  example set (each seed's training and validation sets, the ID and OOD test sets) and each seed's probe are
  computed once and stored as units of the shared cache.
* **FT** (head N(0, 0.02^2), as a new classifier layer), **LP-FT** (head = the probe), **LoRA-FT** and
  **LP-LoRA-FT** (peft LoRA on the attention and MLP projections, the head trainable): values of
  :func:`theory.lpft.method_values` run by :func:`theory.finetune.finetune`; one unit per seed and method.

Every unit is planned as data (:func:`plan`), so an executor (``--executor local|submitit``) computes them in other
processes before :func:`run` gathers them; a unit that needs another (fine-tuning needs the features and the probe)
reads it from the cache, computing it there if no one did.

Per method and seed: ID and OOD accuracy; ECE (15 equal-width bins, top label) and NLL before and after temperature
scaling fitted on the validation set; the head norm over training; the feature change ||phi_FT(x) - phi_0(x)|| on
the ID and OOD test sets; the head and backbone (or LoRA) parts of the eNTK at the start of FT on
``kernel_examples`` training examples (their traces and shares; head part in closed form from the cached features,
backbone part by the engine with ``params_subset``); and the LP head-norm curves under CE and MSE on the cached
features. Tables: ``results.jsonl`` (tidy: seed, method, metric, value), ``head_norm_history``, ``reliability``,
``head_norm_curves``, ``comparison.md``; the runner draws ``lpft.pdf/png`` (figures/lpft.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Literal, Optional

import numpy as np

from ftsim.core.cache import UnitCache
from ftsim.core.config import config_hash
from ftsim.core.errors import InputError
from ftsim.core.experiment import Experiment, RunContext, UnitSpec, loaded_once
from ftsim.core.io import atomic_write_text, stable_hash, write_json, write_table
from ftsim.core.tables import aggregate, markdown_table, mean_std
from ftsim.core.threads import threads_if

__all__ = ["LPFTConfig", "PRESETS", "EXPERIMENT", "run", "plan", "compute_unit", "UNIT_VERSIONS",
           "comparison_markdown"]

METHODS = ("LP", "FT", "LP-FT", "LoRA-FT", "LP-LoRA-FT")
# Bump a kind's version when its computation changes (old units are then never read). finetune 3: the LoRA adapter
# of the eNTK parts at the start of FT is drawn from the RNG seeded as FT seeds it (version 2 drew it from the
# process's global RNG, so a unit depended on what its process had run before), and an LP method's key names its
# probe by the probe unit instead of the probe's weights (unknown when the run is planned).
UNIT_VERSIONS = {"features": 1, "probe": 1, "finetune": 3}
# The probe's fit (theory.lpft.fit_linear_probe: the authors' LogisticRegressionCV), part of the probe unit's key.
PROBE_FIT = {"Cs": 10, "folds": 5, "max_iter": 5000}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",  # llama
                "query", "key", "value", "dense")  # BERT


def _f(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class LPFTConfig:
    """Settings of one ``lpft`` run. Defaults are the paper preset's (the authors' scripts: full training sets,
    10 epochs, AdamW, FT lr 1e-5 batch 32, LP-FT lr 1e-5 batch 8, LoRA lr 5e-4 batch 32, LP-LoRA lr 1e-3 batch 8,
    r = alpha = 8); ``quick`` shrinks what a 2-core CPU affords."""

    model: str = _f("smollm2", "smollm2 | tiny-causal | tiny-encoder | minilm | GGUF path | local dir")
    task: str = _f("SST-2", "in-distribution task")
    ood_task: str = _f("CR", "out-of-distribution task with the same label space")
    k: Optional[int] = _f(None, "training (and validation) examples per class (None: the full training pool, "
                                "less val_size held out for validation)")
    val_size: int = _f(500, "validation examples held out of the pool when k is None")
    seeds: tuple[int, ...] = _f((13, 21, 42), "seeds (k-shot draw, head init, mini-batch order, CV folds)")
    data_dir: Optional[str] = _f(None, "data folder (default $FTSIM_DATA or ../shared/data/text_classification)")
    test_size: int = _f(1000, "ID test examples (seeded cap)")
    ood_test_size: int = _f(1000, "OOD test examples (seeded cap)")
    methods: tuple[str, ...] = _f(METHODS, "subset of " + ",".join(METHODS))
    epochs: float = _f(10.0, "fine-tuning epochs over the training set (steps = ceil(epochs * N / batch))")
    max_steps: Optional[int] = _f(None, "cap on fine-tuning steps (None: none)")
    optimizer: Literal["adamw", "adam", "sgd"] = _f("adamw", "optimizer (Hugging Face Trainer: AdamW)")
    ft_lr: float = _f(1e-5, "learning rate of FT")
    ft_batch: int = _f(32, "batch of FT")
    lpft_lr: float = _f(1e-5, "learning rate of LP-FT")
    lpft_batch: int = _f(8, "batch of LP-FT")
    lora_lr: float = _f(5e-4, "learning rate of LoRA-FT")
    lora_batch: int = _f(32, "batch of LoRA-FT")
    lplora_lr: float = _f(1e-3, "learning rate of LP-LoRA-FT")
    lplora_batch: int = _f(8, "batch of LP-LoRA-FT")
    lora_rank: int = _f(8, "LoRA rank r")
    lora_alpha: int = _f(8, "LoRA alpha")
    schedule: Literal["linear", "constant", "cosine"] = _f("linear", "learning-rate schedule (Trainer: linear)")
    max_grad_norm: Optional[float] = _f(1.0, "gradient-norm clipping (Trainer default)")
    head_std: float = _f(0.02, "std of the new head of FT / LoRA-FT")
    max_length: int = _f(128, "tokens per example (the authors' max_seq_length)")
    kernel_examples: int = _f(8, "training examples of the eNTK parts at the start of FT (0: skip)")
    ntk_implementation: Literal["auto", "jacobian", "streaming", "factored"] = _f("auto", "eNTK engine algorithm")
    lp_curve_steps: int = _f(2000, "GD steps of the LP head-norm curves (CE vs MSE) on the cached features")
    threads: int = _f(0, "torch CPU threads (0: torch's default)")

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise InputError(f"unknown {sorted(unknown)}; choose from {', '.join(METHODS)}", field="methods")
        if not self.seeds:
            raise InputError("at least one seed", field="seeds")
        if self.k is not None and self.k < 2:
            raise InputError(f"must be >= 2 (cross-validated LP) or None, got {self.k}", field="k")
        for name in ("test_size", "ood_test_size", "ft_batch", "lpft_batch", "lora_batch", "lplora_batch",
                     "lora_rank", "lora_alpha", "max_length", "val_size", "lp_curve_steps"):
            if getattr(self, name) < 1:
                raise InputError(f"must be >= 1, got {getattr(self, name)}", field=name)
        for name in ("ft_lr", "lpft_lr", "lora_lr", "lplora_lr", "epochs", "head_std"):
            if not getattr(self, name) > 0:
                raise InputError(f"must be > 0, got {getattr(self, name)}", field=name)
        if self.max_steps is not None and self.max_steps < 1:
            raise InputError(f"must be >= 1 or None, got {self.max_steps}", field="max_steps")
        for name in ("kernel_examples", "threads"):
            if getattr(self, name) < 0:
                raise InputError(f"must be >= 0, got {getattr(self, name)}", field=name)


PRESETS = {
    # quick: one ID/OOD pair, every method, 3 seeds on a 2-core CPU in about an hour for SmolLM2 (notes/issue-12.md
    # has the per-part times): 16 training examples per class (and 16 for validation and temperature scaling), 100
    # ID and 100 OOD test examples, 2 epochs at batch 8 (8 steps per method), eNTK parts on 4 examples, 48 tokens.
    # The budget is ~1/1000 of the authors' steps, so the learning rates are 10x theirs for full FT and LP-FT
    # (1e-4) and 1e-3 for both LoRA methods (Adam moves a weight by ~lr per step: at 1e-5, 8 steps move the new
    # N(0, 0.02^2) head by 4e-3 of its scale, and FT stayed at chance on MiniLM, 48.7%).
    "quick": LPFTConfig(k=16, test_size=100, ood_test_size=100, epochs=2.0, ft_lr=1e-4, lpft_lr=1e-4, ft_batch=8,
                        lora_batch=8, lora_lr=1e-3, lplora_lr=1e-3, kernel_examples=4, max_length=48,
                        lp_curve_steps=2000),
    "paper": LPFTConfig(),
}


# ---------------------------------------------------------------------------------------------------------------
# Data, model and the units of the run
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Setup:
    """A loaded run: the example sets, the model at theta_0 and what every unit's key depends on (``key``).

    Attributes:
        sets: name -> list[Example]; names ``train-<seed>``, ``val-<seed>``, ``test``, ``ood``.
        records: what ``splits.json`` holds (the data files and each seed's split).
        cache_root: the unit cache the run's units (and their dependencies) live in.
    """

    cfg: LPFTConfig
    lm: object
    sets: dict
    records: dict
    key: dict
    theta0: dict
    device: str
    progress: bool
    cache_root: str
    encoded: dict = dataclasses.field(default_factory=dict)
    hashes: dict = dataclasses.field(default_factory=dict)

    def encode(self, name: str):
        from real_tasks.classify import encode_set

        if name not in self.encoded:
            self.encoded[name] = encode_set(self.lm, self.sets[name], prompt=None, max_length=self.cfg.max_length)
        return self.encoded[name]

    def set_hash(self, name: str) -> str:
        """Content hash of the example set ``name`` (its texts and labels), computed once."""
        if name not in self.hashes:
            self.hashes[name] = stable_hash([(e.text_a, e.text_b, e.label) for e in self.sets[name]])
        return self.hashes[name]

    def labels(self, name: str) -> np.ndarray:
        return np.array([e.label for e in self.sets[name]])

    def classifier(self, head_seed: int = 0):
        """The linear-head classifier of the model at theta_0 (weights restored, head N(0, 0.02^2) from the seed)."""
        from real_tasks.classify import make_classifier
        from theory.finetune import restore

        restore(self.lm.model, self.theta0)
        return make_classifier(self.lm, use_prompt=False, num_classes=2, head_seed=head_seed).to(self.device)


def _splits(cfg: LPFTConfig) -> tuple[dict, dict]:
    from real_tasks.data import cap_test, kshot_split, load_task

    data = load_task(cfg.task, cfg.data_dir)
    ood = load_task(cfg.ood_task, cfg.data_dir)
    if data.spec.num_labels != ood.spec.num_labels or data.spec.num_labels != 2:
        raise InputError(f"{cfg.task} has {data.spec.num_labels} labels, {cfg.ood_task} {ood.spec.num_labels}; the "
                         "pair needs one binary label space", field="ood_task")
    sets: dict = {"test": [data.test[i] for i in cap_test(len(data.test), cfg.test_size, 0)],
                  "ood": [ood.test[i] for i in cap_test(len(ood.test), cfg.ood_test_size, 0)]}
    records = {"id": data.describe(), "ood": ood.describe(), "splits": {}}
    for seed in cfg.seeds:
        if cfg.k is not None:
            sp = kshot_split(data, cfg.k, seed, max_test=cfg.test_size)
            sets[f"train-{seed}"], sets[f"val-{seed}"] = list(sp.train), list(sp.dev)
            records["splits"][seed] = {"train_index": list(sp.train_index), "val_index": list(sp.dev_index)}
        else:
            perm = np.random.RandomState(seed).permutation(len(data.train))
            val, tr = perm[:cfg.val_size], perm[cfg.val_size:]
            sets[f"train-{seed}"] = [data.train[i] for i in tr]
            sets[f"val-{seed}"] = [data.train[i] for i in val]
            records["splits"][seed] = {"val_index": sorted(int(i) for i in val)}
    return sets, {**records, "files": {**data.files, **ood.files}}


def load_setup(cfg: LPFTConfig, *, device: str, cache: UnitCache, progress: bool = False) -> Setup:
    """The example sets of ``cfg`` and its model at theta_0 (a function of the config alone: same seed, same sets
    and weights in any process)."""
    from real_tasks.data import texts
    from real_tasks.models import load_model

    sets, records = _splits(cfg)
    vocab = " ".join(texts([e for v in sets.values() for e in v])).split() if cfg.model.startswith("tiny-") else None
    lm = load_model(cfg.model, device=device, cache=cache, vocab=vocab)
    key = {"model": lm.fingerprint, "task": cfg.task, "ood_task": cfg.ood_task, "files": records["files"],
           "max_length": cfg.max_length}
    theta0 = {k: v.detach().to("cpu", copy=True) for k, v in lm.model.named_parameters()}
    return Setup(cfg, lm, sets, records, key, theta0, device, progress, str(cache.root))


def _setup(cfg: LPFTConfig, device: str, cache: UnitCache, progress: bool = False) -> Setup:
    # keyed by the cache too: a Setup names the cache its units' dependencies are read from
    return loaded_once(("lpft", config_hash(cfg), device, str(cache.root)),
                       lambda: load_setup(cfg, device=device, cache=cache, progress=progress))


def _spec(setup: Setup, kind: str, inputs: dict, label: str, needs: tuple[UnitSpec, ...] = (), **params
          ) -> UnitSpec:
    """A unit of this run as data: its key, :func:`compute_unit` with the config and the unit's parameters, and
    the units it reads (``needs``)."""
    return UnitSpec(f"lpft.{kind}", UNIT_VERSIONS[kind], inputs, "real_tasks.lpft:compute_unit",
                    {"config": dataclasses.asdict(setup.cfg), "device": setup.device, "cache_root": setup.cache_root,
                     "unit": kind, **params}, label=label, needs=tuple(n.key.digest for n in needs))


def features_spec(setup: Setup, name: str) -> UnitSpec:
    """phi_0(x) of the example set ``name`` (array ``phi``, (N, H)), keyed by the model and the set's examples."""
    import torch

    inputs = {**setup.key, "unit": "features", "set": setup.set_hash(name), "n": len(setup.sets[name]),
              "device": torch.device(setup.device).type}
    return _spec(setup, "features", inputs, f"features {name}", name=name)


def probe_spec(setup: Setup, seed: int) -> UnitSpec:
    """The linear probe of ``seed`` (arrays ``weight`` (2, H) and ``bias`` (2,)), keyed by the features unit of its
    training set (which names the model and the examples, labels included) and the fit's settings."""
    features = features_spec(setup, f"train-{seed}")
    inputs = {"unit": "probe", "features": features.key.digest, "seed": seed, "num_classes": 2, "fit": PROBE_FIT}
    return _spec(setup, "probe", inputs, f"linear probe seed {seed}", needs=(features,), seed=seed)


def finetune_spec(setup: Setup, seed: int, name: str) -> UnitSpec:
    """One fine-tuning method on one seed (see :func:`_finetune`)."""
    import torch

    cfg = setup.cfg
    method = methods_for(cfg, len(setup.sets[f"train-{seed}"]), _probe_stand_in(), seed)[name]
    inputs = {**setup.key, "unit": "finetune", "seed": seed, "method": _method_key(setup, seed, method),
              "train": setup.set_hash(f"train-{seed}"), "val": setup.set_hash(f"val-{seed}"),
              "test": setup.set_hash("test"), "ood": setup.set_hash("ood"), "kernel_examples": cfg.kernel_examples,
              "ntk": cfg.ntk_implementation, "device": torch.device(setup.device).type}
    needs = tuple(features_spec(setup, n) for n in (f"train-{seed}", "test", "ood"))
    needs += (probe_spec(setup, seed),) if name.startswith("LP-") else ()
    return _spec(setup, "finetune", inputs, f"{name} seed {seed}", needs=needs, seed=seed, method=name)


def _method_key(setup: Setup, seed: int, method) -> dict:
    """The method's description for a key; a head started at the probe is named by the probe's unit, as its
    weights are known only once that unit ran."""
    d = method.describe()
    if d["head"]["init"] == "given":
        d["head"]["weights"] = {"probe": probe_spec(setup, seed).key.digest}
    return d


def _probe_stand_in():
    """A probe in place of the fitted one where only the method's description is needed (see :func:`_method_key`)."""
    from theory.lpft import Probe

    return Probe(np.zeros((2, 1)), np.zeros(2), 1.0, 2)


def read_probe(unit):
    """The :class:`theory.lpft.Probe` stored by a probe unit."""
    from theory.lpft import Probe

    return Probe(unit.array("weight"), unit.array("bias"), float(unit.result["C"]), int(unit.result["folds"]))


def _needs_probe(cfg: LPFTConfig) -> bool:
    return bool({"LP", "LP-FT", "LP-LoRA-FT"} & set(cfg.methods))


def _ft_methods(cfg: LPFTConfig) -> list[str]:
    return [m for m in METHODS[1:] if m in cfg.methods]


def plan(cfg: LPFTConfig, ctx: RunContext) -> list[UnitSpec]:
    """Every unit of the run as data, dependencies first: the features of every example set, each seed's probe,
    then one fine-tuning unit per seed and method (loads the data and the model once, for the keys; computes
    nothing). A unit whose dependency is not there yet computes it through the cache (:func:`_needed`)."""
    setup = _setup(cfg, ctx.device, ctx.cache, ctx.progress)
    specs = [features_spec(setup, name) for name in setup.sets]
    specs += [probe_spec(setup, s) for s in cfg.seeds] if _needs_probe(cfg) else []
    specs += [finetune_spec(setup, s, m) for s in cfg.seeds for m in _ft_methods(cfg)]
    return list({s.key.digest: s for s in specs}.values())  # two sets with the same examples share a unit


def compute_unit(work, config: dict, device: str, cache_root: str, unit: str, **params):
    """Compute one unit (in this process or an executor's worker) from the config alone: the data and the model
    are loaded once per process, the thread count fixed when ``threads`` > 0 (float32 reductions depend on it)."""
    from ftsim.core.config import config_from_dict

    cfg = config_from_dict(LPFTConfig, config)
    setup = _setup(cfg, device, UnitCache(cache_root))
    with threads_if(cfg.threads):
        return _dispatch(setup, work, unit, params)


def _dispatch(setup: Setup, work, unit: str, params: dict):
    if unit == "features":
        return _features(setup, work, params["name"])
    if unit == "probe":
        return _probe(setup, work, params["seed"])
    if unit == "finetune":
        return _finetune(setup, params["seed"], params["method"])
    raise ValueError(f"unknown lpft unit {unit!r}")


def pooled_and_logits(module, data, device, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """phi(x) (N, H) and logits (N, C) of a :class:`LinearHeadClassifier` in one pass (eval mode), float64."""
    import torch

    from real_tasks.models import batch_to

    was = module.training
    module.eval()
    phi = logits = None
    with torch.no_grad():
        for idx, batch in data.batches(batch_size):
            p = module.pooled(batch_to(batch, device))
            z = module.head(p)
            if phi is None:
                phi, logits = np.empty((len(data), p.shape[1])), np.empty((len(data), z.shape[1]))
            phi[idx.numpy()] = p.double().cpu().numpy()
            logits[idx.numpy()] = z.double().cpu().numpy()
    module.train(was)
    return phi, logits


def _features(setup: Setup, work, name: str) -> dict:
    t0 = time.perf_counter()
    phi, _ = pooled_and_logits(setup.classifier(), setup.encode(name), setup.device)
    work.save_array("phi", phi)
    return {"seconds": time.perf_counter() - t0, "n": len(phi)}


def _probe(setup: Setup, work, seed: int) -> dict:
    from theory.lpft import fit_linear_probe

    t0 = time.perf_counter()
    phi = features_spec(setup, f"train-{seed}").fetch(setup.cache_root).array("phi")
    probe = fit_linear_probe(phi, setup.labels(f"train-{seed}"), 2, seed=seed, **PROBE_FIT)
    work.save_array("weight", probe.weight)
    work.save_array("bias", probe.bias)
    return {"C": probe.C, "folds": probe.folds, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------------------------

def _steps(cfg: LPFTConfig, n: int, batch: int) -> int:
    steps = int(np.ceil(cfg.epochs * n / batch))
    return max(1, min(steps, cfg.max_steps) if cfg.max_steps else steps)


def methods_for(cfg: LPFTConfig, n_train: int, probe, seed: int) -> dict:
    """The four fine-tuning methods of :func:`theory.lpft.method_values` with the config's per-method learning
    rates and batches (as the authors' scripts: LP-FT and LP-LoRA-FT have their own)."""
    import dataclasses as dc

    from peft import LoraConfig

    from theory.finetune import Optimizer
    from theory.lpft import method_values

    def opt(lr):
        return Optimizer(cfg.optimizer, lr=lr, weight_decay=0.0, schedule=cfg.schedule)

    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=list(LORA_TARGETS))
    base = method_values(ft=opt(cfg.ft_lr), lora_ft=opt(cfg.lora_lr), steps=1, batch_size=1, probe=probe,
                         lora_config=lora, backbone="lm", head="head", random_head_seed=seed,
                         random_head_std=cfg.head_std, max_grad_norm=cfg.max_grad_norm)
    per = {"FT": (cfg.ft_lr, cfg.ft_batch), "LP-FT": (cfg.lpft_lr, cfg.lpft_batch),
           "LoRA-FT": (cfg.lora_lr, cfg.lora_batch), "LP-LoRA-FT": (cfg.lplora_lr, cfg.lplora_batch)}
    return {name: dc.replace(m, optimizer=opt(per[name][0]), batch_size=per[name][1],
                             steps=_steps(cfg, n_train, per[name][1]))
            for name, m in base.items() if name in cfg.methods}


def _backbone_kernel_shares(module, data, n: int, lora: bool, phi0: np.ndarray, implementation: str) -> dict:
    """eNTK parts at the start of FT on the first ``n`` examples of ``data``: the head part in closed form from the
    cached features (exactly what the engine returns, :func:`theory.lpft.head_kernel`), the backbone (or LoRA)
    part by the engine with ``params_subset``."""
    import torch
    from torch.func import functional_call

    from real_tasks.models import trim_batch
    from theory.lpft import head_kernel, kernel_shares
    from theory.ntk import empirical_ntk

    module.eval()
    batch = {k: v[:n] for k, v in data.select(torch.arange(n)).items()}
    params = {k: v.detach() for k, v in module.named_parameters()}

    def f(p, b):
        if not torch._C._functorch.is_batchedtensor(b["attention_mask"]):
            b = trim_batch(b)
        return functional_call(module, p, (b,))

    t0 = time.perf_counter()
    pred = (lambda name: "lora_" in name) if lora else (lambda name: name.startswith("lm."))
    kb = empirical_ntk(f, params, batch, params_subset=pred, implementation=implementation).kernel
    kh = head_kernel(torch.as_tensor(phi0[:n]), num_classes=kb.shape[1])
    return {**{f"kernel_{k}": v for k, v in kernel_shares(kh, kb).items()}, "kernel_seconds": time.perf_counter() - t0}


def _finetune(setup: Setup, seed: int, name: str) -> dict:
    """One method on one seed: kernel parts at the start, fine-tuning with the head norm recorded, then the metrics
    of :func:`_evaluate`. The features (and the probe) come from their units."""
    t0 = time.perf_counter()
    setup.lm.model = _strip_adapters(setup.lm.model)  # left by a unit that failed earlier in this process
    phi0 = {n: features_spec(setup, n).fetch(setup.cache_root).array("phi") for n in (f"train-{seed}", "test", "ood")}
    probe = read_probe(probe_spec(setup, seed).fetch(setup.cache_root)) if name.startswith("LP-") else None
    method = methods_for(setup.cfg, len(setup.sets[f"train-{seed}"]), probe, seed)[name]
    out = _start(setup, seed, name, method, phi0[f"train-{seed}"])
    rec = _train_and_evaluate(setup, seed, name, method, phi0, out)
    rec["metrics"]["seconds"] = time.perf_counter() - t0
    return rec


@contextlib.contextmanager
def _seeded(seed: int, device: str):
    """The global torch RNG seeded from ``seed`` for a block, as :func:`theory.finetune.finetune` seeds it, without
    disturbing the caller's."""
    import torch

    cuda = torch.device(device).type == "cuda"
    with torch.random.fork_rng(devices=[torch.device(device)] if cuda else [], device_type="cuda"):
        torch.manual_seed(seed)
        yield


def _start(setup: Setup, seed: int, name: str, method, phi0_train: np.ndarray) -> dict:
    """The head norm and the eNTK parts at the start of FT. The adapter (LoRA's A) is drawn as fine-tuning draws
    it (the RNG seeded from ``seed``): the kernel is the one FT starts from, and the unit a function of its key."""
    from theory.finetune import prepare
    from theory.lpft import head_norm

    cfg = setup.cfg
    start = setup.classifier(head_seed=seed)
    with _seeded(seed, setup.device):
        prepare(start, method)  # the method's start: its head (random or the probe) and adapter
    out: dict = {"head_norm_start": head_norm(start.head.weight)}
    if cfg.kernel_examples:
        train = setup.encode(f"train-{seed}")
        out.update(_backbone_kernel_shares(start, train, min(cfg.kernel_examples, len(train)), "LoRA" in name,
                                           phi0_train, cfg.ntk_implementation))
    del start
    setup.lm.model = _strip_adapters(setup.lm.model)
    return out


def _train_and_evaluate(setup: Setup, seed: int, name: str, method, phi0: dict, out: dict) -> dict:
    """Fine-tune from theta_0 with the head norm recorded at every step; ``out`` gets the metrics."""
    from theory.finetune import finetune
    from theory.lpft import head_norm

    module = setup.classifier(head_seed=seed)

    def on_step(step, mod):
        return {"head_norm": head_norm(mod.head.weight)}

    t1 = time.perf_counter()
    res = finetune(module, setup.encode(f"train-{seed}"), method, seed=seed, device=setup.device,
                   progress=setup.progress, desc=f"{name} s{seed}", on_step=on_step)
    ft_seconds = time.perf_counter() - t1
    norms = [{"step": 0, "head_norm": out["head_norm_start"], "train_loss": None}] + \
        [{"step": h["step"], "head_norm": h["head_norm"], "train_loss": h["train_loss"]} for h in res.history]
    t2 = time.perf_counter()
    logits, phis = {}, {}
    for split in ("val", "test", "ood"):
        key = f"val-{seed}" if split == "val" else split
        phis[split], logits[split] = pooled_and_logits(module, setup.encode(key), setup.device)
    out.update(_evaluate(setup, seed, logits, phis, phi0))
    out.update(head_norm_end=head_norm(module.head.weight), train_loss_final=res.final_train_loss,
               trainable_entries=res.trainable_entries, steps=method.steps, ft_seconds=ft_seconds,
               eval_seconds=time.perf_counter() - t2)
    setup.lm.model = _strip_adapters(module.lm)
    return {"metrics": out, "history": norms, "test_logits": logits["test"].tolist()}


def _strip_adapters(model):
    """Remove injected LoRA layers (peft's ``inject_adapter_in_model`` changes the module in place), so the next
    method starts from the plain model; the base weights are restored from theta_0 by :meth:`Setup.classifier`."""
    if not any("lora_" in n for n, _ in model.named_parameters()):
        return model
    from peft.tuners.lora import LoraLayer

    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoraLayer) and hasattr(mod, "get_base_layer"):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, mod.get_base_layer())
    if any("lora_" in n for n, _ in model.named_parameters()):
        raise RuntimeError("LoRA layers left after stripping the adapters")
    return model


def _evaluate(setup: Setup, seed: int, logits: dict, phis: dict, phi0: dict) -> dict:
    from theory.lpft import calibration_report, expected_calibration_error, feature_change, softmax
    from theory.metrics import accuracy

    y = {s: np.array([e.label for e in setup.sets[f"val-{seed}" if s == "val" else s]]) for s in ("val", "test", "ood")}
    rep = calibration_report(logits["val"], y["val"], logits["test"], y["test"])
    out = {"id_acc": rep["accuracy"], "ece": rep["ece"], "ece_ts": rep["ece_ts"], "nll": rep["nll"],
           "nll_ts": rep["nll_ts"], "temperature": rep["temperature"], "ood_acc": accuracy(logits["ood"], y["ood"]),
           "ood_ece": expected_calibration_error(softmax(logits["ood"]), y["ood"]),
           "ood_ece_ts": expected_calibration_error(softmax(logits["ood"] / rep["temperature"]), y["ood"])}
    if phis is not None:
        for s in ("test", "ood"):
            fc = feature_change(phis[s], phi0[s])
            out[f"feature_change_{s}"], out[f"feature_change_rel_{s}"] = fc["feature_change"], fc["feature_change_rel"]
    return out


def _reliability(setup: Setup, seed: int, method: str, test_logits, temperature: float) -> list[dict]:
    from theory.lpft import reliability_bins, softmax

    y = np.array([e.label for e in setup.sets["test"]])
    z = np.asarray(test_logits, float)
    return [{"seed": seed, "method": method, "calibration": cal, **b}
            for cal, T in (("before TS", 1.0), ("after TS", temperature)) for b in reliability_bins(softmax(z / T), y)]



# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------

def run(cfg: LPFTConfig, ctx: RunContext) -> dict:
    """Every unit of :func:`plan` (read from the cache when an executor or an earlier run computed it), then the
    tables and the summary."""
    with threads_if(cfg.threads):
        return _run(cfg, ctx)


def _lp(setup: Setup, seed: int, probe, phi0: dict, base: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """LP's rows and reliability bins (when LP is one of the methods) and the LP head-norm curves (CE vs MSE)."""
    from theory.lpft import head_norm, least_squares_head, probe_gradient_descent

    cfg, rows, reliability, curves = setup.cfg, [], [], []
    train = phi0[f"train-{seed}"]
    if "LP" in cfg.methods:
        lp_logits = {"val": probe.logits(phi0[f"val-{seed}"]), "test": probe.logits(phi0["test"]),
                     "ood": probe.logits(phi0["ood"])}
        m = _evaluate(setup, seed, lp_logits, None, phi0)
        m.update(head_norm_start=0.0, head_norm_end=head_norm(probe.weight), feature_change_test=0.0,
                 feature_change_ood=0.0, lp_C=probe.C)
        rows += [{**base, "seed": seed, "method": "LP", "metric": k, "value": v} for k, v in m.items()]
        reliability += _reliability(setup, seed, "LP", lp_logits["test"], m["temperature"])
    y = setup.labels(f"train-{seed}")
    V_ls, _, lr = least_squares_head(train, y, 2)
    for loss in ("ce", "mse"):
        curves += [{**base, "seed": seed, "objective": loss, "lr": lr, "ls_head_norm": head_norm(V_ls), **r}
                   for r in probe_gradient_descent(train, y, 2, loss=loss, lr=lr, steps=cfg.lp_curve_steps)]
    return rows, reliability, curves


def _run(cfg: LPFTConfig, ctx: RunContext) -> dict:
    import torch

    t_all = time.perf_counter()
    setup = _setup(cfg, ctx.device, ctx.cache, ctx.progress)
    write_json(ctx.out_dir / "splits.json", setup.records)
    seconds = {"features": 0.0, "lp": 0.0, "kernels": 0.0, "finetune": 0.0, "evaluate": 0.0}
    t = time.perf_counter()
    phi0 = {name: ctx.unit_of(features_spec(setup, name)).array("phi") for name in setup.sets}
    seconds["features"] = time.perf_counter() - t
    rows, history, reliability, curves = [], [], [], []
    base = {"task": cfg.task, "ood_task": cfg.ood_task, "model": cfg.model}
    for seed in cfg.seeds:
        t = time.perf_counter()
        probe = read_probe(ctx.unit_of(probe_spec(setup, seed))) if _needs_probe(cfg) else None
        lp_rows, lp_reliability, lp_curves = _lp(setup, seed, probe, phi0, base)
        rows, reliability, curves = rows + lp_rows, reliability + lp_reliability, curves + lp_curves
        seconds["lp"] += time.perf_counter() - t
        for name in _ft_methods(cfg):
            rec = ctx.unit_of(finetune_spec(setup, seed, name)).result
            m = rec["metrics"]
            seconds["kernels"] += m.get("kernel_seconds", 0.0)
            seconds["finetune"] += m.get("ft_seconds", 0.0)
            seconds["evaluate"] += m.get("eval_seconds", 0.0)
            rows += [{**base, "seed": seed, "method": name, "metric": k, "value": v} for k, v in m.items()
                     if k not in ("kernel_seconds", "ft_seconds", "eval_seconds", "seconds") and v is not None]
            history += [{**base, "seed": seed, "method": name, **h} for h in rec["history"]]
            reliability += _reliability(setup, seed, name, rec["test_logits"], m["temperature"])
    write_table(ctx.out_dir / "results", rows)
    write_table(ctx.out_dir / "head_norm_history", history)
    write_table(ctx.out_dir / "reliability", reliability)
    write_table(ctx.out_dir / "head_norm_curves", curves)
    comp = aggregate(rows, ("method", "metric"))
    write_table(ctx.out_dir / "comparison", comp)
    atomic_write_text(ctx.out_dir / "comparison.md", comparison_markdown(comp, cfg))
    get = {(r["method"], r["metric"]): r for r in comp}
    parts = [f"{m} ID {mean_std(get[(m, 'id_acc')], 100, 1)} / OOD {mean_std(get[(m, 'ood_acc')], 100, 1)}"
             for m in METHODS if (m, "id_acc") in get]
    return {"headline": f"{cfg.task} -> {cfg.ood_task}, {cfg.model}, {len(cfg.seeds)} seeds (acc % mean (sample "
                        f"std)): " + "; ".join(parts),
            "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "this_invocation_seconds": round(time.perf_counter() - t_all, 1), "model": setup.lm.describe(),
            "sizes": {k: len(v) for k, v in setup.sets.items()}, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count()}


def comparison_markdown(comp: list[dict], cfg: LPFTConfig) -> str:
    get = {(r["method"], r["metric"]): r for r in comp}
    cols = [("id_acc", "ID acc %", 100, 1), ("ood_acc", "OOD acc %", 100, 1), ("ece", "ECE %", 100, 1),
            ("ece_ts", "ECE after TS %", 100, 1), ("nll", "NLL", 1, 3), ("nll_ts", "NLL after TS", 1, 3),
            ("head_norm_end", "head norm", 1, 2), ("feature_change_test", "feature change (ID)", 1, 2),
            ("feature_change_ood", "feature change (OOD)", 1, 2), ("kernel_share_backbone", "backbone share", 1, 3)]
    body = [[m] + [mean_std(get[(m, c)], s, d) if (m, c) in get else "" for c, _, s, d in cols] for m in METHODS
            if (m, "id_acc") in get]
    return (f"{cfg.task} (ID) -> {cfg.ood_task} (OOD), {cfg.model}; mean (sample std) over {len(cfg.seeds)} seeds:\n\n"
            + markdown_table(["method"] + [c[1] for c in cols], body))


EXPERIMENT = Experiment(
    name="lpft",
    config_cls=LPFTConfig,
    presets=PRESETS,
    run=run,
    figures=("figures.lpft:redraw",),
    verifier="lpft",
    plan=plan,
    reproduce=(),
    help=("Tomihari & Sato 2024 / Kumar et al. 2022 on a real LM: LP (cross-validated logistic regression on cached "
          "features), FT, LP-FT, LoRA-FT, LP-LoRA-FT; ID and OOD accuracy, ECE/NLL before and after temperature "
          "scaling, head norm, feature change, eNTK head/backbone parts at the start of FT.\n\nexample:\n"
          "  ftsim run lpft --preset quick --model smollm2 --task SST-2 --ood-task CR"),
)
