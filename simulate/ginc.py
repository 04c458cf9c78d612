"""GINC: the mixture-of-HMMs world of Xie, Raghunathan, Liang & Ma (2021), "An Explanation of In-context Learning
as Implicit Bayesian Inference", as a frozen value object with exact concept inference and in-context prompts.

The model (GINC's generator, ``generate_data.py`` of the paper's code):

* hidden state h = (v, s): an entity/*value* v in {0..V-1} and a property/*slot* s in {0..S-1}, numbered
  ``h = v * S + s``. The two chains move independently, so a concept's transition matrix is the Kronecker
  product ``kron(value_trans, slot_trans[c])``: P(v', s' | v, s) = value_trans[v, v'] * slot_trans[c, s, s'].
* emissions are deterministic: a memory matrix ``memory`` (V, S), shared by every concept, maps each
  (value, slot) pair to one token, x_t = memory[v_t, s_t].
* a *concept* c is a slot chain ``slot_trans[c]`` with its start distribution ``start[c]`` (GINC's concepts
  differ in their transition matrices); the value chain is shared (GINC's default, biased to the identity so
  an entity persists). The pretraining distribution is the mixture with ``concept_prior``.

The delimiter. Slot 0 is the *delimiter slot*: memory[v, 0] = token 0 (:data:`DELIMITER`) for every value, and
no other slot emits token 0. So in the pretraining corpus the delimiter appears wherever a concept's slot
chain visits slot 0 -- it is a hidden state of every concept, not a token inserted at fixed positions. This is
GINC's construction, and it is what the theory needs: Xie et al. assume the delimiter is emitted from
delimiter hidden states of the pretraining HMMs, so an in-context prompt (examples separated by delimiters)
has non-zero probability under the pretraining distribution and the posterior over concepts is well defined.
It also keeps the corpus an exact sample of one stationary HMM, so the corpus writer, resume and the
``tokens == sample(hmm, N, T, seed)`` identity hold unchanged.

In- and out-of-distribution concepts. Concepts ``0 .. num_id_concepts - 1`` have prior ``1 / num_id_concepts``
(the pretraining mixture), the others prior 0: their parameters stay in the model (a :class:`GINC` keeps
every concept's start and slot chain; the stored corpus HMM keeps every transition block) but the mixture never
enters them. :func:`ood_hmm` builds an OOD concept's HMM (or the uniform mixture of the OOD concepts) and
:func:`icl_prompts` builds GINC prompts for any concept, in or out of distribution.

Exact inference. A mixture of HMMs is one HMM on (concept, value, slot) with block-diagonal transitions
(:meth:`GINC.as_hmm`, the corpus's model), so P(c | x) is the final filtered marginal summed over concept c's
block (``implementation="joint"``, through :mod:`simulate.inference`). The default ``"factored"`` recursion runs
each concept's scaled forward pass on (V, S) arrays, one product with value_trans and one with slot_trans[c]
per step (O(V S (V + S)) instead of O((V S)^2)), and combines log P(x | c) with the prior; ``"hmm"`` runs
:func:`simulate.inference.log_likelihood` on each concept's HMM. Tests check all three against enumeration
of every hidden path. A sequence impossible under every concept of the prior gets NaN posteriors (as
:func:`simulate.inference.infer` gives NaN posteriors for log-likelihood -inf).

Corpora: ``CorpusSpec("ginc", params)`` / ``ftsim generate --preset ginc`` write the joint HMM
(:func:`simulate.hmm.ginc_hmm`) with the format-2 writer; :func:`ginc_from_corpus` rebuilds the structured
model from the manifest's parameters and ``hmm_seed`` and checks it against the stored arrays bit for bit.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import numpy as np

from ftsim.core.errors import InputError
from simulate.hmm import (
    GINC_DELIMITER,
    HMM,
    HMM_FIELDS,
    HMMValidationError,
    _as_frozen,
    _check_stochastic,
    ginc_joint_hmm,
    ginc_parameters,
)
from simulate.inference import _batch, forward, log_likelihood

__all__ = [
    "DELIMITER",
    "DELIMITER_SLOT",
    "GINC",
    "ginc_model",
    "ginc_from_corpus",
    "ood_hmm",
    "concept_log_likelihoods",
    "concept_posterior",
    "predictive",
    "Prompts",
    "icl_prompts",
    "bayes_accuracy",
    "IMPLEMENTATIONS",
]

DELIMITER = GINC_DELIMITER
"""The delimiter token (0), emitted by the delimiter slot whatever the value."""

DELIMITER_SLOT = 0
"""The slot that emits the delimiter."""

IMPLEMENTATIONS = ("factored", "hmm", "joint")


@dataclasses.dataclass(frozen=True, eq=False)
class GINC:
    """A GINC world: concept HMMs on (value, slot) states sharing a value chain and a memory matrix.

    Args:
        concept_prior: (num_concepts,) the pretraining mixture; 0 for an out-of-distribution concept.
        start: (num_concepts, num_values * num_slots) P(h_0 = v * S + s | c).
        value_trans: (num_values, num_values) the value chain, shared by every concept.
        slot_trans: (num_concepts, num_slots, num_slots) concept c's slot chain.
        memory: (num_values, num_slots) int, the token emitted by (v, s); column 0 is the delimiter 0 and no
            other entry is.
        vocab_size: number of tokens (>= 2).

    Raises:
        HMMValidationError: naming the field, the concept or row and the problem.
    """

    concept_prior: np.ndarray
    start: np.ndarray
    value_trans: np.ndarray
    slot_trans: np.ndarray
    memory: np.ndarray
    vocab_size: int

    def __post_init__(self) -> None:
        for name, ndim in (("concept_prior", 1), ("start", 2), ("value_trans", 2), ("slot_trans", 3)):
            object.__setattr__(self, name, _as_frozen(name, getattr(self, name), "GINC", ndim))
        memory = np.asarray(self.memory)
        if memory.dtype.kind not in "iu" or memory.ndim != 2:
            raise HMMValidationError(f"GINC.memory: expected a 2-d integer array, got dtype {memory.dtype} and "
                                     f"shape {memory.shape}", field="memory")
        memory = np.array(memory, dtype=np.int64, copy=True)
        memory.setflags(write=False)
        object.__setattr__(self, "memory", memory)
        n = self.vocab_size
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral) or n < 2:
            raise HMMValidationError(f"GINC.vocab_size: must be an integer >= 2 (the delimiter and one more "
                                     f"token), got {n!r}", field="vocab_size")
        object.__setattr__(self, "vocab_size", int(n))
        self.validate()

    def validate(self) -> GINC:
        C, (V, S) = self.concept_prior.shape[0], self.memory.shape
        if C == 0 or V == 0:
            raise HMMValidationError(f"GINC: needs at least one concept and one value (num_concepts={C}, "
                                     f"num_values={V})", field="concept_prior" if C == 0 else "memory")
        if S < 2:
            raise HMMValidationError(f"GINC.memory: has {S} slot(s); slot 0 is the delimiter slot, so at least 2",
                                     field="memory")
        for name, want in (("start", (C, V * S)), ("value_trans", (V, V)), ("slot_trans", (C, S, S))):
            got = getattr(self, name).shape
            if got != want:
                raise HMMValidationError(f"GINC.{name}: shape {got}; expected {want} from {C} concepts (concept_prior) "
                                         f"and memory's {V} values x {S} slots", field=name)
        _check_stochastic("GINC", "concept_prior", self.concept_prior)
        _check_stochastic("GINC", "start", self.start)  # row c = concept c
        _check_stochastic("GINC", "value_trans", self.value_trans)
        for c in range(C):
            _check_stochastic("GINC", f"slot_trans[concept={c}]", self.slot_trans[c], field="slot_trans")
        m = self.memory
        bad = np.argwhere((m < 0) | (m >= self.vocab_size))
        if bad.size:
            v, s = bad[0]
            raise HMMValidationError(f"GINC.memory row {v}: entry {s} is {m[v, s]}, outside [0, {self.vocab_size})",
                                     field="memory", row=int(v))
        bad = np.flatnonzero(m[:, DELIMITER_SLOT] != DELIMITER)
        if bad.size:
            raise HMMValidationError(f"GINC.memory row {bad[0]}: entry {DELIMITER_SLOT} (the delimiter slot) is "
                                     f"{m[bad[0], DELIMITER_SLOT]}; it must be the delimiter {DELIMITER}",
                                     field="memory", row=int(bad[0]))
        bad = np.argwhere(m[:, DELIMITER_SLOT + 1:] == DELIMITER)
        if bad.size:
            v, s = bad[0]
            raise HMMValidationError(f"GINC.memory row {v}: entry {s + 1} is the delimiter {DELIMITER}; only slot "
                                     f"{DELIMITER_SLOT} may emit it", field="memory", row=int(v))
        return self

    # -- sizes and index maps ------------------------------------------------------------------------------

    @property
    def num_concepts(self) -> int:
        return int(self.concept_prior.shape[0])

    @property
    def num_values(self) -> int:
        return int(self.memory.shape[0])

    @property
    def num_slots(self) -> int:
        return int(self.memory.shape[1])

    @property
    def num_hidden(self) -> int:
        """States of one concept HMM: num_values * num_slots."""
        return self.num_values * self.num_slots

    @property
    def num_states(self) -> int:
        """States of the joint HMM: num_concepts * num_values * num_slots."""
        return self.num_concepts * self.num_hidden

    @property
    def id_concepts(self) -> np.ndarray:
        """Indices of the in-distribution concepts (prior > 0)."""
        return np.flatnonzero(self.concept_prior > 0)

    @property
    def ood_concepts(self) -> np.ndarray:
        """Indices of the out-of-distribution concepts (prior 0)."""
        return np.flatnonzero(self.concept_prior == 0)

    def split_state(self, joint: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Joint state indices (of :meth:`as_hmm`, and of a corpus's states files) -> (concept, value, slot)."""
        joint = np.asarray(joint)
        concept, hidden = np.divmod(joint, self.num_hidden)
        value, slot = np.divmod(hidden, self.num_slots)
        return concept, value, slot

    # -- HMM views -----------------------------------------------------------------------------------------

    def emit(self) -> np.ndarray:
        """(num_values * num_slots, vocab_size) one-hot emissions: row v * S + s is 1 at memory[v, s]."""
        out = np.zeros((self.num_hidden, self.vocab_size))
        out[np.arange(self.num_hidden), self.memory.reshape(-1)] = 1.0
        return out

    def concept_trans(self, concept: int) -> np.ndarray:
        """(V S, V S) concept ``concept``'s transitions: kron(value_trans, slot_trans[concept])."""
        return np.kron(self.value_trans, self.slot_trans[self._concept(concept)])

    def concept_hmm(self, concept: int, start: np.ndarray | None = None) -> HMM:
        """The HMM of one concept (in or out of distribution) on its V * S states; ``start`` overrides its
        start distribution (e.g. a prompt's)."""
        c = self._concept(concept)
        return HMM(self.start[c] if start is None else start, self.concept_trans(c), self.emit())

    def as_hmm(self, prior: np.ndarray | None = None) -> HMM:
        """The mixture as one HMM on (concept, value, slot) (:func:`simulate.hmm.ginc_joint_hmm`): the corpus's
        model for the default prior; ``prior`` replaces ``concept_prior`` (e.g. to put weight on OOD concepts)."""
        return ginc_joint_hmm(_prior(self, prior), self.start, self.value_trans, self.slot_trans, self.memory,
                              self.vocab_size)

    def with_prior(self, prior: np.ndarray) -> GINC:
        """The same concepts under another prior (validated)."""
        return dataclasses.replace(self, concept_prior=_prior(self, prior))

    def arrays(self) -> dict[str, Any]:
        """The fields by name (read-only arrays; ``vocab_size`` an int)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def _concept(self, concept: Any) -> int:
        if isinstance(concept, (bool, np.bool_)) or not isinstance(concept, numbers.Integral) or \
                not 0 <= concept < self.num_concepts:
            raise InputError(f"must be a concept index in [0, {self.num_concepts}), got {concept!r}", field="concept")
        return int(concept)

    def __repr__(self) -> str:
        return (f"GINC(num_concepts={self.num_concepts} ({len(self.id_concepts)} in distribution), "
                f"num_values={self.num_values}, num_slots={self.num_slots}, vocab_size={self.vocab_size})")


def _prior(model: GINC, prior: np.ndarray | None) -> np.ndarray:
    if prior is None:
        return model.concept_prior
    p = _as_frozen("prior", prior, "GINC", 1)
    if p.shape != (model.num_concepts,):
        raise HMMValidationError(f"GINC.prior: shape {p.shape}; expected ({model.num_concepts},), one weight per "
                                 "concept", field="prior")
    _check_stochastic("GINC", "prior", p)
    return p


def ginc_model(
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
) -> GINC:
    """The GINC world of the ``ginc`` preset as a :class:`GINC`: the same draws as
    :func:`simulate.hmm.ginc_hmm` (``ginc_model(...).as_hmm()`` is that HMM, bit for bit). Parameters and
    defaults: :func:`simulate.hmm.ginc_parameters`.

    Raises:
        InputError: a parameter out of range, naming it.
    """
    return GINC(**ginc_parameters(num_values, num_slots, vocab_size, num_id_concepts, num_ood_concepts, seed,
                                  start_temp=start_temp, trans_temp=trans_temp, value_identity=value_identity))


def ginc_from_corpus(corpus: Any) -> GINC:
    """The :class:`GINC` behind a ``ginc`` corpus (a :class:`simulate.corpus.Corpus`): redrawn from the
    manifest's ``params`` and ``hmm_seed``, then checked against the corpus's stored HMM arrays bit for bit
    (the stored HMM keeps the OOD concepts' transition blocks, but its start gives them no mass, so their
    start distributions can only come from the redraw).

    Raises:
        InputError: not a ``ginc`` corpus, or the redrawn model differs from the stored one (field names it).
    """
    m = corpus.manifest
    where = corpus.path / "manifest.json"
    if m.get("preset") != "ginc":
        raise InputError(f"is {m.get('preset')!r}; not a ginc corpus", field="preset", path=where)
    model = ginc_model(seed=m["hmm_seed"], **m["params"])
    joint = model.as_hmm()
    for name in HMM_FIELDS:
        if not np.array_equal(getattr(joint, name), getattr(corpus.model, name)):
            raise InputError(f"the stored model-{name}.npy differs from the GINC world that params and hmm_seed "
                             f"draw (numpy's generator changed?)", field=f"model.arrays.{name}", path=where)
    return model


def ood_hmm(model: GINC, concept: int | None = None) -> HMM:
    """An out-of-distribution concept's HMM (its own start and slot chain), or with ``concept=None`` the uniform
    mixture of every OOD concept as a joint HMM (same state numbering as :meth:`GINC.as_hmm`); both sample
    with :func:`simulate.sampling.sample`.

    Raises:
        InputError: the model has no OOD concept, or ``concept`` is in distribution (field ``concept``).
    """
    ood = model.ood_concepts
    if concept is None:
        if ood.size == 0:
            raise InputError("the model has no out-of-distribution concept (num_ood_concepts=0)", field="concept")
        prior = np.zeros(model.num_concepts)
        prior[ood] = 1.0 / ood.size
        return model.as_hmm(prior)
    c = model._concept(concept)
    if c not in ood:
        raise InputError(f"concept {c} is in distribution (prior {model.concept_prior[c]:.3g}); OOD concepts are "
                         f"{ood.tolist()}", field="concept")
    return model.concept_hmm(c)


# ----------------------------------------------------------------------------------------------------------
# Exact inference
# ----------------------------------------------------------------------------------------------------------


def _factored_forward(model: GINC, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every concept's scaled forward pass at once on (value, slot) arrays.

    alpha_hat[t] = P(v_t, s_t | x_0..t, c) of shape (B, C, V, S); one step is
    ``(value_trans^T @ alpha) @ slot_trans[c]`` (= alpha @ kron(value_trans, slot_trans[c]) on the flattened
    state), times the emission indicator 1[memory == x_t] (1 where x_t is masked), divided by its sum c[t] =
    P(x_t | x_<t, c).

    Returns:
        last: (B, C, V, S) P(v_T-1, s_T-1 | x, c); NaN for a concept under which x is impossible.
        loglik: (B, C) log P(x | c), -inf where impossible.
    """
    B, T = tokens.shape
    V, S = model.num_values, model.num_slots
    value_t = np.ascontiguousarray(model.value_trans.T)
    memory = model.memory

    def emission(t: int) -> np.ndarray:  # (B, 1, V, S)
        tok = tokens[:, t]
        em = (memory[None, :, :] == tok[:, None, None]).astype(np.float64)
        em[tok < 0] = 1.0
        return em[:, None]

    loglik = np.zeros((B, model.num_concepts))
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = model.start.reshape(1, -1, V, S) * emission(0)  # (B, C, V, S)
        for t in range(T):
            if t:
                alpha = np.matmul(np.matmul(value_t, alpha), model.slot_trans)  # (B, C, V, S)
                alpha *= emission(t)
            scale = alpha.sum(axis=(2, 3))  # (B, C)
            alpha /= scale[:, :, None, None]
            loglik += np.log(scale)
    loglik[~np.isfinite(loglik)] = -np.inf
    alpha[loglik == -np.inf] = np.nan
    return alpha, loglik


def _check_implementation(implementation: str, allowed: tuple[str, ...]) -> None:
    if implementation not in allowed:
        raise InputError(f"is {implementation!r}; choose one of {', '.join(allowed)}", field="implementation")


def concept_log_likelihoods(model: GINC, tokens: np.ndarray, *, implementation: str = "factored") -> np.ndarray:
    """log P(x | c) for every concept, in or out of distribution: (B, num_concepts), or (num_concepts,) for one
    sequence; -inf where no hidden path of concept c emits x.

    Args:
        tokens: (B, T) or (T,) int; a negative token (:data:`simulate.inference.MASK`) is missing.
        implementation: ``"factored"`` (Kronecker-factored recursion, all concepts at once) or ``"hmm"``
            (:func:`simulate.inference.log_likelihood` on each :meth:`GINC.concept_hmm`).
    """
    _check_implementation(implementation, IMPLEMENTATIONS[:2])
    tokens, single = _batch(tokens, model.vocab_size)
    if implementation == "factored":
        ll = _factored_forward(model, tokens)[1]
    else:
        ll = np.stack([log_likelihood(model.concept_hmm(c), tokens) for c in range(model.num_concepts)], axis=-1)
    return ll[0] if single else ll


def _posterior_from_loglik(loglik: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """softmax(log prior + log P(x | c)) over concepts; NaN rows where every concept of the prior is impossible."""
    with np.errstate(divide="ignore"):
        logp = np.log(prior) + loglik  # -inf for prior 0 or impossible; never +inf
    top = logp.max(axis=-1, keepdims=True)
    possible = np.isfinite(top)
    with np.errstate(invalid="ignore"):
        w = np.exp(logp - np.where(possible, top, 0.0))
        post = w / w.sum(axis=-1, keepdims=True)
    post[~possible[..., 0]] = np.nan
    return post


def concept_posterior(model: GINC, tokens: np.ndarray, *, prior: np.ndarray | None = None,
                      implementation: str = "factored") -> np.ndarray:
    """P(c | x) under the mixture: (B, num_concepts), or (num_concepts,) for one sequence. Zero for a concept
    of prior 0; NaN rows for a sequence of probability zero under the prior.

    Args:
        prior: (num_concepts,) replaces ``model.concept_prior`` (default: the pretraining mixture).
        implementation: ``"factored"`` or ``"hmm"`` (log-likelihoods per concept, see
            :func:`concept_log_likelihoods`, combined with the prior in log space), or ``"joint"``: the final
            filtered marginal of the product-space HMM (:meth:`GINC.as_hmm`, :func:`simulate.inference.forward`)
            summed over each concept's block (it stores the (B, T, num_states) filtered marginals: small cases).
    """
    _check_implementation(implementation, IMPLEMENTATIONS)
    p = _prior(model, prior)
    if implementation == "joint":
        filtered, _ = forward(model.as_hmm(p), tokens)
        last = filtered[..., -1, :]
        return last.reshape(*last.shape[:-1], model.num_concepts, model.num_hidden).sum(axis=-1)
    return _posterior_from_loglik(concept_log_likelihoods(model, tokens, implementation=implementation), p)


def predictive(model: GINC, tokens: np.ndarray, *, prior: np.ndarray | None = None) -> np.ndarray:
    """The Bayes-optimal next token under the mixture, P(x_T = k | x_0..T-1): (B, vocab_size), or
    (vocab_size,) for one sequence; NaN rows for a context of probability zero.

    sum_c P(c | x) sum_{v,s} P(v_T, s_T | x, c) 1[memory[v_T, s_T] = k], with P(v_T, s_T | x, c) one step of
    concept c's chain from its last filtered marginal. Xie et al.'s in-context predictor is its argmax
    (:func:`bayes_accuracy`).
    """
    p = _prior(model, prior)
    tokens, single = _batch(tokens, model.vocab_size)
    last, loglik = _factored_forward(model, tokens)
    post = _posterior_from_loglik(loglik, p)  # (B, C)
    weight = np.where(post > 0, post, 0.0)  # NaN rows and impossible concepts weigh 0, never 0 * NaN
    nxt = np.matmul(np.matmul(np.ascontiguousarray(model.value_trans.T), np.nan_to_num(last)), model.slot_trans)
    mix = np.einsum("bc,bcvs->bvs", weight, nxt).reshape(tokens.shape[0], model.num_hidden)
    out = mix @ model.emit()
    out[np.isnan(post[:, 0])] = np.nan
    return out[0] if single else out


# ----------------------------------------------------------------------------------------------------------
# In-context prompts
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prompts:
    """GINC in-context prompts: ``num_examples`` examples of ``example_length`` tokens, each followed by the
    delimiter, then the test input x (the first ``example_length - 1`` tokens of a last example) whose next
    token is the label y.

    Attributes:
        tokens: (P, num_examples * (example_length + 1) + example_length - 1) int64 prompts.
        labels: (P,) int64, the token y that completes the test example.
        slots: (P, example_length + 1) each prompt's slot pattern (the last is the delimiter slot 0), shared by
            its examples.
        values: (P, num_examples + 1) each example's value (the last is the test example's), constant within
            an example.
        concept: the concept whose slot chain made the patterns, or None for random patterns.
    """

    tokens: np.ndarray
    labels: np.ndarray
    slots: np.ndarray
    values: np.ndarray
    concept: int | None


def _count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < minimum:
        raise InputError(f"must be an integer >= {minimum}, got {value!r}", field=name)
    return int(value)


def icl_prompts(model: GINC, concept: int | None, *, num_prompts: int, num_examples: int, example_length: int,
                seed: int | np.random.Generator = 0) -> Prompts:
    """In-context prompts as GINC builds them (``generate_prompts``, types ``ID`` and ``OOD``).

    With a concept (in or out of distribution: an OOD concept gives OOD-concept prompts), a prompt's slot
    pattern starts at a uniform non-delimiter slot s_0 and follows the concept's most likely slot transition,
    s_j+1 = argmax_s' slot_trans[c, s_j, s'] (as in GINC, a pattern may pass through the delimiter slot), then
    the delimiter slot; with ``concept=None`` the pattern is ``example_length`` uniform non-delimiter slots
    (GINC's OOD prompts). Every example draws a uniform value and keeps it; token j of an example is
    memory[value, pattern[j]].

    Raises:
        InputError: naming ``concept``, ``num_prompts``, ``num_examples`` or ``example_length``.
    """
    P = _count("num_prompts", num_prompts, 1)
    n = _count("num_examples", num_examples, 0)
    k = _count("example_length", example_length, 2)
    c = None if concept is None else model._concept(concept)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    S, V = model.num_slots, model.num_values
    if c is None:
        pattern = rng.integers(1, S, size=(P, k))
    else:
        pattern = np.empty((P, k), dtype=np.int64)
        pattern[:, 0] = rng.integers(1, S, size=P)
        most_likely = np.argmax(model.slot_trans[c], axis=1)  # (S,)
        for j in range(1, k):
            pattern[:, j] = most_likely[pattern[:, j - 1]]
    slots = np.concatenate([pattern, np.full((P, 1), DELIMITER_SLOT)], axis=1)  # (P, k + 1)
    values = rng.integers(0, V, size=(P, n + 1))
    full = model.memory[values[:, :, None], slots[:, None, :]].reshape(P, -1)  # (P, (n + 1) (k + 1))
    # Drop the final delimiter; the token before it is the label, the rest is the prompt.
    return Prompts(np.ascontiguousarray(full[:, :-2]), full[:, -2].copy(), slots, values, c)


def bayes_accuracy(model: GINC, prompts: Prompts, *, prior: np.ndarray | None = None) -> float:
    """The in-context accuracy of the Bayes-optimal predictor under the mixture: the fraction of prompts whose
    label is the argmax of :func:`predictive` (a prompt of probability zero counts as wrong)."""
    probs = predictive(model, prompts.tokens, prior=prior)
    ok = ~np.isnan(probs[:, 0])
    return float(np.mean(ok & (np.argmax(np.nan_to_num(probs), axis=1) == prompts.labels)))
