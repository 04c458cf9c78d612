"""Pretraining small transformers on HMM corpora, with checkpoints cached by a hash of what produced them.

A pretraining run is fixed by an :class:`HMMSpec` (preset, parameters, seed), the sequence length and a
:class:`PretrainConfig`. Its corpus and its checkpoint are units of the shared cache (:mod:`ftsim.core.cache`):
the corpus unit holds the shards (:mod:`simulate.corpora`), the checkpoint unit ``model.safetensors`` (no pickle)
and, as its JSON result, the configs, the TV curve and the wall time. A rerun with the same spec and config
reads both (checked by SHA-256) instead of training.

The TV curve: every ``eval_every`` steps the model's mask-position output on held-out sequences
``[MASK, x_1..x_T]`` is compared with the exact G_0(x) = P(X_0 | x_1..T) (forward-backward), and
E_x TV(model(x), G_0(x)) is recorded.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ftsim.core.cache import Unit, UnitCache, UnitKey, unit_key
from ftsim.core.io import stable_hash
from simulate.corpora import corpus_unit
from simulate.corpus import CorpusSpec
from simulate.hmm import HMM, MemoryHMM, make_preset
from simulate.inference import infer
from simulate.sampling import sample
from simulate.wei2021.models import SmallTransformer, TransformerConfig, cosine_lr, mask_probs
from theory.wei2021 import total_variation

__all__ = ["HMMSpec", "PretrainConfig", "Pretrained", "pretrain", "pretrain_key", "train_unit", "load_pretrained",
           "heldout_set", "derive_seed", "UNIT_VERSION"]

UNIT_VERSION = 3  # bump when pretraining changes (2: the pre-cache checkpoints)


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from integers/strings (stable across runs and platforms)."""
    words = [int(p) if isinstance(p, (int, np.integer)) else int(stable_hash(str(p), 8), 16) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1)[0] & 0x7FFFFFFF)


@dataclasses.dataclass(frozen=True)
class HMMSpec:
    """Which HMM: a preset of :mod:`simulate.hmm` with its parameters and seed."""

    preset: str
    params: tuple[tuple[str, Any], ...]
    seed: int

    @classmethod
    def make(cls, preset: str, seed: int, **params: Any) -> "HMMSpec":
        return cls(preset, tuple(sorted(params.items())), int(seed))

    def build(self) -> HMM | MemoryHMM:
        return make_preset(self.preset, seed=self.seed, **dict(self.params))

    def describe(self) -> dict[str, Any]:
        return {"preset": self.preset, "params": dict(self.params), "seed": self.seed}


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Pretraining hyper-parameters (model size, optimisation, masking, evaluation).

    Sequences are ``prompt_slots + T + 1`` tokens: k slot positions, x_0, x_1..x_T. Masking (masked LM): x_0 is
    masked with probability ``mask0_prob`` (the downstream tasks read the output there), every other
    position with probability ``mask_prob``, and with probability ``slot_mask_prob`` all k slots are masked
    (empty, as in head tuning); the loss is cross-entropy on masked positions. ``prefix_prob`` > 0 masks a
    random prefix 0..j instead (position j predicted from its right context only, like x_0); it slowed
    learning in our tests and is off by default. The causal LM is trained on reversed sequences with
    next-token cross-entropy everywhere, its k slots (first in reading order) empty with probability
    ``slot_mask_prob``.
    """

    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    causal: bool = False
    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 50
    mask_prob: float = 0.15
    mask0_prob: float = 0.5
    slot_mask_prob: float = 0.5
    prefix_prob: float = 0.0
    corpus_sequences: int = 50_000
    eval_every: int = 100
    eval_sequences: int = 512
    prompt_slots: int = 1
    seed: int = 0

    def model_config(self, vocab_size: int, max_len: int) -> TransformerConfig:
        return TransformerConfig(vocab_size, max_len, self.d_model, self.num_layers, self.num_heads, self.causal,
                                 self.prompt_slots)


@dataclasses.dataclass
class Pretrained:
    """A pretrained (frozen) model and its record.

    Attributes:
        model: the :class:`SmallTransformer` in eval mode, parameters frozen.
        hmm: the generating HMM.
        curve: rows {"step", "tv_mean", "tv_median", "loss"} over pretraining.
        path: checkpoint directory.
        reused: True if loaded from the cache.
        seconds: wall time of the training (from meta.json when reused).
    """

    model: SmallTransformer
    hmm: HMM | MemoryHMM
    curve: list[dict]
    path: Path
    reused: bool
    seconds: float


def heldout_set(hmm: HMM | MemoryHMM, num: int, length: int, seed: int, lead: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Held-out downstream-shaped inputs and the exact output the model should give on them.

    Args:
        lead: unobserved positions before x_0 in the model's input (a masked LM's empty prompt slots): the
            target is then P(X_lead | x_{lead+1..}) for a chain that starts ``lead`` steps earlier, which is
            exactly what the model sees.

    Returns:
        observed: (num, length) tokens x_1..x_T (positions lead+1..lead+T of a sampled sequence).
        G0: (num, n) the exact distribution of the masked token given the observed ones.
    """
    full = sample(hmm, num, lead + length + 1, seed).tokens.astype(np.int64)
    full[:, :lead + 1] = -1
    joint = hmm.as_hmm()
    post0 = infer(hmm, full).posteriors[:, lead]
    return full[:, lead + 1:], post0 @ joint.emit


def _corpus(spec: HMMSpec, length: int, num: int, seed: int, cache: UnitCache, progress: bool) -> np.ndarray:
    cspec = CorpusSpec(spec.preset, dict(spec.params), num_sequences=num, length=length, seed=seed, hmm_seed=spec.seed)
    return corpus_unit(cache, cspec, progress=progress)[1].tokens()


def _mlm_loss(model: SmallTransformer, batch: torch.Tensor, cfg: PretrainConfig, gen: torch.Generator) -> torch.Tensor:
    B, L = batch.shape
    k = model.config.prompt_slots
    u = torch.rand(B, L, generator=gen, device=batch.device)
    masked = u < cfg.mask_prob
    masked[:, k] = u[:, k] < cfg.mask0_prob  # x_0: where the downstream mask sits
    if k:
        # Empty prompt slots (all k masked) half of the time, as downstream; otherwise they are ordinary
        # positions, so the model learns how evidence there moves its belief about H_0.
        empty = torch.rand(B, 1, generator=gen, device=batch.device) < cfg.slot_mask_prob
        masked[:, :k] = torch.where(empty, torch.ones_like(masked[:, :k]), masked[:, :k])
    if cfg.prefix_prob > 0:
        # Prefix masking: positions 0..j all masked, so position j is predicted from x_{j+1..} alone -- the
        # same kind of quantity as G_0, from j + 1 predictions per sequence instead of one.
        j = torch.randint(0, max(1, L // 2), (B, 1), generator=gen, device=batch.device)
        prefix = torch.arange(L, device=batch.device)[None, :] <= j
        use = torch.rand(B, 1, generator=gen, device=batch.device) < cfg.prefix_prob
        masked = torch.where(use, prefix, masked)
    inputs = torch.where(masked, torch.full_like(batch, model.config.mask_id), batch)
    logits = model(inputs)  # (B, L, n)
    return F.cross_entropy(logits[masked], batch[masked])


def _causal_loss(model: SmallTransformer, batch: torch.Tensor, cfg: PretrainConfig, gen: torch.Generator) -> torch.Tensor:
    rev = torch.flip(batch, dims=[1])  # right-to-left LM: the last prediction is x_0
    inputs = rev[:, :-1].clone()
    k = model.config.prompt_slots
    if k:
        # The slots come first in reading order (after x_T in time): empty ([MASK]) half of the time.
        empty = torch.rand(inputs.shape[0], 1, generator=gen, device=batch.device) < cfg.slot_mask_prob
        inputs[:, :k] = torch.where(empty, torch.full_like(inputs[:, :k], model.config.mask_id), inputs[:, :k])
    logits = model(inputs)  # (B, L-1, n)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rev[:, 1:].reshape(-1))


def _evaluate(model: SmallTransformer, observed: torch.Tensor, G0: np.ndarray) -> dict[str, float]:
    model.eval()
    probs = mask_probs(model, observed).cpu().double().numpy()
    model.train()
    tv = total_variation(probs, G0)
    return {"tv_mean": float(tv.mean()), "tv_median": float(np.median(tv))}


def _load(path: Path, model: SmallTransformer) -> None:
    from safetensors.torch import load_file

    state = load_file(path)
    missing = set(model.state_dict()) ^ set(state)
    if missing:
        raise ValueError(f"{path}: keys differ from the model: {sorted(missing)[:5]}")
    model.load_state_dict(state)


def pretrain(
    spec: HMMSpec,
    length: int,
    cfg: PretrainConfig,
    cache: UnitCache,
    *,
    max_len: int | None = None,
    eval_length: int | None = None,
    device: str = "cpu",
    progress: bool = False,
    overwrite: bool = False,
) -> Pretrained:
    """Pretrain (or read from the cache) a transformer on sequences of ``length`` tokens from ``spec``.

    Args:
        spec: the HMM.
        length: T + 1, tokens x_0..x_T per sequence (the corpus has ``cfg.prompt_slots`` more in front).
        cfg: hyper-parameters; ``cfg.causal`` picks the right-to-left causal LM.
        cache: the unit cache (corpus and checkpoint units).
        max_len: position embeddings (default length + cfg.prompt_slots).
        eval_length: T of the held-out inputs [slots, MASK, x_1..T] of the TV curve (default length - 1).
        overwrite: retrain even if the checkpoint is cached.
    """
    key = pretrain_key(spec, length, cfg, max_len=max_len, eval_length=eval_length, device=device)
    reused = not overwrite and cache.get(key) is not None
    unit = cache.get_or_compute(key, lambda work: train_unit(work, spec, length, cfg, cache, max_len=max_len,
                                                             eval_length=eval_length, device=device,
                                                             progress=progress), overwrite=overwrite)
    return load_pretrained(unit, spec, length, cfg, max_len=max_len, eval_length=eval_length, device=device,
                           reused=reused)


def _described(spec: HMMSpec, length: int, cfg: PretrainConfig, max_len: int | None,
               eval_length: int | None) -> dict[str, Any]:
    """What a pretraining run is a function of (the device aside), with the defaults of :func:`pretrain` filled."""
    max_len = length + cfg.prompt_slots if max_len is None else max_len
    eval_length = length - 1 if eval_length is None else eval_length
    return {"hmm": spec.describe(), "length": length, "max_len": max_len, "eval_length": eval_length,
            "cfg": dataclasses.asdict(cfg)}


def pretrain_key(spec: HMMSpec, length: int, cfg: PretrainConfig, *, max_len: int | None = None,
                 eval_length: int | None = None, device: str = "cpu") -> UnitKey:
    """The cache key of the checkpoint unit of :func:`pretrain` (same arguments); no HMM is built."""
    described = _described(spec, length, cfg, max_len, eval_length)
    return unit_key("wei2021.pretrain", UNIT_VERSION, {**described, "device": torch.device(device).type})


def _initial_model(vocab_size: int, cfg: PretrainConfig, described: dict[str, Any]) -> tuple[SmallTransformer, str]:
    """The untrained model and the hash its seed derives from; the global RNG is left as it was."""
    init_key = stable_hash({"version": 2, **described})
    # The initial weights are a function of the seed alone (before version 3 they were drawn from the global RNG
    # as whatever ran earlier in the process had left it, so a model depended on which units were cached).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "init", init_key))
        model = SmallTransformer(cfg.model_config(vocab_size, described["max_len"]))
    return model, init_key


def train_unit(work, spec: HMMSpec, length: int, cfg: PretrainConfig, cache: UnitCache, *,
               max_len: int | None = None, eval_length: int | None = None, device: str = "cpu",
               progress: bool = False) -> dict:
    """Compute the checkpoint unit of :func:`pretrain` into the cache's work directory ``work``: train, write
    ``model.safetensors``; return the record (configs, TV curve, wall time). The corpus is a unit of ``cache``."""
    from safetensors.torch import save_file

    described = _described(spec, length, cfg, max_len, eval_length)
    hmm = spec.build()
    model, init_key = _initial_model(hmm.as_hmm().vocab_size, cfg, described)
    meta = _train(model, spec, hmm, length, cfg, cache, described["eval_length"], device, progress, init_key)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(work.path / "model.safetensors"))
    return meta


def load_pretrained(unit: Unit, spec: HMMSpec, length: int, cfg: PretrainConfig, *, max_len: int | None = None,
                    eval_length: int | None = None, device: str = "cpu", reused: bool = True) -> Pretrained:
    """The frozen model of a checkpoint unit (see :func:`pretrain_key`), on ``device``."""
    described = _described(spec, length, cfg, max_len, eval_length)
    hmm = spec.build()
    model, _ = _initial_model(hmm.as_hmm().vocab_size, cfg, described)
    _load(unit.file("model.safetensors"), model)
    model.to(device).eval().requires_grad_(False)
    return Pretrained(model, hmm, unit.result["curve"], unit.path, reused, float(unit.result["seconds"]))


def _train(model: SmallTransformer, spec: HMMSpec, hmm, length: int, cfg: PretrainConfig, cache: UnitCache,
           eval_length: int, device: str, progress: bool, init_key: str) -> dict:
    """Train ``model`` in place; return the record (configs, TV curve, wall time)."""
    t0 = time.perf_counter()
    model.to(device).train()
    corpus = torch.as_tensor(_corpus(spec, length + cfg.prompt_slots, cfg.corpus_sequences,
                                     derive_seed(cfg.seed, "corpus"), cache, progress).astype(np.int64))
    # The masked LM's empty slots are unobserved positions *before* x_0; the causal LM's come after x_T.
    observed, G0 = heldout_set(hmm, cfg.eval_sequences, eval_length, derive_seed(cfg.seed, "heldout", spec.seed),
                               lead=0 if cfg.causal else cfg.prompt_slots)
    observed_t = torch.as_tensor(observed, device=device)
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "batches"))
    dev_gen = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, "masks"))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    curve: list[dict] = []
    perm = torch.randperm(len(corpus), generator=gen)
    cursor = 0
    running: float | None = None  # smoothed training loss (None before the first step)
    from ftsim.core.progress import bar as tqdm

    bar = tqdm(range(cfg.steps), desc=f"pretrain {'causal' if cfg.causal else 'MLM'} {spec.preset} "
               f"{dict(spec.params)}", disable=not progress, leave=False, mininterval=1.0)
    for step in bar:
        if step % cfg.eval_every == 0:
            curve.append({"step": step, **_evaluate(model, observed_t, G0), "loss": running})
        if cursor + cfg.batch_size > len(corpus):
            perm, cursor = torch.randperm(len(corpus), generator=gen), 0
        batch = corpus[perm[cursor:cursor + cfg.batch_size]].to(device)
        cursor += cfg.batch_size
        for group in opt.param_groups:
            group["lr"] = cfg.lr * cosine_lr(step, cfg.steps, cfg.warmup)
        loss = _causal_loss(model, batch, cfg, dev_gen) if cfg.causal else _mlm_loss(model, batch, cfg, dev_gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = float(loss.detach()) if running is None else 0.95 * running + 0.05 * float(loss.detach())
        if progress and step % 50 == 0:
            bar.set_postfix(loss=f"{running:.3f}", tv=f"{curve[-1]['tv_mean']:.3f}")
    curve.append({"step": cfg.steps, **_evaluate(model, observed_t, G0), "loss": running})
    seconds = time.perf_counter() - t0
    return {"hmm": spec.describe(), "length": length, "max_len": model.config.max_len,
            "eval_length": eval_length, "pretrain": dataclasses.asdict(cfg),
            "model": dataclasses.asdict(model.config), "num_parameters": model.num_parameters(), "curve": curve,
            "seconds": round(seconds, 2), "device": device}
