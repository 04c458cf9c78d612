"""Downstream tasks defined through exact posteriors, as in Wei, Xie & Ma (2021).

The canonical task: a sequence x_1..T is observed, position 0 is a prepended mask, and the label is
``y = 1[mu^T P(H_0 | x_1..T) >= 0]`` for a sparse random ``mu``. Any other function of the posteriors plugs
in through :class:`PosteriorTask`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from ftsim.core.errors import InputError
from simulate.hmm import HMM, MemoryHMM
from simulate.inference import MASK, Inference, infer

__all__ = [
    "PosteriorTask",
    "sparse_mu",
    "linear_posterior_task",
    "memory_linear_task",
    "prepend_mask",
]


def prepend_mask(tokens: np.ndarray) -> np.ndarray:
    """(B, T) tokens -> (B, T + 1) int64 tokens with :data:`MASK` at position 0."""
    tokens = np.asarray(tokens)
    out = np.empty((tokens.shape[0], tokens.shape[1] + 1), dtype=np.int64)
    out[:, 0] = MASK
    out[:, 1:] = tokens
    return out


@dataclasses.dataclass(frozen=True)
class PosteriorTask:
    """A downstream task whose label is a function of exact HMM posteriors.

    Attributes:
        name: short description.
        fn: maps an :class:`Inference` of a batch (posteriors (B, T, m) of the joint-state model) to labels
            (B,) int.
        mask_position: if not None, a :data:`MASK` is *prepended* to each sequence before inference and the
            posteriors are those of the (T + 1)-long masked sequence (Wei et al.'s mask position 0).
    """

    name: str
    fn: Callable[[Inference], np.ndarray]
    mask_position: int | None = 0

    def inputs(self, tokens: np.ndarray) -> np.ndarray:
        return prepend_mask(tokens) if self.mask_position is not None else np.asarray(tokens)

    def labels(self, model: HMM | MemoryHMM, tokens: np.ndarray) -> np.ndarray:
        """(B,) labels of the sequences ``tokens`` (B, T)."""
        return np.asarray(self.fn(infer(model, self.inputs(tokens))), dtype=np.int64)


def sparse_mu(num_states: int, support_size: int, seed: int | np.random.Generator) -> np.ndarray:
    """mu with ``support_size`` non-zero N(0, 1) entries at random positions (6 in the paper's code).

    Raises:
        InputError: ``support_size`` not an integer in [1, num_states] (field ``support_size``).
    """
    if isinstance(support_size, bool) or not isinstance(support_size, (int, np.integer)) \
            or not 1 <= support_size <= num_states:
        raise InputError(f"must be an integer in [1, num_states={num_states}], got {support_size!r}",
                         field="support_size")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    mu = np.zeros(num_states)
    support = np.sort(rng.choice(num_states, size=support_size, replace=False))
    mu[support] = rng.standard_normal(support_size)
    return mu


def linear_posterior_task(mu: np.ndarray, position: int = 0) -> PosteriorTask:
    """y = 1[mu^T P(H_position | x) >= 0], with a mask prepended at position 0."""
    mu = np.asarray(mu, dtype=np.float64)

    def fn(inf: Inference) -> np.ndarray:
        post = inf.posteriors if inf.posteriors.ndim == 3 else inf.posteriors[None]
        return (post[:, position] @ mu >= 0).astype(np.int64)

    return PosteriorTask(f"linear(mu, H_{position})", fn, mask_position=0)


def memory_linear_task(model: MemoryHMM, mu: np.ndarray) -> PosteriorTask:
    """y = 1[mu^T P(M | x) >= 0] for a memory HMM (mu over memory values); no mask is prepended."""
    mu = np.asarray(mu, dtype=np.float64)
    if mu.shape != (model.num_memory,):
        raise InputError(f"has shape {mu.shape}; expected ({model.num_memory},) = (num_memory,)", field="mu")
    N, S = model.num_memory, model.num_syntax

    def fn(inf: Inference) -> np.ndarray:
        post = inf.posteriors if inf.posteriors.ndim == 3 else inf.posteriors[None]
        mem = post[:, 0].reshape(-1, N, S).sum(axis=2)  # memory is constant: any position gives P(M | x)
        return (mem @ mu >= 0).astype(np.int64)

    return PosteriorTask("linear(mu, M)", fn, mask_position=None)
