"""Hypothesis strategies for the objects the theorems talk about: stochastic matrices, HMMs, memory HMMs,
token sequences, PSD kernels and parameter masks."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from simulate.hmm import HMM, MemoryHMM

__all__ = ["stochastic_matrices", "hmms", "memory_hmms", "token_batches", "psd_kernels", "masks"]


@st.composite
def stochastic_matrices(draw, rows: int, cols: int, allow_near_zero: bool = True) -> np.ndarray:
    """(rows, cols) row-stochastic matrices. Entries come from Dirichlet rows whose concentration is drawn
    from [0.05, 5]; with ``allow_near_zero`` some entries are pushed down to ~1e-12 (near-zero entries are
    where scaling and log-space code break)."""
    seed = draw(st.integers(0, 2**32 - 1))
    conc = draw(st.sampled_from([0.05, 0.3, 1.0, 5.0]))
    rng = np.random.default_rng(seed)
    x = rng.dirichlet(np.full(cols, conc), size=rows)
    if allow_near_zero and draw(st.booleans()):
        mask = rng.random((rows, cols)) < 0.3
        x = np.where(mask, 1e-12, x)
    x = np.maximum(x, 1e-300)
    return x / x.sum(axis=1, keepdims=True)


@st.composite
def hmms(draw, max_states: int = 64, max_vocab: int = 64, min_states: int = 1) -> HMM:
    m = draw(st.integers(min_states, max_states))
    n = draw(st.integers(1, max_vocab))
    start = draw(stochastic_matrices(1, m))[0]
    return HMM(start, draw(stochastic_matrices(m, m)), draw(stochastic_matrices(m, n)))


@st.composite
def memory_hmms(draw, max_memory: int = 4, max_syntax: int = 4, max_vocab: int = 8) -> MemoryHMM:
    N = draw(st.integers(1, max_memory))
    S = draw(st.integers(1, max_syntax))
    n = draw(st.integers(1, max_vocab))
    emit = np.stack([draw(stochastic_matrices(S, n)) for _ in range(N)])
    return MemoryHMM(draw(stochastic_matrices(1, N))[0], draw(stochastic_matrices(1, S))[0],
                     draw(stochastic_matrices(S, S)), emit)


@st.composite
def token_batches(draw, vocab_size: int, max_batch: int = 4, max_length: int = 5, allow_mask: bool = True):
    """(B, T) int64 tokens in [0, vocab_size), with some -1 (masked) entries when ``allow_mask``."""
    B = draw(st.integers(1, max_batch))
    T = draw(st.integers(1, max_length))
    low = -1 if allow_mask else 0
    return draw(hnp.arrays(np.int64, (B, T), elements=st.integers(low, vocab_size - 1)))


@st.composite
def psd_kernels(draw, max_n: int = 12, rank: int | None = None) -> np.ndarray:
    """(n, n) symmetric PSD matrices G G^T, optionally of a given rank, with entries of order one."""
    n = draw(st.integers(1, max_n))
    r = rank if rank is not None else draw(st.integers(1, n))
    seed = draw(st.integers(0, 2**32 - 1))
    g = np.random.default_rng(seed).standard_normal((n, r))
    return g @ g.T / r


@st.composite
def masks(draw, shape: tuple[int, ...], min_density: float = 0.0, max_density: float = 1.0) -> np.ndarray:
    """Boolean parameter masks of a given shape with density in [min_density, max_density]."""
    density = draw(st.floats(min_density, max_density))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).random(shape) < density
