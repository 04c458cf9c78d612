"""Small transformers pretrained on HMM corpora: a masked LM (BERT-style, bidirectional) and a causal variant.

Both read token ids in [0, n) plus a ``[MASK]`` id n, add learned absolute position embeddings, run pre-LN
transformer blocks and return logits over the n real tokens at every position.

Prompt slots. The first k = ``prompt_slots`` input positions are where a soft prompt goes. In pretraining they
hold genuine tokens of the chain (the k tokens before x_0) or, half of the time, ``[MASK]``; downstream they
hold ``[MASK]`` (head tuning: nothing observed there) or k trainable vectors (prompt tuning). So a prompt is
read the way the model learned to read evidence about the states just before H_0 -- the theory's "prompt
token one position before H_0" -- and a prompt initialised at the ``[MASK]`` embedding is exactly the
head-tuning model.

How each model gives G_0(x) = P(X_0 = . | x_1..T) (see :func:`mask_logits`):

* masked LM: input ``[slots, MASK, x_1, ..., x_T]``, read the logits at the ``[MASK]`` position;
* causal LM: it is trained on *time-reversed* sequences (a right-to-left LM), so after reading
  ``[slots, x_T, ..., x_1]`` its next-token distribution is the distribution of x_0 (its slots come first in
  reading order, i.e. after x_T in time).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["TransformerConfig", "SmallTransformer", "mask_logits", "mask_probs", "leave_one_out_probs", "cosine_lr"]


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Architecture of :class:`SmallTransformer`.

    Attributes:
        vocab_size: n real tokens (the ``[MASK]`` id is n).
        max_len: longest input, prompt positions included.
        d_model, num_layers, num_heads: width, depth and attention heads (d_model % num_heads == 0).
        causal: causal self-attention (the right-to-left LM) instead of bidirectional (the masked LM).
        prompt_slots: k leading input positions that prompt tuning may overwrite with soft vectors (see the
            module docstring).
    """

    vocab_size: int
    max_len: int
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    causal: bool = False
    prompt_slots: int = 0

    def __post_init__(self) -> None:
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not a multiple of num_heads={self.num_heads}")
        if min(self.vocab_size, self.max_len, self.d_model, self.num_layers, self.num_heads) < 1:
            raise ValueError(f"vocab_size, max_len, d_model, num_layers, num_heads must be >= 1: {self}")
        if self.prompt_slots < 0:
            raise ValueError(f"prompt_slots must be >= 0, got {self.prompt_slots}")

    @property
    def mask_id(self) -> int:
        return self.vocab_size


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, heads, L, D/heads)
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, D))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class SmallTransformer(nn.Module):
    """A pre-LN transformer LM over n tokens + ``[MASK]``; see the module docstring."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.tok = nn.Embedding(config.vocab_size + 1, d)
        self.pos = nn.Embedding(config.max_len, d)
        self.blocks = nn.ModuleList(_Block(d, config.num_heads, config.causal) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(d)
        self.out = nn.Linear(d, config.vocab_size)
        self.apply(self._init)

    @staticmethod
    def _init(mod: nn.Module) -> None:
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            nn.init.normal_(mod.weight, std=0.02)
        if isinstance(mod, nn.Linear) and mod.bias is not None:
            nn.init.zeros_(mod.bias)

    def embed(self, tokens: torch.Tensor, prompt: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids -> (B, L, d) input embeddings with positions added; a (k, d) ``prompt`` replaces the
        embeddings of the first k = ``prompt_slots`` positions."""
        x = self.tok(tokens)
        if prompt is not None:
            k = self.config.prompt_slots
            if prompt.shape[0] != k:
                raise ValueError(f"prompt has {prompt.shape[0]} vectors; the model has prompt_slots={k}")
            x = torch.cat([prompt.unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype), x[:, k:]], dim=1)
        L = x.shape[1]
        if L > self.config.max_len:
            raise ValueError(f"input of length {L} exceeds max_len={self.config.max_len}")
        return x + self.pos.weight[:L]

    def forward(self, tokens: torch.Tensor, prompt: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L, n) for ids (B, L); ``prompt`` (k, d_model) overrides the first k positions."""
        x = self.embed(tokens, prompt)
        for block in self.blocks:
            x = block(x)
        return self.out(self.ln_f(x))

    def with_slots(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prepend k ``[MASK]`` ids (the empty prompt slots): (B, T) -> (B, k + T)."""
        k = self.config.prompt_slots
        pad = torch.full((tokens.shape[0], k), self.config.mask_id, dtype=tokens.dtype, device=tokens.device)
        return torch.cat([pad, tokens], dim=1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def mask_logits(model: SmallTransformer, observed: torch.Tensor, prompt: torch.Tensor | None = None) -> torch.Tensor:
    """The model's logits for X_0 given x_1..T: (B, n).

    Args:
        model: a masked or causal :class:`SmallTransformer`.
        observed: (B, T) token ids x_1..x_T (no mask column).
        prompt: optional (k, d_model) soft prompt for the model's k prompt slots (None: ``[MASK]`` there).
    """
    B = observed.shape[0]
    if model.config.causal:
        logits = model(model.with_slots(torch.flip(observed, dims=[1])), prompt)  # right-to-left: x_T .. x_1
        return logits[:, -1]
    mask = torch.full((B, 1), model.config.mask_id, dtype=observed.dtype, device=observed.device)
    return model(model.with_slots(torch.cat([mask, observed], dim=1)), prompt)[:, model.config.prompt_slots]


def mask_probs(model: SmallTransformer, observed: torch.Tensor, prompt: torch.Tensor | None = None,
               batch_size: int = 1024) -> torch.Tensor:
    """softmax(:func:`mask_logits`) in batches without gradients: (B, n) float32 on the model's device."""
    outs = []
    with torch.no_grad():
        for i in range(0, observed.shape[0], batch_size):
            outs.append(torch.softmax(mask_logits(model, observed[i:i + batch_size], prompt).float(), -1))
    return torch.cat(outs)


def leave_one_out_probs(model: SmallTransformer, tokens: torch.Tensor, positions: list[int] | None = None,
                        batch_size: int = 512) -> torch.Tensor:
    """The masked LM's per-position outputs G_t(x) ~ P(X_t | x_{-t}): mask position t, read position t
    (the prompt slots hold ``[MASK]``).

    One forward pass per masked position (T passes of the batch); ``positions`` picks a subset.

    Args:
        tokens: (B, T) token ids.
    Returns:
        (B, len(positions), n) probabilities.
    """
    if model.config.causal:
        raise ValueError("leave_one_out_probs needs the bidirectional (masked) LM")
    T, k = tokens.shape[1], model.config.prompt_slots
    positions = list(range(T)) if positions is None else list(positions)
    out = torch.empty(tokens.shape[0], len(positions), model.config.vocab_size, device=tokens.device)
    with torch.no_grad():
        for j, t in enumerate(positions):
            for i in range(0, tokens.shape[0], batch_size):
                x = model.with_slots(tokens[i:i + batch_size])
                x[:, k + t] = model.config.mask_id
                out[i:i + batch_size, j] = torch.softmax(model(x)[:, k + t].float(), -1)
    return out


def cosine_lr(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to 1, then cosine decay to ``floor`` (a multiplier of the base learning rate)."""
    if step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))

