"""A-priori costs of units on a pretrained LM, for ``ftsim run ... --dry-run`` before anything was measured.

Arithmetic: a forward pass of a dense transformer does about ``2 N`` flops per token (N parameters outside the
embedding tables; attention's ``T^2`` term is small at the few hundred tokens of these tasks), a backward pass
about twice that (Kaplan et al. 2020, section 2.1): a training step on ``n`` tokens is ``6 N n`` flops, ``C``
output gradients of one example are ``2 N T (1 + 2 C)``. ``tests/test_costs.py`` checks these against
``torch.utils.flop_counter``. Memory: weights, gradients and optimizer state are ``P x bytes`` each (Adam keeps
two moments); the activations autograd keeps for the backward pass are measured on one example
(:func:`theory.memory.saved_activation_bytes`) and scaled by tokens. The eNTK engine plans within its memory
budget (``theory.ntk``), so a kernel unit needs the weights plus at most that budget.

These are estimates; ``--dry-run`` turns flops into seconds at the rate measured on finished units.
"""

from __future__ import annotations

import dataclasses

__all__ = ["LMCostBasis", "lm_cost_basis", "forward_flops", "training_flops", "output_gradient_flops",
           "training_bytes"]


@dataclasses.dataclass(frozen=True)
class LMCostBasis:
    """What the estimates of one model need: parameter count and bytes, activation bytes per token."""

    params: int
    param_bytes: int
    activation_bytes_per_token: float
    embedding_params: int = 0  # looked up, not multiplied (a tied LM head scores only the label words here)

    @property
    def flop_params(self) -> int:
        """The parameters a token is multiplied by: all but the embedding tables (Kaplan et al.'s N)."""
        return self.params - self.embedding_params

    @property
    def weight_bytes(self) -> int:
        return self.params * self.param_bytes


def lm_cost_basis(module, batch: dict, tokens: int) -> LMCostBasis:
    """Measure the basis on ``module`` (a classifier) and one encoded ``batch`` of ``tokens`` tokens."""
    from theory.memory import saved_activation_bytes

    import torch

    ps = list(module.parameters())
    lookups = {m.weight.data_ptr(): m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Embedding)}
    saved = saved_activation_bytes(module, batch)
    return LMCostBasis(params=sum(p.numel() for p in ps), param_bytes=ps[0].element_size() if ps else 4,
                       activation_bytes_per_token=saved / max(tokens, 1),
                       embedding_params=sum(lookups.values()))


def forward_flops(basis: LMCostBasis, tokens: float) -> float:
    """Forward passes over ``tokens`` tokens in total: ``2 N tokens`` (N: :attr:`LMCostBasis.flop_params`)."""
    return 2.0 * basis.flop_params * tokens


def training_flops(basis: LMCostBasis, tokens: float) -> float:
    """Training steps (forward + backward) over ``tokens`` tokens in total: ``6 P tokens``."""
    return 3.0 * forward_flops(basis, tokens)


def output_gradient_flops(basis: LMCostBasis, tokens: float, num_outputs: int) -> float:
    """One forward and ``C`` backward passes (the C gradient rows of every example, as an eNTK needs)."""
    return (1 + 2 * num_outputs) * forward_flops(basis, tokens)


def training_bytes(basis: LMCostBasis, *, optimizer: str, batch_tokens: int, snapshots: int = 0) -> int:
    """Peak device memory of fine-tuning every parameter: weights, gradients, the optimizer's state (Adam/AdamW: two
    moments; SGD without momentum: none), ``snapshots`` copies of the weights (a best checkpoint) and the
    activations of the largest batch (``batch_tokens`` tokens, padding included)."""
    states = {"adam": 2, "adamw": 2}.get(optimizer, 0)
    return int(basis.weight_bytes * (2 + states + snapshots) + basis.activation_bytes_per_token * batch_tokens)
