"""``ftsim run malladi``: prompt-based fine-tuning vs its eNTK on a real pretrained LM (Malladi et al. 2023).

For one task, one model, k examples per class and several data seeds, the run measures test accuracy of

* **zero-shot** prompting (label-word scores at theta_0);
* **FT-SGD** / **FT-Adam**: prompt-based fine-tuning of all parameters (:func:`theory.finetune.finetune`);
* **K-SGD**: the SGD eNTK solution -- kernel regression with the f_0 correction (and kernel logistic regression,
  reported as ``K-SGD (logistic)``); **K-A-SignGD**: the asymmetric LS-SVM on the A-SignGD kernel, Adam's kernel
  analogue (:mod:`real_tasks.entk`, engine :mod:`theory.ntk`);
* **FT (no prompt)** and **K-SGD (no prompt)**: standard fine-tuning of a new linear head on a pooled
  representation, and its eNTK -- the paper's claim is that the prompt is what makes the kernel work;

plus the kernel-behaviour diagnostics of the fine-tuned models: accuracy of the linearised model
f(theta_0) + <grad f(theta_0), theta_FT - theta_0> against fine-tuning (share of the fine-tuning gain it
recovers), and the movement of the eNTK between theta_0 and theta_FT on (part of) the training set.

Every fine-tuning method is a :class:`theory.finetune.Method` value run by :func:`theory.finetune.finetune`. Work is
split into units of the shared cache (zero-shot; the kernels over the union of the test subset and all seeds'
training sets, arrays checked by SHA-256 when read; one unit per seed and fine-tuning method, diagnostics
included), keyed by everything that produced them: a killed run resumes and runs share units. Tables:
``results.jsonl/csv`` (tidy: task, model, k, seed, method, metric, value), ``comparison.csv/md`` (mean and
sample std over seeds), ``splits.json`` (the k-shot indices); the runner draws ``malladi.pdf/png`` from them.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from ftsim.core.errors import InputError
from ftsim.core.config import config_hash
from ftsim.core.experiment import Experiment, RunContext, UnitMissing, UnitSpec, loaded_once
from ftsim.core.io import atomic_write_text, stable_hash, write_json, write_table
from ftsim.core.tables import aggregate, mean_std, markdown_table

__all__ = ["MalladiConfig", "PRESETS", "EXPERIMENT", "run", "plan", "compute_unit", "METHOD_ORDER", "ALL_METHODS",
           "comparison_rows", "comparison_markdown", "method_value", "UNIT_VERSIONS"]

ALL_METHODS = ("zero-shot", "ft-sgd", "ft-adam", "ft-noprompt", "k-sgd", "k-asigngd", "k-noprompt")

# Row order of the comparison table (names as in Malladi et al.'s tables).
METHOD_ORDER = ("zero-shot", "FT-SGD", "K-SGD", "K-SGD (logistic)", "FT-Adam", "K-A-SignGD",
                "FT (no prompt)", "K-SGD (no prompt)", "K-SGD (no prompt, logistic)")


def _f(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class MalladiConfig:
    """Settings of one ``malladi`` run. Defaults are the paper's (RoBERTa-base, LM-BFF's 1000 steps and grids,
    1000 test examples, exact eNTK where it fits); ``quick`` shrinks what a 2-core CPU cannot afford."""

    task: str = _f("SST-2", "task name (SST-2, SST-5, MR, CR, MPQA, Subj, TREC, AG News, MNLI, SNLI, QNLI, RTE, "
                            "MRPC, QQP)")
    model: str = _f("roberta-base", "smollm2 | minilm | tiny-causal | tiny-masked | tiny-encoder | GGUF path | local "
                                    "dir | Hugging Face id (offline: must be in the hub cache)")
    k: int = _f(16, "training (and validation) examples per class")
    seeds: tuple[int, ...] = _f((13, 21, 42, 87, 100), "data seeds (LM-BFF's five)")
    data_dir: Optional[str] = _f(None, "data folder (default $FTSIM_DATA or ../shared/data/text_classification)")
    test_size: int = _f(1000, "test examples (a seeded draw; LM-Kernel-FT caps at 1000); every method uses this set")
    label_mode: Literal["first", "sum"] = _f("first", "multi-token label words: first token's logit, or summed "
                                                      "log-probability (causal LMs)")
    methods: tuple[str, ...] = _f(ALL_METHODS, "subset of " + ",".join(ALL_METHODS))
    ft_steps: int = _f(1000, "fine-tuning steps (LM-BFF: 1000)")
    batch_sizes: tuple[int, ...] = _f((2, 4, 8), "mini-batch size grid (LM-BFF: 2,4,8)")
    sgd_lrs: tuple[float, ...] = _f((1e-4, 1e-3, 1e-2), "SGD learning-rate grid (prompt-based FT-SGD)")
    adam_lrs: tuple[float, ...] = _f((1e-5, 2e-5, 5e-5), "Adam learning-rate grid (LM-BFF)")
    noprompt_optimizer: Literal["sgd", "adam"] = _f("sgd", "optimizer of standard FT (sgd: the one its SGD eNTK "
                                                           "describes)")
    noprompt_lrs: tuple[float, ...] = _f((1e-4, 1e-3, 1e-2), "learning-rate grid of standard FT")
    eval_every: int = _f(100, "validate every this many steps and keep the best checkpoint (LM-BFF: 100)")
    max_grad_norm: Optional[float] = _f(1.0, "gradient-norm clipping (Hugging Face Trainer default)")
    head_seed: int = _f(0, "seed of the new linear head of standard FT (one head for all data seeds, so one "
                           "kernel serves them all)")
    ntk_implementation: Literal["auto", "jacobian", "streaming", "sketch", "factored"] = _f(
        "auto", "eNTK engine algorithm")
    union_ntk_implementation: Optional[Literal["auto", "jacobian", "streaming", "sketch", "factored"]] = _f(
        None, "engine of the union kernels behind K-SGD / K-A-SignGD / no-prompt kernel, exact ones accumulated in "
              "float64 (None: as ntk_implementation); ntk_* then apply to the diagnostics' kernel movement only")
    sketch_dim: Optional[int] = _f(None, "count-sketch dimension when the engine sketches (default: engine's)")
    sketch_seed: int = _f(0, "seed of the sketch hashes")
    memory_budget_gb: Optional[float] = _f(None, "memory the eNTK engine may use (default: half of what is free)")
    ntk_dtype: Literal["float64", "float32"] = _f("float64", "accumulation dtype of the eNTK engine")
    kernel_ridge: float = _f(0.0, "ridge of kernel regression, relative to the mean diagonal (0: pseudo-inverse, "
                                  "LM-Kernel-FT's lstsq)")
    logistic_ridge: float = _f(1e-3, "ridge of kernel logistic regression (relative to the mean diagonal)")
    asym_gamma: float = _f(1.0, "gamma of the asymmetric LS-SVM (LM-Kernel-FT's kernel_gamma)")
    diagnostics: bool = _f(True, "linearisation accuracy and kernel movement of the fine-tuned prompt models")
    diag_test_size: Optional[int] = _f(None, "test examples for the linearised model (None: the whole test set)")
    diag_train_size: Optional[int] = _f(None, "training examples (balanced over classes) for the kernel movement "
                                              "(None: all)")
    threads: int = _f(0, "torch CPU threads (0: torch's default; fix it for units byte-identical across executors)")
    precision: Literal["fp32", "bf16", "fp16"] = _f("fp32", "fine-tuning forward pass under autocast on CUDA (bf16 or "
                                                            "fp16 with a gradient scaler); kernels stay float32 "
                                                            "gradients accumulated in float64")

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(ALL_METHODS)
        if unknown:
            raise InputError(f"unknown {sorted(unknown)}; choose from {', '.join(ALL_METHODS)}", field="methods")
        for name in ("k", "test_size", "ft_steps"):
            if getattr(self, name) < 1:
                raise InputError(f"must be >= 1, got {getattr(self, name)}", field=name)
        for name in ("eval_every", "threads"):
            if getattr(self, name) < 0:
                raise InputError(f"must be >= 0, got {getattr(self, name)}", field=name)
        if not self.seeds:
            raise InputError("at least one seed", field="seeds")
        if any(s < 0 for s in self.seeds):
            raise InputError(f"seeds must be >= 0, got {list(self.seeds)}", field="seeds")
        for name in ("batch_sizes", "sgd_lrs", "adam_lrs", "noprompt_lrs"):
            values = getattr(self, name)
            if not values:
                raise InputError("must not be empty", field=name)
            if any(not v > 0 for v in values):
                raise InputError(f"every value must be > 0, got {list(values)}", field=name)
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise InputError(f"must be > 0, got {self.memory_budget_gb}", field="memory_budget_gb")
        if self.sketch_dim is not None and self.sketch_dim < 1:
            raise InputError(f"must be >= 1, got {self.sketch_dim}", field="sketch_dim")


PRESETS = {
    # What a shared 2-core CPU affords for one task, 5 seeds and every method (notes/issue-5.md has the measured
    # times). Against the paper preset: 100 test examples (a seeded subset nested in the 1000-example test set)
    # for every method; one learning rate per optimiser instead of a grid, set from the gradient scale (with the
    # gradient clipped to norm 1, an SGD step moves f by at most lr*||grad f|| ~ 80*lr logits for SmolLM2) and
    # checked on seed 13's validation set; 16 steps of batch 8 (4 epochs of the 32 examples) instead of 1000;
    # validation every 4 steps; the union kernels exact (factored engine, float64, 10 GiB); kernel movement on 8
    # training examples per seed with the eNTK count-sketched to 16384 dimensions in float32 (K(theta_0) and
    # K(theta_FT) with the same hashes; kept from the first runs so that their fine-tuning units stay cached).
    "quick": MalladiConfig(
        model="smollm2", test_size=100, ft_steps=16, batch_sizes=(8,), sgd_lrs=(1e-2,), adam_lrs=(1e-5,),
        noprompt_lrs=(1e-2,), eval_every=4, ntk_implementation="sketch", sketch_dim=16384, ntk_dtype="float32",
        union_ntk_implementation="factored", memory_budget_gb=10.0, diag_test_size=None, diag_train_size=8),
    # GPU-sized: LM-BFF's grids and 1000 steps, 1000 test examples, exact kernels; fine-tuning in bf16 autocast on
    # CUDA (ignored on the CPU), kernels in float64 accumulation.
    "paper": MalladiConfig(precision="bf16"),
}


# ---------------------------------------------------------------------------------------------------------------
# Units of work. Versions: bump when a unit's computation changes (old units are then never read).
# ---------------------------------------------------------------------------------------------------------------

UNIT_VERSIONS = {"zero-shot": 1, "finetune": 1, "kernels": 1, "diag-kernel0": 1}

_FT_NAMES = {"sgd": "FT-SGD", "adam": "FT-Adam", "noprompt": "FT (no prompt)"}


def _timer():
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0


def _balanced_prefix(labels: list[int], n: int | None) -> list[int]:
    """Positions of the first ``n // C`` examples of each class (all when ``n`` is None)."""
    if n is None or n >= len(labels):
        return list(range(len(labels)))
    classes = sorted(set(labels))
    per = max(1, n // len(classes))
    out, seen = [], {c: 0 for c in classes}
    for i, y in enumerate(labels):
        if seen[y] < per:
            out.append(i)
            seen[y] += 1
    return out


@dataclasses.dataclass
class Task:
    """A loaded task: data, k-shot splits, the kernel union, the model at theta_0, prompt and label words, and
    what every unit's key depends on."""

    cfg: MalladiConfig
    device: str
    progress: bool
    data: object
    splits: dict
    union: object
    lm: object
    prompt: object
    label_tokens: object
    theta0: dict
    key_common: dict
    load_seconds: float
    cache_root: str = ""
    encoded_sets: dict = dataclasses.field(default_factory=dict)
    cost_bases: dict = dataclasses.field(default_factory=dict)  # use_prompt -> real_tasks.costs.LMCostBasis

    @property
    def spec(self):
        return self.data.spec

    @property
    def prompt_ok(self) -> bool:
        return self.lm.has_lm_head

    @property
    def test_examples(self):
        return next(iter(self.splits.values())).test

    def restore_theta0(self) -> None:
        from theory.finetune import restore

        restore(self.lm.model, self.theta0)

    def classifier(self, use_prompt: bool):
        """A classifier of the model at theta_0 (prompt-based, or a linear head on the pooled representation)."""
        from real_tasks.classify import make_classifier

        self.restore_theta0()
        return make_classifier(self.lm, use_prompt=use_prompt, label_tokens=self.label_tokens,
                               label_mode=self.cfg.label_mode, num_classes=self.spec.num_labels,
                               head_seed=self.cfg.head_seed).to(self.device)

    def encoded(self, name: str, examples, use_prompt: bool):
        from real_tasks.classify import encode_set

        key = (name, use_prompt)
        if key not in self.encoded_sets:
            self.encoded_sets[key] = encode_set(self.lm, examples, prompt=self.prompt if use_prompt else None,
                                                label_tokens=self.label_tokens, label_mode=self.cfg.label_mode,
                                                max_length=self.prompt.max_length)
        return self.encoded_sets[key]

    def test_set(self, use_prompt: bool):
        return self.encoded("test", self.test_examples, use_prompt)

    def union_set(self, use_prompt: bool):
        return self.encoded("union", self.union.examples, use_prompt)

    def inputs(self, **settings) -> dict:
        """A unit's inputs: what every unit depends on, plus its own settings."""
        return {**self.key_common, **settings}


def load_task(cfg: MalladiConfig, *, device: str, cache, progress: bool = False, out_dir=None) -> Task:
    """Data, k-shot splits (written to ``<out_dir>/splits.json``), the kernel union and the model."""
    from real_tasks.data import kshot_split, load_task as load_data, texts
    from real_tasks.entk import kernel_union
    from real_tasks.models import load_model
    from real_tasks.prompts import PROMPTS, get_prompt, label_token_ids, words_of

    data = load_data(cfg.task, cfg.data_dir)
    splits = {s: kshot_split(data, cfg.k, s, max_test=cfg.test_size) for s in cfg.seeds}
    union = kernel_union(list(splits.values()))
    if out_dir is not None:
        write_json(Path(out_dir) / "splits.json", {"data": data.describe(), "splits": [s.record() for s in
                                                   splits.values()], "kernel_union": union.record()})
    vocab = None
    if cfg.model.startswith("tiny-"):
        pool = list(union.examples) + [e for s in splits.values() for e in s.dev]
        vocab = " ".join(texts(pool)).split() + words_of(PROMPTS.values())
    t = _timer()
    lm = load_model(cfg.model, device=device, cache=cache, vocab=vocab)
    load_seconds = t()
    prompt = get_prompt(data.spec.name)
    label_tokens = label_token_ids(lm.tokenizer, prompt, lm.kind) if lm.has_lm_head else None
    if cfg.label_mode == "sum" and lm.kind != "causal":
        raise InputError(f"sum needs a causal LM; {cfg.model} is {lm.kind}", field="label_mode")
    theta0 = {k: v.detach().to("cpu", copy=True) for k, v in lm.model.named_parameters()}
    test_index = list(next(iter(splits.values())).test_index)
    key_common = {"model": lm.fingerprint, "task": data.spec.name, "k": cfg.k, "data_files": data.files,
                  "test_index": stable_hash(test_index), "label_mode": cfg.label_mode,
                  "prompt": dataclasses.asdict(prompt)}
    return Task(cfg, device, progress, data, splits, union, lm, prompt, label_tokens, theta0, key_common,
                load_seconds, cache_root=str(cache.root) if cache is not None else "")


def ntk_options(task: Task, union: bool = False) -> dict:
    """Engine options of the diagnostics' kernels, or (``union``) of the union kernels."""
    import torch

    cfg = task.cfg
    opts = {"implementation": cfg.ntk_implementation, "sketch_dim": cfg.sketch_dim, "seed": cfg.sketch_seed,
            "memory_budget": None if cfg.memory_budget_gb is None else int(cfg.memory_budget_gb * 2 ** 30),
            "dtype": getattr(torch, cfg.ntk_dtype)}
    if union and _union_engine_differs(cfg):
        opts.update(implementation=cfg.union_ntk_implementation, dtype=torch.float64,
                    sketch_dim=cfg.sketch_dim if cfg.union_ntk_implementation in ("sketch", "auto") else None)
    return opts


def _union_engine_differs(cfg: MalladiConfig) -> bool:
    u = cfg.union_ntk_implementation
    return u is not None and u != cfg.ntk_implementation


def _ntk_key(opts: dict) -> dict:
    return {k: str(v) for k, v in opts.items() if k != "memory_budget"}


def method_value(cfg: MalladiConfig, method: str, lr: float, batch_size: int):
    """The :class:`theory.finetune.Method` of one grid point: ``sgd`` / ``adam`` prompt-based fine-tuning of every
    parameter, ``noprompt`` standard fine-tuning of the linear-head classifier; linear decay, clipping at
    ``max_grad_norm``, validation every ``eval_every`` steps keeping the best checkpoint (LM-BFF)."""
    from theory.finetune import Method, Optimizer

    name = {"sgd": "sgd", "adam": "adam", "noprompt": cfg.noprompt_optimizer}[method]
    return Method(name=f"{_FT_NAMES[method]} lr={lr:g} bs={batch_size}",
                  optimizer=Optimizer(name, lr=lr, momentum=0.0, weight_decay=0.0, schedule="linear"),
                  steps=cfg.ft_steps, batch_size=batch_size, eval_every=cfg.eval_every,
                  max_grad_norm=cfg.max_grad_norm, loss="ce",
                  autocast=None if cfg.precision == "fp32" else cfg.precision)


def _spec(task: Task, kind: str, inputs: dict, label: str, cost: dict, **params) -> UnitSpec:
    """A unit of this run as data: its key, ``compute_unit`` with the config and the unit's parameters, and its
    a-priori cost (see :mod:`real_tasks.costs`)."""
    return UnitSpec(f"malladi.{kind}", UNIT_VERSIONS[kind], inputs, "real_tasks.malladi:compute_unit",
                    {"config": dataclasses.asdict(task.cfg), "device": task.device, "cache_root": task.cache_root,
                     "unit": kind, **params}, label=label, cost={**cost, "device": task.device})


# -- a-priori costs (real_tasks.costs): flops and peak device memory of each unit -------------------------------

def _basis(task: Task, use_prompt: bool):
    """The model's cost basis, measured once per task on the longest test example."""
    if use_prompt not in task.cost_bases:
        from real_tasks.costs import lm_cost_basis
        from theory.batching import batch_to

        test = task.test_set(use_prompt)
        i = int(test.lengths.argmax())
        task.cost_bases[use_prompt] = lm_cost_basis(task.classifier(use_prompt),
                                                    batch_to(test.select([i]), task.device),
                                                    _tokens(task, test, use_prompt, [i]))
    return task.cost_bases[use_prompt]


def _tokens(task: Task, enc, use_prompt: bool, rows=None) -> int:
    """Tokens the model reads for the encoded set (``rows`` of it): C continuations each with ``label_mode=sum``."""
    lengths = enc.lengths if rows is None else enc.lengths[list(rows)]
    per = task.spec.num_labels if use_prompt and task.cfg.label_mode == "sum" else 1
    return int(lengths.sum()) * per


def _kernel_bytes(task: Task, basis) -> int:
    """The engine plans within its budget (default: half the free memory, as the engine takes it)."""
    from theory.memory import available_memory

    budget = (int(task.cfg.memory_budget_gb * 2 ** 30) if task.cfg.memory_budget_gb is not None
              else available_memory(task.device) // 2)
    return basis.weight_bytes + budget


def _finetune_cost(task: Task, method: str, seed: int, k0_inline: bool) -> dict:
    """Every grid point's steps and validations, the test pass and the diagnostics (linearisation: a forward and a
    JVP, about three forwards; kernel movement: C gradient rows of the diagnostic examples, once or twice)."""
    from real_tasks.costs import forward_flops, output_gradient_flops, training_bytes, training_flops

    cfg, use_prompt = task.cfg, method != "noprompt"
    basis = _basis(task, use_prompt)
    split = task.splits[seed]
    train = task.encoded(f"train-{seed}", split.train, use_prompt)
    dev = task.encoded(f"dev-{seed}", split.dev, use_prompt)
    per_example = _tokens(task, train, use_prompt) / len(train)
    lrs = {"sgd": cfg.sgd_lrs, "adam": cfg.adam_lrs, "noprompt": cfg.noprompt_lrs}[method]
    evals = cfg.ft_steps // cfg.eval_every + 1 if cfg.eval_every else 1
    flops = sum(training_flops(basis, cfg.ft_steps * bs * per_example) + forward_flops(basis, evals * _tokens(
        task, dev, use_prompt)) for bs in cfg.batch_sizes for _ in lrs)
    flops += forward_flops(basis, _tokens(task, task.test_set(use_prompt), use_prompt))
    optimizer = {"sgd": "sgd", "adam": "adam", "noprompt": cfg.noprompt_optimizer}[method]
    grid = len(cfg.batch_sizes) * len(lrs)
    longest = _tokens(task, train, use_prompt, [int(train.lengths.argmax())])
    memory = training_bytes(basis, optimizer=optimizer, batch_tokens=max(cfg.batch_sizes) * longest,
                            snapshots=int(grid > 1))
    if cfg.diagnostics and use_prompt:
        test = task.test_set(True)
        n_diag = len(test) if cfg.diag_test_size is None else min(cfg.diag_test_size, len(test))
        flops += 3 * forward_flops(basis, _tokens(task, test, True, range(n_diag)))
        n_train = len(train) if cfg.diag_train_size is None else min(cfg.diag_train_size, len(train))
        flops += (1 + int(k0_inline)) * output_gradient_flops(basis, n_train * per_example, task.spec.num_labels)
        memory = max(memory, _kernel_bytes(task, basis))
    return {"flops": flops, "memory_bytes": memory}


def _kernel_cost(task: Task, enc, use_prompt: bool, rows=None) -> dict:
    from real_tasks.costs import output_gradient_flops

    basis = _basis(task, use_prompt)
    return {"flops": output_gradient_flops(basis, _tokens(task, enc, use_prompt, rows), task.spec.num_labels),
            "memory_bytes": _kernel_bytes(task, basis)}


def _zero_shot_cost(task: Task) -> dict:
    from real_tasks.costs import forward_flops

    basis = _basis(task, True)
    return {"flops": forward_flops(basis, _tokens(task, task.test_set(True), True)),
            "memory_bytes": basis.weight_bytes}


def compute_unit(work, config: dict, device: str, cache_root: str, unit: str, **params):
    """Compute one unit (in this process or an executor's worker): the task is loaded once per process."""
    from ftsim.core.cache import UnitCache
    from ftsim.core.config import config_from_dict

    cfg = config_from_dict(MalladiConfig, config)
    task = loaded_once(("malladi", config_hash(cfg), device, str(cache_root)),
                       lambda: load_task(cfg, device=device, cache=UnitCache(cache_root), progress=False))
    from ftsim.core.threads import threads_if

    with threads_if(cfg.threads):  # float32 reductions depend on the thread count: a unit is the same everywhere
        return _dispatch(task, work, unit, params)


def _dispatch(task: Task, work, unit: str, params: dict):
    if unit == "zero-shot":
        return _zero_shot(task)
    if unit == "finetune":
        return _finetune(task, **params)
    if unit == "kernels":
        return _kernels(task, work, params["use_prompt"], tuple(params["names"]))
    if unit == "diag-kernel0":
        return _diag_kernel0(task, work, params["seed"], params["positions"])
    raise ValueError(f"unknown malladi unit {unit!r}")


def _zero_shot(task: Task) -> dict:
    from theory.finetune import evaluate
    from theory.metrics import accuracy

    t = _timer()
    test = task.test_set(True)
    scores = evaluate(task.classifier(True), test, task.device)
    return {"accuracy": accuracy(scores, test.labels), "scores": scores.tolist(), "seconds": t()}


def zero_shot_spec(task: Task) -> UnitSpec:
    return _spec(task, "zero-shot", task.inputs(unit="zeroshot"), "zero-shot", _zero_shot_cost(task))


def finetune_spec(task: Task, method: str, seed: int, k0_inline: bool) -> UnitSpec:
    """Fine-tune with the method's grid on one seed; keep the best on validation; diagnostics.

    The eNTK at theta_FT on a class-balanced part of the training set is stored with the unit; the same kernel
    at theta_0 is computed here too when ``k0_inline`` (else it is read out of the union kernel later, which
    uses the same algorithm, sketch dimension and hashes)."""
    import torch

    cfg = task.cfg
    use_prompt = method != "noprompt"
    optimizer = {"sgd": "sgd", "adam": "adam", "noprompt": cfg.noprompt_optimizer}[method]
    lrs = {"sgd": cfg.sgd_lrs, "adam": cfg.adam_lrs, "noprompt": cfg.noprompt_lrs}[method]
    settings = {"unit": f"ft-{method}-s{seed}", "seed": seed, "method": method, "optimizer": optimizer, "lrs": lrs,
                "batch_sizes": cfg.batch_sizes, "steps": cfg.ft_steps, "eval_every": cfg.eval_every,
                "max_grad_norm": cfg.max_grad_norm, "head_seed": None if use_prompt else cfg.head_seed}
    if cfg.diagnostics and use_prompt:
        settings["diagnostics"] = {"test": cfg.diag_test_size, "train": cfg.diag_train_size, "k0_inline": k0_inline,
                                   "ntk": _ntk_key(ntk_options(task))}
    if cfg.precision != "fp32" and torch.device(task.device).type == "cuda":
        settings["precision"] = cfg.precision
    return _spec(task, "finetune", task.inputs(**settings), f"{_FT_NAMES[method]} seed {seed}",
                 _finetune_cost(task, method, seed, k0_inline), method=method, seed=seed, k0_inline=k0_inline)


def _finetune(task: Task, method: str, seed: int, k0_inline: bool) -> dict:
    import torch

    from theory.finetune import evaluate, finetune, restore, snapshot
    from theory.metrics import accuracy

    cfg = task.cfg
    use_prompt = method != "noprompt"
    optimizer = {"sgd": "sgd", "adam": "adam", "noprompt": cfg.noprompt_optimizer}[method]
    lrs = {"sgd": cfg.sgd_lrs, "adam": cfg.adam_lrs, "noprompt": cfg.noprompt_lrs}[method]
    split = task.splits[seed]
    train = task.encoded(f"train-{seed}", split.train, use_prompt)
    dev = task.encoded(f"dev-{seed}", split.dev, use_prompt)
    test = task.test_set(use_prompt)
    t_all = _timer()
    grid, best = [], None
    for bs in cfg.batch_sizes:
        for lr in lrs:
            t = _timer()
            module = task.classifier(use_prompt)
            m = method_value(cfg, method, lr, bs)
            try:
                res = finetune(module, train, m, seed=seed, device=task.device, dev=dev, progress=task.progress,
                               desc=f"{method} s{seed} lr={lr:g} bs={bs}")
            except FloatingPointError as exc:  # a diverging grid point is a result, not a crash
                grid.append({"lr": lr, "batch_size": bs, "dev_acc": float("nan"), "error": str(exc), "seconds": t()})
                continue
            entry = {"lr": lr, "batch_size": bs, "dev_acc": res.best_dev_acc, "best_step": res.best_step,
                     "final_train_loss": res.final_train_loss, "seconds": t(),
                     "history": [h for h in res.history if "dev_acc" in h]}
            grid.append(entry)
            if best is None or res.best_dev_acc > best[0]["dev_acc"]:
                state = snapshot(module) if len(cfg.batch_sizes) * len(lrs) > 1 else None
                best = (entry, module, state)
    if best is None:
        return {"method": method, "seed": seed, "grid": grid, "accuracy": float("nan"), "seconds": t_all(),
                "error": "every grid point diverged"}
    entry, module, state = best
    if state is not None:
        restore(module, state)
    scores = evaluate(module, test, task.device)
    rec = {"method": method, "seed": seed, "optimizer": optimizer, "grid": grid, "selected": {
        "lr": entry["lr"], "batch_size": entry["batch_size"], "best_step": entry["best_step"]},
        "dev_acc": entry["dev_acc"], "accuracy": accuracy(scores, test.labels), "scores": scores.tolist(),
        "ft_seconds": t_all()}
    if cfg.diagnostics and use_prompt:
        rec["diagnostics"] = _diagnostics(task, module, scores, split, seed, k0_inline)
    rec["seconds"] = t_all()
    del module
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rec


def _diagnostics(task: Task, module, scores, split, seed: int, k0_inline: bool) -> dict:
    """Linearised-model accuracy and output distance on the test set; eNTK movement on training examples."""
    from real_tasks.classify import linearized_scores
    from real_tasks.entk import compute_kernel
    from theory.finetune import snapshot
    from theory.metrics import accuracy, kernel_distance, kernel_rel_change

    cfg = task.cfg
    t = _timer()
    theta_ft = snapshot(module)
    theta0 = {"lm." + k: v for k, v in task.theta0.items()}
    test = task.test_set(True)
    n_diag = len(test) if cfg.diag_test_size is None else min(cfg.diag_test_size, len(test))
    rows = list(range(n_diag))
    diag_test = task.encoded(f"diag-test-{n_diag}", list(split.test)[:n_diag], True)
    lin, f0 = linearized_scores(module, theta0, theta_ft, diag_test, task.device)
    acc_lin = accuracy(lin, diag_test.labels)
    acc_ft = accuracy(scores[rows], diag_test.labels)
    acc_0 = accuracy(f0, diag_test.labels)
    gain = acc_ft - acc_0
    out = {"diag_test_size": n_diag, "linearized_accuracy": acc_lin, "ft_accuracy_diag": acc_ft,
           "zero_shot_accuracy_diag": acc_0,
           "gain_recovered": (acc_lin - acc_0) / gain if abs(gain) > 1e-12 else float("nan"),
           "lin_output_rel_error": float((lin - scores[rows]).norm() / (scores[rows] - f0).norm().clamp_min(1e-12)),
           "linearize_seconds": t()}
    t = _timer()
    pos = _balanced_prefix([e.label for e in split.train], cfg.diag_train_size)
    sub = task.encoded(f"diag-train-{seed}-{len(pos)}", [split.train[i] for i in pos], True)
    module.eval()
    opts = ntk_options(task)
    k1 = compute_kernel(module, sub, kernel="sgd", device=task.device, progress=task.progress, **opts)
    out.update({"diag_train_size": len(pos), "kernel_ft": k1["kernel"].tolist(), "diag_train_positions": pos})
    if k0_inline:
        k0 = compute_kernel(module, sub, kernel="sgd", device=task.device, progress=task.progress, params=theta0,
                            **opts)
        out["kernel_0"] = k0["kernel"].tolist()
        out.update(kernel_rel_change=kernel_rel_change(k0["kernel"], k1["kernel"]),
                   kernel_distance=kernel_distance(k0["kernel"], k1["kernel"]))
    out["kernel_seconds"] = t()
    return out


def kernels_spec(task: Task, use_prompt: bool, names: tuple[str, ...]) -> UnitSpec:
    """The union kernels ``names`` (``sgd``, ``asigngd``) of the prompt (or no-prompt) model function at
    theta_0, computed in one engine call (one set of per-example gradients) and stored as one unit whose arrays
    are checked by SHA-256 whenever they are read."""
    inputs = task.inputs(unit="kernels", union=stable_hash(task.union.record()), use_prompt=use_prompt,
                         kernels=list(names), head_seed=None if use_prompt else task.cfg.head_seed,
                         ntk=_ntk_key(ntk_options(task, union=True)))
    return _spec(task, "kernels", inputs, f"{'prompt' if use_prompt else 'no-prompt'} kernels {'+'.join(names)}",
                 _kernel_cost(task, task.union_set(use_prompt), use_prompt), use_prompt=use_prompt, names=list(names))


def _kernels(task: Task, work, use_prompt: bool, names: tuple[str, ...]) -> dict:
    from ftsim.core.progress import say
    from real_tasks.entk import compute_kernel

    opts = ntk_options(task, union=True)
    module = task.classifier(use_prompt)
    res = compute_kernel(module, task.union_set(use_prompt), kernel=list(names), device=task.device,
                         progress=task.progress, **opts)
    meta = {}
    for nm in names:
        r = res[nm]
        work.save_array(f"{nm}-kernel", r["kernel"])
        work.save_array(f"{nm}-outputs", r["outputs"])
        m = {"plan": r["plan"], "plan_text": r["plan_text"], "seconds": r["seconds"],
             "num_outputs": r["num_outputs"], "size": len(task.union.examples), "computed_with": list(names)}
        if r["error_bound"] is not None:
            diag = np.sqrt(np.clip(np.diag(r["kernel"]), 0, None))
            rel = r["error_bound"] / np.maximum(np.abs(r["kernel"]), 1e-300)
            m["sketch_std_bound_over_norms"] = float(np.max(r["error_bound"] / np.maximum(
                np.outer(diag, diag), 1e-300)))
            m["sketch_std_bound_relative_median"] = float(np.median(rel))
        meta[nm] = m
    say(res[names[0]]["plan_text"])  # what the planner chose (exact or sketch) and why
    return meta


def kernels(task: Task, ctx: RunContext, use_prompt: bool, names: tuple[str, ...]) -> dict[str, dict]:
    """Kernel name -> record with ``kernel`` (N*C, N*C) and ``outputs`` (N, C) arrays (see :func:`kernels_spec`)."""
    unit = ctx.unit_of(kernels_spec(task, use_prompt, names))
    return {nm: {**unit.result[nm], "kernel": unit.array(f"{nm}-kernel"), "outputs": unit.array(f"{nm}-outputs")}
            for nm in names}


def diag_kernel0_spec(task: Task, seed: int, positions: list[int]) -> UnitSpec:
    """The diagnostics' SGD kernel at theta_0 on the training positions of ``seed``."""
    inputs = task.inputs(unit=f"diag-kernel0-{seed}", seed=seed, positions=list(positions),
                         ntk=_ntk_key(ntk_options(task)))
    split = task.splits[seed]
    sub = task.encoded(f"diag-train-{seed}-{len(positions)}", [split.train[i] for i in positions], True)
    return _spec(task, "diag-kernel0", inputs, f"kernel at theta_0, seed {seed}", _kernel_cost(task, sub, True),
                 seed=seed, positions=list(positions))


def _diag_kernel0(task: Task, work, seed: int, positions: list[int]) -> dict:
    from real_tasks.entk import compute_kernel

    split = task.splits[seed]
    sub = task.encoded(f"diag-train-{seed}-{len(positions)}", [split.train[i] for i in positions], True)
    k0 = compute_kernel(task.classifier(True), sub, kernel="sgd", device=task.device, progress=task.progress,
                        **ntk_options(task))
    work.save_array("kernel", k0["kernel"])
    return {"seconds": k0["seconds"]}


def _methods(task: Task) -> tuple[set[str], list[str]]:
    methods, skipped = set(task.cfg.methods), []
    prompt_methods = {"zero-shot", "ft-sgd", "ft-adam", "k-sgd", "k-asigngd"}
    if not task.prompt_ok and methods & prompt_methods:
        skipped.append(f"prompt-based methods {sorted(methods & prompt_methods)}: {task.cfg.model} has no LM head")
        methods -= prompt_methods
    return methods, skipped


def _k0_inline(cfg: MalladiConfig, methods: set[str]) -> bool:
    return cfg.ntk_implementation == "auto" or "k-sgd" not in methods


def _kernel_specs(task: Task, methods: set[str]) -> list[UnitSpec]:
    prompt_names = tuple(n for n, m in (("sgd", "k-sgd"), ("asigngd", "k-asigngd")) if m in methods)
    out = [kernels_spec(task, True, prompt_names)] if prompt_names else []
    if "k-noprompt" in methods:
        out.append(kernels_spec(task, False, ("sgd",)))
    return out


def plan(cfg: MalladiConfig, ctx: RunContext) -> list[UnitSpec]:
    """Every unit of the run, as data (loads the data and the model once, for the keys)."""
    task = _task(cfg, ctx)
    methods, _ = _methods(task)
    k0_inline = _k0_inline(cfg, methods)
    specs = [zero_shot_spec(task)] if "zero-shot" in methods else []
    specs += [finetune_spec(task, m, s, k0_inline) for s in cfg.seeds for m in ("sgd", "adam", "noprompt")
              if f"ft-{m}" in methods]
    specs += _kernel_specs(task, methods)
    if cfg.diagnostics and _union_engine_differs(cfg) and "ft-sgd" in methods | {"ft-adam"} and not k0_inline:
        for s in cfg.seeds:
            if {"ft-sgd", "ft-adam"} & methods:
                pos = _balanced_prefix([e.label for e in task.splits[s].train], cfg.diag_train_size)
                specs.append(diag_kernel0_spec(task, s, pos))
    return specs


def _task(cfg: MalladiConfig, ctx: RunContext) -> Task:
    return loaded_once(("malladi", config_hash(cfg), ctx.device, str(ctx.cache.root)),
                       lambda: load_task(cfg, device=ctx.device, cache=ctx.cache, progress=ctx.progress,
                                         out_dir=ctx.out_dir))


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------

def _num(x) -> float | None:
    """A float from a stored value (strict JSON keeps NaN and infinities as the strings "nan", "inf")."""
    return None if x is None else float(x)


def comparison_rows(rows: list[dict]) -> list[dict]:
    """Mean, sample std and 95% CI over seeds of every (task, model, k, method, metric) (ftsim.core.tables), in
    :data:`METHOD_ORDER`."""
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    comp = aggregate(rows, ("task", "model", "k", "method", "metric"))
    return sorted(comp, key=lambda r: (r["task"], r["model"], r["k"], r["metric"] != "accuracy", r["metric"],
                                       order.get(r["method"], 99), r["method"]))


def comparison_markdown(comp: list[dict]) -> str:
    """Accuracy table (percent, mean (sample std) over seeds) and a diagnostics table."""
    acc = [r for r in comp if r["metric"] == "accuracy"]
    out = "Test accuracy %, mean (sample std) over seeds:\n\n" + markdown_table(
        ["task", "model", "k", "method", "accuracy %", "seeds"],
        [[r["task"], r["model"], r["k"], r["method"], mean_std(r, 100, 1), r["n"]] for r in acc])
    diag = [r for r in comp if r["metric"] != "accuracy"]
    if diag:
        out += "\nDiagnostics, mean (sample std) over seeds:\n\n" + markdown_table(
            ["task", "method", "diagnostic", "value", "seeds"],
            [[r["task"], r["method"], r["metric"], mean_std(r, 1, 3), r["n"]] for r in diag])
    return out


def _gathered(ctx: RunContext, spec: UnitSpec):
    """The unit, or None when the run only reads finished units (``--cached-only``) and this one is not: its rows
    are left out of the tables."""
    try:
        return ctx.unit_of(spec)
    except UnitMissing:
        return None


def _kernel_rows(task: Task, ctx: RunContext, methods: set[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for spec in _kernel_specs(task, methods):
        use_prompt, names = spec.args["use_prompt"], tuple(spec.args["names"])
        try:
            got = kernels(task, ctx, use_prompt, names)
        except UnitMissing:
            continue
        for nm, rec in got.items():
            out[f"{'prompt' if use_prompt else 'noprompt'}-{nm}"] = rec
    return out


def run(cfg: MalladiConfig, ctx: RunContext) -> dict:
    """Every unit (read from the cache when done before), then the tables and the summary."""
    from ftsim.core.threads import threads_if

    with threads_if(cfg.threads):
        return _run(cfg, ctx)


def _run(cfg: MalladiConfig, ctx: RunContext) -> dict:
    import torch

    from real_tasks.entk import solve_seed
    from theory.metrics import accuracy, kernel_distance, kernel_rel_change

    t_total = _timer()
    task = _task(cfg, ctx)
    write_json(ctx.out_dir / "splits.json", {"data": task.data.describe(), "splits": [s.record() for s in
                                             task.splits.values()], "kernel_union": task.union.record()})
    methods, skipped = _methods(task)
    base = {"task": task.spec.name, "model": cfg.model, "k": cfg.k}
    rows: list[dict] = []
    seconds = {"load": task.load_seconds, "zero_shot": 0.0, "entk": 0.0, "entk_solve": 0.0, "finetune": 0.0,
               "diagnostics": 0.0}
    test_labels = np.array([e.label for e in task.test_examples])
    union_labels = np.array([e.label for e in task.union.examples])
    checks: dict = {}

    z = _gathered(ctx, zero_shot_spec(task)) if "zero-shot" in methods else None
    if z is not None:
        z = z.result
        seconds["zero_shot"] += z["seconds"]
        rows.append({**base, "seed": None, "method": "zero-shot", "metric": "accuracy", "value": _num(z["accuracy"]),
                     "n_test": len(test_labels)})

    k0_inline = _k0_inline(cfg, methods)
    ft_records: dict[tuple[str, int], dict] = {}
    for seed in cfg.seeds:
        for method in ("sgd", "adam", "noprompt"):
            if f"ft-{method}" in methods:
                unit = _gathered(ctx, finetune_spec(task, method, seed, k0_inline))
                if unit is not None:
                    ft_records[(method, seed)] = unit.result

    kern = _kernel_rows(task, ctx, methods)
    for k in kern.values():
        seconds["entk"] += k["seconds"]
    if "prompt-sgd" in kern and "zero-shot" in methods:
        # Self-check: the engine's f_0 on the test rows must predict what zero-shot prompting predicts.
        f0 = kern["prompt-sgd"]["outputs"][list(task.union.test_rows)]
        checks["zero_shot_from_engine_outputs"] = accuracy(f0, test_labels)

    t = _timer()
    for seed in cfg.seeds:
        tr, te = task.union.train_rows[seed], task.union.test_rows
        solved: dict[str, np.ndarray] = {}
        if "prompt-sgd" in kern or "prompt-asigngd" in kern:
            ks, ka = kern.get("prompt-sgd"), kern.get("prompt-asigngd")
            outs = (ks or ka)["outputs"]
            solved.update(solve_seed(None if ks is None else ks["kernel"], None if ka is None else ka["kernel"],
                                     outs, union_labels, tr, te, ridge=cfg.kernel_ridge,
                                     logistic_ridge=cfg.logistic_ridge, gamma=cfg.asym_gamma))
        if "noprompt-sgd" in kern:
            kn = kern["noprompt-sgd"]
            res = solve_seed(kn["kernel"], None, kn["outputs"], union_labels, tr, te, ridge=cfg.kernel_ridge,
                             logistic_ridge=cfg.logistic_ridge)
            solved["K-SGD (no prompt)"] = res["K-SGD"]
            solved["K-SGD (no prompt, logistic)"] = res["K-SGD (logistic)"]
        for method, out in solved.items():
            rows.append({**base, "seed": seed, "method": method, "metric": "accuracy",
                         "value": accuracy(out, test_labels), "n_test": len(test_labels)})
    seconds["entk_solve"] += t()

    for (method, seed), rec in ft_records.items():
        diag = dict(rec.get("diagnostics", {}))
        seconds["finetune"] += rec.get("ft_seconds", rec.get("seconds", 0.0))
        seconds["diagnostics"] += diag.get("linearize_seconds", 0.0) + diag.get("kernel_seconds", 0.0)
        k0 = None
        if "kernel_ft" in diag and "kernel_distance" not in diag and _union_engine_differs(cfg):
            # K(theta_0) with the diagnostics' engine (same algorithm, sketch and hashes as K(theta_FT))
            unit = _gathered(ctx, diag_kernel0_spec(task, seed, diag["diag_train_positions"]))
            k0 = None if unit is None else unit.array("kernel")
        elif "kernel_ft" in diag and "kernel_distance" not in diag and "prompt-sgd" in kern:
            c = kern["prompt-sgd"]["num_outputs"]
            rows_u = [task.union.train_rows[seed][i] for i in diag["diag_train_positions"]]
            flat = (np.asarray(rows_u)[:, None] * c + np.arange(c)[None, :]).reshape(-1)
            k0 = kern["prompt-sgd"]["kernel"][np.ix_(flat, flat)]
        if k0 is not None:
            k1 = np.asarray(diag["kernel_ft"], float)
            diag.update(kernel_rel_change=kernel_rel_change(k0, k1), kernel_distance=kernel_distance(k0, k1))
        rows.append({**base, "seed": seed, "method": _FT_NAMES[method], "metric": "accuracy",
                     "value": _num(rec["accuracy"]), "n_test": len(test_labels),
                     "lr": rec.get("selected", {}).get("lr"), "batch_size": rec.get("selected", {}).get("batch_size"),
                     "best_step": rec.get("selected", {}).get("best_step")})
        for metric in ("linearized_accuracy", "ft_accuracy_diag", "zero_shot_accuracy_diag", "gain_recovered",
                       "lin_output_rel_error", "kernel_distance", "kernel_rel_change"):
            if metric in diag:
                rows.append({**base, "seed": seed, "method": _FT_NAMES[method], "metric": metric,
                             "value": _num(diag[metric]), "n_test": diag.get("diag_test_size")})

    write_table(ctx.out_dir / "results", rows)
    comp = comparison_rows(rows)
    write_table(ctx.out_dir / "comparison", comp)
    atomic_write_text(ctx.out_dir / "comparison.md", comparison_markdown(comp))

    acc = {r["method"]: r for r in comp if r["metric"] == "accuracy"}
    parts = [f"{m} {mean_std(acc[m], 100, 1)}" for m in METHOD_ORDER if m in acc]
    return {
        "headline": f"{task.spec.name} k={cfg.k} {cfg.model} ({len(cfg.seeds)} seeds, {len(test_labels)} test; "
                    f"accuracy % mean (sample std)): " + ", ".join(parts)
                    + (f" [partial: {len(ctx.units_missing)} units not computed yet]" if ctx.units_missing else ""),
        "task": task.spec.name, "model": task.lm.describe(), "k": cfg.k, "seeds": list(cfg.seeds),
        "test_size": len(test_labels), "kernel_union_size": len(task.union.examples),
        "label_tokens": None if task.label_tokens is None else task.label_tokens.record(),
        "accuracy": {m: {"mean": r["mean"], "std": r["std"], "n": r["n"], "ci_low": r["ci_low"],
                         "ci_high": r["ci_high"]} for m, r in acc.items()},
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "task_compute_seconds": round(sum(seconds.values()), 2),
        "this_invocation_seconds": round(t_total(), 2),
        "kernel_plans": {n: k["plan_text"] for n, k in kern.items()},
        "checks": checks, "skipped": skipped,
        "data": {k: v for k, v in task.data.describe().items() if k not in ("files",)},
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
    }


EXPERIMENT = Experiment(
    name="malladi",
    config_cls=MalladiConfig,
    presets=PRESETS,
    run=run,
    figures=("figures.malladi:redraw",),
    verifier="ntk",
    plan=plan,
    reproduce=(),
    help=("Malladi et al. 2023, 'A Kernel-Based View of Language Model Fine-Tuning': prompt-based fine-tuning "
          "(SGD, Adam) vs the eNTK solutions (K-SGD, K-A-SignGD) on k-shot real tasks, standard fine-tuning "
          "without a prompt and its kernel, zero-shot, and kernel-behaviour diagnostics.\n\nexample:\n"
          "  ftsim run malladi --preset quick --task SST-2 --model smollm2 --k 16 --seeds 13,21,42,87,100"),
)
