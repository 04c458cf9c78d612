"""``ftsim run smart``: SMART (Jiang et al., ACL 2020) on a real pretrained LM, k-shot prompt-based fine-tuning.

For each task, each data seed and each method -- FT (prompt-based fine-tuning of every parameter with Adam,
LM-BFF's protocol), FT + R_s (the smoothness-inducing adversarial regularizer on the input embeddings), FT + R_s +
VBPP and FT + R_s + MBPP (plus the Bregman proximal point term with the vanilla or the momentum anchor), and
optionally FT + R_s in the public codes' normalised form -- one cached unit fine-tunes the prompt classifier of
:mod:`real_tasks.classify` and measures

* test accuracy (LM-BFF's selection of the best validation checkpoint),
* robust accuracy: accuracy after PGD on the cross-entropy in an l_inf ball of the *input embeddings* (padding not
  perturbed), on the first ``robust_size`` test examples,
* local sensitivity: the symmetric KL between the outputs at the embeddings and at the perturbation that K ascent
  steps find in the same ball (SMART's own inner problem),
* distance to the pretrained weights ||theta - theta_0|| / ||theta_0||,
* seconds per optimizer step (median over steps without a validation pass), for the cost against FT.

Every unit is data (:func:`plan`: one ``smart.zero-shot`` unit per task, one ``smart.finetune`` unit per task, seed
and method, computed by :func:`compute_unit` from the config alone), so an executor can compute them in worker
processes before :func:`run` gathers them from the unit cache. A worker loads each task's data and model once; a
real model is shared by the tasks and restored to its checkpoint's weights before every unit.

The classifier is evaluated at given embeddings through the LM's ``inputs_embeds`` (:func:`prompt_forward_embeds`,
checked against ``PromptClassifier.forward`` in the tests); the perturbation sizes are relative to the RMS entry of
the LM's input-embedding table (SmolLM2-135M: 0.136; SMART's eps = 1e-5 is absolute for BERT).

Tables (``ftsim.core.tables``): ``results.jsonl/csv`` (task, model, k, seed, method, metric, value),
``comparison`` (mean, sample std and 95% t interval over seeds), ``differences`` (each method minus FT on the same
seeds, 95% interval, verdict; seed-spread ratio with the Pitman-Morgan interval), ``cost``, ``comparison.md``,
``claims.md``; the runner draws ``smart.pdf/png`` (:mod:`figures.smart`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from typing import Literal, Optional

import numpy as np

from ftsim.core.errors import InputError
from ftsim.core.config import config_hash
from ftsim.core.experiment import Experiment, RunContext, UnitSpec, loaded_once
from ftsim.core.io import atomic_write_text, stable_hash, write_json, write_table
from ftsim.core.tables import aggregate, markdown_table, mean_std

__all__ = ["SmartConfig", "PRESETS", "EXPERIMENT", "ALL_METHODS", "METHOD_LABELS", "prompt_embed",
           "prompt_forward_embeds", "prompt_mask", "method_value", "run", "plan", "compute_unit", "UNIT_VERSIONS"]

ALL_METHODS = ("ft", "ft-rs", "ft-rs-vbpp", "ft-rs-mbpp", "ft-rs-public")
METHOD_LABELS = {"zero-shot": "zero-shot", "ft": "FT", "ft-rs": "FT + R_s", "ft-rs-vbpp": "FT + R_s + VBPP",
                 "ft-rs-mbpp": "FT + R_s + MBPP", "ft-rs-public": "FT + R_s (public normalisation)"}
# 2: each task of a multi-task run starts from the weights it loaded (1 could start a later task from an earlier
# task's fine-tuned weights, under the same key)
UNIT_VERSIONS = {"finetune": 2, "zero-shot": 2}


def _num(x) -> float | None:
    """A float from a stored value (strict JSON keeps NaN as the string "nan")."""
    return None if x is None else float(x)


def _f(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class SmartConfig:
    """Settings of one ``smart`` run. Defaults are the paper's where it has one (Adam, lambda_s = 1, mu = 1,
    beta = 0.99, K = 1, eta / eps = 100, sigma / eps = 1, l_inf) and LM-BFF's few-shot protocol otherwise (k = 16,
    five data seeds, 1000 steps, validation every 100); ``quick`` shrinks what a 2-core CPU cannot afford."""

    tasks: tuple[str, ...] = _f(("SST-2", "MR"), "tasks (each its own units; a run over several reuses them)")
    model: str = _f("smollm2", "smollm2 | tiny-causal | tiny-masked | GGUF path | local dir")
    k: int = _f(16, "training (and validation) examples per class")
    seeds: tuple[int, ...] = _f((13, 21, 42, 87, 100), "data seeds (LM-BFF's five)")
    data_dir: Optional[str] = _f(None, "data folder (default $FTSIM_DATA or ../shared/data/text_classification)")
    test_size: int = _f(1000, "test examples (a seeded draw, the same for every seed and method)")
    robust_size: int = _f(200, "test examples (the first of the test set) for robust accuracy and sensitivity")
    methods: tuple[str, ...] = _f(("ft", "ft-rs", "ft-rs-vbpp", "ft-rs-mbpp"), "subset of " + ",".join(ALL_METHODS))
    steps: int = _f(1000, "fine-tuning steps (LM-BFF: 1000)")
    batch_size: int = _f(8, "mini-batch size")
    lr: float = _f(1e-5, "Adam learning rate (LM-BFF's grid: 1e-5, 2e-5, 5e-5)")
    eval_every: int = _f(100, "validate every this many steps and keep the best checkpoint (LM-BFF: 100)")
    max_grad_norm: Optional[float] = _f(1.0, "gradient-norm clipping")
    lambda_s: float = _f(1.0, "lambda_s, the weight of R_s (SMART: 1, 3 or 5)")
    eps_rel: float = _f(0.1, "eps / RMS entry of the input-embedding table (l_inf: per coordinate)")
    ascent_steps: int = _f(1, "K, ascent steps of R_s's inner maximisation (SMART: 1)")
    step_size_rel: float = _f(100.0, "eta / eps (SMART: 1e-3 / 1e-5)")
    init_std_rel: float = _f(1.0, "sigma / eps (SMART: 1e-5 / 1e-5)")
    norm: Literal["linf", "l2"] = _f("linf", "norm of the ball (SMART's Algorithm 1: linf)")
    public_radius: float = _f(1.0, "per-token norm of the public codes' normalised perturbation (their value: 1)")
    mu: float = _f(1.0, "mu, weight of the Bregman proximal term (SMART: 1)")
    beta: float = _f(0.99, "beta of the momentum anchor (SMART: 0.99)")
    prox_every: int = _f(4, "S, steps per proximal point (with S = 1 VBPP equals FT + R_s: no dropout in SmolLM2)")
    eval_eps_rel: float = _f(0.05, "eps / RMS embedding entry of the evaluation attack and sensitivity ascent")
    eval_steps: int = _f(10, "ascent steps of the evaluation attack (PGD) and of the sensitivity ascent")
    eval_batch_size: int = _f(8, "batch size of the evaluation attacks")
    label_mode: Literal["first"] = _f("first", "label-word scores: the first token's logit")
    threads: int = _f(0, "torch CPU threads (0: torch's default)")

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(ALL_METHODS)
        if unknown:
            raise InputError(f"unknown {sorted(unknown)}; choose from {', '.join(ALL_METHODS)}", field="methods")
        if "ft" not in self.methods:
            raise InputError("must include ft (every comparison is against plain fine-tuning)", field="methods")
        if not self.tasks:
            raise InputError("at least one task", field="tasks")
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise InputError(f"need seeds >= 0, got {list(self.seeds)}", field="seeds")
        for name in ("k", "test_size", "robust_size", "steps", "batch_size", "prox_every", "eval_steps",
                     "eval_batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"must be >= 1, got {getattr(self, name)}", field=name)
        for name in ("eval_every", "threads", "ascent_steps", "lambda_s", "mu", "init_std_rel"):
            if getattr(self, name) < 0:
                raise InputError(f"must be >= 0, got {getattr(self, name)}", field=name)
        for name in ("lr", "eps_rel", "step_size_rel", "eval_eps_rel", "public_radius"):
            if not getattr(self, name) > 0:
                raise InputError(f"must be > 0, got {getattr(self, name)}", field=name)
        if not 0 <= self.beta < 1:
            raise InputError(f"must be in [0, 1), got {self.beta}", field="beta")
        if self.robust_size > self.test_size:
            raise InputError(f"must be <= test_size ({self.test_size}), got {self.robust_size}", field="robust_size")
        if self.label_mode != "first":
            raise InputError("only 'first' (one label token, the embeddings of one sequence)", field="label_mode")


PRESETS = {
    # What one task costs on the shared 2-core CPU within ~90 minutes (notes/issue-14-smart.md has the measured
    # per-step and per-example times): 5 seeds x 4 methods, 16 Adam steps of batch 8 (4 epochs of the 32
    # examples, Malladi et al.'s quick setting) at lr 1e-5 (their FT-Adam), validation every 4 steps, 200 test
    # examples, 32 of them attacked with 2 PGD / ascent steps.
    "quick": SmartConfig(test_size=200, robust_size=32, steps=16, eval_every=4, eval_steps=2, prox_every=4),
    "paper": SmartConfig(),
}


# ---------------------------------------------------------------------------------------------------------------
# The prompt classifier at given input embeddings
# ---------------------------------------------------------------------------------------------------------------

def prompt_embed(model, batch) -> "torch.Tensor":
    """(B, T, d) input embeddings of a :class:`real_tasks.models.PromptClassifier` batch (a function of theta
    through the LM's embedding table)."""
    return model.lm.get_input_embeddings()(batch["input_ids"])


def prompt_mask(batch) -> "torch.Tensor":
    """(B, T): the tokens R_s and the attacks may perturb (padding may not)."""
    return batch["attention_mask"]


def _keeps_last(lm) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(lm.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def prompt_forward_embeds(model, batch, embeds) -> "torch.Tensor":
    """:class:`real_tasks.models.PromptClassifier`'s label-word scores (B, C) computed from input embeddings
    (``inputs_embeds``) instead of token ids: the same attention mask (4-D additive when the classifier uses one),
    position ids and scored position, so that ``prompt_forward_embeds(m, b, prompt_embed(m, b)) == m(b)``."""
    import torch

    from real_tasks.models import attention_mask_4d

    if getattr(model, "label_mode", "first") != "first":
        raise ValueError("prompt_forward_embeds: only label_mode='first'")
    mask = batch["attention_mask"]
    kwargs = {"inputs_embeds": embeds,
              "attention_mask": attention_mask_4d(mask, model.kind == "causal", model.lm.dtype) if model.mask_4d
              else mask}
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    if model.kind == "causal" and _keeps_last(model.lm):
        logits = model.lm(**kwargs, logits_to_keep=1).logits[:, -1]  # (B, V): left padding, last position
    else:
        logits = model.lm(**kwargs).logits  # (B, T, V)
        logits = logits[torch.arange(logits.shape[0], device=logits.device), batch["pred_pos"]]
    return logits[:, model.label_ids]


def _perturbations(cfg: SmartConfig, rms: float) -> dict:
    from theory.smart import Perturbation

    eps = cfg.eps_rel * rms
    train = Perturbation(eps=eps, steps=cfg.ascent_steps, step_size=cfg.step_size_rel * eps,
                         init_std=cfg.init_std_rel * eps, norm=cfg.norm)
    public = dataclasses.replace(train, ball="token", variant="normalize", radius=cfg.public_radius)
    e = cfg.eval_eps_rel * rms
    attack = Perturbation(eps=e, steps=cfg.eval_steps, step_size=2.5 * e / cfg.eval_steps, init_std=e / 2,
                          norm="linf")
    return {"train": train, "public": public, "eval": attack}


def method_value(cfg: SmartConfig, method: str, rms: float):
    """The :class:`theory.finetune.Method` of ``method``: prompt-based FT of every parameter with Adam (linear
    decay, clipping, best validation checkpoint), plus R_s and the proximal anchors of :mod:`theory.smart`."""
    from theory.finetune import Method, Optimizer
    from theory.smart import momentum_bpp, smoothness_regularizer, vanilla_bpp

    pert = _perturbations(cfg, rms)
    regs = ()
    if method != "ft":
        p = pert["public"] if method == "ft-rs-public" else pert["train"]
        regs = (smoothness_regularizer(p, weight=cfg.lambda_s, embed=prompt_embed, forward_embeds=prompt_forward_embeds,
                                       mask=prompt_mask),)
    prox = {"ft-rs-vbpp": vanilla_bpp(cfg.mu, every=cfg.prox_every),
            "ft-rs-mbpp": momentum_bpp(cfg.mu, cfg.beta, every=cfg.prox_every)}.get(method)
    return Method(name=METHOD_LABELS[method], optimizer=Optimizer("adam", lr=cfg.lr, schedule="linear"),
                  steps=cfg.steps, batch_size=cfg.batch_size, eval_every=cfg.eval_every,
                  max_grad_norm=cfg.max_grad_norm, loss="ce", regularizers=regs, proximal=prox)


# ---------------------------------------------------------------------------------------------------------------
# A loaded task
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A model as loaded, with what fine-tuning overwrites kept aside.

    Attributes:
        lm: the :class:`real_tasks.models.LoadedLM` (its weights change in place while a unit fine-tunes it).
        theta0: CPU copy of its parameters at load time, restored before every unit.
        rms: RMS entry of its input-embedding table at theta_0 (the scale of every perturbation size).
    """

    lm: object
    theta0: dict
    rms: float


def _load_pretrained(model: str, device: str, cache, vocab: list[str] | None) -> Pretrained:
    from real_tasks.models import load_model

    lm = load_model(model, device=device, cache=cache, vocab=vocab)
    theta0 = {k: v.detach().to("cpu", copy=True) for k, v in lm.model.named_parameters()}
    rms = float(lm.model.get_input_embeddings().weight.detach().double().pow(2).mean().sqrt())
    return Pretrained(lm, theta0, rms)


def pretrained(cfg: SmartConfig, splits: dict, device: str, cache) -> Pretrained:
    """The model of ``cfg`` at theta_0, loaded once per process and device.

    A real model is shared by every task (and its theta_0 is the checkpoint's, whatever a unit of another task
    fine-tuned before); a tiny random one is built for a task's vocabulary and keyed by it.

    Args:
        cfg: the run's config (``model``).
        splits: data seed -> k-shot split of the task (the tiny models' vocabulary).
        device: torch device name.
        cache: unit cache where a GGUF model's de-quantized copy is kept.
    """
    vocab = _vocab(splits) if cfg.model.startswith("tiny-") else None
    key = ("smart.lm", cfg.model, device, None if vocab is None else stable_hash(vocab))
    return loaded_once(key, lambda: _load_pretrained(cfg.model, device, cache, vocab))


@dataclasses.dataclass
class Task:
    """Data, k-shot splits, the model at theta_0, prompt, label words, the embedding scale and the unit keys."""

    cfg: SmartConfig
    device: str
    progress: bool
    name: str
    splits: dict
    lm: object
    prompt: object
    label_tokens: object
    theta0: dict
    rms: float
    key_common: dict
    cache_root: str = ""
    encoded_sets: dict = dataclasses.field(default_factory=dict)

    @property
    def test_examples(self):
        return next(iter(self.splits.values())).test

    def classifier(self):
        from real_tasks.classify import make_classifier
        from theory.finetune import restore

        restore(self.lm.model, self.theta0)
        return make_classifier(self.lm, use_prompt=True, label_tokens=self.label_tokens,
                               label_mode="first").to(self.device)

    def encoded(self, name: str, examples):
        from real_tasks.classify import encode_set

        if name not in self.encoded_sets:
            self.encoded_sets[name] = encode_set(self.lm, examples, prompt=self.prompt, label_tokens=self.label_tokens,
                                                 max_length=self.prompt.max_length)
        return self.encoded_sets[name]

    def inputs(self, **settings) -> dict:
        return {**self.key_common, **settings}


def _vocab(splits) -> list[str]:
    from real_tasks.data import texts
    from real_tasks.prompts import PROMPTS, words_of

    pool = [e for s in splits.values() for e in (*s.train, *s.dev, *s.test)]
    return " ".join(texts(pool)).split() + words_of(PROMPTS.values())


def load_task(cfg: SmartConfig, name: str, *, device: str, cache, progress: bool = False) -> Task:
    """Data and k-shot splits of the task ``name``, the model at theta_0 (:func:`pretrained`), prompt, label words
    and the inputs every unit key of the task shares.

    Raises:
        InputError: the model has no LM head (SMART here fine-tunes the prompt classifier).
    """
    from real_tasks.data import kshot_split, load_task as load_data
    from real_tasks.prompts import get_prompt, label_token_ids

    data = load_data(name, cfg.data_dir)
    splits = {s: kshot_split(data, cfg.k, s, max_test=cfg.test_size) for s in cfg.seeds}
    pre = pretrained(cfg, splits, device, cache)
    if not pre.lm.has_lm_head:
        raise InputError(f"{cfg.model} has no LM head: SMART here fine-tunes the prompt classifier", field="model")
    prompt = get_prompt(data.spec.name)
    label_tokens = label_token_ids(pre.lm.tokenizer, prompt, pre.lm.kind)
    test_index = list(next(iter(splits.values())).test_index)
    key_common = {"model": pre.lm.fingerprint, "task": data.spec.name, "k": cfg.k, "data_files": data.files,
                  "test_index": stable_hash(test_index), "prompt": dataclasses.asdict(prompt)}
    return Task(cfg, device, progress, data.spec.name, splits, pre.lm, prompt, label_tokens, pre.theta0, pre.rms,
                key_common, cache_root=str(cache.root) if cache is not None else "")


def _task_key(cfg: SmartConfig, name: str, device: str, cache_root: str) -> tuple:
    from real_tasks.data import task_spec

    return ("smart", config_hash(cfg), device, cache_root, task_spec(name).name)


def _task(cfg: SmartConfig, ctx: RunContext, name: str) -> Task:
    """The task ``name`` of this run, loaded once per process: the plan, the run and the units computed in this
    process share it."""
    return loaded_once(_task_key(cfg, name, ctx.device, str(ctx.cache.root)),
                       lambda: load_task(cfg, name, device=ctx.device, cache=ctx.cache, progress=ctx.progress))


# ---------------------------------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------------------------------

def _eval_settings(cfg: SmartConfig) -> dict:
    return {"test_size": cfg.test_size, "robust_size": cfg.robust_size, "eval_eps_rel": cfg.eval_eps_rel,
            "eval_steps": cfg.eval_steps, "eval_batch_size": cfg.eval_batch_size}


def _train_settings(cfg: SmartConfig, method: str) -> dict:
    d = {"method": method, "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
         "eval_every": cfg.eval_every, "max_grad_norm": cfg.max_grad_norm}
    if method != "ft":
        d.update(lambda_s=cfg.lambda_s, eps_rel=cfg.eps_rel, ascent_steps=cfg.ascent_steps,
                 step_size_rel=cfg.step_size_rel, init_std_rel=cfg.init_std_rel, norm=cfg.norm)
    if method == "ft-rs-public":
        d["public_radius"] = cfg.public_radius
    if method in ("ft-rs-vbpp", "ft-rs-mbpp"):
        d.update(mu=cfg.mu, prox_every=cfg.prox_every, beta=cfg.beta if method == "ft-rs-mbpp" else 0.0)
    return d


def _spec(task: Task, kind: str, inputs: dict, label: str, **params) -> UnitSpec:
    """A unit of this run as data: its key, and :func:`compute_unit` with the config, the task and the unit's
    parameters."""
    return UnitSpec(f"smart.{kind}", UNIT_VERSIONS[kind], inputs, "real_tasks.smart:compute_unit",
                    {"config": dataclasses.asdict(task.cfg), "device": task.device, "cache_root": task.cache_root,
                     "task": task.name, "unit": kind, **params}, label=f"{task.name} {label}")


def zero_shot_spec(task: Task) -> UnitSpec:
    """Accuracy, robust accuracy and sensitivity of the prompt classifier at theta_0."""
    return _spec(task, "zero-shot", task.inputs(unit="zero-shot", **_eval_settings(task.cfg)), "zero-shot")


def finetune_spec(task: Task, method: str, seed: int) -> UnitSpec:
    """Fine-tune with ``method`` on the k-shot split of data seed ``seed``, then every metric of the module
    docstring."""
    import torch

    inputs = task.inputs(unit=f"{method}-s{seed}", seed=seed, **_train_settings(task.cfg, method),
                         **_eval_settings(task.cfg), device=torch.device(task.device).type)
    return _spec(task, "finetune", inputs, f"{METHOD_LABELS[method]} seed {seed}", method=method, seed=seed)


def task_specs(task: Task) -> list[UnitSpec]:
    """The units of one task in the order of its result rows: zero-shot, then every method on every seed."""
    cfg = task.cfg
    return [zero_shot_spec(task), *(finetune_spec(task, m, s) for s in cfg.seeds for m in cfg.methods)]


def plan(cfg: SmartConfig, ctx: RunContext) -> list[UnitSpec]:
    """Every unit of the run as data, task by task (loads each task's data and model once, for the keys)."""
    return [spec for name in cfg.tasks for spec in task_specs(_task(cfg, ctx, name))]


def compute_unit(work, config: dict, device: str, cache_root: str, task: str, unit: str, **params) -> dict:
    """Compute one unit (in this process or an executor's worker) from the config alone.

    Args:
        work: the unit's work directory (unused: results are JSON).
        config: ``dataclasses.asdict`` of the run's :class:`SmartConfig`.
        device: torch device name.
        cache_root: the unit cache (a GGUF model's de-quantized copy is kept there).
        task: task name; its data and model are loaded once per process.
        unit: ``zero-shot`` or ``finetune``.
        **params: the unit's parameters (``method``, ``seed`` of a fine-tuning unit).
    """
    from ftsim.core.cache import UnitCache
    from ftsim.core.config import config_from_dict

    cfg = config_from_dict(SmartConfig, config)
    loaded = loaded_once(_task_key(cfg, task, device, cache_root),
                         lambda: load_task(cfg, task, device=device, cache=UnitCache(cache_root)))
    from ftsim.core.threads import threads_if

    with threads_if(cfg.threads):  # float32 reductions depend on the thread count: a unit is the same everywhere
        return _dispatch(loaded, unit, params)


def _dispatch(task: Task, unit: str, params: dict) -> dict:
    if unit == "zero-shot":
        return _zero_shot(task)
    if unit == "finetune":
        return _finetune(task, params["method"], params["seed"])
    raise ValueError(f"unknown smart unit {unit!r}")


def _robustness(task: Task, module, test, seed: int) -> dict:
    """Robust accuracy (PGD on the cross-entropy) and sensitivity (the SKL ascent) on the first robust_size test
    examples, in mini-batches; perturbations from a generator seeded by the data seed."""
    import torch

    from real_tasks.models import batch_to
    from theory.smart import local_sensitivity, robust_correct

    cfg = task.cfg
    pert = _perturbations(cfg, task.rms)["eval"]
    module.eval()
    gen = torch.Generator().manual_seed(30_000 + seed)
    n = min(cfg.robust_size, len(test))
    correct, sens = [], []
    for start in range(0, n, cfg.eval_batch_size):
        idx = torch.arange(start, min(n, start + cfg.eval_batch_size))
        batch = batch_to(test.select(idx), task.device)
        labels = test.labels[idx]
        with torch.no_grad():
            x = prompt_embed(module, batch)

        def f(e, batch=batch):
            return prompt_forward_embeds(module, batch, e)

        mask = prompt_mask(batch)
        correct.append(robust_correct(f, x, labels, pert, mask=mask, generator=gen))
        sens.append(local_sensitivity(f, x, pert, mask=mask, generator=gen).double().cpu())
    return {"robust_accuracy": float(torch.cat(correct).double().mean()), "sensitivity": float(torch.cat(sens).mean()),
            "robust_n": n}


def _zero_shot(task: Task) -> dict:
    from theory.finetune import evaluate
    from theory.metrics import accuracy

    t0 = time.perf_counter()
    test = task.encoded("test", task.test_examples)
    module = task.classifier()
    scores = evaluate(module, test, task.device)
    out = {"accuracy": accuracy(scores, test.labels), **_robustness(task, module, test, seed=0)}
    return {"metrics": out, "seconds": time.perf_counter() - t0}


def _finetune(task: Task, method: str, seed: int) -> dict:
    import torch

    from theory.finetune import evaluate, finetune
    from theory.metrics import accuracy

    cfg = task.cfg
    split = task.splits[seed]
    train = task.encoded(f"train-{seed}", split.train)
    dev = task.encoded(f"dev-{seed}", split.dev)
    test = task.encoded("test", task.test_examples)
    module = task.classifier()
    m = method_value(cfg, method, task.rms)
    stamps: list[float] = []
    t0 = time.perf_counter()
    res = finetune(module, train, m, seed=seed, device=task.device, dev=dev, progress=task.progress,
                   desc=f"{task.name} {method} s{seed}", on_step=lambda s, mod: stamps.append(time.perf_counter()))
    ft_seconds = time.perf_counter() - t0
    evals = {h["step"] for h in res.history if "dev_acc" in h}
    steps = [stamps[i] - stamps[i - 1] for i in range(1, len(stamps)) if (i + 1) not in evals]
    t1 = time.perf_counter()
    scores = evaluate(module, test, task.device)
    metrics = {"accuracy": accuracy(scores, test.labels), "dev_acc": res.best_dev_acc,
               "best_step": res.best_step, "final_train_loss": res.final_train_loss,
               "seconds_per_step": float(np.median(steps)) if steps else float("nan")}
    metrics["dist_init"] = _dist_init(module, task.theta0)
    metrics.update(_robustness(task, module, test, seed))
    rec = {"method": method, "seed": seed, "metrics": metrics, "ft_seconds": ft_seconds,
           "eval_seconds": time.perf_counter() - t1, "history": [h for h in res.history if "dev_acc" in h]}
    del module
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rec


def _dist_init(module, theta0: dict) -> float:
    """||theta - theta_0|| / ||theta_0|| over every LM parameter, in float64."""
    from theory.finetune import snapshot

    theta = snapshot(module)
    num = sum(float(((theta["lm." + k].double() - v.double()) ** 2).sum()) for k, v in theta0.items())
    den = sum(float((v.double() ** 2).sum()) for v in theta0.values())
    return math.sqrt(num / den)


# ---------------------------------------------------------------------------------------------------------------
# Run and tables
# ---------------------------------------------------------------------------------------------------------------

def run(cfg: SmartConfig, ctx: RunContext) -> dict:
    from ftsim.core.threads import threads_if

    with threads_if(cfg.threads):
        return _run(cfg, ctx)


def _run(cfg: SmartConfig, ctx: RunContext) -> dict:
    t_all = time.perf_counter()
    rows, seconds, info, splits = [], {"finetune": 0.0, "eval": 0.0, "zero_shot": 0.0}, {}, []
    for name in cfg.tasks:
        task = _task(cfg, ctx, name)
        splits += [s.record() for s in task.splits.values()]
        info[task.name] = {"embedding_rms": task.rms, "eps": cfg.eps_rel * task.rms,
                           "eval_eps": cfg.eval_eps_rel * task.rms, "test_size": len(task.test_examples)}
        for spec in task_specs(task):
            result = ctx.unit_of(spec).result
            rows += _unit_rows(task, spec, result)
            for k, v in _unit_seconds(spec, result).items():
                seconds[k] += v
    write_json(ctx.out_dir / "splits.json", {"splits": splits})
    comp, diffs, cost = _write_tables(ctx.out_dir, rows)
    acc = {(r["task"], r["method"]): r for r in comp if r["metric"] == "accuracy"}
    head = "; ".join(f"{t}: " + ", ".join(f"{m} {mean_std(r, 100, 1)}" for (tt, m), r in acc.items() if tt == t)
                     for t in dict.fromkeys(t for t, _ in acc))
    return {"headline": f"smart {cfg.model} k={cfg.k} ({len(cfg.seeds)} seeds; accuracy % mean (sample std)): "
                        + head,
            "tasks": info, "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "this_invocation_seconds": round(time.perf_counter() - t_all, 1),
            "verdicts": {f"{d['task']} {d['method']}: {d['metric']}": d["verdict"] for d in diffs},
            "cost_vs_ft": {f"{r['task']} {r['method']}": r["mean"] for r in cost}}


def _write_tables(out_dir, rows: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Write the results, comparison, differences and cost tables and their markdown; return the last three."""
    from theory.smart import compare_to_baseline

    write_table(out_dir / "results", rows)
    comp = aggregate(rows, ("task", "model", "k", "method", "metric"))
    write_table(out_dir / "comparison", comp)
    tuned = [r for r in rows if r["method"] != "zero-shot"]
    diffs = compare_to_baseline(tuned, "FT", group=("task",))
    write_table(out_dir / "differences", diffs)
    cost = _cost_rows(tuned)
    write_table(out_dir / "cost", cost)
    atomic_write_text(out_dir / "comparison.md", comparison_markdown(comp, cost))
    atomic_write_text(out_dir / "claims.md", claims_markdown(diffs))
    return comp, diffs, cost


def _unit_rows(task: Task, spec: UnitSpec, result: dict) -> list[dict]:
    """The tidy rows (task, model, k, seed, method, metric, value) of one unit's metrics."""
    zero = spec.args["unit"] == "zero-shot"
    base = {"task": task.name, "model": task.cfg.model, "k": task.cfg.k, "seed": None if zero else spec.args["seed"],
            "method": "zero-shot" if zero else METHOD_LABELS[spec.args["method"]]}
    return [{**base, "metric": metric, "value": _num(value)} for metric, value in result["metrics"].items()
            if metric != "robust_n"]


def _unit_seconds(spec: UnitSpec, result: dict) -> dict[str, float]:
    """Seconds the unit took when it was computed, by phase."""
    if spec.args["unit"] == "zero-shot":
        return {"zero_shot": result["seconds"]}
    return {"finetune": result["ft_seconds"], "eval": result["eval_seconds"]}


def _cost_rows(rows: list[dict]) -> list[dict]:
    from ftsim.core.tables import summarize

    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        sub = [r for r in rows if r["task"] == task and r["metric"] == "seconds_per_step"]
        base = {r["seed"]: r["value"] for r in sub if r["method"] == "FT"}
        for m in dict.fromkeys(r["method"] for r in sub):
            st = summarize(r["value"] / base[r["seed"]] for r in sub if r["method"] == m and base.get(r["seed"])
                           and r["value"] is not None)
            out.append({"task": task, "method": m, "metric": "cost vs FT (x)", **st.row()})
    return out


def comparison_markdown(comp: list[dict], cost: list[dict]) -> str:
    """Per task and method: accuracy, robust accuracy (percent), sensitivity, distance to init, cost per step
    against FT: mean (sample std) over seeds."""
    metrics = ("accuracy", "robust_accuracy", "sensitivity", "dist_init")
    by = {(r["task"], r["method"], r["metric"]): r for r in comp}
    cst = {(r["task"], r["method"]): r for r in cost}
    keys = list(dict.fromkeys((r["task"], r["method"]) for r in comp))
    body = []
    for t, m in keys:
        cells = []
        for metric in metrics:
            r = by.get((t, m, metric))
            scale, digits = (100, 1) if metric.endswith("accuracy") else (1, 4)
            cells.append(mean_std(r, scale, digits) if r else "")
        c = cst.get((t, m))
        body.append([t, m, *cells, mean_std(c, 1, 2) if c else "", by.get((t, m, "accuracy"), {}).get("n", "")])
    return ("Mean (sample std) over data seeds (zero-shot: one value).\n\n"
            + markdown_table(["task", "method", "accuracy %", "robust accuracy %", "sensitivity (SKL)",
                              "||theta - theta_0|| / ||theta_0||", "cost per step vs FT (x)", "seeds"], body))


def claims_markdown(diffs: list[dict]) -> str:
    body = [[d["task"], d["method"], d["metric"], d["expected"], d["statistic"], f"{d['value']:.4g}",
             f"[{d['ci_low']:.4g}, {d['ci_high']:.4g}]", d["n"], d["verdict"]] for d in diffs]
    return ("Each method against FT on the same data seeds: mean paired difference with its 95% t interval; seed "
            "spread: ratio of sample stds with the Pitman-Morgan interval.\n\n"
            + markdown_table(["task", "method", "metric", "expected", "statistic", "value", "95% CI", "seeds",
                              "verdict"], body))


EXPERIMENT = Experiment(
    name="smart",
    config_cls=SmartConfig,
    presets=PRESETS,
    run=run,
    figures=("figures.smart:redraw",),
    verifier="smart",
    plan=plan,
    reproduce=(),
    help=("SMART (Jiang et al. 2020) on k-shot real tasks: prompt-based FT vs FT + R_s (+ VBPP / MBPP): accuracy, "
          "seed spread, robust accuracy under input-embedding perturbations, sensitivity, distance to init, cost.\n\n"
          "example:\n  ftsim run smart --preset quick --tasks SST-2 --model smollm2"),
)
