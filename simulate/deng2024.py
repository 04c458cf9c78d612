"""Deng, Hong, Zhou & Mahdavi (AISTATS 2024) in the HMM world, where every term of their bound is computable.

The world. Sequences x_0..x_T of a ``wei2021`` HMM; pretraining is a masked LM (:class:`SmallTransformer`) on
them; the downstream task reads the input ``[MASK, x_1..x_T]`` -- exactly a pretraining input with x_0 masked, so
the distribution-heterogeneity term of the bound is zero -- and predicts y = 1[X_0 in S] for a fixed half S of
the vocabulary (a property of the masked token). Then, exactly per input (MC over inputs, with standard errors):

* pretraining excess risk E_pre = E_x KL(G(x) || q(x)), G(x) = P(X_0 | x_1..T) by forward-backward
  (:mod:`simulate.inference`), q the model's distribution at the mask -- the MLM's excess cross-entropy there;
* Bayes: p(x) = P(y = 1 | x) = sum_{v in S} G(x)_v; the downstream excess squared risk of a predictor f is
  E (f(x) - p(x))^2, of a classifier 1[f >= 1/2] the excess 0-1 risk E |2p - 1| 1[disagrees with 1[p >= 1/2]];
* two representations for norm-bounded linear heads (:mod:`theory.pretraining_bound`): ``hidden``, the final
  layer-normed hidden state at the mask divided by sqrt(d_model) (Deng et al.'s encoder h; the decoder g is the
  output layer), and ``output``, q itself (Wei et al.'s G-feature), for which Pinsker proves
  (C_beta, beta) = (span(u)^2 / 2, 1) = (1/2, 1) for squared loss.

D1 (transferability): masked LMs of several widths and seeds, with checkpoints along training (this module's own
loop, :func:`pretrain_checkpoints`); per checkpoint E_pre, the transfer term T_B(h), the fine-tuned head's excess
risk on ``label_draws`` labelled samples and the bound :func:`theory.pretraining_bound.clipped_square_bound`.
(C_beta, beta) is fitted per run and pooled, checked on a held-out seed, and the bound's slack reported.

D2 (RadReg): the same pretraining with lambda * B E_sigma ||(1/m) sum sigma_j h(x_j)|| on unlabelled downstream
inputs added to the MLM loss (the closed form of the inner max over linear heads), at equal steps; paired
differences against plain MLM (same seeds) of the Rademacher term, E_pre, T_B and the downstream excess risk.

``ftsim verify pretraining-bound`` checks the exact parts; ``ftsim run deng2024 --preset quick`` runs D1 and D2.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ftsim.core.claims import Claim
from ftsim.core.errors import InputError
from ftsim.core.experiment import Experiment, RunContext, UnitSpec, Verifier
from ftsim.core.io import atomic_write_text, write_table
from ftsim.core.tables import markdown_table, paired_difference, summarize
from ftsim.core.threads import single_threaded
from simulate.hmm import HMM, wei2021_hmm
from simulate.sampling import sample
from simulate.wei2021.models import SmallTransformer, TransformerConfig, cosine_lr
from simulate.wei2021.oracles import mask_posteriors
from simulate.wei2021.pretrain import derive_seed
from theory.pretraining_bound import (
    ball_least_squares,
    clipped_square_bound,
    envelope_constant,
    fit_transferability,
    khintchine_kahane_bounds,
    kl_rows,
    pinsker_transfer_constants,
    pretraining_excess_risk,
    rademacher_linear,
    radreg_penalty,
    square_loss_range,
    squared_excess,
    zero_one_excess,
)

__all__ = ["DengConfig", "PRESETS", "World", "make_world", "Population", "population", "labelled_sample",
           "RunSpec", "run_specs", "pretrain_checkpoints", "compute_pretrain", "plan", "representations",
           "evaluate_checkpoint", "transfer_analysis", "radreg_analysis", "run", "enumerate_inputs", "EXPERIMENT",
           "VERIFIER", "PRETRAIN_VERSION", "EVAL_VERSION"]

PRETRAIN_VERSION = 1  # bump when pretrain_checkpoints changes
EVAL_VERSION = 2  # bump when evaluate_checkpoint changes
REPRESENTATIONS = ("hidden", "output")


def _f(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class DengConfig:
    num_states: int = _f(10, "hidden states m of the wei2021 HMM")
    vocab_size: int = _f(10, "vocabulary size n")
    hmm_seed: int = _f(1, "seed of the HMM (1: its task is balanced and informative, see the notes)")
    trans_temp: float = _f(0.05, "transition temperature of the wei2021 HMM (lower: closer to deterministic)")
    emit_temp: float = _f(0.05, "emission temperature of the wei2021 HMM")
    length: int = _f(12, "T: observed tokens x_1..x_T after the masked x_0")
    task_size: int = _f(5, "|S|: the downstream label is y = 1[X_0 in S]")
    task_seed: int = _f(0, "seed of S and of the downstream samples")
    d_models: tuple[int, ...] = _f((16, 32, 64), "transformer widths of the plain MLM runs (model sizes, D1)")
    num_layers: int = _f(2, "transformer blocks")
    num_heads: int = _f(2, "attention heads (divides every width)")
    seeds: tuple[int, ...] = _f((0, 1, 2, 3, 4), "pretraining seeds (the last is D1's held-out seed)")
    steps: int = _f(4000, "pretraining optimiser steps (the equal budget of D2)")
    checkpoints: tuple[int, ...] = _f((0, 25, 50, 100, 200, 400, 800, 1600, 4000),
                                      "steps at which a checkpoint is kept (0 = initialisation; include steps)")
    batch_size: int = _f(64, "pretraining batch (sequences)")
    lr: float = _f(3e-3, "peak AdamW learning rate (linear warm-up, cosine decay to a tenth)")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    warmup: int = _f(50, "warm-up steps")
    mask_prob: float = _f(0.1, "masking rate of positions 1..T")
    mask0_prob: float = _f(1.0, "masking rate of x_0 (where the downstream mask sits)")
    corpus_sequences: int = _f(64_000, "pretraining corpus (sequences of T + 1 tokens)")
    radreg_weights: tuple[float, ...] = _f((0.01, 0.1), "RadReg weights lambda > 0 of D2 (lambda = 0 is the plain run)")
    radreg_d_models: tuple[int, ...] = _f((32,), "widths that get RadReg runs (each must be in d_models)")
    radreg_batch: int = _f(64, "unlabelled downstream inputs m per RadReg step")
    radreg_draws: int = _f(8, "sign vectors sigma per RadReg step (Monte Carlo of E_sigma)")
    unlabelled_pool: int = _f(4096, "unlabelled downstream inputs RadReg draws from")
    head_norm: float = _f(4.0, "B: linear heads ||w|| <= B (the bound, D1, and RadReg's penalty)")
    head_norms: tuple[float, ...] = _f((1.0, 4.0, 16.0), "B values compared at the final checkpoint (D2)")
    num_labelled: int = _f(64, "labelled downstream examples n of the fine-tuned head")
    label_draws: int = _f(10, "independent labelled samples per checkpoint")
    eval_inputs: int = _f(4000, "downstream inputs of the population estimates (half fit the comparator head)")
    rad_draws: int = _f(2000, "sign vectors of each Rademacher estimate")
    delta: float = _f(0.05, "the bound holds with probability >= 1 - delta")

    def __post_init__(self) -> None:
        positive = ("num_states", "vocab_size", "length", "num_layers", "num_heads", "steps", "batch_size",
                    "corpus_sequences", "radreg_batch", "radreg_draws", "unlabelled_pool", "num_labelled",
                    "label_draws", "rad_draws")
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"must be >= 1, got {getattr(self, name)}", field=name)
        if self.eval_inputs < 4:
            raise InputError(f"must be >= 4 (two halves of >= 2), got {self.eval_inputs}", field="eval_inputs")
        if not 1 <= self.task_size < self.vocab_size:
            raise InputError(f"must be in [1, vocab_size - 1] = [1, {self.vocab_size - 1}], got {self.task_size}",
                             field="task_size")
        if not self.d_models or min(self.d_models) < 1:
            raise InputError(f"need positive widths, got {self.d_models}", field="d_models")
        bad = [d for d in self.d_models if d % self.num_heads]
        if bad:
            raise InputError(f"widths {bad} are not multiples of num_heads={self.num_heads}", field="d_models")
        if len(self.seeds) < 1 or len(set(self.seeds)) != len(self.seeds):
            raise InputError(f"need distinct seeds, got {self.seeds}", field="seeds")
        cks = self.checkpoints
        if not cks or list(cks) != sorted(set(cks)) or cks[0] < 0 or cks[-1] != self.steps:
            raise InputError(f"must be increasing, >= 0 and end at steps={self.steps}, got {cks}", field="checkpoints")
        if any(w <= 0 or not math.isfinite(w) for w in self.radreg_weights):
            raise InputError(f"weights must be positive and finite, got {self.radreg_weights}", field="radreg_weights")
        missing = [d for d in self.radreg_d_models if d not in self.d_models]
        if missing:
            raise InputError(f"widths {missing} are not in d_models {self.d_models}", field="radreg_d_models")
        for name in ("head_norm", "trans_temp", "emit_temp"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise InputError(f"must be positive and finite, got {getattr(self, name)}", field=name)
        if not self.head_norms or min(self.head_norms) <= 0 or self.head_norm not in self.head_norms:
            raise InputError(f"need positive values that include head_norm={self.head_norm}, got {self.head_norms}",
                             field="head_norms")
        for name in ("mask_prob", "mask0_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise InputError(f"must be in [0, 1], got {getattr(self, name)}", field=name)
        if self.lr <= 0:
            raise InputError(f"must be > 0, got {self.lr}", field="lr")
        if not 0 < self.delta < 1:
            raise InputError(f"must be in (0, 1), got {self.delta}", field="delta")


PRESETS = OrderedDict(
    # quick: ~14 min on the shared 2-core machine (notes/issue-14-deng.md has the measured per-unit times): two
    # widths x five seeds of plain MLM and two RadReg weights x five seeds at width 32, 1200 steps of 64 sequences
    # each (13-31 s per plain run, 29-61 s per RadReg run, 2-9 s per run's evaluation, under load ~6).
    quick=DengConfig(d_models=(16, 32), seeds=(0, 1, 2, 3, 4), steps=1200,
                     checkpoints=(0, 25, 50, 100, 200, 400, 800, 1200), radreg_weights=(0.01, 0.1),
                     radreg_d_models=(32,), eval_inputs=4000, label_draws=10),
    paper=DengConfig(),
)


# ---------------------------------------------------------------------------------------------------------------
# The world: HMM, task, exact conditionals
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class World:
    """The HMM, the downstream task y = 1[X_0 in S] (u = indicator of S) and the sequence length T."""

    hmm: HMM
    u: np.ndarray
    length: int

    def describe(self) -> dict[str, Any]:
        return {"hmm": self.hmm.to_dict(), "u": self.u.tolist(), "length": self.length}


def make_world(config: DengConfig) -> World:
    """The ``wei2021`` HMM of ``hmm_seed`` and a uniformly drawn S of ``task_size`` tokens (``task_seed``)."""
    return _world_of(_world_key(config))


def _world_key(config: DengConfig) -> dict[str, Any]:
    return {"num_states": config.num_states, "vocab_size": config.vocab_size, "hmm_seed": config.hmm_seed,
            "trans_temp": config.trans_temp, "emit_temp": config.emit_temp, "length": config.length,
            "task_size": config.task_size, "task_seed": config.task_seed}


def _world_of(key: dict[str, Any]) -> World:
    hmm = wei2021_hmm(key["num_states"], key["vocab_size"], seed=key["hmm_seed"], trans_temp=key["trans_temp"],
                      emit_temp=key["emit_temp"])
    rng = np.random.default_rng(np.random.SeedSequence([key["hmm_seed"], key["task_seed"], 14]))
    u = np.zeros(key["vocab_size"])
    u[rng.choice(key["vocab_size"], size=key["task_size"], replace=False)] = 1.0
    return World(hmm, u, key["length"])


@dataclasses.dataclass(frozen=True)
class Population:
    """Downstream inputs with their exact conditionals.

    Attributes:
        observed: (N, T) tokens x_1..x_T (int64); the model reads ``[MASK] + observed``.
        G: (N, n) exact P(X_0 | x_1..T).
        p: (N,) exact P(y = 1 | x) = G @ u.
        y: (N,) labels drawn with the sequences (y = 1[x_0 in S] for the sampled x_0).
    """

    observed: np.ndarray
    G: np.ndarray
    p: np.ndarray
    y: np.ndarray

    def rows(self, sl: slice) -> "Population":
        return Population(self.observed[sl], self.G[sl], self.p[sl], self.y[sl])


def population(world: World, num: int, seed: int) -> Population:
    """``num`` sequences x_0..x_T of the HMM, x_0 hidden, with exact G, p and the sampled label."""
    full = sample(world.hmm, num, world.length + 1, seed).tokens.astype(np.int64)
    observed = full[:, 1:].copy()
    G = mask_posteriors(world.hmm, observed) @ world.hmm.emit
    return Population(observed, G, G @ world.u, world.u[full[:, 0]].astype(np.int64))


def labelled_sample(world: World, n: int, draw: int, task_seed: int) -> Population:
    """The ``draw``-th labelled downstream sample of n examples (shared by every run, so runs are paired)."""
    return population(world, n, derive_seed(task_seed, "labelled", draw))


# ---------------------------------------------------------------------------------------------------------------
# Pretraining with checkpoints and RadReg
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One pretraining run: width, seed and RadReg weight (0 = plain MLM)."""

    d_model: int
    seed: int
    radreg: float = 0.0

    @property
    def label(self) -> str:
        return f"d={self.d_model} seed={self.seed} radreg={self.radreg:g}"


def run_specs(config: DengConfig) -> list[RunSpec]:
    """D1's plain runs (every width and seed), then D2's RadReg runs."""
    plain = [RunSpec(d, s) for d in config.d_models for s in config.seeds]
    reg = [RunSpec(d, s, lam) for d in config.radreg_d_models for lam in config.radreg_weights for s in config.seeds]
    return plain + reg


def _pretrain_inputs(config: DengConfig, spec: RunSpec, device: str) -> dict[str, Any]:
    radreg = None
    if spec.radreg > 0:
        radreg = {"weight": spec.radreg, "batch": config.radreg_batch, "draws": config.radreg_draws,
                  "pool": config.unlabelled_pool, "head_norm": config.head_norm}
    return {"world": _world_key(config),
            "model": {"d_model": spec.d_model, "num_layers": config.num_layers, "num_heads": config.num_heads},
            "optim": {"steps": config.steps, "batch_size": config.batch_size, "lr": config.lr,
                      "weight_decay": config.weight_decay, "warmup": config.warmup},
            "mlm": {"mask_prob": config.mask_prob, "mask0_prob": config.mask0_prob,
                    "corpus_sequences": config.corpus_sequences},
            "radreg": radreg, "checkpoints": list(config.checkpoints), "seed": spec.seed,
            "device": torch.device(device).type}


def _new_model(inputs: dict[str, Any]) -> SmallTransformer:
    w, m = inputs["world"], inputs["model"]
    cfg = TransformerConfig(w["vocab_size"], w["length"] + 1, m["d_model"], m["num_layers"], m["num_heads"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(inputs["seed"], "deng2024-init", m["d_model"]))
        return SmallTransformer(cfg)


def _with_mask(model: SmallTransformer, observed: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T + 1): ``[MASK, x_1..x_T]``."""
    mask = torch.full((observed.shape[0], 1), model.config.mask_id, dtype=observed.dtype, device=observed.device)
    return torch.cat([mask, observed], dim=1)


def representations(model: SmallTransformer, observed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two representations at the mask of ``[MASK, x_1..x_T]``: hidden (B, d) = ln_f output / sqrt(d), and the
    logits (B, n) of q (the output representation is softmax of them). Differentiable."""
    x = model.embed(_with_mask(model, observed))
    for block in model.blocks:
        x = block(x)
    z = model.ln_f(x)[:, 0]  # (B, d)
    return z / math.sqrt(model.config.d_model), model.out(z)


def _mlm_loss(model: SmallTransformer, batch: torch.Tensor, mask_prob: float, mask0_prob: float,
              gen: torch.Generator) -> torch.Tensor:
    """Cross-entropy on masked positions: x_0 masked with probability mask0_prob, x_1..T with mask_prob."""
    u = torch.rand(batch.shape, generator=gen, device=batch.device)
    masked = u < mask_prob
    masked[:, 0] = u[:, 0] < mask0_prob
    if not bool(masked.any()):  # an empty loss would be NaN: predict x_0 then
        masked[:, 0] = True
    logits = model(torch.where(masked, torch.full_like(batch, model.config.mask_id), batch))  # (B, T + 1, n)
    return F.cross_entropy(logits[masked], batch[masked])


def pretrain_checkpoints(inputs: dict[str, Any], device: str = "cpu", progress: bool = False
                         ) -> tuple[dict[int, dict[str, torch.Tensor]], list[dict]]:
    """Train the masked LM described by :func:`_pretrain_inputs` and keep its weights at every checkpoint step.

    Every ``log_every`` steps the curve records the smoothed MLM loss and RadReg penalty. The corpus, the batches,
    the masks, the unlabelled pool and the RadReg signs are seeded from the inputs.

    Returns:
        ({step: state_dict on CPU}, curve rows).
    """
    from ftsim.core.progress import bar

    w, opt_cfg, mlm, reg = inputs["world"], inputs["optim"], inputs["mlm"], inputs["radreg"]
    world = _world_of(w)
    seed = inputs["seed"]
    model = _new_model(inputs).to(device).train()
    corpus = torch.as_tensor(sample(world.hmm, mlm["corpus_sequences"], world.length + 1,
                                    derive_seed(seed, "deng2024-corpus")).tokens.astype(np.int64), device=device)
    pool = None
    if reg is not None:
        pool = torch.as_tensor(population(world, reg["pool"], derive_seed(seed, "deng2024-pool")).observed,
                               device=device)
    gen = torch.Generator().manual_seed(derive_seed(seed, "deng2024-batches"))
    dev_gen = torch.Generator(device=device).manual_seed(derive_seed(seed, "deng2024-masks"))
    opt = torch.optim.AdamW(model.parameters(), lr=opt_cfg["lr"], weight_decay=opt_cfg["weight_decay"],
                            betas=(0.9, 0.98))
    keep = set(inputs["checkpoints"])
    states: dict[int, dict[str, torch.Tensor]] = {}
    curve: list[dict] = []
    running = {"loss": None, "penalty": None}
    steps = opt_cfg["steps"]
    log_every = max(1, steps // 40)
    for step in bar(range(steps + 1), desc=f"deng2024 pretrain d={inputs['model']['d_model']} seed={seed}",
                    disable=not progress):
        if step in keep:
            states[step] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if step == steps:
            break
        idx = torch.randint(0, len(corpus), (opt_cfg["batch_size"],), generator=gen)
        for group in opt.param_groups:
            group["lr"] = opt_cfg["lr"] * cosine_lr(step, steps, opt_cfg["warmup"])
        loss = _mlm_loss(model, corpus[idx.to(device)], mlm["mask_prob"], mlm["mask0_prob"], dev_gen)
        total, penalty = loss, None
        if reg is not None:
            j = torch.randint(0, len(pool), (reg["batch"],), generator=gen)
            hidden, _ = representations(model, pool[j.to(device)])
            penalty = radreg_penalty(hidden, reg["head_norm"], reg["draws"], generator=dev_gen)
            total = loss + reg["weight"] * penalty
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for key, val in (("loss", loss), ("penalty", penalty)):
            if val is not None:
                v = float(val.detach())
                running[key] = v if running[key] is None else 0.95 * running[key] + 0.05 * v
        if (step + 1) % log_every == 0:
            curve.append({"step": step + 1, "mlm_loss": running["loss"], "radreg_penalty": running["penalty"]})
    return states, curve


def compute_pretrain(work, inputs: dict[str, Any], device: str, progress: bool = False) -> dict[str, Any]:
    """The pretraining unit: every checkpoint's weights in ``checkpoints.safetensors`` (keys ``<step>.<name>``)
    and, as its result, the loss curve, the wall time and the parameter count."""
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    states, curve = pretrain_checkpoints(inputs, device, progress)
    flat = {f"{step:07d}.{k}": v.contiguous() for step, sd in states.items() for k, v in sd.items()}
    save_file(flat, str(work.path / "checkpoints.safetensors"))
    return {"curve": curve, "seconds": round(time.perf_counter() - t0, 2),
            "num_parameters": sum(v.numel() for v in states[inputs["checkpoints"][0]].values())}


def _pretrain_spec(config: DengConfig, spec: RunSpec, device: str) -> UnitSpec:
    inputs = _pretrain_inputs(config, spec, device)
    return UnitSpec("deng2024.pretrain", PRETRAIN_VERSION, inputs, "simulate.deng2024:compute_pretrain",
                    {"inputs": inputs, "device": device}, label=spec.label)


def plan(config: DengConfig, where: Any) -> list[UnitSpec]:
    """Every pretraining run as data (the expensive units; each run's evaluation is computed by :func:`run`).
    ``where`` is the run context or a device name."""
    device = getattr(where, "device", where)
    return [_pretrain_spec(config, s, device) for s in run_specs(config)]


def _pretrain_unit(ctx: RunContext, config: DengConfig, spec: RunSpec):
    us = _pretrain_spec(config, spec, ctx.device)
    return us.inputs, ctx.unit(us.kind, us.version, us.inputs,
                               lambda work: compute_pretrain(work, us.inputs, ctx.device, ctx.progress))


def _load_checkpoint(inputs: dict[str, Any], path, step: int) -> SmallTransformer:
    from safetensors.torch import load_file

    flat = load_file(str(path))
    prefix = f"{step:07d}."
    model = _new_model(inputs)
    model.load_state_dict({k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)})
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation of one checkpoint
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _features(model: SmallTransformer, observed: np.ndarray, batch: int = 2048) -> dict[str, np.ndarray]:
    """hidden (N, d), q (N, n) and log q (N, n), float64 (the log-softmax is taken in float64)."""
    hid, logq = [], []
    dev = next(model.parameters()).device
    for i in range(0, len(observed), batch):
        h, logits = representations(model, torch.as_tensor(observed[i:i + batch], device=dev))
        hid.append(h.double().cpu())
        logq.append(torch.log_softmax(logits.double(), dim=-1).cpu())
    log_q = torch.cat(logq).numpy()
    return {"hidden": torch.cat(hid).numpy(), "output": np.exp(log_q), "log_q": log_q}


def _feature_norm_bound(model: SmallTransformer) -> float:
    """sup_x ||hidden(x)||: the layer norm's normalised vector has norm <= sqrt(d), so ||gamma * u + beta|| / sqrt(d)
    <= ||gamma||_inf + ||beta||_2 / sqrt(d)."""
    d = model.config.d_model
    gamma, beta = model.ln_f.weight.detach(), model.ln_f.bias.detach()
    return float(gamma.abs().max()) + float(beta.norm()) / math.sqrt(d)


def _score_range(rep: str, w: np.ndarray, feature_bound: float) -> tuple[float, float]:
    """[s_min, s_max] of <w, h(x)> over every possible input: the simplex's corners for ``output``, the ball of
    radius ``feature_bound`` for ``hidden``."""
    if rep == "output":
        return float(w.min()), float(w.max())
    r = float(np.linalg.norm(w)) * feature_bound
    return -r, r


def _se(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def evaluate_checkpoint(model: SmallTransformer, world: World, pop: Population, labelled: list[Population],
                        head_norms: tuple[float, ...], rad_draws: int, delta: float, seed: int
                        ) -> tuple[list[dict], list[dict]]:
    """Every term of the bound at one checkpoint, for both representations and each B.

    ``pop`` is split in halves A and B: the comparator head w_bar = argmin_{||w|| <= B} mean_A (<w, h> - p)^2 is
    fitted on A, and every population quantity except E_pre is estimated on B (so R(w_bar) is an unbiased
    estimate for a fixed head, as the bound needs). E_pre and the Pinsker check use all of ``pop``.

    Returns:
        (checkpoint rows: one per representation and B, with means over the labelled draws; fine-tuning rows: one
        per representation, B and draw).
    """
    feats = _features(model, np.concatenate([pop.observed] + [s.observed for s in labelled]))
    N = len(pop.p)
    half = N // 2
    e_pre, e_pre_se = pretraining_excess_risk(pop.G, feats["log_q"][:N])
    kl = kl_rows(pop.G, feats["log_q"][:N])
    pB = pop.p[half:]
    fbound = {"hidden": _feature_norm_bound(model), "output": 1.0}
    ck_rows, ft_rows = [], []
    offset = N
    lab_feats = []
    for s in labelled:
        lab_feats.append({r: feats[r][offset:offset + len(s.p)] for r in REPRESENTATIONS})
        offset += len(s.p)
    for rep in REPRESENTATIONS:
        H = feats[rep][:N]
        base: dict[str, Any] = {"rep": rep, "pre_excess": e_pre, "pre_excess_se": e_pre_se,
                                "feature_bound": fbound[rep],
                                "feature_rms": float(np.sqrt((H ** 2).sum(axis=1).mean()))}
        if rep == "output":
            # Pinsker: E (<u, q> - p)^2 <= span(u)^2 / 2 E KL, and the plug-in 0-1 excess <= sqrt(2) span sqrt(E KL),
            # both on the same inputs (so they are exact inequalities on this sample)
            fu = H @ world.u
            c2, _ = pinsker_transfer_constants(world.u, "squared")
            c01, _ = pinsker_transfer_constants(world.u, "zero_one")
            base.update(theorem_lhs=float(squared_excess(fu, pop.p).mean()), theorem_rhs=c2 * float(kl.mean()),
                        theorem01_lhs=float(zero_one_excess(fu, pop.p).mean()),
                        theorem01_rhs=c01 * math.sqrt(float(kl.mean())))
        for B in head_norms:
            comp = ball_least_squares(H[:half], pop.p[:half], B)
            resid = squared_excess(H[half:] @ comp.w, pB)
            transfer = float(resid.mean())
            b_bar = square_loss_range(*_score_range(rep, comp.w, fbound[rep]))
            row = {**base, "head_norm": B, "transfer": transfer, "transfer_se": _se(resid),
                   "comparator_norm": float(np.linalg.norm(comp.w)), "comparator_range": b_bar}
            draws = []
            for r, (s, lf) in enumerate(zip(labelled, lab_feats)):
                hl = lf[rep]
                w_hat = ball_least_squares(hl, s.y, B).w
                f_hat = np.clip(H[half:] @ w_hat, 0.0, 1.0)
                ex = squared_excess(f_hat, pB)
                rad = rademacher_linear(hl, B, rad_draws, derive_seed(seed, rep, r, str(B)), delta / 3)
                terms = clipped_square_bound(transfer, rad, len(s.y), b_bar, delta)
                # Rad over its Khintchine-Kahane upper end (B/m) sqrt(sum ||h_j||^2): in [1/sqrt(2), 1], so for linear
                # heads the Rademacher term is a feature-norm measure up to this factor
                _, kk_top = khintchine_kahane_bounds(hl, B)
                d = {"rep": rep, "head_norm": B, "draw": r, "excess": float(ex.mean()), "excess_se": _se(ex),
                     "excess01": float(zero_one_excess(f_hat, pB).mean()), **rad.row("rad"), **terms.row("bound"),
                     "rad_kk_ratio": rad.value / kk_top, "head_norm_used": float(np.linalg.norm(w_hat))}
                d["holds"] = bool(d["excess"] <= d["bound"])
                draws.append(d)
            ft_rows.extend(draws)
            for key in ("excess", "excess01", "rad", "bound", "rad_kk_ratio"):
                st = summarize(d[key] for d in draws)
                row[f"{key}_mean"], row[f"{key}_std"] = st.mean, st.std
            row["bound_holds"] = float(np.mean([d["holds"] for d in draws]))
            row["slack_min"] = float(min(d["bound"] - d["excess"] for d in draws))
            ck_rows.append(row)
    return ck_rows, ft_rows


def _eval_inputs(config: DengConfig, pre_inputs: dict[str, Any]) -> dict[str, Any]:
    return {"pretrain": pre_inputs,
            "eval": {"eval_inputs": config.eval_inputs, "num_labelled": config.num_labelled,
                     "label_draws": config.label_draws, "rad_draws": config.rad_draws, "delta": config.delta,
                     "head_norm": config.head_norm, "head_norms": list(config.head_norms)}}


def _eval_unit(ctx: RunContext, config: DengConfig, spec: RunSpec, world: World, pop: Population,
               labelled: list[Population]):
    pre_inputs, pre_unit = _pretrain_unit(ctx, config, spec)
    inputs = _eval_inputs(config, pre_inputs)

    def compute(work):
        t0 = time.perf_counter()
        ck_rows, ft_rows = [], []
        last = config.checkpoints[-1]
        for step in config.checkpoints:
            model = _load_checkpoint(pre_inputs, pre_unit.file("checkpoints.safetensors"), step)
            norms = config.head_norms if step == last else (config.head_norm,)
            ck, ft = evaluate_checkpoint(model, world, pop, labelled, norms, config.rad_draws, config.delta,
                                         derive_seed(spec.seed, "deng2024-rad", step))
            ck_rows.extend({"step": step, **r} for r in ck)
            ft_rows.extend({"step": step, **r} for r in ft)
        return {"checkpoints": ck_rows, "finetune": ft_rows, "seconds": round(time.perf_counter() - t0, 2)}

    return pre_unit, ctx.unit("deng2024.eval", EVAL_VERSION, inputs, compute)


# ---------------------------------------------------------------------------------------------------------------
# D1 and D2 analyses (tidy rows in, tidy rows out)
# ---------------------------------------------------------------------------------------------------------------


def transfer_analysis(ck_rows: list[dict], ft_rows: list[dict], head_norm: float, held_out_seed: int) -> list[dict]:
    """D1 per representation: per-run slopes beta (mean, sample s.d., 95% t CI over runs), the pooled fit on the
    runs of every seed but ``held_out_seed`` and its check on that seed's checkpoints, the proven (1/2, 1) check of
    the output representation, and the bound's coverage and slack over every (checkpoint, draw).

    Uses the plain runs (radreg = 0) at B = ``head_norm``.
    """
    out = []
    for rep in REPRESENTATIONS:
        pts = [r for r in ck_rows if r["rep"] == rep and r["radreg"] == 0 and r["head_norm"] == head_norm]
        if not pts:
            continue
        runs = sorted({(r["d_model"], r["seed"]) for r in pts})
        betas = []
        for d, s in runs:
            sub = [r for r in pts if (r["d_model"], r["seed"]) == (d, s)]
            try:
                betas.append(fit_transferability([r["pre_excess"] for r in sub], [r["transfer"] for r in sub]).beta)
            except ValueError:
                pass
        st_beta = summarize(betas)
        train = [r for r in pts if r["seed"] != held_out_seed] or pts
        test = [r for r in pts if r["seed"] == held_out_seed and len(train) < len(pts)]
        fit = fit_transferability([r["pre_excess"] for r in train], [r["transfer"] for r in train])
        pooled = fit_transferability([r["pre_excess"] for r in pts], [r["transfer"] for r in pts])
        ratio = [fit.c_envelope * r["pre_excess"] ** fit.beta / r["transfer"] for r in test if r["transfer"] > 0]
        fts = [r for r in ft_rows if r["rep"] == rep and r["radreg"] == 0 and r["head_norm"] == head_norm]
        # the transferability form of the bound: C_beta E_pre^beta (pooled envelope) in place of the transfer term
        by_ck = {(r["d_model"], r["seed"], r["step"]): r for r in pts}
        tf_holds = [f["excess"] <= f["bound"] - f["bound_transfer"] + pooled.predict(
            by_ck[(f["d_model"], f["seed"], f["step"])]["pre_excess"]) for f in fts]
        row = {"rep": rep, "head_norm": head_norm, "num_runs": len(runs), "num_points": len(pts),
               "beta_mean": st_beta.mean, "beta_std": st_beta.std, "beta_ci_low": st_beta.ci_low,
               "beta_ci_high": st_beta.ci_high, "beta_n": st_beta.n,
               "fit_beta": fit.beta, "fit_c_ls": fit.c_ls, "fit_c_envelope": fit.c_envelope, "fit_r2": fit.r2,
               "pooled_beta": pooled.beta, "pooled_c_ls": pooled.c_ls, "pooled_c_envelope": pooled.c_envelope,
               "held_out_seed": held_out_seed, "held_out_points": len(test),
               "held_out_holds": float(np.mean([x >= 1 for x in ratio])) if ratio else float("nan"),
               "held_out_min_ratio": float(min(ratio)) if ratio else float("nan"),
               "bound_cases": len(fts),
               "bound_holds": float(np.mean([f["holds"] for f in fts])) if fts else float("nan"),
               "bound_min_slack": float(min(f["bound"] - f["excess"] for f in fts)) if fts else float("nan"),
               "bound_median_ratio": float(np.median([f["bound"] / f["excess"] for f in fts if f["excess"] > 0]))
               if fts else float("nan"),
               "transfer_form_holds": float(np.mean(tf_holds)) if tf_holds else float("nan")}
        if rep == "output":
            c, beta = 0.5, 1.0  # span(u) = 1 for an indicator u
            row.update(theorem_c=c, theorem_beta=beta,
                       theorem_max_ratio=float(max(r["theorem_lhs"] / r["theorem_rhs"] for r in pts)),
                       theorem01_max_ratio=float(max(r["theorem01_lhs"] / r["theorem01_rhs"] for r in pts)),
                       fitted_transfer_max_ratio=float(max(r["transfer"] / (c * r["pre_excess"]) for r in pts)))
        out.append(row)
    return out


def radreg_analysis(ck_rows: list[dict], steps: int) -> list[dict]:
    """D2: at the final checkpoint, per representation, RadReg weight lambda > 0 and B, the paired difference
    (lambda - plain, paired by seed) of each metric: mean, sample s.d., n, 95% t CI, and a reading."""
    final = [r for r in ck_rows if r["step"] == steps]
    out = []
    keys = (("rad_mean", "Rademacher term"), ("excess_mean", "downstream excess risk"),
            ("excess01_mean", "excess 0-1 risk"), ("transfer", "transfer term"), ("pre_excess", "pretraining excess"),
            ("feature_rms", "feature rms norm"))
    widths = sorted({r["d_model"] for r in final if r["radreg"] > 0})
    for d in widths:
        for rep in REPRESENTATIONS:
            for B in sorted({r["head_norm"] for r in final}):
                sub = [r for r in final if r["d_model"] == d and r["rep"] == rep and r["head_norm"] == B]
                for lam in sorted({r["radreg"] for r in sub if r["radreg"] > 0}):
                    row: dict[str, Any] = {"d_model": d, "rep": rep, "head_norm": B, "radreg": lam}
                    for key, _ in keys:
                        plain = summarize(r.get(key) for r in sub if r["radreg"] == 0)
                        reg = summarize(r.get(key) for r in sub if r["radreg"] == lam)
                        diff = paired_difference(sub, "radreg", lam, 0.0, ("seed",), value=key)
                        row.update({f"{key}_plain": plain.mean, f"{key}_plain_std": plain.std,
                                    f"{key}_reg": reg.mean, f"{key}_reg_std": reg.std,
                                    f"{key}_diff": diff.mean, f"{key}_diff_std": diff.std, f"{key}_n": diff.n,
                                    f"{key}_ci_low": diff.ci_low, f"{key}_ci_high": diff.ci_high,
                                    f"{key}_reading": ("lower" if diff.n > 1 and diff.ci_high < 0 else
                                                       "higher" if diff.n > 1 and diff.ci_low > 0 else
                                                       "no detectable difference")})
                    out.append(row)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------------------------


def run(config: DengConfig, ctx: RunContext) -> dict:
    """D1 and D2: every run's pretraining and evaluation units, then the tidy tables (figures are drawn from them)."""
    from ftsim.core.progress import bar
    from ftsim.core.threads import limit_threads

    world = make_world(config)
    with limit_threads(1):
        pop = population(world, config.eval_inputs, derive_seed(config.task_seed, "deng2024-population"))
        labelled = [labelled_sample(world, config.num_labelled, r, config.task_seed) for r in range(config.label_draws)]
        ck_rows, ft_rows, curves, timing = [], [], [], []
        for spec in bar(run_specs(config), desc="deng2024", unit="run", disable=not ctx.progress):
            pre_unit, ev_unit = _eval_unit(ctx, config, spec, world, pop, labelled)
            tag = {"d_model": spec.d_model, "seed": spec.seed, "radreg": spec.radreg}
            ck_rows.extend({**tag, **r} for r in ev_unit.result["checkpoints"])
            ft_rows.extend({**tag, **r} for r in ev_unit.result["finetune"])
            curves.extend({**tag, **r} for r in pre_unit.result["curve"])
            timing.append({**tag, "pretrain_seconds": pre_unit.result["seconds"],
                           "eval_seconds": ev_unit.result["seconds"],
                           "num_parameters": pre_unit.result["num_parameters"]})
    hB = pop.p[len(pop.p) // 2:]
    world_rows = [{"num_states": config.num_states, "vocab_size": config.vocab_size, "length": config.length,
                   "task": [int(v) for v in np.flatnonzero(world.u)],
                   "bayes_squared_risk": float((hB * (1 - hB)).mean()),
                   "bayes_01_risk": float(np.minimum(hB, 1 - hB).mean()), "positive_rate": float(hB.mean()),
                   "eval_inputs": config.eval_inputs, "num_labelled": config.num_labelled,
                   "label_draws": config.label_draws, "delta": config.delta, "head_norm": config.head_norm,
                   "steps": config.steps}]
    d1 = transfer_analysis(ck_rows, ft_rows, config.head_norm, config.seeds[-1])
    d2 = radreg_analysis(ck_rows, config.steps)
    write_table(ctx.out_dir / "checkpoints", ck_rows)
    write_table(ctx.out_dir / "finetune", ft_rows)
    write_table(ctx.out_dir / "curves", curves)
    write_table(ctx.out_dir / "timing", timing)
    write_table(ctx.out_dir / "world", world_rows)
    write_table(ctx.out_dir / "transfer_fit", d1)
    write_table(ctx.out_dir / "radreg", d2)
    atomic_write_text(ctx.out_dir / "tables.md", tables_markdown(d1, d2))
    return {"headline": _headline(d1, d2, config), "transfer_fit": d1, "radreg": d2}


def tables_markdown(d1: list[dict], d2: list[dict]) -> str:
    """The D1 and D2 tables as markdown (sample s.d. in parentheses, 95% t intervals in brackets)."""
    def ci(lo: float, hi: float, digits: int = 3, sign: str = "+") -> str:
        return f"[{lo:{sign}.{digits}f}, {hi:{sign}.{digits}f}]" if np.isfinite(lo) and np.isfinite(hi) else ""

    rows = [[r["rep"], f"{r['beta_mean']:.2f} ({r['beta_std']:.2f}), {r['beta_n']} runs",
             ci(r["beta_ci_low"], r["beta_ci_high"], 2, ""),
             f"{r['pooled_beta']:.2f}, {r['pooled_c_envelope']:.3f}, {r['pooled_c_ls']:.3f}, {r['fit_r2']:.2f}",
             f"{100 * r['held_out_holds']:.0f}% of {r['held_out_points']} (min ratio {r['held_out_min_ratio']:.2f})",
             f"{100 * r['bound_holds']:.0f}% of {r['bound_cases']}, median bound/excess {r['bound_median_ratio']:.0f}x"]
            for r in d1]
    out = ["D1, transferability T_B <= C_beta E_pre^beta over checkpoints (plain runs, B = "
           f"{d1[0]['head_norm']:g}): beta per run, mean (sample s.d.) and 95% t interval; pooled fit "
           "(beta, envelope C_beta, least-squares C, R^2 of the fit on all but the held-out seed); the envelope on "
           "the held-out seed; the excess-risk bound over every (checkpoint, labelled draw).", "",
           markdown_table(["representation", "beta", "95% CI", "pooled beta, C_beta, C_LS, R^2",
                           "held-out seed: C_beta E^beta >= T", "bound holds"], rows)] if d1 else []
    keys = (("rad_mean", "Rademacher term"), ("feature_rms", "feature rms"), ("pre_excess", "pretraining excess"),
            ("excess_mean", "downstream excess"), ("transfer", "transfer term"))
    rows2 = [[f"d={r['d_model']}, {r['rep']}, B={r['head_norm']:g}, lambda={r['radreg']:g}", label,
              f"{r[f'{k}_plain']:.4f} ({r[f'{k}_plain_std']:.4f})", f"{r[f'{k}_reg']:.4f} ({r[f'{k}_reg_std']:.4f})",
              f"{r[f'{k}_diff']:+.4f} {ci(r[f'{k}_ci_low'], r[f'{k}_ci_high'], 4)}", r[f"{k}_reading"]]
             for r in d2 if r["rep"] == "hidden" for k, label in keys]
    if rows2:
        out += ["", "D2, RadReg against plain masked-LM pretraining at the final checkpoint, paired by seed (hidden "
                "representation): mean (sample s.d.), paired difference with its 95% t interval.", "",
                markdown_table(["setting", "metric", "plain", "RadReg", "difference [95% CI]", "reading"], rows2)]
    return "\n".join(out) + "\n"


def _headline(d1: list[dict], d2: list[dict], config: DengConfig) -> str:
    parts = []
    for r in d1:
        parts.append(f"{r['rep']}: beta {r['beta_mean']:.2f} (s.d. {r['beta_std']:.2f}, {r['beta_n']} runs), "
                     f"bound holds {100 * r['bound_holds']:.0f}% (median bound/excess {r['bound_median_ratio']:.0f}x)")
    for r in d2:
        if r["rep"] == "hidden" and r["head_norm"] == config.head_norm:
            parts.append(f"RadReg {r['radreg']:g}: Rad {r['rad_mean_diff']:+.3f} ({r['rad_mean_reading']}), "
                         f"excess {r['excess_mean_diff']:+.4f} ({r['excess_mean_reading']})")
    return "; ".join(parts)


EXPERIMENT = Experiment(
    name="deng2024",
    config_cls=DengConfig,
    presets=PRESETS,
    run=run,
    figures=("figures.deng2024:redraw", "figures.deng2024_radreg:redraw"),
    verifier="pretraining-bound",
    plan=plan,
    reproduce=(),
    help="Deng et al. 2024 in the HMM world: transferability (C_beta, beta) fitted across masked-LM checkpoints and "
         "sizes with the bound's slack (D1), and RadReg in pretraining vs plain MLM at equal steps (D2).",
)


# ---------------------------------------------------------------------------------------------------------------
# ftsim verify pretraining-bound
# ---------------------------------------------------------------------------------------------------------------




def _rng(seed: int, claim: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, claim, 2024]))


def enumerate_inputs(hmm: HMM, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every observed x_1..x_T (n^T rows) with P(x_1..T) and the brute-force joint P(X_0 = v, x_1..T) (n columns),
    by summing the HMM's joint over all state paths (:func:`simulate.oracles.enumerate_joint`): shares no code
    with forward-backward."""
    import itertools

    from simulate.oracles import enumerate_joint

    n = hmm.vocab_size
    xs = np.array(list(itertools.product(range(n), repeat=length)), dtype=np.int64)
    joint0 = np.empty((len(xs), n))
    for i, x in enumerate(xs):
        for v in range(n):
            _, j = enumerate_joint(hmm, np.concatenate([[v], x]))
            joint0[i, v] = j.sum()
    return xs, joint0.sum(axis=1), joint0


@single_threaded
def claim_rademacher_closed_form(quick: bool, seed: int) -> Claim:
    """B E_sigma ||mean sigma h|| against a brute-force supremum over a dense grid of head directions in 2-D and
    every sign vector; the projected-ascent inner max reaches the closed form."""
    import itertools

    from theory.pretraining_bound import inner_max_projected_ascent, rademacher_linear_exact

    rng = _rng(seed, 1)
    K = 20_000  # directions: the grid maximum is within a factor cos(pi / K) of the supremum
    ang = np.linspace(0, 2 * np.pi, K, endpoint=False)
    dirs = np.stack([np.cos(ang), np.sin(ang)], axis=1)  # (K, 2)
    steps = 200
    worst, worst_ascent, cases, reached = 0.0, 0.0, 0, 0
    for m in (3, 6, 10):
        h = rng.normal(size=(m, 2)) * rng.uniform(0.2, 3.0, size=(m, 1))
        B = float(rng.uniform(0.5, 4.0))
        sups = []
        for sig in itertools.product((1.0, -1.0), repeat=m):
            v = np.asarray(sig) @ h / m
            sups.append(B * float((dirs @ v).max()))  # sup over the circle (linear: the ball's max is on it)
            # ascent of step 1 from 0 walks k v; once its path k ||v|| reaches B it sits at the maximiser, so
            # it is compared where that happened within the steps (sign vectors with v ~ 0 need more steps)
            if steps * np.linalg.norm(v) >= B:
                val, _ = inner_max_projected_ascent(h, sig, B, steps=steps)
                worst_ascent = max(worst_ascent, abs(val - B * np.linalg.norm(v)) / (B * np.linalg.norm(v)))
                reached += 1
        brute = float(np.mean(sups))
        exact = rademacher_linear_exact(h, B)
        worst = max(worst, abs(exact - brute) / exact)
        cases += 2 ** m
    tol = 1 - math.cos(math.pi / K) + 1e-12
    return Claim("linear-head Rademacher complexity = B E_sigma ||(1/m) sum sigma_j h_j|| (closed form)",
                 f"2-D features, m = 3, 6, 10 ({cases} sign vectors), sup over {K} head directions; projected ascent",
                 f"max rel. gap closed form vs brute force {worst:.1e} (grid tol {tol:.1e}); projected ascent "
                 f"({steps} steps of size 1) vs closed form {worst_ascent:.1e} on the {reached} sign vectors whose "
                 f"path reached the ball's boundary (tol 1e-12)",
                 worst <= tol and worst_ascent <= 1e-12 and reached >= cases // 2,
                 "Cauchy-Schwarz; brute force")


@single_threaded
def claim_rademacher_estimate(quick: bool, seed: int) -> list[Claim]:
    """The Monte Carlo estimate's stated errors cover the exact value (exact enumeration at m = 12)."""
    from scipy.stats import binom

    from theory.pretraining_bound import khintchine_kahane_bounds, rademacher_linear_exact

    rng = _rng(seed, 2)
    h = rng.normal(size=(12, 5))
    B, delta, K = 2.0, 0.05, 200
    exact = rademacher_linear_exact(h, B)
    reps = 200 if quick else 1000
    mc_cover, clt_cover = 0, 0
    for r in range(reps):
        est = rademacher_linear(h, B, K, rng, delta)
        mc_cover += abs(est.value - exact) < est.halfwidth
        clt_cover += abs(est.value - exact) <= 1.959964 * est.std_error
    # pass if the observed miss count is not above the binomial 1e-6 upper quantile of the stated miss rate
    mc_limit = int(binom.ppf(1 - 1e-6, reps, delta))
    clt_lo = int(binom.ppf(1e-6, reps, 0.95))
    ratios = []
    for m in (2, 5, 9, 14):
        for _ in range(5):
            hh = rng.normal(size=(m, 3))
            if _ == 0:
                hh = np.repeat(hh[:1], m, axis=0)  # identical vectors: the 1/sqrt(2) constant is sharp at m = 2
            lo, hi = khintchine_kahane_bounds(hh, 1.0)
            ex = rademacher_linear_exact(hh, 1.0)
            ratios.append((ex / lo, ex / hi))
    kk_ok = all(a >= 1 - 1e-12 and b <= 1 + 1e-12 for a, b in ratios)
    return [
        Claim("Monte Carlo Rademacher estimate: McDiarmid half-width covers the exact value w.p. >= 1 - delta",
              f"m = 12, d = 5, K = {K} sign draws, delta = {delta}, {reps} repetitions vs exact enumeration",
              f"covered {mc_cover}/{reps} (misses allowed <= {mc_limit}, binomial 1e-6 quantile); CLT 95% "
              f"interval covered {clt_cover}/{reps} (>= {clt_lo})",
              reps - mc_cover <= mc_limit and clt_cover >= clt_lo, "McDiarmid 1989; exact enumeration"),
        Claim("Khintchine-Kahane sandwich: (B/m) sqrt(sum ||h||^2) x [1/sqrt(2), 1] contains the exact value",
              "m = 2, 5, 9, 14, d = 3, 5 instances each (one with identical vectors)",
              f"exact/lower in [{min(a for a, _ in ratios):.4f}, {max(a for a, _ in ratios):.3f}], exact/upper "
              f"<= {max(b for _, b in ratios):.4f}", kk_ok, "Latala & Oleszkiewicz 1994; Jensen"),
    ]


def _tiny_world(seed: int, n: int = 3, m: int = 3) -> World:
    from simulate.hmm import random_hmm

    hmm = random_hmm(m, n, seed=seed, concentration=1.0)
    rng = np.random.default_rng(seed + 7)
    u = np.zeros(n)
    u[rng.choice(n, size=max(1, n // 2), replace=False)] = 1.0
    return World(hmm, u, 4)


@single_threaded
def claim_exact_conditionals(quick: bool, seed: int) -> list[Claim]:
    """G, p, E_pre and the Bayes risks from forward-backward against brute-force enumeration of every sequence."""
    worst_g, worst_ce, worst_mc, bayes_ok, tries = 0.0, 0.0, 0.0, True, 0
    for k in range(2 if quick else 5):
        world = _tiny_world(1000 * seed + k)
        xs, px, joint0 = enumerate_inputs(world.hmm, world.length)
        G_brute = joint0 / px[:, None]
        G = mask_posteriors(world.hmm, xs) @ world.hmm.emit
        worst_g = max(worst_g, float(np.abs(G - G_brute).max()))
        # any model q: its expected cross-entropy at X_0 minus H(X_0 | X) equals E KL(G || q)
        rng = _rng(seed, 30 + k)
        log_q = torch.log_softmax(torch.as_tensor(rng.normal(size=G.shape)), -1).numpy()
        ce = -float((joint0 * log_q).sum())
        ent = -float((joint0 * np.log(G_brute)).sum())
        ekl = float(px @ kl_rows(G, log_q))
        worst_ce = max(worst_ce, abs((ce - ent) - ekl) / ekl)
        # Bayes: p = G u is P(y = 1 | x); E p(1-p) is below the squared risk of every other predictor
        p = G @ world.u
        bayes_sq = float(px @ (p * (1 - p)))
        for _ in range(200):
            f = rng.uniform(0, 1, size=len(p))
            risk = float(px @ (p * (1 - f) ** 2 + (1 - p) * f ** 2))
            bayes_ok &= risk >= bayes_sq - 1e-15
            tries += 1
        # the sampled estimator of E_pre is within 4 standard errors of the exact value
        pop = population(world, 4000, derive_seed(seed, "exact-pop", k))
        idx = {tuple(x): i for i, x in enumerate(xs)}
        lq = log_q[[idx[tuple(x)] for x in pop.observed]]
        est, se = pretraining_excess_risk(pop.G, lq)
        worst_mc = max(worst_mc, abs(est - ekl) / se)
    return [
        Claim("exact conditionals: forward-backward G(x) = P(X_0 | x_1..T) equals brute force",
              f"random HMMs m = n = 3, T = 4, all {3 ** 4} inputs x {2 if quick else 5} HMMs",
              f"max |G - brute| = {worst_g:.1e} (tol 1e-12)", worst_g <= 1e-12, "enumeration of state paths"),
        Claim("pretraining excess risk of a masked LM = E_x KL(G(x) || q(x)) (cross-entropy minus H(X_0|X))",
              "random q, exact sums over every (x_0, x); sampled estimator on 4000 inputs",
              f"max rel. gap of the identity {worst_ce:.1e} (tol 1e-10); sampled estimate within "
              f"{worst_mc:.2f} s.e. of the exact value (<= 4)", worst_ce <= 1e-10 and worst_mc <= 4,
              "Deng et al. 2024 (pretraining excess risk); enumeration"),
        Claim("the Bayes predictor p(x) = sum_{v in S} G(x)_v has the least squared risk",
              f"{tries} random predictors on the enumerated input distribution", f"all risks >= E p(1-p): {bayes_ok}",
              bayes_ok, "E (f - y)^2 = E (f - p)^2 + E p(1-p)"),
    ]


@single_threaded
def claim_pinsker_transfer(quick: bool, seed: int) -> Claim:
    """The proven transferability of the output representation, on exact input distributions."""
    worst2, worst01 = 0.0, 0.0
    cases = 0
    for k in range(3 if quick else 8):
        world = _tiny_world(1000 * seed + 50 + k, n=4, m=3)
        xs, px, joint0 = enumerate_inputs(world.hmm, 3)
        G = joint0 / px[:, None]
        p = G @ world.u
        rng = _rng(seed, 60 + k)
        for temp in (0.03, 0.3, 1.0, 3.0):
            log_q = torch.log_softmax(torch.as_tensor(np.log(G) + temp * rng.normal(size=G.shape)), -1).numpy()
            q = np.exp(log_q)
            ekl = float(px @ kl_rows(G, log_q))
            fu = q @ world.u
            c2, _ = pinsker_transfer_constants(world.u, "squared")
            c01, _ = pinsker_transfer_constants(world.u, "zero_one")
            worst2 = max(worst2, float(px @ squared_excess(fu, p)) / (c2 * ekl))
            worst01 = max(worst01, float(px @ zero_one_excess(fu, p)) / (c01 * math.sqrt(ekl)))
            cases += 1
    return Claim("transferability of the output representation (Pinsker): E(<u,q> - p)^2 <= E_pre / 2 (beta = 1); "
                 "plug-in 0-1 excess <= sqrt(2) sqrt(E_pre) (beta = 1/2)",
                 f"{cases} (HMM, q) pairs, n = 4, T = 3, every input enumerated; q = G perturbed at 4 temperatures",
                 f"max lhs/rhs: squared {worst2:.3f}, 0-1 {worst01:.3f} (<= 1)", worst2 <= 1 and worst01 <= 1,
                 "Pinsker; Devroye, Gyorfi & Lugosi 1996 Thm 2.2")


@single_threaded
def claim_ball_least_squares(quick: bool, seed: int) -> Claim:
    from scipy.optimize import minimize

    rng = _rng(seed, 7)
    worst = 0.0
    for k in range(6):
        X = rng.normal(size=(40, 5)) @ np.diag([1, 1, 1, 0.1, 0.0])  # rank-deficient on purpose
        y = rng.normal(size=40)
        B = float(rng.choice([0.05, 0.5, 5.0]))
        got = ball_least_squares(X, y, B)
        ref = minimize(lambda w: np.mean((X @ w - y) ** 2), np.zeros(5), method="SLSQP",
                       constraints=[{"type": "ineq", "fun": lambda w: B ** 2 - w @ w}],
                       options={"ftol": 1e-15, "maxiter": 1000})
        worst = max(worst, (got.value - ref.fun) / max(ref.fun, 1e-300))
        worst = max(worst, float(np.linalg.norm(got.w)) / B - 1)
    return Claim("ball-constrained least squares (the downstream ERM) is optimal and feasible",
                 "6 problems N = 40, d = 5 (rank 4), B in {0.05, 0.5, 5}, vs scipy SLSQP",
                 f"max (ours - SLSQP)/SLSQP and ||w||/B - 1: {worst:.1e} (<= 1e-9)", worst <= 1e-9, "scipy SLSQP")


def _bound_trial(rng: np.random.Generator, M: int, d: int, n: int, B: float, reps: int, delta: float):
    """A finite input distribution (M points, uniform) with fixed features and p(x): exact population risks."""
    Hx = rng.normal(size=(M, d)) / math.sqrt(d)
    p = 1 / (1 + np.exp(-(Hx @ rng.normal(size=d)) * 2 - rng.normal(size=M) * 0.5))
    comp = ball_least_squares(Hx, p, B)
    transfer = float(squared_excess(Hx @ comp.w, p).mean())
    fb = float(np.linalg.norm(Hx, axis=1).max())
    b_bar = square_loss_range(*_score_range("hidden", comp.w, fb))
    holds, ratios = 0, []
    for _ in range(reps):
        idx = rng.integers(0, M, size=n)
        y = (rng.uniform(size=n) < p[idx]).astype(float)
        w_hat = ball_least_squares(Hx[idx], y, B).w
        ex = float(squared_excess(np.clip(Hx @ w_hat, 0, 1), p).mean())
        rad = rademacher_linear(Hx[idx], B, 500, rng, delta / 3)
        bound = clipped_square_bound(transfer, rad, n, b_bar, delta).total
        holds += ex <= bound
        ratios.append(bound / max(ex, 1e-300))
    return holds, ratios


@single_threaded
def claim_generalization_bound(quick: bool, seed: int) -> Claim:
    from scipy.stats import binom

    rng = _rng(seed, 8)
    reps, delta = (100 if quick else 500), 0.05
    holds, ratios = 0, []
    trials = 3
    for _ in range(trials):
        h, r = _bound_trial(rng, 60, 3, 32, 2.0, reps, delta)
        holds += h
        ratios += r
    limit = int(binom.ppf(1 - 1e-6, trials * reps, delta))
    return Claim("the bound: excess <= T_B + 4 Rad^+ + 3 sqrt(log(6/d)/2n) + b sqrt(log(3/d)/2n) w.p. >= 1 - delta",
                 f"3 finite input distributions (60 points, d = 3, exact p), n = 32, B = 2, {reps} labelled draws "
                 f"each, delta = {delta}",
                 f"held in {holds}/{trials * reps} (misses allowed <= {limit}); median bound/excess "
                 f"{np.median(ratios):.0f}x", trials * reps - holds <= limit,
                 "Bartlett & Mendelson 2002; Mohri et al. 2018 Thm 3.3; contraction; Hoeffding")


@single_threaded
def claim_transfer_fit(quick: bool, seed: int) -> Claim:
    rng = _rng(seed, 9)
    worst, env_ok = 0.0, True
    for _ in range(5):
        C, beta = float(rng.uniform(0.1, 5)), float(rng.uniform(0.3, 1.5))
        e = np.exp(rng.uniform(-6, 0, size=12))
        fit = fit_transferability(e, C * e ** beta)
        worst = max(worst, abs(fit.beta - beta), abs(fit.c_ls / C - 1), abs(fit.c_envelope / C - 1))
        t = C * e ** beta * np.exp(rng.normal(size=12) * 0.3)
        noisy = fit_transferability(e, t)
        env_ok &= bool(np.all(t <= noisy.predict(e) * (1 + 1e-12)))
        env_ok &= math.isclose(noisy.c_envelope, envelope_constant(e, t, noisy.beta))
    return Claim("fitting (C_beta, beta): a noiseless power law is recovered; the envelope constant bounds every point",
                 "5 random (C, beta), 12 points over E in [e^-6, 1]; the same with 30% log-normal noise",
                 f"max error {worst:.1e} (tol 1e-9); envelope holds at every noisy point: {env_ok}",
                 worst <= 1e-9 and env_ok, "log-log least squares")


@single_threaded
def claim_radreg_gradient(quick: bool, seed: int) -> Claim:
    """Danskin: the gradient of the closed-form penalty equals the gradient of the bilinear min-max objective at
    the inner maximiser; the Monte Carlo penalty is unbiased."""
    from theory.pretraining_bound import inner_max_projected_ascent, rademacher_linear_exact

    rng = _rng(seed, 10)
    h = torch.tensor(rng.normal(size=(10, 4)), dtype=torch.float64, requires_grad=True)
    B = 1.5
    g = torch.Generator().manual_seed(seed)
    pen = radreg_penalty(h, B, num_draws=1, generator=g)
    pen.backward()
    g2 = torch.Generator().manual_seed(seed)
    sigma = (torch.randint(0, 2, (1, 10), generator=g2).double() * 2 - 1).numpy()[0]  # the same draw
    _, w_star = inner_max_projected_ascent(h.detach().numpy(), sigma, B, steps=500)
    danskin = np.outer(sigma, w_star) / 10
    gerr = float(np.abs(h.grad.numpy() - danskin).max())
    with torch.no_grad():
        vals = torch.stack([radreg_penalty(h, B, 64, generator=g) for _ in range(100)])
    exact = rademacher_linear_exact(h.detach().numpy(), B)
    z = abs(float(vals.mean()) - exact) / (float(vals.std()) / 10)
    return Claim("RadReg penalty: gradient = min-max gradient at the inner maximiser (Danskin); MC mean unbiased",
                 "m = 10, d = 4, B = 1.5; 100 x 64 sign draws vs exact enumeration",
                 f"max gradient gap {gerr:.1e} (tol 1e-12); MC mean {z:.2f} s.e. from exact (<= 4)",
                 gerr <= 1e-12 and z <= 4, "Danskin's theorem; exact enumeration")


VERIFIER = Verifier(
    name="pretraining-bound",
    claims=(claim_rademacher_closed_form, claim_rademacher_estimate, claim_exact_conditionals, claim_pinsker_transfer,
            claim_ball_least_squares, claim_generalization_bound, claim_transfer_fit, claim_radreg_gradient),
    help="Deng et al. 2024's bound, exact parts: linear-head Rademacher closed form and its estimate, masked-LM excess "
         "risk = KL to exact conditionals, Bayes predictor, Pinsker transferability, ERM, bound coverage, RadReg.",
)
