"""Hidden Markov models as frozen, validated value objects, and the presets of the synthetic world.

Conventions (as in hmmlearn and dynamax): ``num_states`` = m hidden states, ``vocab_size`` = n symbols,

* ``start``: (m,)   P(H_0 = h)
* ``trans``: (m, m) P(H_{t+1} = h' | H_t = h), rows sum to one
* ``emit``:  (m, n) P(X_t = v | H_t = h), rows sum to one

Wei, Xie & Ma (2021) write the emission matrix as W in R^{n x m} with columns P(X | H = h); our ``emit`` is
W^T. "W has full column rank" is ``rank(emit) == num_states``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = [
    "HMM",
    "MemoryHMM",
    "HMMValidationError",
    "wei2021_hmm",
    "memory_hmm",
    "random_hmm",
    "permutation_mixture",
    "softmax_rows",
    "PRESETS",
    "make_preset",
]

ROW_SUM_ATOL = 1e-8


class HMMValidationError(ValueError):
    """A parameter array of an HMM is malformed; the message names the field, the row and the problem."""


def _as_frozen(name: str, value: Any, owner: str, ndim: int) -> np.ndarray:
    try:
        arr = np.array(value, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise HMMValidationError(f"{owner}.{name}: cannot be read as a float array ({exc})") from None
    if arr.ndim != ndim:
        raise HMMValidationError(f"{owner}.{name}: expected a {ndim}-d array, got shape {arr.shape}")
    arr.setflags(write=False)
    return arr


def _check_stochastic(owner: str, name: str, arr: np.ndarray, atol: float = ROW_SUM_ATOL) -> None:
    """Every row of ``arr`` (or the vector itself) must be a probability vector."""
    rows = arr[None, :] if arr.ndim == 1 else arr
    where = (lambda i: "") if arr.ndim == 1 else (lambda i: f" row {i}")
    if rows.shape[-1] == 0:
        raise HMMValidationError(f"{owner}.{name}: has no columns (shape {arr.shape})")
    for i, row in enumerate(rows):
        if not np.all(np.isfinite(row)):
            j = int(np.flatnonzero(~np.isfinite(row))[0])
            raise HMMValidationError(f"{owner}.{name}{where(i)}: entry {j} is {row[j]} (must be finite)")
        if np.any(row < 0):
            j = int(np.argmin(row))
            raise HMMValidationError(f"{owner}.{name}{where(i)}: entry {j} is negative ({row[j]:.3g})")
        total = float(row.sum())
        if abs(total - 1.0) > atol:
            raise HMMValidationError(
                f"{owner}.{name}{where(i)}: sums to {total:.10g}, off by {total - 1.0:+.3g} "
                f"(tolerance {atol:g})"
            )


@dataclasses.dataclass(frozen=True, eq=False)
class HMM:
    """A categorical hidden Markov model.

    Args:
        start: (num_states,) initial distribution.
        trans: (num_states, num_states) row-stochastic transition matrix.
        emit: (num_states, vocab_size) row-stochastic emission matrix.

    Raises:
        HMMValidationError: naming the field, row and problem (shape mismatch, NaN, negative entry, row sum
            off by how much).
    """

    start: np.ndarray
    trans: np.ndarray
    emit: np.ndarray

    def __post_init__(self) -> None:
        for name, ndim in (("start", 1), ("trans", 2), ("emit", 2)):
            object.__setattr__(self, name, _as_frozen(name, getattr(self, name), "HMM", ndim))
        self.validate()

    def validate(self, atol: float = ROW_SUM_ATOL) -> "HMM":
        m = self.start.shape[0]
        if m == 0:
            raise HMMValidationError("HMM.start: has no states (shape (0,))")
        if self.trans.shape != (m, m):
            raise HMMValidationError(
                f"HMM.trans: shape {self.trans.shape} does not match num_states={m} from start; expected ({m}, {m})"
            )
        if self.emit.shape[0] != m:
            raise HMMValidationError(
                f"HMM.emit: shape {self.emit.shape} has {self.emit.shape[0]} rows; expected num_states={m}"
            )
        _check_stochastic("HMM", "start", self.start, atol)
        _check_stochastic("HMM", "trans", self.trans, atol)
        _check_stochastic("HMM", "emit", self.emit, atol)
        return self

    @property
    def num_states(self) -> int:
        return int(self.start.shape[0])

    @property
    def vocab_size(self) -> int:
        return int(self.emit.shape[1])

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start.tolist(), "trans": self.trans.tolist(), "emit": self.emit.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HMM":
        missing = {"start", "trans", "emit"} - set(data)
        if missing:
            raise HMMValidationError(f"HMM: missing field(s) {sorted(missing)}")
        return cls(np.asarray(data["start"]), np.asarray(data["trans"]), np.asarray(data["emit"]))

    def __repr__(self) -> str:
        return f"HMM(num_states={self.num_states}, vocab_size={self.vocab_size})"


@dataclasses.dataclass(frozen=True, eq=False)
class MemoryHMM:
    """The memory-augmented HMM of Wei, Xie & Ma (2021, Sec. 5): a memory value fixed per sequence and a
    syntax chain; each token is emitted from the joint (memory, syntax) state.

    Args:
        memory_prior: (num_memory,) distribution of the memory value M, drawn once per sequence.
        syntax_start: (num_syntax,) distribution of S_0.
        syntax_trans: (num_syntax, num_syntax) transitions of S_t (M never changes).
        emit: (num_memory, num_syntax, vocab_size) P(X_t | M, S_t).

    The joint-state view :meth:`as_hmm` numbers the joint state (M=a, S=s) as ``a * num_syntax + s``; its
    transition matrix is block diagonal (I_N kron syntax_trans), so every exact-inference routine applies.
    """

    memory_prior: np.ndarray
    syntax_start: np.ndarray
    syntax_trans: np.ndarray
    emit: np.ndarray

    def __post_init__(self) -> None:
        for name, ndim in (("memory_prior", 1), ("syntax_start", 1), ("syntax_trans", 2), ("emit", 3)):
            object.__setattr__(self, name, _as_frozen(name, getattr(self, name), "MemoryHMM", ndim))
        self.validate()

    def validate(self, atol: float = ROW_SUM_ATOL) -> "MemoryHMM":
        N, S = self.memory_prior.shape[0], self.syntax_start.shape[0]
        if N == 0 or S == 0:
            raise HMMValidationError(f"MemoryHMM: num_memory={N} and num_syntax={S} must be positive")
        if self.syntax_trans.shape != (S, S):
            raise HMMValidationError(
                f"MemoryHMM.syntax_trans: shape {self.syntax_trans.shape}; expected ({S}, {S}) from syntax_start"
            )
        if self.emit.shape[:2] != (N, S):
            raise HMMValidationError(
                f"MemoryHMM.emit: shape {self.emit.shape}; expected ({N}, {S}, vocab_size) from "
                "memory_prior and syntax_start"
            )
        _check_stochastic("MemoryHMM", "memory_prior", self.memory_prior, atol)
        _check_stochastic("MemoryHMM", "syntax_start", self.syntax_start, atol)
        _check_stochastic("MemoryHMM", "syntax_trans", self.syntax_trans, atol)
        for a in range(N):
            try:
                _check_stochastic("MemoryHMM", f"emit[memory={a}]", self.emit[a], atol)
            except HMMValidationError as exc:
                raise HMMValidationError(str(exc)) from None
        return self

    @property
    def num_memory(self) -> int:
        return int(self.memory_prior.shape[0])

    @property
    def num_syntax(self) -> int:
        return int(self.syntax_start.shape[0])

    @property
    def num_states(self) -> int:
        return self.num_memory * self.num_syntax

    @property
    def vocab_size(self) -> int:
        return int(self.emit.shape[2])

    def as_hmm(self) -> HMM:
        """The joint-state HMM over (memory, syntax), state index ``memory * num_syntax + syntax``."""
        N, S = self.num_memory, self.num_syntax
        start = (self.memory_prior[:, None] * self.syntax_start[None, :]).reshape(N * S)
        trans = np.kron(np.eye(N), self.syntax_trans)
        emit = self.emit.reshape(N * S, self.vocab_size)
        return HMM(start, trans, emit)

    def split_state(self, joint: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Joint state indices -> (memory, syntax) indices."""
        joint = np.asarray(joint)
        return joint // self.num_syntax, joint % self.num_syntax

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k).tolist() for k in ("memory_prior", "syntax_start", "syntax_trans", "emit")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MemoryHMM":
        fields = ("memory_prior", "syntax_start", "syntax_trans", "emit")
        missing = set(fields) - set(data)
        if missing:
            raise HMMValidationError(f"MemoryHMM: missing field(s) {sorted(missing)}")
        return cls(*(np.asarray(data[k]) for k in fields))

    def __repr__(self) -> str:
        return (f"MemoryHMM(num_memory={self.num_memory}, num_syntax={self.num_syntax}, "
                f"vocab_size={self.vocab_size})")


# --------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def softmax_rows(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` (stable)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def permutation_mixture(num_states: int, num_permutations: int, temperature: float,
                        rng: np.random.Generator) -> np.ndarray:
    """sum_k w_k P_k with random permutation matrices P_k and w = softmax((u - 1/2) / temperature),
    u ~ Uniform(0, 1)^K. Doubly stochastic; as temperature -> 0 it tends to a single permutation
    (deterministic transitions)."""
    weights = softmax_rows(rng.random(num_permutations) - 0.5, temperature)
    trans = np.zeros((num_states, num_states))
    rows = np.arange(num_states)
    for w in weights:
        trans[rows, rng.permutation(num_states)] += w
    return trans


def wei2021_hmm(
    num_states: int = 10,
    vocab_size: int = 10,
    seed: int | np.random.Generator = 0,
    *,
    start_temp: float = 10.0,
    trans_temp: float = 0.1,
    emit_temp: float = 0.1,
    num_permutations: int | None = None,
) -> HMM:
    """The HMM family of Wei, Xie & Ma (2021) (and of the GINC generator of Xie et al. 2022).

    * start: softmax((u - 1/2) / start_temp), u ~ U(0,1)^m; near-uniform at the default start_temp = 10.
    * trans: a softmax-weighted mixture of ``num_permutations`` (default m) random permutation matrices
      (:func:`permutation_mixture`), doubly stochastic; near-deterministic as trans_temp -> 0.
    * emit: row-wise softmax((u - 1/2) / emit_temp), u ~ U(0,1)^{m x n}: at emit_temp = 0.1 the logits span
      [-5, 5], so each state emits mostly one or two symbols. With m > n the emission matrix cannot have
      full column rank (``rank(emit) <= n < m``), which is the degenerate regime of the paper.
    """
    if num_states < 1 or vocab_size < 1:
        raise ValueError(f"num_states={num_states} and vocab_size={vocab_size} must be >= 1")
    rng = _rng(seed)
    K = num_states if num_permutations is None else num_permutations
    start = softmax_rows(rng.random(num_states) - 0.5, start_temp)
    trans = permutation_mixture(num_states, K, trans_temp, rng)
    emit = softmax_rows(rng.random((num_states, vocab_size)) - 0.5, emit_temp)
    return HMM(start, trans, emit)


def memory_hmm(
    num_memory: int = 3,
    num_syntax: int = 4,
    vocab_size: int = 10,
    seed: int | np.random.Generator = 0,
    *,
    start_temp: float = 10.0,
    trans_temp: float = 0.1,
    emit_temp: float = 0.1,
    memory_temp: float = 10.0,
    num_permutations: int | None = None,
) -> MemoryHMM:
    """A memory-augmented HMM: memory prior near-uniform (softmax at ``memory_temp``), a ``wei2021``-style
    syntax chain, and emissions P(X | M=a, S=s) drawn as in :func:`wei2021_hmm` independently for every
    joint state. With ``num_memory=1`` it is exactly a ``wei2021`` HMM over the syntax states."""
    if num_memory < 1 or num_syntax < 1:
        raise ValueError(f"num_memory={num_memory} and num_syntax={num_syntax} must be >= 1")
    rng = _rng(seed)
    K = num_syntax if num_permutations is None else num_permutations
    memory_prior = softmax_rows(rng.random(num_memory) - 0.5, memory_temp)
    syntax_start = softmax_rows(rng.random(num_syntax) - 0.5, start_temp)
    syntax_trans = permutation_mixture(num_syntax, K, trans_temp, rng)
    emit = softmax_rows(rng.random((num_memory, num_syntax, vocab_size)) - 0.5, emit_temp)
    return MemoryHMM(memory_prior, syntax_start, syntax_trans, emit)


def random_hmm(
    num_states: int = 4,
    vocab_size: int = 6,
    seed: int | np.random.Generator = 0,
    *,
    concentration: float = 1.0,
) -> HMM:
    """Every row drawn from a symmetric Dirichlet(concentration); small concentrations give near-zero
    entries. For property tests and stress."""
    if not concentration > 0:
        raise ValueError(f"concentration must be positive, got {concentration}")
    rng = _rng(seed)

    def rows(k: int, d: int) -> np.ndarray:
        x = rng.dirichlet(np.full(d, concentration), size=k)
        # Dirichlet draws at tiny concentration can underflow to an all-zero row; renormalise from a floor.
        x = np.maximum(x, 1e-300)
        return x / x.sum(axis=1, keepdims=True)

    return HMM(rows(1, num_states)[0], rows(num_states, num_states), rows(num_states, vocab_size))


PRESETS = {"wei2021": wei2021_hmm, "memory": memory_hmm, "random": random_hmm}


def make_preset(preset: str, **params: Any) -> HMM | MemoryHMM:
    """Build a preset by name with its keyword parameters (see each function for the defaults)."""
    try:
        fn = PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}") from None
    return fn(**params)
