"""Real-task classifiers and their data: encoded example sets, the prompt-based and linear-head classifiers to
fine-tune (:mod:`real_tasks.models`), the model function of the eNTK contract, and the linearised model's scores.

The fine-tuning itself is :func:`theory.finetune.finetune` with a :class:`theory.finetune.Method` value: an
:class:`EncodedSet` is the data set it trains on (``len``, ``labels``, ``select``, ``batches``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Sequence

import torch
from torch import nn

from real_tasks.data import Example
from real_tasks.models import LinearHeadClassifier, LoadedLM, PromptClassifier, batch_to, collate, kernel_outputs, trim_batch
from real_tasks.prompts import (EncodedPrompt, LabelTokens, Prompt, encode_plain, encode_prompt,
                                encode_sum_continuations)

__all__ = ["EncodedSet", "encode_set", "make_classifier", "functional_outputs", "linearized_scores",
           "eager_attention"]


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
    """Scores of the first-order Taylor expansion of the model around ``theta0``, evaluated at ``theta1``
    (Malladi et al. 2023, Def. 3.2), through :func:`theory.linearize.linearized_outputs` (one forward-mode JVP
    per mini-batch). Returns (f_lin, f(x; theta0)), both (N, C) float64 on CPU."""
    from torch.func import functional_call

    from theory.linearize import linearized_outputs

    p0 = {k: v.to(device) for k, v in theta0.items()}
    p1 = {k: theta1[k].to(device) for k in p0}
    was = module.training
    module.eval()
    lin = f0 = None

    def f(params, batch):
        return functional_call(module, params, (batch,))

    with eager_attention(module):
        for idx, batch in data.batches(batch_size):
            with torch.no_grad():
                out_lin, out0 = linearized_outputs(f, p0, p1, batch_to(batch, device))
            if lin is None:
                lin = torch.empty(len(data), out0.shape[1], dtype=torch.float64)
                f0 = torch.empty_like(lin)
            lin[idx] = out_lin.double().cpu()
            f0[idx] = out0.double().cpu()
    module.train(was)
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
