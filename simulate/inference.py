"""Exact inference in categorical HMMs, batched over sequences, float64, stable for T = 10^4.

All routines take ``tokens: (B, T) int`` (or ``(T,)``, treated as one sequence) and accept *missing*
observations: a negative token (:data:`MASK`) contributes likelihood 1 for every state. That is how the
posterior at a masked position is computed, e.g. P(H_0 | x_1..T) for Wei et al.'s G_0(x) = W^T P(H_0 | x):
put ``MASK`` at position 0.

Stability: the forward pass is the scaled recursion (Rabiner 1989): ``alpha_hat[t] = P(H_t | x_<=t)`` and
``c[t] = P(x_t | x_<t)``, so ``log P(x) = sum_t log c[t]`` never underflows; the backward pass reuses the
same scales. Sequences of probability zero get ``log_likelihood = -inf`` and NaN posteriors.

Chunks and threads: a batch is cut into a fixed grid of chunks of sequences that depends only on the batch
size and ``num_states`` (:func:`chunk_slices`), never on ``workers``; each chunk runs the whole time loop on
its own rows, so ``workers`` threads only decide which thread runs which chunk and cannot change a bit. The
per-step product is one (rows, m) x (m, m) matmul; BLAS is held to one thread for the loop
(:func:`ftsim.core.threads.limit_threads`): a second BLAS thread gains nothing at these sizes, and on a busy
machine a BLAS pool that does split them makes each step wait for a descheduled worker (issue 11 measured
0.08-0.2 M tokens/s with two BLAS threads against 1.3 M with one). Per-row results do not depend on how rows
are grouped into chunks (tested bit for bit against one chunk), except that numpy sends a one-row product
to gemv instead of gemm, so the grid never makes a one-row chunk.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise

import numpy as np

from ftsim.core.threads import limit_threads
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
    "chunk_slices",
    "Inference",
    "infer",
]

MASK = -1

CHUNK_STEP_FLOATS = 1 << 13
"""Forward-backward chunk size: rows * num_states of one time step's (rows, m) slice (64 KiB of float64, so
a step's operands stay in L2; m = 32 gives 256 sequences per chunk)."""

VITERBI_STEP_FLOATS = 1 << 16
"""Viterbi chunk size: rows * num_states**2 of one step's (rows, m, m) score block (512 KiB, in L2; m = 32
gives 64 sequences per chunk)."""

LIMIT_MIN_WORK = 1 << 23
"""B * T * m**2 from which the BLAS pool is limited. Below it the loop's products take ~2 ms or less, and
``limit_threads`` itself costs 0.2-0.6 ms per call (threadpoolctl looks up the loaded libraries on every
entry), more than a spinning BLAS worker could cost; small calls (tests, per-example oracles) skip it."""


def _rowdot(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Row-wise dot products over the last axis into ``out``: ``np.vecdot`` (one ddot per row, so no row
    depends on its neighbours) on numpy >= 2, the equivalent einsum before."""
    if _VECDOT is not None:
        return _VECDOT(a, b, out=out)
    return np.einsum("...i,...i->...", a, b, out=out)


_VECDOT = getattr(np, "vecdot", None)


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


def _check_workers(workers: int) -> int:
    if int(workers) != workers or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    return int(workers)


def chunk_slices(num_sequences: int, rows: int) -> list[slice]:
    """The grid of chunks over a batch: as few chunks of about ``rows`` sequences as cover it, their sizes
    differing by at most one (even work for threads), and no one-row chunk unless the batch has one sequence
    (numpy sends a one-row product to gemv, whose rounding differs from gemm's); so a chunk has at most
    ``max(rows, 2) + 1`` rows."""
    if num_sequences <= 0:
        return []
    count = -(-num_sequences // max(2, int(rows)))
    count = max(1, min(count, num_sequences // 2))  # every chunk >= 2 rows
    base, extra = divmod(num_sequences, count)
    bounds = np.concatenate([[0], np.cumsum([base + 1] * extra + [base] * (count - extra))]).tolist()
    return [slice(lo, hi) for lo, hi in pairwise(bounds)]


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How a batch runs: its chunks, the threads that run them, and whether BLAS is held to one thread."""

    chunks: tuple[slice, ...]
    workers: int
    limit_blas: bool

    def run(self, chunk_fn: Callable[[slice], None]) -> None:
        """Call ``chunk_fn(s)`` once per chunk; chunks write disjoint rows, so order does not matter."""
        limit = limit_threads(1, torch_threads=False) if self.limit_blas else contextlib.nullcontext()
        with limit:
            if self.workers == 1 or len(self.chunks) == 1:
                for s in self.chunks:
                    chunk_fn(s)
                return
            with ThreadPoolExecutor(max_workers=min(self.workers, len(self.chunks))) as pool:
                for _ in pool.map(chunk_fn, self.chunks):  # re-raises a chunk's exception here
                    pass


def _plan(tokens: np.ndarray, num_states: int, rows: int, workers: int, blas: bool) -> _Plan:
    """The chunk grid for ``rows`` sequences per chunk; BLAS is limited when the loop multiplies matrices
    and the call is big enough for a BLAS thread to matter (:data:`LIMIT_MIN_WORK`)."""
    B, T = tokens.shape
    big = B * T * num_states * num_states >= LIMIT_MIN_WORK
    return _Plan(tuple(chunk_slices(B, rows)), _check_workers(workers), blas and big)


def _fb_plan(tokens: np.ndarray, num_states: int, workers: int) -> _Plan:
    return _plan(tokens, num_states, CHUNK_STEP_FLOATS // num_states, workers, blas=True)


@dataclasses.dataclass(frozen=True)
class _Params:
    """The model's arrays in the layouts the loops want, float64."""

    start: np.ndarray  # (m,)
    trans: np.ndarray  # (m, m) [from, to]
    trans_t: np.ndarray  # (m, m) [to, from], contiguous
    emit_t: np.ndarray  # (n, m), contiguous: a gather by token gives rows over states


def _params(hmm: HMM) -> _Params:
    trans = np.asarray(hmm.trans, dtype=np.float64)
    return _Params(np.asarray(hmm.start, dtype=np.float64), trans, np.ascontiguousarray(trans.T),
                   np.ascontiguousarray(np.asarray(hmm.emit, dtype=np.float64).T))


def _emissions(emit_t: np.ndarray, tokens: np.ndarray, missing: float = 1.0) -> np.ndarray:
    """(T, b, m) time-major rows ``emit_t[x_t]`` for validated ``tokens`` (b, T); ``missing`` at masked
    positions (1 for likelihoods, 0 for log-likelihoods)."""
    tok = tokens.T  # (T, b)
    masked = tok < 0
    any_masked = bool(masked.any())
    em = np.take(emit_t, np.where(masked, 0, tok) if any_masked else tok, axis=0)  # (T, b, m); take: 3x fancy indexing
    if any_masked:
        em[masked] = missing
    return em


def emission_likelihoods(model: HMM | MemoryHMM, tokens: np.ndarray, dtype=np.float64) -> np.ndarray:
    """P(x_t | H_t = h) for every position: ``(T, B, m)`` time-major; 1 at masked positions."""
    hmm = _as_hmm(model)
    tokens, _ = _batch(tokens, hmm.vocab_size)
    return _emissions(np.ascontiguousarray(np.asarray(hmm.emit, dtype=dtype).T), tokens)


def _forward_chunk(p: _Params, em: np.ndarray, c: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    """Scaled forward pass over one chunk; returns the last filtered marginal (b, m).

    Args:
        em: (T, b, m) emission likelihoods, overwritten with ``em[t] / c[t]``: the scaled emissions the
            backward pass needs, so that pass has no division of its own.
        c: (T, b) out: the scales c[t] = P(x_t | x_<t) = sum_h (alpha_hat[t-1] @ trans)_h em[t, h].
        alpha: (T, b, m) out: filtered marginals alpha_hat[t] = (alpha_hat[t-1] @ trans) * em[t] / c[t];
            ``None`` keeps only two steps (for the log-likelihood and the last marginal).

    Per step: one matmul, one row-wise dot (:func:`_rowdot`), one broadcast division and one product, all in
    place on contiguous (b, m) slices. The scale comes from the dot rather than a row sum (``sum(axis=1)``
    over 32 states costs about as much as the matmul), and dividing the emissions rather than alpha hands
    the backward pass its scaled emissions for free.
    """
    T = em.shape[0]
    buf = np.empty((2,) + em.shape[1:]) if alpha is None else alpha
    at = (lambda t: buf[t & 1]) if alpha is None else (lambda t: buf[t])
    scale = c[..., None]  # (T, b, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        _rowdot(p.start, em[0], out=c[0])
        em[0] /= scale[0]
        np.multiply(p.start, em[0], out=at(0))
        for t in range(1, T):
            a, e = at(t), em[t]
            np.matmul(at(t - 1), p.trans, out=a)
            _rowdot(a, e, out=c[t])
            e /= scale[t]
            a *= e
    return at(T - 1)


def _backward_chunk(p: _Params, em_scaled: np.ndarray, beta: np.ndarray) -> None:
    """Scaled backward pass over one chunk into ``beta`` (T, b, m):
    beta_hat[t] = trans @ (em[t+1] / c[t+1] * beta_hat[t+1]), beta_hat[T-1] = 1."""
    T = em_scaled.shape[0]
    tmp = np.empty(em_scaled.shape[1:])
    beta[T - 1] = 1.0
    with np.errstate(invalid="ignore"):
        for t in range(T - 2, -1, -1):
            np.multiply(beta[t + 1], em_scaled[t + 1], out=tmp)
            np.matmul(tmp, p.trans_t, out=beta[t])


def _view(x: np.ndarray, single: bool) -> np.ndarray:
    """Time-major (T, B, ...) -> a batch-major (B, T, ...) view (no copy), squeezed for one sequence."""
    x = np.swapaxes(x, 0, 1)
    return x[0] if single else x


def _loglik(c: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        ll = np.log(c).sum(axis=0)
    ll[~np.isfinite(ll)] = -np.inf
    return ll


def forward(model: HMM | MemoryHMM, tokens: np.ndarray, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Scaled forward pass.

    Args:
        workers: threads over chunks of sequences (see the module docstring); the result is bitwise the
            same for every value.

    Returns:
        filtered: (B, T, m) P(H_t = h | x_0..t) (a view of time-major storage).
        log_c: (B, T) log P(x_t | x_0..t-1); their sum over t is the log-likelihood.
    """
    hmm = _as_hmm(model)
    tokens, single = _batch(tokens, hmm.vocab_size)
    p = _params(hmm)
    (B, T), m = tokens.shape, hmm.num_states
    alpha = np.empty((T, B, m))
    c = np.empty((T, B))

    def chunk(s: slice) -> None:
        _forward_chunk(p, _emissions(p.emit_t, tokens[s]), c[:, s], alpha[:, s])

    _fb_plan(tokens, m, workers).run(chunk)
    with np.errstate(divide="ignore"):
        log_c = np.log(c)
    return _view(alpha, single), _view(log_c, single)


def backward(model: HMM | MemoryHMM, tokens: np.ndarray, workers: int = 1) -> np.ndarray:
    """Scaled backward pass: (B, T, m) beta_hat[t, h] = P(x_t+1..T-1 | H_t = h) / P(x_t+1..T-1 | x_0..t).

    ``filtered * beta_hat`` is the smoothed posterior. ``workers``: as in :func:`forward`.
    """
    hmm = _as_hmm(model)
    tokens, single = _batch(tokens, hmm.vocab_size)
    p = _params(hmm)
    (B, T), m = tokens.shape, hmm.num_states
    beta = np.empty((T, B, m))

    def chunk(s: slice) -> None:
        em = _emissions(p.emit_t, tokens[s])
        _forward_chunk(p, em, np.empty((T, s.stop - s.start)), None)
        _backward_chunk(p, em, beta[:, s])

    _fb_plan(tokens, m, workers).run(chunk)
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


def infer(model: HMM | MemoryHMM, tokens: np.ndarray, workers: int = 1) -> Inference:
    """Forward-backward: posteriors, log-likelihoods and filtered marginals of a batch.

    beta_hat is written where the posteriors go and multiplied by alpha_hat in one pass per chunk
    (gamma_t = alpha_hat_t * beta_hat_t), so it is never stored separately. Arrays are (B, T, m) views of
    time-major storage.

    Args:
        model: an :class:`HMM` or :class:`MemoryHMM` (through its joint-state view).
        tokens: (B, T) or (T,) int; :data:`MASK` marks a missing observation.
        workers: threads over chunks of sequences (numpy releases the GIL in its kernels). The chunk grid
            does not depend on it, so the output is bitwise identical for every value; 1 (the default)
            runs in the calling thread. On an idle 2-core machine 2 is ~1.3x faster at m = 32, B = 512;
            with another process holding a core it gains nothing (see benchmarks/bench_hmm.py).
    """
    hmm = _as_hmm(model)
    tokens, single = _batch(tokens, hmm.vocab_size)
    p = _params(hmm)
    (B, T), m = tokens.shape, hmm.num_states
    alpha = np.empty((T, B, m))
    gamma = np.empty((T, B, m))
    c = np.empty((T, B))

    def chunk(s: slice) -> None:
        em = _emissions(p.emit_t, tokens[s])
        _forward_chunk(p, em, c[:, s], alpha[:, s])
        g = gamma[:, s]
        _backward_chunk(p, em, g)
        with np.errstate(invalid="ignore"):
            np.multiply(g, alpha[:, s], out=g)

    _fb_plan(tokens, m, workers).run(chunk)
    loglik = _loglik(c)
    impossible = ~np.isfinite(loglik)
    if impossible.any():
        gamma[:, impossible] = np.nan
        alpha[:, impossible] = np.nan
    return Inference(_view(gamma, single), loglik[0] if single else loglik, _view(alpha, single))


def posteriors(model: HMM | MemoryHMM, tokens: np.ndarray, workers: int = 1) -> np.ndarray:
    """(B, T, m) smoothed posteriors P(H_t = h | x_0..T-1). ``workers``: as in :func:`infer`."""
    return infer(model, tokens, workers=workers).posteriors


def _last_filtered(hmm: HMM, tokens: np.ndarray, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, m) P(H_T-1 | x_0..T-1) and (T, B) scales, keeping two steps of alpha per chunk."""
    p = _params(hmm)
    (B, T), m = tokens.shape, hmm.num_states
    last = np.empty((B, m))
    c = np.empty((T, B))

    def chunk(s: slice) -> None:
        last[s] = _forward_chunk(p, _emissions(p.emit_t, tokens[s]), c[:, s], None)

    _fb_plan(tokens, m, workers).run(chunk)
    return last, c


def log_likelihood(model: HMM | MemoryHMM, tokens: np.ndarray, workers: int = 1) -> np.ndarray:
    """(B,) log P(x_0..T-1) (forward pass only). ``workers``: as in :func:`infer`."""
    hmm = _as_hmm(model)
    tokens, single = _batch(tokens, hmm.vocab_size)
    ll = _loglik(_last_filtered(hmm, tokens, workers)[1])
    return ll[0] if single else ll


def _viterbi_chunk(log_start: np.ndarray, log_trans_t: np.ndarray, log_em: np.ndarray,
                   path: np.ndarray, log_prob: np.ndarray) -> None:
    """Max-product over one chunk: log_em (T, b, m) in, path (T, b) and log_prob (b,) out.

    Scores are laid out (b, to, from) so argmax runs over the contiguous last axis (numpy's argmax over a
    middle axis copies the array first; a max-reduction over a 32-long axis is slower than gathering the
    argmax). The same sums and the first maximum (lowest ``from``) as a (b, from, to) layout: same bits.
    """
    T, b, m = log_em.shape
    back = np.empty((T, b, m), dtype=np.int16 if m < 2**15 else np.int32)
    scores = np.empty((b, m, m))  # (b, to, from)
    delta = log_start + log_em[0]  # (b, m)
    for t in range(1, T):
        np.add(delta[:, None, :], log_trans_t, out=scores)
        best = np.argmax(scores, axis=2)  # (b, to)
        back[t] = best
        delta = np.take_along_axis(scores, best[:, :, None], axis=2)[:, :, 0]
        delta += log_em[t]
    rows = np.arange(b)
    path[T - 1] = np.argmax(delta, axis=1)
    log_prob[...] = delta[rows, path[T - 1]]
    for t in range(T - 1, 0, -1):
        path[t - 1] = back[t, rows, path[t]]


def viterbi(model: HMM | MemoryHMM, tokens: np.ndarray, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Most likely state path, batched.

    Args:
        workers: threads over chunks of sequences; the output is bitwise identical for every value (the
            loop is elementwise, max and argmax: no BLAS).

    Returns:
        path: (B, T) int, argmax_h log P(h_0..T-1, x_0..T-1) (ties go to the lowest state index at each
            back-pointer).
        log_prob: (B,) the joint log-probability of that path and the tokens (-inf if impossible).
    """
    hmm = _as_hmm(model)
    tokens, single = _batch(tokens, hmm.vocab_size)
    (B, T), m = tokens.shape, hmm.num_states
    with np.errstate(divide="ignore"):
        log_start = np.log(np.asarray(hmm.start, dtype=np.float64))
        log_trans_t = np.ascontiguousarray(np.log(np.asarray(hmm.trans, dtype=np.float64)).T)  # (to, from)
        log_emit_t = np.ascontiguousarray(np.log(np.asarray(hmm.emit, dtype=np.float64)).T)  # (n, m)
    path = np.empty((T, B), dtype=np.int64)
    log_prob = np.empty(B)

    def chunk(s: slice) -> None:
        log_em = _emissions(log_emit_t, tokens[s], missing=0.0)  # (T, b, m) log P(x_t | h)
        _viterbi_chunk(log_start, log_trans_t, log_em, path[:, s], log_prob[s])

    _plan(tokens, m, VITERBI_STEP_FLOATS // (m * m), workers, blas=False).run(chunk)
    path = path.T
    return (path[0], log_prob[0]) if single else (path, log_prob)


def memory_posterior(model: MemoryHMM, tokens: np.ndarray, workers: int = 1) -> np.ndarray:
    """(B, num_memory) P(M = a | x_0..T-1): the memory value is constant, so it is the final filtered
    marginal summed over syntax states. ``workers``: as in :func:`infer`."""
    if not isinstance(model, MemoryHMM):
        raise TypeError(f"memory_posterior needs a MemoryHMM, got {type(model).__name__}")
    hmm = model.as_hmm()
    tokens, single = _batch(tokens, hmm.vocab_size)
    last, _ = _last_filtered(hmm, tokens, workers)  # (B, N*S)
    last = last[0] if single else last
    return last.reshape(*last.shape[:-1], model.num_memory, model.num_syntax).sum(axis=-1)


PosteriorFunction = Callable[[Inference], np.ndarray]
