"""Vectorised sampling from HMMs: Walker/Vose alias tables, a loop over time only, blocks of sequences.

Determinism: sequences are drawn in blocks of ``block_sequences(length)`` sequences; block ``i`` uses the
generator ``default_rng(SeedSequence(seed, spawn_key=(i,)))``. So the same seed gives the same bytes, a
corpus on disk holds exactly ``sample(hmm, N, T, seed)``, and the first k sequences of a larger sample equal
a sample of k sequences (prefix stability).

Each categorical draw uses one uniform u: ``x = u * d``, column ``k = floor(x)``, and the fractional part
``x - k`` (uniform on [0, 1) up to 2^-45 for d <= 256) is compared with the alias probability. The sampler
is exact up to that float resolution; tests compare its frequencies with exact marginals.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from simulate.hmm import HMM, MemoryHMM

__all__ = [
    "AliasTable",
    "alias_table",
    "Sample",
    "sample",
    "iter_sample_blocks",
    "block_sequences",
    "smallest_uint",
    "BLOCK_TOKENS",
]

BLOCK_TOKENS = 1 << 20  # tokens per block: bounds the sampler's working memory (~40 MB) whatever N and T are


def smallest_uint(max_value: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds ``max_value``."""
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"{max_value} does not fit in uint64")


@dataclasses.dataclass(frozen=True)
class AliasTable:
    """Alias tables for K categorical distributions over d outcomes: (K * d,) acceptance probabilities and
    (K * d,) aliases, flattened so that a draw is one gather with index ``row * d + column``."""

    prob: np.ndarray  # (K * d,) float64
    alias: np.ndarray  # (K * d,) int32
    num_outcomes: int


def alias_table(probs: np.ndarray) -> AliasTable:
    """Vose's alias method for every row of ``probs`` (K, d). Exact for each row that sums to one.

    Tables are built once per distinct matrix and cached (HMMs are immutable), so repeated sampling from
    one model pays O(K d) set-up once.
    """
    probs = np.atleast_2d(np.asarray(probs, dtype=np.float64))
    key = (probs.shape, probs.tobytes())
    hit = _ALIAS_CACHE.get(key)
    if hit is not None:
        return hit
    K, d = probs.shape
    prob_rows, alias_rows = [], []
    for row in probs:
        scaled = (row * (d / row.sum())).tolist()  # plain floats: this loop is scalar work
        prob = [1.0] * d
        alias = list(range(d))
        small = [i for i, p in enumerate(scaled) if p < 1.0]
        large = [i for i, p in enumerate(scaled) if p >= 1.0]
        while small and large:
            s, g = small.pop(), large.pop()
            prob[s] = scaled[s]
            alias[s] = g
            scaled[g] = (scaled[g] + scaled[s]) - 1.0
            (small if scaled[g] < 1.0 else large).append(g)
        # What is left over is 1 up to rounding: always accept (prob already 1.0).
        prob_rows.append(prob)
        alias_rows.append(alias)
    table = AliasTable(np.array(prob_rows).reshape(-1), np.array(alias_rows, dtype=np.int32).reshape(-1), d)
    if len(_ALIAS_CACHE) >= 64:
        _ALIAS_CACHE.pop(next(iter(_ALIAS_CACHE)))
    _ALIAS_CACHE[key] = table
    return table


_ALIAS_CACHE: dict[tuple, AliasTable] = {}


def _draw(table: AliasTable, rows: np.ndarray, u: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """One draw per element from distribution ``rows[i]`` of the table, using the uniform ``u[i]``.

    int32 indices and in-place updates: this is the sampler's hot loop (a handful of passes per token).
    """
    d = table.num_outcomes
    x = u * d
    k = x.astype(np.int32)
    np.minimum(k, d - 1, out=k)  # u < 1 so k < d, but guard the float edge
    x -= k  # the fractional part: the acceptance uniform
    flat = rows.astype(np.int32)
    flat *= d
    flat += k
    accept = x < table.prob.take(flat)
    if out is None:
        out = np.empty(flat.shape, dtype=np.int32)
    table.alias.take(flat, out=out)
    np.copyto(out, k, where=accept, casting="unsafe")
    return out


@dataclasses.dataclass(frozen=True)
class Sample:
    """Sequences drawn from an HMM.

    Attributes:
        tokens: (num_sequences, length) tokens, smallest unsigned dtype holding the vocabulary.
        states: (num_sequences, length) hidden states (joint index for a MemoryHMM; see
            :meth:`MemoryHMM.split_state`).
    """

    tokens: np.ndarray
    states: np.ndarray


def block_sequences(length: int) -> int:
    """Sequences per block: ``max(1, BLOCK_TOKENS // length)``."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    return max(1, BLOCK_TOKENS // length)


@dataclasses.dataclass(frozen=True)
class _Tables:
    start: AliasTable
    trans: AliasTable
    emit: AliasTable
    token_dtype: np.dtype
    state_dtype: np.dtype


def _tables(hmm: HMM) -> _Tables:
    return _Tables(alias_table(hmm.start[None]), alias_table(hmm.trans), alias_table(hmm.emit),
                   smallest_uint(hmm.vocab_size - 1), smallest_uint(hmm.num_states - 1))


def _sample_block(tabs: _Tables, num: int, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    # Sequence i of the block consumes uniforms [2 T i, 2 T (i + 1)) of the stream (T for its states, then T
    # for its tokens), so a block's first k sequences do not depend on how many follow (prefix stability).
    u = rng.random((num, 2, length))
    # The state chain runs time-major so each step touches one contiguous (num,) row.
    u_state = np.ascontiguousarray(u[:, 0].T)  # (length, num)
    states_tm = np.empty((length, num), dtype=np.int32)
    _draw(tabs.start, np.zeros(num, dtype=np.int32), u_state[0], out=states_tm[0])
    for t in range(1, length):
        _draw(tabs.trans, states_tm[t - 1], u_state[t], out=states_tm[t])
    del u_state
    # Narrow, then transpose (1-2 bytes per entry); emissions are drawn batch-major from the strided view
    # u[:, 1] in cache-sized slabs of sequences, so no float array is transposed twice.
    states = np.ascontiguousarray(states_tm.astype(tabs.state_dtype).T)  # (num, length)
    del states_tm
    tokens = np.empty((num, length), dtype=tabs.token_dtype)
    step = max(1, (1 << 16) // length)
    for lo in range(0, num, step):
        tokens[lo:lo + step] = _draw(tabs.emit, states[lo:lo + step], u[lo:lo + step, 1])
    return tokens, states


def iter_sample_blocks(model: HMM | MemoryHMM, num_sequences: int, length: int, seed: int,
                       workers: int = 1) -> Iterator[Sample]:
    """Yield consecutive blocks of ``block_sequences(length)`` sequences (the last may be shorter).

    With ``workers > 1``, up to ``workers`` blocks are generated ahead in threads (numpy releases the GIL in
    its array loops); blocks are still yielded in order and are byte-identical to ``workers=1``, since each
    block has its own seed. At most ``workers + 1`` blocks are alive at once, so memory stays bounded.
    """
    hmm = model.as_hmm() if isinstance(model, MemoryHMM) else model
    if num_sequences < 0:
        raise ValueError(f"num_sequences must be >= 0, got {num_sequences}")
    per = block_sequences(length)
    tabs = _tables(hmm)

    def block(i: int) -> Sample:
        rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(i,)))
        lo = i * per
        tokens, states = _sample_block(tabs, min(per, num_sequences - lo), length, rng)
        return Sample(tokens, states)

    count = -(-num_sequences // per)
    if workers <= 1 or count <= 1:
        for i in range(count):
            yield block(i)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        next_index = 0
        while next_index < count or pending:
            while next_index < count and len(pending) < workers:
                pending.append(pool.submit(block, next_index))
                next_index += 1
            yield pending.popleft().result()


def sample(model: HMM | MemoryHMM, num_sequences: int, length: int, seed: int) -> Sample:
    """Draw ``num_sequences`` sequences of ``length`` tokens (vectorised over sequences).

    Args:
        model: an :class:`HMM` or :class:`MemoryHMM` (sampled through its joint-state view: the memory
            value is drawn once per sequence and never changes).
        num_sequences, length: output shape (N, T).
        seed: an integer seed; the same seed gives identical arrays.

    Returns:
        :class:`Sample` with ``tokens`` and ``states`` of shape (N, T).
    """
    blocks = list(iter_sample_blocks(model, num_sequences, length, seed))
    hmm = model.as_hmm() if isinstance(model, MemoryHMM) else model
    if not blocks:
        return Sample(np.zeros((0, length), smallest_uint(hmm.vocab_size - 1)),
                      np.zeros((0, length), smallest_uint(hmm.num_states - 1)))
    return Sample(np.concatenate([b.tokens for b in blocks]), np.concatenate([b.states for b in blocks]))
