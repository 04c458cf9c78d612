"""Exact inference in categorical HMMs, batched over sequences, float64, stable for T = 10^4.

All routines take ``tokens: (B, T) int`` (or ``(T,)``, treated as one sequence) and accept *missing*
observations: a negative token (:data:`MASK`) contributes likelihood 1 for every state. That is how the
posterior at a masked position is computed, e.g. P(H_0 | x_1..T) for Wei et al.'s G_0(x) = W^T P(H_0 | x):
put ``MASK`` at position 0.

Stability: the forward pass is the scaled recursion (Rabiner 1989): ``alpha_hat[t] = P(H_t | x_<=t)`` and
``c[t] = P(x_t | x_<t)``, so ``log P(x) = sum_t log c[t]`` never underflows; the backward pass reuses the
same scales. Sequences of probability zero get ``log_likelihood = -inf`` and NaN posteriors.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from simulate.hmm import HMM, MemoryHMM

__all__ = [
    "MASK",
    "emission_likelihoods",
    "forward",
    "backward",
    "posteriors",
    "log_likelihood",
    "viterbi",
    "memory_posterior",
    "Inference",
    "infer",
]

MASK = -1


def _as_hmm(model: HMM | MemoryHMM) -> HMM:
    return model.as_hmm() if isinstance(model, MemoryHMM) else model


def _batch(tokens: np.ndarray, vocab_size: int) -> tuple[np.ndarray, bool]:
    tokens = np.asarray(tokens)
    if not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"tokens must be an integer array, got dtype {tokens.dtype}")
    single = tokens.ndim == 1
    if single:
        tokens = tokens[None, :]
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must have shape (B, T) or (T,) with T >= 1, got {np.shape(tokens)}")
    if tokens.size and tokens.max() >= vocab_size:
        b, t = np.unravel_index(int(np.argmax(tokens)), tokens.shape)
        raise ValueError(f"tokens[{b}, {t}] = {tokens[b, t]} is outside the vocabulary (size {vocab_size})")
    return tokens, single


def emission_likelihoods(model: HMM | MemoryHMM, tokens: np.ndarray, dtype=np.float64) -> np.ndarray:
    """P(x_t | H_t = h) for every position: ``(T, B, m)`` time-major; 1 at masked positions."""
    hmm = _as_hmm(model)
    tokens, _ = _batch(tokens, hmm.vocab_size)
    emit_t = np.asarray(hmm.emit.T, dtype=dtype)  # (n, m)
    tok = tokens.T  # (T, B)
    em = emit_t[np.maximum(tok, 0)]  # (T, B, m)
    masked = tok < 0
    if masked.any():
        em[masked] = 1.0
    return em


def _forward_scaled(hmm: HMM, em: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """alpha_hat (T, B, m) and scales c (T, B) from time-major emission likelihoods.

    Time-major storage keeps every step's (B, m) slice contiguous, and all updates are in place: the loop
    costs one small matmul and three vector ops per step.
    """
    T, B, m = em.shape
    trans = np.asarray(hmm.trans, dtype=em.dtype)
    alpha = np.empty_like(em)
    c = np.empty((T, B), dtype=em.dtype)
    with np.errstate(divide="ignore", invalid="ignore"):
        np.multiply(hmm.start.astype(em.dtype), em[0], out=alpha[0])
        np.sum(alpha[0], axis=1, out=c[0])
        alpha[0] /= c[0][:, None]
        for t in range(1, T):
            a = alpha[t]
            np.matmul(alpha[t - 1], trans, out=a)
            a *= em[t]
            np.sum(a, axis=1, out=c[t])
            a /= c[t][:, None]
    return alpha, c


def _backward_steps(hmm: HMM, em: np.ndarray, c: np.ndarray):
    """Yield (t, beta_hat[t]) for t = T-1 .. 0 without storing all of beta (one (B, m) buffer)."""
    T, B, m = em.shape
    trans_T = np.ascontiguousarray(np.asarray(hmm.trans, dtype=em.dtype).T)
    beta = np.ones((B, m), dtype=em.dtype)
    tmp = np.empty_like(beta)
    yield T - 1, beta
    with np.errstate(divide="ignore", invalid="ignore"):
        for t in range(T - 2, -1, -1):
            np.multiply(beta, em[t + 1], out=tmp)
            np.matmul(tmp, trans_T, out=beta)
            beta /= c[t + 1][:, None]
            yield t, beta


def _view(x: np.ndarray, single: bool) -> np.ndarray:
    """Time-major (T, B, ...) -> a batch-major (B, T, ...) view (no copy), squeezed for one sequence."""
    x = np.swapaxes(x, 0, 1)
    return x[0] if single else x


def _loglik(c: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        ll = np.log(c).sum(axis=0)
    ll[~np.isfinite(ll)] = -np.inf
    return ll


def forward(model: HMM | MemoryHMM, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scaled forward pass.

    Returns:
        filtered: (B, T, m) P(H_t = h | x_0..t) (a view of time-major storage).
        log_c: (B, T) log P(x_t | x_0..t-1); their sum over t is the log-likelihood.
    """
    hmm = _as_hmm(model)
    tokens, single = _batch(tokens, hmm.vocab_size)
    alpha, c = _forward_scaled(hmm, emission_likelihoods(hmm, tokens))
    with np.errstate(divide="ignore"):
        log_c = np.log(c)
    return _view(alpha, single), _view(log_c, single)


def backward(model: HMM | MemoryHMM, tokens: np.ndarray) -> np.ndarray:
    """Scaled backward pass: (B, T, m) beta_hat[t, h] = P(x_t+1..T-1 | H_t = h) / P(x_t+1..T-1 | x_0..t).

    ``filtered * beta_hat`` is the smoothed posterior.
    """
    hmm = _as_hmm(model)
    tokens, single = _batch(tokens, hmm.vocab_size)
    em = emission_likelihoods(hmm, tokens)
    _, c = _forward_scaled(hmm, em)
    beta = np.empty_like(em)
    for t, b in _backward_steps(hmm, em, c):
        beta[t] = b
    return _view(beta, single)


@dataclasses.dataclass(frozen=True)
class Inference:
    """Exact smoothing results for a batch of sequences.

    Attributes:
        posteriors: (B, T, m) P(H_t = h | x_0..T-1).
        log_likelihood: (B,) log P(x_0..T-1).
        filtered: (B, T, m) P(H_t = h | x_0..t).
    """

    posteriors: np.ndarray
    log_likelihood: np.ndarray
    filtered: np.ndarray


def infer(model: HMM | MemoryHMM, tokens: np.ndarray) -> Inference:
    """Forward-backward: posteriors, log-likelihoods and filtered marginals of a batch.

    The smoothed posterior is formed during the backward sweep (gamma_t = alpha_hat_t * beta_hat_t), so
    beta is never stored. Arrays are (B, T, m) views of time-major storage.
    """
    hmm = _as_hmm(model)
    tokens, single = _batch(tokens, hmm.vocab_size)
    em = emission_likelihoods(hmm, tokens)
    alpha, c = _forward_scaled(hmm, em)
    gamma = np.empty_like(em)
    for t, beta in _backward_steps(hmm, em, c):
        np.multiply(alpha[t], beta, out=gamma[t])
    loglik = _loglik(c)
    impossible = ~np.isfinite(loglik)
    if impossible.any():
        gamma[:, impossible] = np.nan
        alpha[:, impossible] = np.nan
    return Inference(_view(gamma, single), loglik[0] if single else loglik, _view(alpha, single))


def posteriors(model: HMM | MemoryHMM, tokens: np.ndarray) -> np.ndarray:
    """(B, T, m) smoothed posteriors P(H_t = h | x_0..T-1)."""
    return infer(model, tokens).posteriors


def log_likelihood(model: HMM | MemoryHMM, tokens: np.ndarray) -> np.ndarray:
    """(B,) log P(x_0..T-1) (forward pass only)."""
    hmm = _as_hmm(model)
    tokens, single = _batch(tokens, hmm.vocab_size)
    _, c = _forward_scaled(hmm, emission_likelihoods(hmm, tokens))
    ll = _loglik(c)
    return ll[0] if single else ll


def viterbi(model: HMM | MemoryHMM, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Most likely state path, batched.

    Returns:
        path: (B, T) int, argmax_h log P(h_0..T-1, x_0..T-1) (ties go to the lowest state index at each
            back-pointer).
        log_prob: (B,) the joint log-probability of that path and the tokens (-inf if impossible).
    """
    hmm = _as_hmm(model)
    tokens, single = _batch(tokens, hmm.vocab_size)
    with np.errstate(divide="ignore"):
        log_em = np.log(emission_likelihoods(hmm, tokens))  # (T, B, m)
        log_trans = np.log(hmm.trans)
        delta = np.log(hmm.start) + log_em[0]  # (B, m)
    T, B, m = log_em.shape
    index_dtype = np.int16 if m < 2**15 else np.int32
    back = np.empty((T, B, m), dtype=index_dtype)
    for t in range(1, T):
        scores = delta[:, :, None] + log_trans[None, :, :]  # (B, from, to)
        best = np.argmax(scores, axis=1)  # (B, to)
        back[t] = best
        delta = np.take_along_axis(scores, best[:, None, :], axis=1)[:, 0, :] + log_em[t]
    path = np.empty((T, B), dtype=np.int64)
    path[T - 1] = np.argmax(delta, axis=1)
    log_prob = delta[np.arange(B), path[T - 1]]
    rows = np.arange(B)
    for t in range(T - 1, 0, -1):
        path[t - 1] = back[t, rows, path[t]]
    path = path.T
    return (path[0], log_prob[0]) if single else (path, log_prob)


def memory_posterior(model: MemoryHMM, tokens: np.ndarray) -> np.ndarray:
    """(B, num_memory) P(M = a | x_0..T-1): the memory value is constant, so it is the final filtered
    marginal summed over syntax states."""
    if not isinstance(model, MemoryHMM):
        raise TypeError(f"memory_posterior needs a MemoryHMM, got {type(model).__name__}")
    filtered, _ = forward(model, tokens)
    last = filtered[..., -1, :]  # (B, N*S)
    return last.reshape(*last.shape[:-1], model.num_memory, model.num_syntax).sum(axis=-1)


PosteriorFunction = Callable[[Inference], np.ndarray]
