"""The two synthetic experiments of Wei, Xie & Ma (2021), with exact oracles beside the learned pipeline.

``ftsim run wei2021-exp1 --preset quick|paper``: accuracy vs the number of hidden states m of prompt tuning and
head tuning on a frozen pretrained masked LM (and a causal, right-to-left variant), mean and spread over
seeds, with the exact oracles on the same axes.

``ftsim run wei2021-exp2 --preset quick|paper``: a memory HMM (4 syntax states x N memory values) with an
attention head over per-position outputs vs a vanilla HMM with as many states and a linear head on G_0.

Units of work (one pretrained model with its TV curve, one (HMM, task) oracle bundle, one (HMM, task, model)
tuning run) go through the shared unit cache: a killed run resumes, and the two experiments share the corpora and
vanilla models they have in common. Each experiment's ``plan`` lists its units as data (:class:`UnitSpec`, target
:func:`compute_unit`), so ``--executor local|submitit`` computes them in other processes; the run then asks for the
same units (``ctx.unit_of``) and finds them in the cache.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import OrderedDict
from typing import Any, Literal


from ftsim.core.experiment import Experiment, RunContext, UnitSpec
from ftsim.core.io import write_table

__all__ = ["Exp1Config", "Exp2Config", "EXP1", "EXP2", "PAPER_EXP1", "PAPER_EXP2"]

# The paper's reported mean test accuracies (%), for the tables and figures.
PAPER_EXP1 = {  # m -> (prompt tuning, head tuning)
    4: (99.7, 94.0), 8: (97.0, 84.0), 10: (92.9, 79.7), 15: (87.0, 74.6), 25: (74.8, 66.1), 30: (75.1, 66.2),
}
PAPER_EXP2 = {  # total states -> (memory HMM + attention head, vanilla HMM + linear head)
    8: (99.8, 83.2), 12: (99.9, 80.6), 20: (99.9, 64.4), 28: (97.8, 66.1),
}


def _f(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class _Common:
    vocab_size: int = _f(10, "vocabulary size n")
    length: int = _f(128, "T: observed tokens x_1..x_T after the masked x_0")
    hmm_seeds: tuple[int, ...] = _f((0, 1, 2, 3, 4), "seeds of the HMM (and of its pretraining)")
    task_seeds: tuple[int, ...] = _f((0,), "seeds of mu and of the downstream samples, per HMM")
    support_size: int = _f(6, "non-zeros of mu (all states/memory values when fewer)")
    num_train: int = _f(5000, "downstream training examples")
    num_val: int = _f(1000, "downstream validation examples (prompt-tuning early stopping, head L2)")
    num_test: int = _f(5000, "downstream test examples")
    oracle_train: int = _f(2000, "training rows used by the exact oracles (their test split is num_test)")
    d_model: int = _f(256, "transformer width")
    num_layers: int = _f(4, "transformer blocks")
    num_heads: int = _f(8, "attention heads")
    pretrain_steps: int = _f(10_000, "pretraining optimiser steps")
    batch_size: int = _f(256, "pretraining batch (sequences)")
    lr: float = _f(1e-3, "peak AdamW learning rate (linear warm-up, cosine decay to a tenth)")
    warmup: int = _f(500, "warm-up steps")
    mask_prob: float = _f(0.15, "masking rate of positions 1..L-1")
    mask0_prob: float = _f(0.5, "masking rate of position 0 (where the downstream mask sits)")
    corpus_sequences: int = _f(1_000_000, "pretraining corpus size (sequences of T + 1 tokens)")
    eval_every: int = _f(500, "pretraining steps between TV evaluations")
    eval_sequences: int = _f(1000, "held-out sequences of the TV curve")
    prompt_length: int = _f(1, "soft prompt vectors (prompt slots reserved in pretraining, [MASK] there)")
    prompt_steps: int = _f(1000, "prompt-tuning Adam steps")
    prompt_batch: int = _f(256, "prompt-tuning batch")
    prompt_lr: float = _f(1e-2, "prompt learning rate")
    head_lr: float = _f(1e-2, "head learning rate during prompt tuning")
    oracle_restarts: int = _f(3, "initialisations of the exact prompt oracle (the first is head tuning)")
    oracle_steps: int = _f(200, "L-BFGS iterations of the exact prompt oracle")

    def pretrain_config(self, causal: bool, seed: int):
        from simulate.wei2021.pretrain import PretrainConfig

        return PretrainConfig(d_model=self.d_model, num_layers=self.num_layers, num_heads=self.num_heads,
                              causal=causal, steps=self.pretrain_steps, batch_size=self.batch_size, lr=self.lr,
                              warmup=self.warmup, mask_prob=self.mask_prob, mask0_prob=self.mask0_prob,
                              corpus_sequences=self.corpus_sequences, eval_every=self.eval_every,
                              eval_sequences=self.eval_sequences, prompt_slots=self.prompt_length, seed=seed)

    def tuning_config(self):
        from simulate.wei2021.tuning import TuningConfig

        return TuningConfig(prompt_steps=self.prompt_steps, prompt_batch=self.prompt_batch, prompt_lr=self.prompt_lr,
                            head_lr=self.head_lr, prompt_init=getattr(self, "prompt_init", "mask"))

    @property
    def seq_len(self) -> int:
        """Pretraining sequence length: x_0..x_T (the model adds its prompt slots in front)."""
        return self.length + 1

    def check(self) -> None:
        from ftsim.core.errors import InputError

        for name in ("vocab_size", "length", "num_train", "num_val", "num_test", "pretrain_steps", "batch_size",
                     "d_model", "num_layers", "num_heads", "eval_every", "eval_sequences", "corpus_sequences"):
            if getattr(self, name) < 1:
                raise InputError(f"must be >= 1, got {getattr(self, name)}", field=name)
        for name in ("hmm_seeds", "task_seeds"):
            if not getattr(self, name) or min(getattr(self, name)) < 0:
                raise InputError(f"need at least one seed, all >= 0, got {list(getattr(self, name))}", field=name)
        if self.oracle_train > self.num_train:
            raise InputError(f"{self.oracle_train} exceeds num_train={self.num_train}", field="oracle_train")
        if self.d_model % self.num_heads:
            raise InputError(f"d_model={self.d_model} is not a multiple of num_heads={self.num_heads}",
                             field="num_heads")


@dataclasses.dataclass(frozen=True)
class Exp1Config(_Common):
    """Experiment 1: prompt vs head tuning as the number of hidden states grows (defaults: the paper's m and
    a GPU-sized pretraining; see the ``quick`` preset for the CPU budget)."""

    num_states: tuple[int, ...] = _f((4, 8, 10, 12, 15, 25, 30), "hidden states m of the wei2021 HMMs")
    causal_num_states: tuple[int, ...] = _f((4, 8, 10, 12, 15, 25, 30),
                                            "m at which the causal (right-to-left) variant is also pretrained and tuned")
    prompt_init: Literal["mask", "token"] = _f(
        "token", "prompt start: 'mask' (the head-tuning model) or 'token' (best real token in the slot, on validation)")

    def __post_init__(self) -> None:
        self.check()
        if not self.num_states or min(self.num_states) < 1:
            from ftsim.core.errors import InputError

            raise InputError(f"must be non-empty and positive, got {list(self.num_states)}", field="num_states")


@dataclasses.dataclass(frozen=True)
class Exp2Config(_Common):
    """Experiment 2: memory HMM + attention head vs vanilla HMM + linear head at equal total states."""

    num_memory: tuple[int, ...] = _f((2, 3, 5, 7), "memory values N of the memory HMMs")
    num_syntax: int = _f(4, "syntax states S (total states N * S)")
    attention_steps: int = _f(600, "Adam steps of the attention head")
    attention_heads: int = _f(4, "attention heads of the attention head")

    def __post_init__(self) -> None:
        self.check()
        if not self.num_memory or min(self.num_memory) < 1 or self.num_syntax < 1:
            from ftsim.core.errors import InputError

            raise InputError(f"num_memory {list(self.num_memory)} and num_syntax {self.num_syntax} must be positive",
                             field="num_memory")

    def tuning_config(self):
        return dataclasses.replace(super().tuning_config(), attention_steps=self.attention_steps,
                                   attention_heads=self.attention_heads)


# Quick presets: what runs on a 2-core CPU in minutes. A 2-layer, 64-wide transformer pretrained for 1000 steps
# of 64 sequences (T = 12, ~1M tokens per HMM), one HMM per m, two tasks per HMM; the oracles use the same
# splits. Pretraining dominates (about 25 s per HMM on a calm 2-core machine).
_QUICK = dict(length=12, hmm_seeds=(0,), task_seeds=(0, 1), num_train=2000, num_val=500, num_test=1000,
              oracle_train=1000, d_model=64, num_layers=2, num_heads=4, pretrain_steps=1000, batch_size=64,
              lr=3e-3, warmup=50, mask_prob=0.1, mask0_prob=1.0, corpus_sequences=64_000, eval_every=100,
              eval_sequences=500, prompt_steps=150, prompt_batch=128, oracle_restarts=2, oracle_steps=100)

# Medium preset (experiment 1 only): the quick downstream setting with 16x the pretraining data -- 4000 steps of
# 256 sequences (~1M sequences, ~14M tokens per HMM) -- which is where the learned prompt gain appeared in our
# sweep (notes/issue-3.md, "Where is the prompt gain?"); 300 prompt-tuning steps; no causal variant (its prompt
# slot is not the theory's position -1). About 5 min of pretraining per HMM on one core of this machine.
_MEDIUM = {**_QUICK, "batch_size": 256, "pretrain_steps": 4000, "warmup": 100, "corpus_sequences": 1_024_000,
           "eval_every": 250, "prompt_steps": 300}

EXP1_PRESETS = OrderedDict(
    # Two HMMs per m (one task each): a paired difference prompt - head per (HMM, task), pooled over the m <= n
    # and the m > n regimes (6 pairs each), carries a 95% t interval (README says where it excludes zero).
    quick=Exp1Config(num_states=(4, 8, 10, 15, 25, 30), causal_num_states=(10,),
                     **{**_QUICK, "hmm_seeds": (0, 1), "task_seeds": (0,)}),
    medium=Exp1Config(num_states=(4, 8, 10, 15, 25, 30), causal_num_states=(), **_MEDIUM),
    paper=Exp1Config(),
)
EXP2_PRESETS = OrderedDict(
    quick=Exp2Config(attention_steps=400, **_QUICK),
    paper=Exp2Config(),
)


# ---------------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------------


def _threads(device: str):
    """One intra-op thread on CPU unless $FTSIM_THREADS says otherwise (at most 2 on the reference machine).

    The quick models are tiny (64-wide): a second thread buys little, and when the two cores are shared with
    other jobs, two spinning OpenMP threads made pretraining up to 10x slower in our measurements. Every unit
    runs under it too, so a unit is the same bytes in this process and in an executor's worker."""
    import contextlib

    from ftsim.core.threads import limit_threads

    if device != "cpu":
        return contextlib.nullcontext()
    return limit_threads(max(1, int(os.environ.get("FTSIM_THREADS", "1"))))


def _splits(data, cfg: _Common):
    return data.split((cfg.num_train, cfg.num_val, cfg.num_test))


def _data_seed(hmm_seed: int, task_seed: int, tag: str) -> int:
    from simulate.wei2021.pretrain import derive_seed

    return derive_seed(hmm_seed, task_seed, tag)


def _exp1_data(cfg: Exp1Config, m: int, hs: int, ts: int) -> tuple:
    """Experiment 1's task on HMM (m, hs), task seed ts: (hmm, mu, train, val, test)."""
    from simulate.wei2021.oracles import downstream_data, wei2021_task

    hmm, mu = wei2021_task(m, cfg.vocab_size, hs, ts, cfg.length, cfg.support_size)
    full = downstream_data(hmm, mu, cfg.num_train + cfg.num_val + cfg.num_test, cfg.length,
                           _data_seed(hs, ts, "downstream"))
    return (hmm, mu, *_splits(full, cfg))


def _exp2_data(cfg: Exp2Config, N: int, hs: int, ts: int, kind: str) -> tuple:
    """Experiment 2's task on the ``memory`` HMM (N memory values) or the ``vanilla`` one with as many states."""
    from simulate.wei2021.oracles import downstream_data, memory_task, wei2021_task

    if kind == "memory":
        model, mu = memory_task(N, cfg.num_syntax, cfg.vocab_size, hs, ts, cfg.length, cfg.support_size)
    else:
        model, mu = wei2021_task(N * cfg.num_syntax, cfg.vocab_size, hs, ts, cfg.length, cfg.support_size)
    full = downstream_data(model, mu, cfg.num_train + cfg.num_val + cfg.num_test, cfg.length,
                           _data_seed(hs, ts, f"downstream-{kind}"))
    return (model, mu, *_splits(full, cfg))


def _exp1_hmm(cfg: Exp1Config, m: int, hs: int):
    from simulate.wei2021.pretrain import HMMSpec

    return HMMSpec.make("wei2021", hs, num_states=m, vocab_size=cfg.vocab_size)


def _exp2_hmms(cfg: Exp2Config, N: int, hs: int) -> dict:
    from simulate.wei2021.pretrain import HMMSpec

    return {"memory": HMMSpec.make("memory", hs, num_memory=N, num_syntax=cfg.num_syntax, vocab_size=cfg.vocab_size),
            "vanilla": HMMSpec.make("wei2021", hs, num_states=N * cfg.num_syntax, vocab_size=cfg.vocab_size)}


def _variants(cfg: Exp1Config, m: int) -> list[bool]:
    """The pretrained models of experiment 1 at m: the masked LM, and the causal one where asked for."""
    return [False] + ([True] if m in cfg.causal_num_states else [])


def _mean_table(rows: list[dict], x: str, group: tuple[str, ...]) -> list[dict]:
    """Mean, sample std, min, max, n and 95% CI (percent) of accuracy per (x, group) (ftsim.core.tables)."""
    from ftsim.core.tables import summarize

    out: dict[tuple, list[float]] = {}
    for r in rows:
        out.setdefault((r[x], *[r[g] for g in group]), []).append(r["accuracy"])
    table = []
    for key, vals in sorted(out.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        st = summarize(vals)
        table.append({x: key[0], **dict(zip(group, key[1:])), "mean": 100 * st.mean, "std": 100 * st.std,
                      "min": 100 * min(vals), "max": 100 * max(vals), "n": st.n,
                      "ci_low": 100 * st.ci_low, "ci_high": 100 * st.ci_high})
    return table


# ---------------------------------------------------------------------------------------------------------
# Units as data: what an executor computes before the run gathers them (Experiment.plan)
# ---------------------------------------------------------------------------------------------------------

UNIT_VERSIONS = {"oracle-exp1": 1, "oracle-exp2": 1, "tuning": 1}  # bump when a unit's computation changes
_TARGET = "simulate.wei2021.experiments:compute_unit"
_EXP2_ARMS = (("memory", "attention"), ("memory", "head"), ("vanilla", "head"))  # (HMM, learned method)


def _unit_inputs(cfg: _Common, **coords) -> dict:
    """A unit's inputs: every field of the config except the sweep axes, plus the unit's coordinates."""
    sweep = {"num_states", "causal_num_states", "hmm_seeds", "task_seeds", "num_memory"}
    return {"config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in sweep}, **coords}


@dataclasses.dataclass(frozen=True)
class _Env:
    """Where a run's units are computed: its config, the device, the unit cache's root and progress output (none
    of them but the config and the device is part of a unit's key)."""

    cfg: _Common
    device: str
    cache_root: str
    progress: bool

    @classmethod
    def of(cls, cfg: _Common, ctx: RunContext) -> "_Env":
        return cls(cfg, ctx.device, str(ctx.cache.root), ctx.progress)

    def spec(self, kind: str, version: int, inputs: dict, label: str, unit: str, needs: tuple[UnitSpec, ...] = (),
             **params) -> UnitSpec:
        """A unit as data: its key, :func:`compute_unit` with the config and the unit's parameters, and the units
        it reads (``needs``)."""
        args = {"config": dataclasses.asdict(self.cfg), "exp": 1 if isinstance(self.cfg, Exp1Config) else 2,
                "device": self.device, "cache_root": self.cache_root, "progress": self.progress, "unit": unit}
        return UnitSpec(kind, version, inputs, _TARGET, {**args, **params}, label=label,
                        needs=tuple(n.key.digest for n in needs))


def _pretrain_spec(env: _Env, hmm, causal: bool) -> UnitSpec:
    """The pretrained masked (or causal) LM of one HMM; its key is :func:`simulate.wei2021.pretrain.pretrain`'s,
    so both experiments (and other callers of ``pretrain``) share the checkpoint."""
    from simulate.wei2021.pretrain import pretrain_key

    key = pretrain_key(hmm, env.cfg.seq_len, env.cfg.pretrain_config(causal, hmm.seed), eval_length=env.cfg.length,
                       device=env.device)
    label = f"pretrain {'causal' if causal else 'mlm'} {hmm.preset} {dict(hmm.params)} seed={hmm.seed}"
    return env.spec(key.kind, key.version, key.inputs, label, "pretrain", hmm=hmm.describe(), causal=causal)


def _oracle1_spec(env: _Env, m: int, hs: int, ts: int) -> UnitSpec:
    return env.spec("wei2021.oracle-exp1", UNIT_VERSIONS["oracle-exp1"],
                    _unit_inputs(env.cfg, num_states=m, hmm_seed=hs, task_seed=ts), f"oracles m={m} hmm={hs} task={ts}",
                    "oracle-exp1", num_states=m, hmm_seed=hs, task_seed=ts)


def _tuning1_spec(env: _Env, m: int, hs: int, ts: int, causal: bool) -> UnitSpec:
    mname = "causal" if causal else "mlm"
    inputs = _unit_inputs(env.cfg, experiment=1, num_states=m, hmm_seed=hs, task_seed=ts, model=mname,
                          device=env.device)
    return env.spec("wei2021.tuning", UNIT_VERSIONS["tuning"], inputs, f"tuning {mname} m={m} hmm={hs} task={ts}",
                    "tuning-exp1", needs=(_pretrain_spec(env, _exp1_hmm(env.cfg, m, hs), causal),), num_states=m,
                    hmm_seed=hs, task_seed=ts, causal=causal)


def _oracle2_spec(env: _Env, N: int, hs: int, ts: int) -> UnitSpec:
    return env.spec("wei2021.oracle-exp2", UNIT_VERSIONS["oracle-exp2"],
                    _unit_inputs(env.cfg, num_memory=N, hmm_seed=hs, task_seed=ts), f"oracles N={N} hmm={hs} task={ts}",
                    "oracle-exp2", num_memory=N, hmm_seed=hs, task_seed=ts)


def _tuning2_spec(env: _Env, N: int, hs: int, ts: int, hmm_kind: str, method: str) -> UnitSpec:
    inputs = _unit_inputs(env.cfg, experiment=2, num_memory=N, hmm_seed=hs, task_seed=ts, hmm=hmm_kind,
                          method=method, device=env.device)
    return env.spec("wei2021.tuning", UNIT_VERSIONS["tuning"], inputs,
                    f"tuning {hmm_kind}+{method} N={N} hmm={hs} task={ts}", "tuning-exp2",
                    needs=(_pretrain_spec(env, _exp2_hmms(env.cfg, N, hs)[hmm_kind], False),), num_memory=N,
                    hmm_seed=hs, task_seed=ts, hmm_kind=hmm_kind, method=method)


def _unique(specs: list[UnitSpec]) -> list[UnitSpec]:
    """Each unit once, in first-seen order (repeated seeds name the same unit)."""
    return list({s.key.digest: s for s in specs}.values())


def plan_exp1(cfg: Exp1Config, ctx: RunContext) -> list[UnitSpec]:
    """Every unit of experiment 1, dependencies first: the pretrained models (which the tuning units read), the
    oracle bundles (which need none), then the tuning runs. An executor that starts a tuning unit before its
    model is stored makes it wait on the cache's lock (or compute the model itself): never twice, never wrong."""
    env = _Env.of(cfg, ctx)
    cells = [(m, hs, ts) for m in cfg.num_states for hs in cfg.hmm_seeds for ts in cfg.task_seeds]
    models = [_pretrain_spec(env, _exp1_hmm(cfg, m, hs), causal) for m in cfg.num_states for hs in cfg.hmm_seeds
              for causal in _variants(cfg, m)]
    oracles = [_oracle1_spec(env, m, hs, ts) for m, hs, ts in cells]
    tuning = [_tuning1_spec(env, m, hs, ts, causal) for m, hs, ts in cells for causal in _variants(cfg, m)]
    return _unique(models + oracles + tuning)


def plan_exp2(cfg: Exp2Config, ctx: RunContext) -> list[UnitSpec]:
    """Every unit of experiment 2 in the order of :func:`plan_exp1`: models, oracle bundles, tuning runs."""
    env = _Env.of(cfg, ctx)
    cells = [(N, hs, ts) for N in cfg.num_memory for hs in cfg.hmm_seeds for ts in cfg.task_seeds]
    models = [_pretrain_spec(env, hmm, False) for N in cfg.num_memory for hs in cfg.hmm_seeds
              for hmm in _exp2_hmms(cfg, N, hs).values()]
    oracles = [_oracle2_spec(env, N, hs, ts) for N, hs, ts in cells]
    tuning = [_tuning2_spec(env, N, hs, ts, kind, method) for N, hs, ts in cells for kind, method in _EXP2_ARMS]
    return _unique(models + oracles + tuning)


# ---------------------------------------------------------------------------------------------------------
# Computing one unit (in the run's process or an executor's worker)
# ---------------------------------------------------------------------------------------------------------


def compute_unit(work, config: dict, exp: int, device: str, cache_root: str, progress: bool, unit: str, **params):
    """Compute one unit of experiment ``exp`` from the JSON form of its config (the target of every
    :class:`UnitSpec` of this module); pretrained models are loaded once per process."""
    from ftsim.core.config import config_from_dict

    env = _Env(config_from_dict(Exp1Config if exp == 1 else Exp2Config, config), device, cache_root, progress)
    with _threads(device):
        return _UNITS[unit](env, work, **params)


def _pretrain_unit(env: _Env, work, hmm: dict, causal: bool) -> dict:
    from ftsim.core.cache import UnitCache
    from simulate.wei2021.pretrain import HMMSpec, train_unit

    spec = HMMSpec.make(hmm["preset"], hmm["seed"], **hmm["params"])
    pcfg = env.cfg.pretrain_config(causal, spec.seed)
    return train_unit(work, spec, env.cfg.seq_len, pcfg, UnitCache(env.cache_root), eval_length=env.cfg.length,
                      device=env.device, progress=env.progress)


def _model(env: _Env, hmm, causal: bool):
    """The frozen pretrained model of ``hmm``: its unit from the cache (computed here if no one has yet; the
    cache's lock makes a unit another process is computing a wait), loaded once per process."""
    from ftsim.core.experiment import loaded_once
    from simulate.wei2021.pretrain import load_pretrained

    spec = _pretrain_spec(env, hmm, causal)
    unit = spec.fetch(env.cache_root)
    pcfg = env.cfg.pretrain_config(causal, hmm.seed)
    return loaded_once(("wei2021.pretrain", str(unit.path), env.device),
                       lambda: load_pretrained(unit, hmm, env.cfg.seq_len, pcfg, eval_length=env.cfg.length,
                                               device=env.device).model)


def _oracle1_unit(env: _Env, work, num_states: int, hmm_seed: int, task_seed: int) -> dict:
    from simulate.wei2021.oracles import exact_exp1_oracles

    cfg = env.cfg
    hmm, mu, tr, _, te = _exp1_data(cfg, num_states, hmm_seed, task_seed)
    sub = tr.split((cfg.oracle_train,))[0]
    base = {"num_states": num_states, "hmm_seed": hmm_seed, "task_seed": task_seed}
    return {**base, **exact_exp1_oracles(hmm, mu, sub, te, seed=task_seed, restarts=cfg.oracle_restarts,
                                         steps=cfg.oracle_steps), "mu": mu.tolist()}


def _tuning1_unit(env: _Env, work, num_states: int, hmm_seed: int, task_seed: int, causal: bool) -> dict:
    """Head tuning, then prompt tuning started from it, on one pretrained model (test accuracy, wall times)."""
    from simulate.wei2021.tuning import head_tuning, prompt_tuning

    cfg, tcfg = env.cfg, env.cfg.tuning_config()
    _, _, tr, va, te = _exp1_data(cfg, num_states, hmm_seed, task_seed)
    model = _model(env, _exp1_hmm(cfg, num_states, hmm_seed), causal)
    t1 = time.perf_counter()
    head = head_tuning(model, tr, va, te, tcfg, env.device)
    out = {"head": {k: head[k] for k in ("train_accuracy", "val_accuracy", "test_accuracy", "l2")}}
    out["head"]["seconds"] = round(time.perf_counter() - t1, 2)
    t1 = time.perf_counter()
    pr = prompt_tuning(model, tr, va, te, tcfg, seed=_data_seed(hmm_seed, task_seed, "prompt"), head_init=head,
                       device=env.device, progress=env.progress)
    out["prompt"] = {**pr, "seconds": round(time.perf_counter() - t1, 2)}
    return out


def _oracle2_unit(env: _Env, work, num_memory: int, hmm_seed: int, task_seed: int) -> dict:
    from simulate.wei2021.oracles import memory_attention_oracle
    from theory.wei2021 import head_oracle

    cfg = env.cfg
    model, _, tr, _, te = _exp2_data(cfg, num_memory, hmm_seed, task_seed, "memory")
    sub = tr.split((cfg.oracle_train,))[0]
    mem = memory_attention_oracle(model, sub, te, seed=task_seed, steps=cfg.attention_steps,
                                  num_heads=cfg.attention_heads)
    _, _, mem_linear = head_oracle(sub.G0, sub.labels, te.G0, te.labels)
    _, _, vtr, _, vte = _exp2_data(cfg, num_memory, hmm_seed, task_seed, "vanilla")
    vsub = vtr.split((cfg.oracle_train,))[0]
    _, _, van = head_oracle(vsub.G0, vsub.labels, vte.G0, vte.labels)
    base = {"total_states": num_memory * cfg.num_syntax, "num_memory": num_memory, "hmm_seed": hmm_seed,
            "task_seed": task_seed}
    return {**base, **mem, "memory_linear_oracle": mem_linear, "vanilla_head_oracle": van,
            "memory_label_balance": float(te.labels.mean()), "vanilla_label_balance": float(vte.labels.mean())}


def _tuning2_unit(env: _Env, work, num_memory: int, hmm_seed: int, task_seed: int, hmm_kind: str,
                  method: str) -> dict:
    """The attention head over per-position outputs, or the linear head on G_0, on one pretrained model."""
    from simulate.wei2021.tuning import attention_tuning, head_tuning

    cfg, tcfg = env.cfg, env.cfg.tuning_config()
    _, _, tr, va, te = _exp2_data(cfg, num_memory, hmm_seed, task_seed, hmm_kind)
    model = _model(env, _exp2_hmms(cfg, num_memory, hmm_seed)[hmm_kind], False)
    t1 = time.perf_counter()
    if method == "attention":
        r = attention_tuning(model, tr, va, te, tcfg, seed=_data_seed(hmm_seed, task_seed, "attention"),
                             device=env.device)
    else:
        r = {k: v for k, v in head_tuning(model, tr, va, te, tcfg, env.device).items()
             if k in ("train_accuracy", "val_accuracy", "test_accuracy", "l2")}
    r["seconds"] = round(time.perf_counter() - t1, 2)
    return r


_UNITS = {"pretrain": _pretrain_unit, "oracle-exp1": _oracle1_unit, "tuning-exp1": _tuning1_unit,
          "oracle-exp2": _oracle2_unit, "tuning-exp2": _tuning2_unit}


def _curve_rows(pretrained: dict, causal: bool, extra: dict) -> list[dict]:
    """The TV curve of a pretrained model (the result of its unit), one row per evaluation."""
    keep = {"num_parameters": pretrained["num_parameters"], **extra, "model": "causal" if causal else "mlm"}
    return [{**keep, **row} for row in pretrained["curve"]]


# ---------------------------------------------------------------------------------------------------------
# Experiment 1
# ---------------------------------------------------------------------------------------------------------


def run_exp1(cfg: Exp1Config, ctx: RunContext) -> dict:
    """Run experiment 1 (see the module docstring); returns the summary with a headline."""
    with _threads(ctx.device):
        return _run_exp1(cfg, ctx)


_EXP1_EXACT = ("head_oracle", "head_certificate", "prompt_oracle_identity", "prompt_oracle_reversal",
               "prompt_oracle_token", "prompt_certificate")


def _run_exp1(cfg: Exp1Config, ctx: RunContext) -> dict:
    """Gather experiment 1's units (those of :func:`plan_exp1`, computed here if no executor did) into tables."""
    from ftsim.core.progress import bar

    t0 = time.perf_counter()
    env = _Env.of(cfg, ctx)
    results: list[dict] = []
    curves: list[dict] = []
    diags: list[dict] = []
    units = [(m, hs) for m in cfg.num_states for hs in cfg.hmm_seeds]
    for m, hs in bar(units, desc="wei2021-exp1 (m, hmm seed)", disable=not ctx.progress):
        for causal in _variants(cfg, m):
            pre = ctx.unit_of(_pretrain_spec(env, _exp1_hmm(cfg, m, hs), causal)).result
            curves.extend(_curve_rows(pre, causal, {"num_states": m, "hmm_seed": hs}))
        for ts in cfg.task_seeds:
            base = {"num_states": m, "hmm_seed": hs, "task_seed": ts}
            rec = ctx.unit_of(_oracle1_spec(env, m, hs, ts)).result
            diags.append({k: v for k, v in rec.items() if k != "mu"})
            results.extend({**base, "model": "exact", "method": meth, "accuracy": rec[meth]} for meth in _EXP1_EXACT)
            for causal in _variants(cfg, m):
                recs = ctx.unit_of(_tuning1_spec(env, m, hs, ts, causal)).result
                results.extend(_tuning1_rows(base, "causal" if causal else "mlm", recs))
    write_table(ctx.out_dir / "results", results)
    write_table(ctx.out_dir / "curves", curves)
    write_table(ctx.out_dir / "diagnostics", diags)
    means = _mean_table(results, "num_states", ("model", "method"))
    write_table(ctx.out_dir / "means", means)
    diffs = _exp1_differences(cfg, results)
    write_table(ctx.out_dir / "differences", diffs)
    return _summary1(means, diffs, time.perf_counter() - t0)


def _tuning1_rows(base: dict, mname: str, recs: dict) -> list[dict]:
    """Result rows of one tuning unit: head, prompt, and the token start alone when prompts start from a token."""
    rows = []
    for meth in ("head", "prompt"):
        r = recs[meth]
        rows.append({**base, "model": mname, "method": meth, "accuracy": r["test_accuracy"],
                     "train_accuracy": r["train_accuracy"], "val_accuracy": r["val_accuracy"]})
    if recs["prompt"].get("prompt_init") == "token":
        # The discrete start alone (best real token in the slot + its head): no gradient steps.
        rows.append({**base, "model": mname, "method": "token_prompt", "accuracy": recs["prompt"]["init_test_accuracy"],
                     "val_accuracy": recs["prompt"]["init_val_accuracy"], "token": recs["prompt"]["init_token"]})
    return rows


def _exp1_differences(cfg: Exp1Config, results: list[dict]) -> list[dict]:
    """Paired prompt - head differences (MLM) per m, then pooled over the m <= n and the m > n regimes."""
    diffs = _paired_rows(results, "num_states", ("mlm",), "prompt", "head")
    for regime, keep in (("m<=n", lambda m: m <= cfg.vocab_size), ("m>n", lambda m: m > cfg.vocab_size)):
        pooled = [{**r, "num_states0": r["num_states"], "num_states": regime} for r in results
                  if keep(r["num_states"])]
        diffs += _paired_rows(pooled, "num_states", ("mlm",), "prompt", "head", pair=("num_states0", "hmm_seed",
                                                                                          "task_seed"))
    return diffs


def _paired_rows(results: list[dict], x: str, models: tuple[str, ...], a: str, b: str,
                 by: tuple[str, ...] = (), pair: tuple[str, ...] = ("hmm_seed", "task_seed")) -> list[dict]:
    """Paired differences accuracy(a) - accuracy(b) (points) per value of ``x`` (and ``by``), pairs matched on
    ``pair`` (HMM seed, task seed): mean, sample std, n and 95% t interval -- what a statement "a beats b" rests
    on. Rows pooled over several m carry the original m as ``num_states0``."""
    from ftsim.core.tables import paired_difference

    results = [{**r, "num_states0": r.get("num_states0", r.get("num_states"))} for r in results]
    out = []
    keys = sorted({(r[x], *[r.get(g) for g in by]) for r in results if r.get("model") in models}, key=str)
    for key in keys:
        for model in models:
            sel = [r for r in results if r[x] == key[0] and r.get("model") == model
                   and all(r.get(g) == v for g, v in zip(by, key[1:]))]
            pts = [{**r, "value": 100 * r["accuracy"]} for r in sel]
            st = paired_difference(pts, "method", a, b, pair)
            if st.n:
                out.append({x: key[0], **dict(zip(by, key[1:])), "model": model, "a": a, "b": b,
                            **st.row(), "excludes_zero": st.excludes_zero})
    return out


def _summary1(means: list[dict], diffs: list[dict], seconds: float) -> dict:
    get = {(r["num_states"], r["model"], r["method"]): r["mean"] for r in means}
    dif = {r["num_states"]: r for r in diffs}
    pooled = [f"{k}: {d['mean']:+.1f} [{d['ci_low']:+.1f}, {d['ci_high']:+.1f}] over {d['n']} pairs"
              for k, d in dif.items() if isinstance(k, str) and d["n"] > 1]
    ms = sorted({r["num_states"] for r in means})
    parts = []
    for m in ms:
        p, h = get.get((m, "mlm", "prompt")), get.get((m, "mlm", "head"))
        if p is not None and h is not None:
            d = dif.get(m)
            ci = (f" [diff {d['mean']:+.1f}, 95% CI {d['ci_low']:+.1f}..{d['ci_high']:+.1f}]"
                  if d is not None and d["n"] > 1 else "")
            parts.append(f"m={m}: prompt {p:.1f} / head {h:.1f}{ci}")
    headline = "test acc % (MLM) " + "; ".join(parts)
    if pooled:
        headline += "; prompt - head (95% CI) " + "; ".join(pooled)
    return {"headline": headline, "seconds": round(seconds, 1)}


# ---------------------------------------------------------------------------------------------------------
# Experiment 2
# ---------------------------------------------------------------------------------------------------------


def run_exp2(cfg: Exp2Config, ctx: RunContext) -> dict:
    """Run experiment 2 (see the module docstring); returns the summary with a headline."""
    with _threads(ctx.device):
        return _run_exp2(cfg, ctx)


def _run_exp2(cfg: Exp2Config, ctx: RunContext) -> dict:
    """Gather experiment 2's units (those of :func:`plan_exp2`, computed here if no executor did) into tables."""
    from ftsim.core.progress import bar

    t0 = time.perf_counter()
    env = _Env.of(cfg, ctx)
    results: list[dict] = []
    curves: list[dict] = []
    units = [(N, hs) for N in cfg.num_memory for hs in cfg.hmm_seeds]
    for N, hs in bar(units, desc="wei2021-exp2 (N, hmm seed)", disable=not ctx.progress):
        total = N * cfg.num_syntax
        for hmm_kind, hmm in _exp2_hmms(cfg, N, hs).items():
            pre = ctx.unit_of(_pretrain_spec(env, hmm, False)).result
            curves.extend(_curve_rows(pre, False, {"total_states": total, "num_memory": N, "hmm": hmm_kind,
                                                   "hmm_seed": hs}))
        for ts in cfg.task_seeds:
            base = {"total_states": total, "num_memory": N, "hmm_seed": hs, "task_seed": ts}
            rec = ctx.unit_of(_oracle2_spec(env, N, hs, ts)).result
            for hmm_kind, method, key in (("memory", "attention", "memory_attention_oracle"),
                                          ("memory", "head", "memory_linear_oracle"),
                                          ("vanilla", "head", "vanilla_head_oracle")):
                results.append({**base, "hmm": hmm_kind, "model": "exact", "method": method, "accuracy": rec[key]})
            for hmm_kind, method in _EXP2_ARMS:
                r = ctx.unit_of(_tuning2_spec(env, N, hs, ts, hmm_kind, method)).result
                results.append({**base, "hmm": hmm_kind, "model": "mlm", "method": method,
                                "accuracy": r["test_accuracy"], "train_accuracy": r["train_accuracy"],
                                "val_accuracy": r["val_accuracy"]})
    write_table(ctx.out_dir / "results", results)
    write_table(ctx.out_dir / "curves", curves)
    means = _mean_table(results, "total_states", ("hmm", "model", "method"))
    write_table(ctx.out_dir / "means", means)
    return _summary2(results, means, ctx, time.perf_counter() - t0)


def _summary2(results: list[dict], means: list[dict], ctx: RunContext, seconds: float) -> dict:
    """The paired memory+attention - vanilla+linear difference (written as a table) and the headline."""
    from ftsim.core.tables import paired_difference

    learned = [{**r, "arm": f"{r['hmm']}-{r['method']}", "value": 100 * r["accuracy"]} for r in results
               if r["model"] == "mlm"]
    st = paired_difference(learned, "arm", "memory-attention", "vanilla-head", ("total_states", "hmm_seed",
                                                                                "task_seed"))
    write_table(ctx.out_dir / "differences", [{"a": "memory + attention", "b": "vanilla + linear", **st.row(),
                                               "excludes_zero": st.excludes_zero}])
    get = {(r["total_states"], r["hmm"], r["model"], r["method"]): r["mean"] for r in means}
    parts = [f"{s} states: memory+attn {get.get((s, 'memory', 'mlm', 'attention'), float('nan')):.1f} / "
             f"vanilla+linear {get.get((s, 'vanilla', 'mlm', 'head'), float('nan')):.1f}"
             for s in sorted({r['total_states'] for r in means})]
    pooled = (f"; memory+attn - vanilla+linear {st.mean:+.1f} [{st.ci_low:+.1f}, {st.ci_high:+.1f}] over {st.n} "
              f"pairs" if st.n > 1 else "")
    return {"headline": "test acc % " + "; ".join(parts) + pooled, "seconds": round(seconds, 1)}


EXP1 = Experiment(
    "wei2021-exp1", Exp1Config, EXP1_PRESETS, run_exp1, figures=("figures.wei2021:redraw",), verifier="wei2021",
    reproduce=("quick", "paper"), plan=plan_exp1,
    help="Wei, Xie & Ma 2021, experiment 1: prompt tuning vs head tuning on a frozen pretrained masked LM\n"
         "(and a causal variant) as the number of hidden states m grows, with the exact oracles\n"
         "(head oracle, prompt oracles, the theorems' certificates) on the same figure.")
EXP2 = Experiment(
    "wei2021-exp2", Exp2Config, EXP2_PRESETS, run_exp2, figures=("figures.wei2021:redraw",), verifier="wei2021",
    reproduce=("quick", "paper"), plan=plan_exp2,
    help="Wei, Xie & Ma 2021, experiment 2: memory HMM + attention head over per-position outputs vs\n"
         "vanilla HMM + linear head on G_0, at equal numbers of hidden states, with exact oracles.")
