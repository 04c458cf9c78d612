"""``ftsim run lpft``: LP, FT, LP-FT, LoRA-FT and LP-LoRA-FT on a real LM, in and out of distribution
(Tomihari & Sato 2024; Kumar et al. 2022).

The classifier is :class:`real_tasks.models.LinearHeadClassifier`: a linear head ``V phi(x) + b`` on the pooled
representation phi(x) (the last token's final hidden state for causal LMs), no prompt -- the authors' setting
(``RobertaForSequenceClassification`` / ``GPT2ForSequenceClassification`` heads). For one ID task (e.g. SST-2), an OOD
task with the same label space (e.g. CR) and several seeds:

* **LP**: a multinomial logistic regression on the frozen features, L2 strength by cross-validation
  (:func:`theory.lpft.fit_linear_probe`, the authors' ``LogisticRegressionCV``). The features phi_0(x) of every
  example set (each seed's training and validation sets, the ID and OOD test sets) are computed once and stored as
  units of the shared cache.
* **FT** (head N(0, 0.02^2), as a new classifier layer), **LP-FT** (head = the probe), **LoRA-FT** and
  **LP-LoRA-FT** (peft LoRA on the attention and MLP projections, the head trainable): values of
  :func:`theory.lpft.method_values` run by :func:`theory.finetune.finetune`; one unit per seed and method.

Per method and seed: ID and OOD accuracy; ECE (15 equal-width bins, top label) and NLL before and after temperature
scaling fitted on the validation set; the head norm over training; the feature change ||phi_FT(x) - phi_0(x)|| on
the ID and OOD test sets; the head and backbone (or LoRA) parts of the eNTK at the start of FT on
``kernel_examples`` training examples (their traces and shares; head part in closed form from the cached features,
backbone part by the engine with ``params_subset``); and the LP head-norm curves under CE and MSE on the cached
features. Tables: ``results.jsonl`` (tidy: seed, method, metric, value), ``head_norm_history``, ``reliability``,
``head_norm_curves``, ``comparison.md``; the runner draws ``lpft.pdf/png`` (figures/lpft.py).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Literal, Optional

import numpy as np

from ftsim.core.errors import InputError
from ftsim.core.experiment import Experiment, RunContext
from ftsim.core.io import atomic_write_text, stable_hash, write_json, write_table
from ftsim.core.tables import aggregate, markdown_table, mean_std

__all__ = ["LPFTConfig", "PRESETS", "EXPERIMENT", "run", "UNIT_VERSIONS", "comparison_markdown"]

METHODS = ("LP", "FT", "LP-FT", "LoRA-FT", "LP-LoRA-FT")
UNIT_VERSIONS = {"features": 1, "finetune": 2}
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
# Data, model and cached features
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Setup:
    cfg: LPFTConfig
    lm: object
    sets: dict  # (name) -> list[Example]; name in train-<seed>, val-<seed>, test, ood
    key: dict
    device: str
    progress: bool
    encoded: dict = dataclasses.field(default_factory=dict)

    def encode(self, name: str):
        from real_tasks.classify import encode_set

        if name not in self.encoded:
            self.encoded[name] = encode_set(self.lm, self.sets[name], prompt=None, max_length=self.cfg.max_length)
        return self.encoded[name]

    def classifier(self, theta0: dict, head_seed: int = 0):
        from real_tasks.classify import make_classifier
        from theory.finetune import restore

        restore(self.lm.model, theta0)
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


def load(cfg: LPFTConfig, ctx: RunContext) -> tuple[Setup, dict]:
    from real_tasks.data import texts
    from real_tasks.models import load_model

    sets, records = _splits(cfg)
    write_json(ctx.out_dir / "splits.json", records)
    vocab = " ".join(texts([e for v in sets.values() for e in v])).split() if cfg.model.startswith("tiny-") else None
    lm = load_model(cfg.model, device=ctx.device, cache=ctx.cache, vocab=vocab)
    key = {"model": lm.fingerprint, "task": cfg.task, "ood_task": cfg.ood_task, "files": records["files"],
           "max_length": cfg.max_length}
    theta0 = {k: v.detach().to("cpu", copy=True) for k, v in lm.model.named_parameters()}
    return Setup(cfg, lm, sets, key, ctx.device, ctx.progress), theta0


def _set_hash(examples) -> str:
    return stable_hash([(e.text_a, e.text_b, e.label) for e in examples])


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


def features(setup: Setup, ctx: RunContext, theta0: dict, name: str) -> np.ndarray:
    """phi_0(x) of the example set ``name``, computed once (a unit keyed by the model and the set's examples)."""
    import torch

    inputs = {**setup.key, "unit": "features", "set": _set_hash(setup.sets[name]), "n": len(setup.sets[name]),
              "device": torch.device(setup.device).type}

    def compute(work):
        t0 = time.perf_counter()
        phi, _ = pooled_and_logits(setup.classifier(theta0), setup.encode(name), setup.device)
        work.save_array("phi", phi)
        return {"seconds": time.perf_counter() - t0, "n": len(phi)}

    return ctx.unit("lpft.features", UNIT_VERSIONS["features"], inputs, compute).array("phi")


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


def finetune_unit(setup: Setup, ctx: RunContext, theta0: dict, seed: int, name: str, method, phi0: dict,
                  probe) -> dict:
    """One method on one seed (a unit): kernel parts at the start, fine-tuning with the head norm recorded, then
    the metrics of :func:`_evaluate`."""
    import torch

    inputs = {**setup.key, "unit": "finetune", "seed": seed, "method": method.describe(),
              "train": _set_hash(setup.sets[f"train-{seed}"]), "val": _set_hash(setup.sets[f"val-{seed}"]),
              "test": _set_hash(setup.sets["test"]), "ood": _set_hash(setup.sets["ood"]),
              "kernel_examples": setup.cfg.kernel_examples, "ntk": setup.cfg.ntk_implementation,
              "device": torch.device(setup.device).type}

    def compute(work):
        from theory.finetune import finetune, prepare
        from theory.lpft import head_norm

        t0 = time.perf_counter()
        train = setup.encode(f"train-{seed}")
        start = setup.classifier(theta0, head_seed=seed)
        prepare(start, method)  # the method's start: its head (random or the probe) and adapter
        out: dict = {"head_norm_start": head_norm(start.head.weight)}
        if setup.cfg.kernel_examples:
            out.update(_backbone_kernel_shares(start, train, min(setup.cfg.kernel_examples, len(train)),
                                               "LoRA" in name, phi0[f"train-{seed}"], setup.cfg.ntk_implementation))
        del start
        setup.lm.model = _strip_adapters(setup.lm.model)
        module = setup.classifier(theta0, head_seed=seed)

        def on_step(step, mod):
            return {"head_norm": head_norm(mod.head.weight)}

        t1 = time.perf_counter()
        res = finetune(module, train, method, seed=seed, device=setup.device, progress=setup.progress,
                       desc=f"{name} s{seed}", on_step=on_step)
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
                   eval_seconds=time.perf_counter() - t2, seconds=time.perf_counter() - t0)
        setup.lm.model = _strip_adapters(module.lm)
        return {"metrics": out, "history": norms, "test_logits": logits["test"].tolist()}

    return ctx.unit("lpft.finetune", UNIT_VERSIONS["finetune"], inputs, compute).result


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
    import contextlib

    from ftsim.core.threads import limit_threads

    with limit_threads(cfg.threads) if cfg.threads > 0 else contextlib.nullcontext():
        return _run(cfg, ctx)


def _run(cfg: LPFTConfig, ctx: RunContext) -> dict:
    import torch

    from theory.lpft import fit_linear_probe, head_norm, least_squares_head, probe_gradient_descent

    t_all = time.perf_counter()
    setup, theta0 = load(cfg, ctx)
    seconds = {"features": 0.0, "lp": 0.0, "kernels": 0.0, "finetune": 0.0, "evaluate": 0.0}
    t = time.perf_counter()
    phi0 = {name: features(setup, ctx, theta0, name) for name in setup.sets}
    seconds["features"] = time.perf_counter() - t
    rows, history, reliability, curves = [], [], [], []
    base = {"task": cfg.task, "ood_task": cfg.ood_task, "model": cfg.model}
    for seed in cfg.seeds:
        t = time.perf_counter()
        y = {n: np.array([e.label for e in setup.sets[n]]) for n in (f"train-{seed}", f"val-{seed}", "test", "ood")}
        probe = fit_linear_probe(phi0[f"train-{seed}"], y[f"train-{seed}"], 2, seed=seed)
        if "LP" in cfg.methods:
            lp_logits = {"val": probe.logits(phi0[f"val-{seed}"]), "test": probe.logits(phi0["test"]),
                         "ood": probe.logits(phi0["ood"])}
            m = _evaluate(setup, seed, lp_logits, None, phi0)
            m.update(head_norm_start=0.0, head_norm_end=head_norm(probe.weight), feature_change_test=0.0,
                     feature_change_ood=0.0, lp_C=probe.C)
            rows += [{**base, "seed": seed, "method": "LP", "metric": k, "value": v} for k, v in m.items()]
            reliability += _reliability(setup, seed, "LP", lp_logits["test"], m["temperature"])
        V_ls, _, lr = least_squares_head(phi0[f"train-{seed}"], y[f"train-{seed}"], 2)
        for loss in ("ce", "mse"):
            curves += [{**base, "seed": seed, "objective": loss, "lr": lr, "ls_head_norm": head_norm(V_ls), **r}
                       for r in probe_gradient_descent(phi0[f"train-{seed}"], y[f"train-{seed}"], 2, loss=loss,
                                                       lr=lr, steps=cfg.lp_curve_steps)]
        seconds["lp"] += time.perf_counter() - t
        for name, method in methods_for(cfg, len(setup.sets[f"train-{seed}"]), probe, seed).items():
            rec = finetune_unit(setup, ctx, theta0, seed, name, method, phi0, probe)
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
    reproduce=(),
    help=("Tomihari & Sato 2024 / Kumar et al. 2022 on a real LM: LP (cross-validated logistic regression on cached "
          "features), FT, LP-FT, LoRA-FT, LP-LoRA-FT; ID and OOD accuracy, ECE/NLL before and after temperature "
          "scaling, head norm, feature change, eNTK head/backbone parts at the start of FT.\n\nexample:\n"
          "  ftsim run lpft --preset quick --model smollm2 --task SST-2 --ood-task CR"),
)
