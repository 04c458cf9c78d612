"""Fine-tuning on k-shot data: prompt-based (all parameters, SGD or Adam, cross-entropy over label-word scores),
standard fine-tuning without a prompt (a linear head on a pooled representation), zero-shot prompting, and the
linearised model used by the kernel-behaviour diagnostics.

Prompt-based fine-tuning (LM-BFF, Gao et al. 2021; Malladi et al. 2023, Sec. 3) minimises

    L(theta) = (1/|B|) sum_{(x, y) in B} -log softmax_c f_c(x; theta) [y]

over all parameters theta, where f_c are the label-word scores of
:class:`real_tasks.models.PromptClassifier`. SGD (no momentum) and Adam (no weight decay) are run for a fixed
number of steps with a linearly decaying learning rate and gradient-norm clipping at 1 (the Hugging Face Trainer
defaults that LM-BFF and LM-Kernel-FT inherit); every ``eval_every`` steps the model is scored on the k-shot
validation set and the best checkpoint (ties: the earlier one) is kept, as LM-BFF does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterator, Literal, Sequence

import torch
from torch import nn

from real_tasks.data import Example
from real_tasks.models import (LinearHeadClassifier, LoadedLM, PromptClassifier, batch_to, collate, kernel_outputs,
                               trim_batch)
from real_tasks.prompts import (EncodedPrompt, LabelTokens, Prompt, encode_plain, encode_prompt,
                                encode_sum_continuations)

__all__ = ["EncodedSet", "encode_set", "make_classifier", "FTConfig", "FTResult", "finetune", "evaluate", "eager_attention",
           "accuracy", "linearized_scores", "snapshot", "restore", "functional_outputs"]


@dataclasses.dataclass
class EncodedSet:
    """A padded, encoded example set: ``batch`` tensors with leading dimension N and ``labels`` (N,).

    ``lengths`` (N,) are the unpadded lengths, used to group similar lengths into mini-batches.
    """

    batch: dict[str, torch.Tensor]
    labels: torch.Tensor
    lengths: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, index: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
        """The sub-batch at ``index`` with all-padding columns removed."""
        index = torch.as_tensor(index, dtype=torch.long)
        return trim_batch({k: v[index] for k, v in self.batch.items()})

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """(indices, sub-batch) over the set, longest first, so each mini-batch pads little."""
        order = torch.argsort(self.lengths, descending=True, stable=True)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield idx, self.select(idx)


def encode_set(lm: LoadedLM, examples: Sequence[Example], *, prompt: Prompt | None,
               label_tokens: LabelTokens | None = None, label_mode: str = "first",
               max_length: int = 128) -> EncodedSet:
    """Encode ``examples`` with ``prompt`` (prompt-based methods) or without one (``prompt=None``: standard FT).

    For ``label_mode="sum"`` each example becomes C continuations (prefix + label word c), stored as
    ``input_ids`` (N, C, T) with ``word_mask`` marking the word tokens.
    """
    if not examples:
        raise ValueError("encode_set: no examples")
    tok = lm.tokenizer
    left = lm.kind == "causal"
    labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    if prompt is None:
        enc = [encode_plain(tok, e, lm.kind, max_length) for e in examples]
        lengths = torch.tensor([len(e.input_ids) for e in enc])
        return EncodedSet(collate(enc, tok.pad_token_id, left), labels, lengths)
    if lm.kind == "encoder":
        raise ValueError(f"{lm.name} has no LM head: prompt-based scoring does not apply (use prompt=None)")
    enc = [encode_prompt(tok, prompt, e, lm.kind, max_length=prompt.max_length) for e in examples]
    if label_mode == "first":
        lengths = torch.tensor([len(e.input_ids) for e in enc])
        return EncodedSet(collate(enc, tok.pad_token_id, left), labels, lengths)
    if label_tokens is None or lm.kind != "causal":
        raise ValueError("label_mode='sum' needs label tokens and a causal LM")
    conts = [encode_sum_continuations(e, label_tokens) for e in enc]
    C = len(label_tokens.full)
    flat = [EncodedPrompt(ids, len(ids) - 1) for per in conts for ids, _, _ in per]
    b = collate(flat, tok.pad_token_id, left_pad=True)
    T = b["input_ids"].shape[1]
    word_mask = torch.zeros(len(flat), T, dtype=torch.long)
    for row, (ids, start, n) in enumerate(c for per in conts for c in per):
        offset = T - len(ids)
        word_mask[row, offset + start: offset + start + n] = 1
    batch = {k: v.reshape(len(examples), C, T) for k, v in b.items() if k != "pred_pos"}
    batch["word_mask"] = word_mask.reshape(len(examples), C, T)
    batch["pred_pos"] = b["pred_pos"].reshape(len(examples), C)[:, 0]
    lengths = torch.tensor([max(len(ids) for ids, _, _ in per) for per in conts])
    return EncodedSet(batch, labels, lengths)


def make_classifier(lm: LoadedLM, *, use_prompt: bool, label_tokens: LabelTokens | None = None,
                    label_mode: str = "first", num_classes: int | None = None, head_seed: int = 0) -> nn.Module:
    """The module that is fine-tuned and whose eNTK is computed (see :mod:`real_tasks.models`)."""
    if use_prompt:
        if label_tokens is None:
            raise ValueError("a prompt classifier needs label tokens")
        module = PromptClassifier(lm.model, lm.kind, label_tokens.first, label_mode)
    else:
        if num_classes is None:
            raise ValueError("a linear-head classifier needs num_classes")
        module = LinearHeadClassifier(lm.model, lm.kind, num_classes, seed=head_seed)
    return module.eval()  # eval mode (no dropout) unless fine-tuning switches it on


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose argmax is the label (ties go to the lower class index)."""
    if scores.ndim == 2 and scores.shape[1] == 1:  # a single output f_1 - f_0: positive means class 1
        pred = (scores[:, 0] > 0).long()
    else:
        pred = scores.argmax(-1)
    return float((pred.cpu() == labels.cpu()).double().mean())


@torch.no_grad()
def evaluate(module: nn.Module, data: EncodedSet, device: str | torch.device, batch_size: int = 16) -> torch.Tensor:
    """Scores (N, C) of ``module`` on ``data`` in eval mode (float64, CPU), in the set's order."""
    was = module.training
    module.eval()
    out = torch.empty(len(data), 0, dtype=torch.float64)
    for idx, batch in data.batches(batch_size):
        s = module(batch_to(batch, device)).double().cpu()
        if out.shape[1] == 0:
            out = torch.empty(len(data), s.shape[1], dtype=torch.float64)
        out[idx] = s
    module.train(was)
    return out


@dataclasses.dataclass(frozen=True)
class FTConfig:
    """One fine-tuning run.

    Attributes:
        optimizer: ``sgd`` (no momentum) or ``adam`` (Adam, no weight decay).
        lr: peak learning rate (linear decay to 0 over ``steps`` when ``schedule="linear"``).
        steps: optimisation steps; ``batch_size``: examples per step (sampled without replacement per epoch).
        eval_every: score the validation set every this many steps (0: only at the end) and keep the best.
        max_grad_norm: clip the global gradient norm (None: no clipping).
    """

    optimizer: Literal["sgd", "adam"]
    lr: float
    steps: int
    batch_size: int = 8
    eval_every: int = 0
    schedule: Literal["linear", "constant"] = "linear"
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', not {self.optimizer!r}")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"steps, batch_size and lr must be positive: {self}")


@dataclasses.dataclass
class FTResult:
    """History rows (step, loss, dev accuracy), the selected step, and its dev accuracy."""

    history: list[dict]
    best_step: int
    best_dev_acc: float
    final_train_loss: float


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the parameters (named as ``module.named_parameters()``)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.named_parameters()}


@torch.no_grad()
def restore(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (from :func:`snapshot`) back into ``module``'s parameters."""
    params = dict(module.named_parameters())
    missing = set(params) - set(state)
    if missing:
        raise KeyError(f"restore: snapshot lacks {sorted(missing)[:3]}")
    for k, p in params.items():
        p.copy_(state[k].to(p.device, p.dtype))


def finetune(module: nn.Module, train: EncodedSet, dev: EncodedSet | None, cfg: FTConfig, *, seed: int,
             device: str | torch.device, progress: bool = False, desc: str = "fine-tune") -> FTResult:
    """Fine-tune all parameters of ``module`` in place on ``train``; leave it at the best validation checkpoint.

    The mini-batch order comes from a ``torch.Generator`` seeded with ``seed`` (same seed, same run on CPU).
    """
    from ftsim.core.progress import bar as tqdm

    module.to(device)
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.0)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    if cfg.schedule == "linear":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / cfg.steps))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    gen = torch.Generator().manual_seed(seed)
    n = len(train)
    perm, cursor = torch.randperm(n, generator=gen), 0
    history: list[dict] = []
    best = (-1.0, 0, None)  # (dev acc, step, snapshot)
    loss_val = math.nan
    bar = tqdm(range(1, cfg.steps + 1), desc=desc, disable=not progress, leave=False)
    for step in bar:
        if cursor >= n:
            perm, cursor = torch.randperm(n, generator=gen), 0
        idx = perm[cursor:cursor + cfg.batch_size]
        cursor += cfg.batch_size
        batch = batch_to(train.select(idx), device)
        scores = module(batch)  # (B, C)
        loss = nn.functional.cross_entropy(scores.float(), train.labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        loss_val = float(loss.detach())
        if not math.isfinite(loss_val):
            raise FloatingPointError(f"{desc}: loss became {loss_val} at step {step} (lr {cfg.lr} too large?)")
        row = {"step": step, "train_loss": loss_val, "lr": sched.get_last_lr()[0]}
        if dev is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
            acc = accuracy(evaluate(module, dev, device), dev.labels)
            row["dev_acc"] = acc
            if acc > best[0]:
                best = (acc, step, snapshot(module) if step != cfg.steps else None)
            module.train()
        history.append(row)
        bar.set_postfix(loss=f"{loss_val:.3f}")
    if best[2] is not None:
        restore(module, best[2])
    module.eval()
    return FTResult(history, best[1] if dev is not None else cfg.steps, best[0] if dev is not None else math.nan,
                    loss_val)


def functional_outputs(module: nn.Module, trim: bool = False):
    """The model function of the eNTK contract: ``f(params, batch) -> (B, C')`` kernel outputs of ``module``
    (:func:`real_tasks.models.kernel_outputs`) with ``params`` substituted by ``torch.func.functional_call``.

    With ``trim`` the columns that are padding in every row of the batch are dropped first
    (:func:`real_tasks.models.trim_batch`; the outputs are unchanged), except under ``vmap``, where the batch is
    one example and trimming would be data-dependent control flow."""
    from torch.func import functional_call

    from real_tasks.models import trim_batch

    if module.training:
        raise ValueError("functional_outputs: put the module in eval mode (the eNTK is of the deterministic model)")

    def f(params, batch):
        if trim and not torch._C._functorch.is_batchedtensor(batch["attention_mask"]):
            batch = trim_batch(batch)
        return kernel_outputs(functional_call(module, params, (batch,)))

    return f


def linearized_scores(module: nn.Module, theta0: dict[str, torch.Tensor], theta1: dict[str, torch.Tensor],
                      data: EncodedSet, device: str | torch.device, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the first-order Taylor expansion of the model around ``theta0``, evaluated at ``theta1``:

        f_lin(x) = f(x; theta0) + <grad_theta f(x; theta0), theta1 - theta0>   (Malladi et al. 2023, Def. 3.2)

    computed with one forward-mode JVP per mini-batch. Returns (f_lin, f(x; theta0)), both (N, C) float64.
    """
    from torch.func import functional_call, jvp

    p0 = {k: v.to(device) for k, v in theta0.items()}
    delta = {k: (theta1[k].to(device) - p0[k]) for k in p0}
    was = module.training
    module.eval()
    lin = f0 = None
    with eager_attention(module):
        for idx, batch in data.batches(batch_size):
            batch = batch_to(batch, device)

            def fn(params, batch=batch):
                return functional_call(module, params, (batch,))

            with torch.no_grad():
                out0, tangent = jvp(fn, (p0,), (delta,))
            if lin is None:
                lin = torch.empty(len(data), out0.shape[1], dtype=torch.float64)
                f0 = torch.empty_like(lin)
            lin[idx] = (out0 + tangent).double().cpu()
            f0[idx] = out0.double().cpu()
    module.train(was)
    del delta
    return lin, f0


@contextlib.contextmanager
def eager_attention(module: nn.Module):
    """Temporarily switch every Hugging Face sub-model to the plain ("eager") attention: PyTorch's fused CPU
    attention kernel has no forward-mode derivative, which :func:`linearized_scores` needs."""
    from transformers import PreTrainedModel

    changed = []
    for sub in module.modules():
        if isinstance(sub, PreTrainedModel):
            old = sub.config._attn_implementation
            if old != "eager":
                sub.set_attn_implementation("eager")
                changed.append((sub, old))
    try:
        yield
    finally:
        for sub, old in changed:
            sub.set_attn_implementation(old)
