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
import inspect
import math
import numbers
import os
from typing import Any, Mapping

import numpy as np

from ftsim.core.errors import InputError

__all__ = [
    "HMM",
    "MemoryHMM",
    "HMMValidationError",
    "HMM_FIELDS",
    "MEMORY_HMM_FIELDS",
    "wei2021_hmm",
    "memory_hmm",
    "random_hmm",
    "ginc_hmm",
    "ginc_parameters",
    "ginc_joint_hmm",
    "GINC_DELIMITER",
    "permutation_mixture",
    "softmax_rows",
    "PRESETS",
    "make_preset",
    "preset_defaults",
    "validate_preset_params",
    "preset_size",
]

HMM_FIELDS = ("start", "trans", "emit")
MEMORY_HMM_FIELDS = ("memory_prior", "syntax_start", "syntax_trans", "emit")

ROW_SUM_ATOL = 1e-8


class HMMValidationError(InputError):
    """A parameter array of an HMM is malformed; the message names the owner, the field, the row and the problem
    (``HMM.trans row 1: entry 1 is negative (-0.1)``).

    Attributes:
        field: the array (``start``, ``trans``, ``emit``, ``memory_prior``, ...).
        row: the row at fault, or None (a vector, or a problem of the whole array).
        path: the file the array came from, when it came from one.
    """

    def __init__(self, message: str, *, field: str | None = None, row: int | None = None,
                 path: str | os.PathLike | None = None):
        self.row = row
        super().__init__(message, field=field, path=path)

    def describe(self, flag_style: bool = False) -> str:
        # The message already names owner.field and row; an array is not a command-line flag.
        return (f"{self.path}: " if self.path is not None else "") + self.message


_REAL_KINDS = "biuf"  # bool, int, uint, float: what a probability array may be read from


def _as_frozen(name: str, value: Any, owner: str, ndim: int) -> np.ndarray:
    try:
        raw = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise HMMValidationError(f"{owner}.{name}: cannot be read as a float array ({exc})", field=name) from None
    if raw.dtype.kind == "c":
        # numpy would drop the imaginary part with only a warning; a probability is real.
        nz = np.flatnonzero(np.asarray(raw.imag).reshape(-1) != 0)
        at = f"; entry {np.unravel_index(int(nz[0]), raw.shape)} is {raw.reshape(-1)[nz[0]]}" if nz.size else ""
        raise HMMValidationError(f"{owner}.{name}: has complex entries (dtype {raw.dtype}{at}); "
                                 "probabilities must be real", field=name)
    if raw.dtype.kind not in _REAL_KINDS + "O":
        raise HMMValidationError(f"{owner}.{name}: cannot be read as a float array (dtype {raw.dtype})", field=name)
    try:
        arr = np.array(raw, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise HMMValidationError(f"{owner}.{name}: cannot be read as a float array ({exc})", field=name) from None
    if arr.ndim != ndim:
        raise HMMValidationError(f"{owner}.{name}: expected a {ndim}-d array, got shape {arr.shape}", field=name)
    arr.setflags(write=False)
    return arr


def _check_stochastic(owner: str, name: str, arr: np.ndarray, atol: float = ROW_SUM_ATOL,
                      field: str | None = None) -> None:
    """Every row of ``arr`` (or the vector itself) must be a probability vector."""
    field = name if field is None else field
    rows = arr[None, :] if arr.ndim == 1 else arr
    where = (lambda i: "") if arr.ndim == 1 else (lambda i: f" row {i}")
    row_of = (lambda i: None) if arr.ndim == 1 else (lambda i: i)
    if rows.shape[-1] == 0:
        raise HMMValidationError(f"{owner}.{name}: has no columns (shape {arr.shape})", field=field)
    bad_rows = np.flatnonzero(~np.all(np.isfinite(rows), axis=-1) | np.any(rows < 0, axis=-1)
                              | (np.abs(rows.sum(axis=-1) - 1.0) > atol))
    for i in bad_rows[:1]:  # vectorised test, then one row's message: a 70,000-symbol emit stays fast
        row = rows[i]
        if not np.all(np.isfinite(row)):
            j = int(np.flatnonzero(~np.isfinite(row))[0])
            raise HMMValidationError(f"{owner}.{name}{where(i)}: entry {j} is {row[j]} (must be finite)",
                                     field=field, row=row_of(i))
        if np.any(row < 0):
            j = int(np.argmin(row))
            raise HMMValidationError(f"{owner}.{name}{where(i)}: entry {j} is negative ({row[j]:.3g})",
                                     field=field, row=row_of(i))
        total = float(row.sum())
        raise HMMValidationError(
            f"{owner}.{name}{where(i)}: sums to {total:.10g}, off by {total - 1.0:+.3g} (tolerance {atol:g})",
            field=field, row=row_of(i))


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

    def validate(self, atol: float = ROW_SUM_ATOL) -> HMM:
        m = self.start.shape[0]
        if m == 0:
            raise HMMValidationError("HMM.start: has no states (shape (0,))", field="start")
        if self.trans.shape != (m, m):
            raise HMMValidationError(
                f"HMM.trans: shape {self.trans.shape} does not match num_states={m} from start; expected ({m}, {m})",
                field="trans")
        if self.emit.shape[0] != m:
            raise HMMValidationError(
                f"HMM.emit: shape {self.emit.shape} has {self.emit.shape[0]} rows; expected num_states={m}",
                field="emit")
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

    def arrays(self) -> dict[str, np.ndarray]:
        """The parameter arrays by field name (read-only views, no copies): what a corpus stores as ``.npy``."""
        return {name: getattr(self, name) for name in HMM_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        """Nested lists (small models only: a corpus stores its model as ``.npy`` files instead)."""
        return {"start": self.start.tolist(), "trans": self.trans.tolist(), "emit": self.emit.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HMM:
        missing = set(HMM_FIELDS) - set(data)
        if missing:
            raise HMMValidationError(f"HMM: missing field(s) {sorted(missing)}", field=sorted(missing)[0])
        return cls(np.asarray(data["start"]), np.asarray(data["trans"]), np.asarray(data["emit"]))

    def as_hmm(self) -> "HMM":
        """The plain-HMM view of a model: the HMM itself (a :class:`MemoryHMM` returns its joint-state chain), so
        exact routines call ``model.as_hmm()`` on either kind."""
        return self

    def to_hmmlearn(self, **kwargs: Any):
        """The same model as hmmlearn's ``CategoricalHMM``, its parameters set (so every hmmlearn routine --
        ``score``, ``score_samples``, ``predict_proba``, ``decode``, ``sample`` -- runs on it).

        Args:
            **kwargs: passed to ``CategoricalHMM`` (e.g. ``random_state``, ``params``); ``init_params``
                defaults to ``""`` so that a later ``fit`` starts from these parameters instead of redrawing
                them.
        """
        try:
            from hmmlearn.hmm import CategoricalHMM
        except ImportError as exc:  # an optional peer, imported only here
            raise ImportError(f"HMM.to_hmmlearn needs hmmlearn (pip install 'hmmlearn>=0.3'): {exc}") from None
        kwargs.setdefault("init_params", "")
        ref = CategoricalHMM(n_components=self.num_states, n_features=self.vocab_size, **kwargs)
        # Writable copies: ours are read-only, and hmmlearn's fit updates its arrays in place.
        ref.startprob_, ref.transmat_, ref.emissionprob_ = self.start.copy(), self.trans.copy(), self.emit.copy()
        return ref

    @classmethod
    def from_hmmlearn(cls, model: Any) -> HMM:
        """An :class:`HMM` from a fitted (or hand-set) hmmlearn ``CategoricalHMM``: ``startprob_`` ->
        ``start``, ``transmat_`` -> ``trans``, ``emissionprob_`` -> ``emit``, validated like any other.

        Raises:
            InputError: the object is not a CategoricalHMM, or has no parameters yet (field = the attribute).
            HMMValidationError: a parameter is not stochastic (e.g. a state that fitting never visited has an
                all-zero row); the message names the hmmlearn attribute and the row.
        """
        try:
            from hmmlearn.hmm import CategoricalHMM
        except ImportError:
            CategoricalHMM = None
        if CategoricalHMM is not None and not isinstance(model, CategoricalHMM):
            raise InputError(f"expected an hmmlearn CategoricalHMM, got {type(model).__module__}."
                             f"{type(model).__qualname__} (its emissions are not categorical symbols)",
                             field="model")
        arrays = {}
        for ours, theirs in _HMMLEARN_NAMES.items():
            if not hasattr(model, theirs):
                raise InputError(f"the hmmlearn model has no {theirs}: fit it (or set it) first", field=theirs)
            arrays[ours] = getattr(model, theirs)
        n_features = getattr(model, "n_features", None)
        emit_shape = np.shape(arrays["emit"])
        if isinstance(n_features, numbers.Integral) and len(emit_shape) == 2 and emit_shape[1] != n_features:
            raise InputError(f"has {emit_shape[1]} columns but the model's n_features is {n_features}",
                             field="emissionprob_")
        try:
            return cls(**arrays)
        except HMMValidationError as exc:
            theirs = _HMMLEARN_NAMES.get(exc.field or "", "")
            raise HMMValidationError(f"{exc.message} (from the hmmlearn model's {theirs})" if theirs else exc.message,
                                     field=exc.field, row=exc.row) from None

    def __repr__(self) -> str:
        return f"HMM(num_states={self.num_states}, vocab_size={self.vocab_size})"


_HMMLEARN_NAMES = {"start": "startprob_", "trans": "transmat_", "emit": "emissionprob_"}


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

    def validate(self, atol: float = ROW_SUM_ATOL) -> MemoryHMM:
        N, S = self.memory_prior.shape[0], self.syntax_start.shape[0]
        if N == 0 or S == 0:
            raise HMMValidationError(f"MemoryHMM: num_memory={N} and num_syntax={S} must be positive",
                                     field="memory_prior" if N == 0 else "syntax_start")
        if self.syntax_trans.shape != (S, S):
            raise HMMValidationError(
                f"MemoryHMM.syntax_trans: shape {self.syntax_trans.shape}; expected ({S}, {S}) from syntax_start",
                field="syntax_trans")
        if self.emit.shape[:2] != (N, S):
            raise HMMValidationError(
                f"MemoryHMM.emit: shape {self.emit.shape}; expected ({N}, {S}, vocab_size) from "
                "memory_prior and syntax_start", field="emit")
        _check_stochastic("MemoryHMM", "memory_prior", self.memory_prior, atol)
        _check_stochastic("MemoryHMM", "syntax_start", self.syntax_start, atol)
        _check_stochastic("MemoryHMM", "syntax_trans", self.syntax_trans, atol)
        for a in range(N):
            _check_stochastic("MemoryHMM", f"emit[memory={a}]", self.emit[a], atol, field="emit")
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

    def arrays(self) -> dict[str, np.ndarray]:
        """The parameter arrays by field name (read-only views, no copies)."""
        return {name: getattr(self, name) for name in MEMORY_HMM_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        """Nested lists (small models only)."""
        return {k: getattr(self, k).tolist() for k in MEMORY_HMM_FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MemoryHMM:
        missing = set(MEMORY_HMM_FIELDS) - set(data)
        if missing:
            raise HMMValidationError(f"MemoryHMM: missing field(s) {sorted(missing)}", field=sorted(missing)[0])
        return cls(*(np.asarray(data[k]) for k in MEMORY_HMM_FIELDS))

    def to_hmmlearn(self, **kwargs: Any):
        """The joint-state view (:meth:`as_hmm`) as an hmmlearn ``CategoricalHMM`` (see :meth:`HMM.to_hmmlearn`)."""
        return self.as_hmm().to_hmmlearn(**kwargs)

    def __repr__(self) -> str:
        return (f"MemoryHMM(num_memory={self.num_memory}, num_syntax={self.num_syntax}, "
                f"vocab_size={self.vocab_size})")


# --------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


# What each kind of preset parameter must be; checked before anything is drawn, so a bad value is reported as
# the parameter's fault (``num_permutations: must be an integer >= 1, got 0``), not as a numpy error inside.
_COUNTS = ("num_states", "vocab_size", "num_memory", "num_syntax", "num_values", "num_slots", "num_id_concepts")
_OPTIONAL_COUNTS = ("num_permutations",)
_NONNEGATIVE_COUNTS = ("num_ood_concepts",)
_POSITIVE_REALS = ("start_temp", "trans_temp", "emit_temp", "memory_temp", "concentration")
_UNIT_REALS = ("value_identity",)


def _check_count(name: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise InputError(f"must be an integer >= 1{' (or None)' if optional else ''}, got {value!r}", field=name)
    if value < 1:
        raise InputError(f"must be an integer >= 1{' (or None)' if optional else ''}, got {value}", field=name)


def _check_positive_real(name: str, value: Any) -> None:
    what = "temperature must be" if name.endswith("temp") or name == "temperature" else "must be"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InputError(f"{what} a positive finite number, got {value!r}", field=name)
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise InputError(f"{what} positive and finite, got {value}", field=name)
    if name.endswith("_temp") and not math.isfinite(0.5 / v):
        # softmax((u - 1/2) / T) with u in [0, 1): logits up to 0.5 / T must be representable.
        raise InputError(f"temperature {value} is too small (0.5 / temperature overflows)", field=name)


def _check_nonnegative_count(name: str, value: Any) -> None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 0:
        raise InputError(f"must be an integer >= 0, got {value!r}", field=name)


def _check_unit_real(name: str, value: Any) -> None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise InputError(f"must be a number in [0, 1], got {value!r}", field=name)


def _check_preset_values(values: Mapping[str, Any]) -> None:
    for name, value in values.items():
        if name in _COUNTS:
            _check_count(name, value)
        elif name in _OPTIONAL_COUNTS:
            _check_count(name, value, optional=True)
        elif name in _NONNEGATIVE_COUNTS:
            _check_nonnegative_count(name, value)
        elif name in _POSITIVE_REALS:
            _check_positive_real(name, value)
        elif name in _UNIT_REALS:
            _check_unit_real(name, value)


def softmax_rows(logits: np.ndarray, temperature: float, name: str = "temperature") -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` (stable). ``name`` is the parameter named in errors."""
    _check_positive_real(name, temperature)
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def permutation_mixture(num_states: int, num_permutations: int, temperature: float,
                        rng: np.random.Generator) -> np.ndarray:
    """sum_k w_k P_k with random permutation matrices P_k and w = softmax((u - 1/2) / temperature),
    u ~ Uniform(0, 1)^K. Doubly stochastic; as temperature -> 0 it tends to a single permutation
    (deterministic transitions)."""
    _check_preset_values({"num_states": num_states, "num_permutations": num_permutations})
    weights = softmax_rows(rng.random(num_permutations) - 0.5, temperature, name="trans_temp")
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

    Raises:
        InputError: a parameter out of range (field = its name): counts must be integers >= 1, temperatures
            positive and finite.
    """
    _check_preset_values(dict(num_states=num_states, vocab_size=vocab_size, start_temp=start_temp,
                              trans_temp=trans_temp, emit_temp=emit_temp, num_permutations=num_permutations))
    rng = _rng(seed)
    K = num_states if num_permutations is None else num_permutations
    start = softmax_rows(rng.random(num_states) - 0.5, start_temp, name="start_temp")
    trans = permutation_mixture(num_states, K, trans_temp, rng)
    emit = softmax_rows(rng.random((num_states, vocab_size)) - 0.5, emit_temp, name="emit_temp")
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
    joint state. With ``num_memory=1`` it is exactly a ``wei2021`` HMM over the syntax states.

    Raises:
        InputError: a parameter out of range (field = its name).
    """
    _check_preset_values(dict(num_memory=num_memory, num_syntax=num_syntax, vocab_size=vocab_size,
                              start_temp=start_temp, trans_temp=trans_temp, emit_temp=emit_temp,
                              memory_temp=memory_temp, num_permutations=num_permutations))
    rng = _rng(seed)
    K = num_syntax if num_permutations is None else num_permutations
    memory_prior = softmax_rows(rng.random(num_memory) - 0.5, memory_temp, name="memory_temp")
    syntax_start = softmax_rows(rng.random(num_syntax) - 0.5, start_temp, name="start_temp")
    syntax_trans = permutation_mixture(num_syntax, K, trans_temp, rng)
    emit = softmax_rows(rng.random((num_memory, num_syntax, vocab_size)) - 0.5, emit_temp, name="emit_temp")
    return MemoryHMM(memory_prior, syntax_start, syntax_trans, emit)


def random_hmm(
    num_states: int = 4,
    vocab_size: int = 6,
    seed: int | np.random.Generator = 0,
    *,
    concentration: float = 1.0,
) -> HMM:
    """Every row drawn from a symmetric Dirichlet(concentration); small concentrations give near-zero
    entries. For property tests and stress.

    Raises:
        InputError: a parameter out of range (field = its name).
    """
    _check_preset_values(dict(num_states=num_states, vocab_size=vocab_size, concentration=concentration))
    rng = _rng(seed)

    def rows(k: int, d: int) -> np.ndarray:
        x = rng.dirichlet(np.full(d, concentration), size=k)
        # Dirichlet draws at tiny concentration can underflow to an all-zero row; renormalise from a floor.
        x = np.maximum(x, 1e-300)
        return x / x.sum(axis=1, keepdims=True)

    return HMM(rows(1, num_states)[0], rows(num_states, num_states), rows(num_states, vocab_size))


# --------------------------------------------------------------------------------------------------------
# GINC (Xie, Raghunathan, Liang & Ma 2021): the preset's parameters and its product-space HMM. The structured
# value object, exact concept inference and in-context prompts are in simulate.ginc, which builds on these.
# --------------------------------------------------------------------------------------------------------

GINC_DELIMITER = 0
"""The delimiter token of a GINC world; slot 0 is the delimiter slot, which emits it whatever the value."""

_JOINT_STATES_MAX = 46_340  # floor(sqrt(2**31 - 1)): the sampler indexes the dense transition matrix with int32


def _check_ginc(values: Mapping[str, Any]) -> None:
    """The per-kind checks, then what GINC needs of them together (a delimiter needs a token and a slot of its
    own; the corpus sampler stores the joint transition matrix densely)."""
    _check_preset_values(values)
    if values["vocab_size"] < 2:
        raise InputError(f"must be >= 2 for ginc (token {GINC_DELIMITER} is the delimiter, the other slots "
                         f"emit the rest), got {values['vocab_size']}", field="vocab_size")
    if values["num_slots"] < 2:
        raise InputError(f"must be >= 2 for ginc (slot 0 is the delimiter slot), got {values['num_slots']}",
                         field="num_slots")
    concepts = values["num_id_concepts"] + values["num_ood_concepts"]
    states = concepts * values["num_values"] * values["num_slots"]
    if states > _JOINT_STATES_MAX:
        raise InputError(f"{concepts} concepts x {values['num_values']} values x {values['num_slots']} slots = "
                         f"{states:,} joint states; the corpus stores their dense transition matrix and samples it "
                         f"with int32 indices (at most {_JOINT_STATES_MAX:,} states)", field="num_values")


def ginc_parameters(
    num_values: int = 10,
    num_slots: int = 10,
    vocab_size: int = 50,
    num_id_concepts: int = 5,
    num_ood_concepts: int = 5,
    seed: int | np.random.Generator = 0,
    *,
    start_temp: float = 10.0,
    trans_temp: float = 0.1,
    value_identity: float = 0.9,
) -> dict[str, Any]:
    """Draw the parameters of a GINC world (the arguments of :class:`simulate.ginc.GINC`).

    Concepts ``0 .. num_id_concepts - 1`` are in distribution (uniform prior), the next ``num_ood_concepts``
    out of distribution (prior 0). Draw order: memory, value chain, then per concept its start and slot chain.

    * ``memory``: (num_values, num_slots) tokens, M[v, 0] = the delimiter 0, M[v, s >= 1] ~ U{1..vocab_size-1}.
    * ``value_trans``: (1 - value_identity) * permutation mixture + value_identity * I, shared by all concepts
      (GINC's default: one value chain, biased to keep the entity).
    * ``slot_trans[c]``: a mixture of ``num_slots`` permutations at ``trans_temp`` (:func:`permutation_mixture`).
    * ``start[c]``: softmax((u - 1/2) / start_temp) over the num_values * num_slots hidden states h = v * S + s.

    Defaults are the released GINC dataset's (50 symbols, 10 values, 10 slots, 10 concepts of which 5 in
    distribution, transition temperature 0.1, start temperature 10, value identity coefficient 0.9).

    Raises:
        InputError: a parameter out of range, naming it.
    """
    _check_ginc(dict(num_values=num_values, num_slots=num_slots, vocab_size=vocab_size,
                     num_id_concepts=num_id_concepts, num_ood_concepts=num_ood_concepts, start_temp=start_temp,
                     trans_temp=trans_temp, value_identity=value_identity))
    rng = _rng(seed)
    V, S, C = num_values, num_slots, num_id_concepts + num_ood_concepts
    memory = rng.integers(1, vocab_size, size=(V, S))
    memory[:, 0] = GINC_DELIMITER
    value_trans = ((1.0 - value_identity) * permutation_mixture(V, V, trans_temp, rng)
                   + value_identity * np.eye(V))
    start = np.empty((C, V * S))
    slot_trans = np.empty((C, S, S))
    for c in range(C):
        start[c] = softmax_rows(rng.random(V * S) - 0.5, start_temp, name="start_temp")
        slot_trans[c] = permutation_mixture(S, S, trans_temp, rng)
    prior = np.concatenate([np.full(num_id_concepts, 1.0 / num_id_concepts), np.zeros(num_ood_concepts)])
    return {"concept_prior": prior, "start": start, "value_trans": value_trans, "slot_trans": slot_trans,
            "memory": memory, "vocab_size": int(vocab_size)}


def ginc_joint_hmm(concept_prior: np.ndarray, start: np.ndarray, value_trans: np.ndarray, slot_trans: np.ndarray,
                   memory: np.ndarray, vocab_size: int) -> HMM:
    """The mixture of concept HMMs as one HMM on the product space (concept, value, slot).

    Joint state ``c * V * S + v * S + s``; start ``prior[c] * start[c, v * S + s]``; transitions block diagonal
    over concepts, block c = ``kron(value_trans, slot_trans[c])`` (the value and slot chains move
    independently); emissions one-hot at ``memory[v, s]``, the same for every concept. A concept of prior 0
    keeps its block but is never entered.
    """
    C, VS = np.shape(start)
    trans = np.zeros((C * VS, C * VS))
    for c in range(C):
        trans[c * VS:(c + 1) * VS, c * VS:(c + 1) * VS] = np.kron(value_trans, slot_trans[c])
    emit = np.zeros((VS, int(vocab_size)))
    emit[np.arange(VS), np.asarray(memory).reshape(-1)] = 1.0
    joint_start = (np.asarray(concept_prior, dtype=np.float64)[:, None] * np.asarray(start)).reshape(-1)
    return HMM(joint_start, trans, np.tile(emit, (C, 1)))


def ginc_hmm(
    num_values: int = 10,
    num_slots: int = 10,
    vocab_size: int = 50,
    num_id_concepts: int = 5,
    num_ood_concepts: int = 5,
    seed: int | np.random.Generator = 0,
    *,
    start_temp: float = 10.0,
    trans_temp: float = 0.1,
    value_identity: float = 0.9,
) -> HMM:
    """GINC's pretraining distribution (Xie, Raghunathan, Liang & Ma 2021): a uniform mixture of the
    in-distribution concept HMMs, as the product-space HMM of :func:`ginc_joint_hmm` over
    ``(num_id_concepts + num_ood_concepts) * num_values * num_slots`` states; parameters as in
    :func:`ginc_parameters`. :func:`simulate.ginc.ginc_model` draws the same world as a structured value.

    Raises:
        InputError: a parameter out of range, naming it.
    """
    return ginc_joint_hmm(**ginc_parameters(num_values, num_slots, vocab_size, num_id_concepts, num_ood_concepts,
                                            seed, start_temp=start_temp, trans_temp=trans_temp,
                                            value_identity=value_identity))


PRESETS = {"wei2021": wei2021_hmm, "memory": memory_hmm, "random": random_hmm, "ginc": ginc_hmm}


def _preset_fn(preset: Any):
    try:
        return PRESETS[preset]
    except (KeyError, TypeError):
        raise InputError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}", field="preset") from None


def preset_defaults(preset: str) -> dict[str, Any]:
    """The preset's parameters (every keyword of its function but ``seed``) and their defaults."""
    sig = inspect.signature(_preset_fn(preset))
    return {name: p.default for name, p in sig.parameters.items() if name != "seed"}


def validate_preset_params(preset: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Check a preset's parameters without drawing anything; return them with every default filled in.

    Raises:
        InputError: unknown preset (field ``preset``), a parameter the preset does not take, or a value out of
            range (field = the parameter's name).
    """
    defaults = preset_defaults(preset)
    if not isinstance(params, Mapping):
        raise InputError(f"must be a mapping of parameter names to values, got {type(params).__name__}",
                         field="params")
    for name in params:
        if name not in defaults:
            raise InputError(f"does not apply to preset {preset!r} (its parameters: {', '.join(defaults)})",
                             field=str(name))
    full = {name: params.get(name, default) for name, default in defaults.items()}
    (_check_ginc if preset == "ginc" else _check_preset_values)(full)
    return full


def preset_size(preset: str, params: Mapping[str, Any]) -> tuple[int, int]:
    """(num_states, vocab_size) of the model a preset builds -- joint states for ``memory`` and ``ginc`` -- from
    its parameters alone (validated first), so sizes can be checked before any array is drawn."""
    full = validate_preset_params(preset, params)
    if preset == "memory":
        states = full["num_memory"] * full["num_syntax"]
    elif preset == "ginc":
        states = (full["num_id_concepts"] + full["num_ood_concepts"]) * full["num_values"] * full["num_slots"]
    else:
        states = full["num_states"]
    return int(states), int(full["vocab_size"])


def make_preset(preset: str, **params: Any) -> HMM | MemoryHMM:
    """Build a preset by name with its keyword parameters and ``seed`` (see each function for the defaults).

    Raises:
        InputError: unknown preset, unknown parameter or a value out of range, naming it.
    """
    seed = params.pop("seed", 0)
    full = validate_preset_params(preset, params)
    return _preset_fn(preset)(seed=seed, **full)
