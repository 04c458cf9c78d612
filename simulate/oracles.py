"""Reference computations for the synthetic world: brute-force enumeration of all state paths (tiny models
only) and exact marginals by matrix powers, which share no code with :mod:`simulate.inference`; and the masked
leave-one-out reference (one masked forward-backward pass per position), against which the one-pass
per-position outputs of :func:`simulate.wei2021.oracles.leave_one_out_outputs` are checked. Tests and the
``ftsim verify`` claims compare the fast routines against these."""

from __future__ import annotations

import itertools

import numpy as np

from simulate.hmm import HMM, MemoryHMM

__all__ = [
    "enumerate_joint",
    "brute_force_log_likelihood",
    "brute_force_posteriors",
    "brute_force_viterbi",
    "brute_force_memory_posterior",
    "state_marginals",
    "token_marginals",
    "masked_outputs",
    "masked_memory_posterior",
]

MAX_PATHS = 200_000


def _hmm(model: HMM | MemoryHMM) -> HMM:
    return model.as_hmm()


def enumerate_joint(model: HMM | MemoryHMM, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All state paths of one sequence and their joint probabilities P(h, x).

    A negative token is unobserved (likelihood 1), as in :mod:`simulate.inference`.

    Returns:
        paths: (m^T, T) int, every path in lexicographic order.
        joint: (m^T,) P(h_0..T-1, x_0..T-1), computed as a plain product (T <= ~8 keeps this exact).
    """
    hmm = _hmm(model)
    tokens = np.asarray(tokens)
    m, T = hmm.num_states, len(tokens)
    if m**T > MAX_PATHS:
        raise ValueError(f"brute force over {m}^{T} = {m**T} paths exceeds {MAX_PATHS}")
    paths = np.array(list(itertools.product(range(m), repeat=T)), dtype=np.int64).reshape(-1, T)
    joint = np.empty(len(paths))
    for i, h in enumerate(paths):
        p = hmm.start[h[0]]
        for t in range(T):
            if t:
                p *= hmm.trans[h[t - 1], h[t]]
            if tokens[t] >= 0:
                p *= hmm.emit[h[t], tokens[t]]
        joint[i] = p
    return paths, joint


def brute_force_log_likelihood(model: HMM | MemoryHMM, tokens: np.ndarray) -> float:
    _, joint = enumerate_joint(model, tokens)
    with np.errstate(divide="ignore"):
        return float(np.log(joint.sum()))


def brute_force_posteriors(model: HMM | MemoryHMM, tokens: np.ndarray) -> np.ndarray:
    """(T, m) P(H_t = h | x) by summing the joint over paths."""
    hmm = _hmm(model)
    paths, joint = enumerate_joint(hmm, tokens)
    T, m = paths.shape[1], hmm.num_states
    post = np.zeros((T, m))
    for t in range(T):
        np.add.at(post[t], paths[:, t], joint)
    return post / joint.sum()


def brute_force_viterbi(model: HMM | MemoryHMM, tokens: np.ndarray) -> tuple[np.ndarray, float]:
    """The maximum joint probability path and its log-probability."""
    paths, joint = enumerate_joint(model, tokens)
    i = int(np.argmax(joint))
    with np.errstate(divide="ignore"):
        return paths[i], float(np.log(joint[i]))


def brute_force_memory_posterior(model: MemoryHMM, tokens: np.ndarray) -> np.ndarray:
    """(num_memory,) P(M = a | x) by enumerating the memory value and the syntax paths separately."""
    N, S = model.num_memory, model.num_syntax
    tokens = np.asarray(tokens)
    T = len(tokens)
    weights = np.zeros(N)
    for a in range(N):
        for s in itertools.product(range(S), repeat=T):
            p = model.memory_prior[a] * model.syntax_start[s[0]]
            for t in range(T):
                if t:
                    p *= model.syntax_trans[s[t - 1], s[t]]
                if tokens[t] >= 0:
                    p *= model.emit[a, s[t], tokens[t]]
            weights[a] += p
    return weights / weights.sum()


def state_marginals(model: HMM | MemoryHMM, length: int) -> np.ndarray:
    """(length, m) P(H_t = h) = start^T trans^t."""
    hmm = _hmm(model)
    out = np.empty((length, hmm.num_states))
    p = hmm.start.copy()
    for t in range(length):
        out[t] = p
        p = p @ hmm.trans
    return out


def token_marginals(model: HMM | MemoryHMM, length: int) -> np.ndarray:
    """(length, n) P(X_t = v) = P(H_t)^T emit."""
    return state_marginals(model, length) @ _hmm(model).emit


def masked_outputs(model: HMM | MemoryHMM, tokens: np.ndarray) -> np.ndarray:
    """(B, T, n) P(X_t | x_-t): position t masked, one forward-backward pass per position (the reference of the
    one-pass leave-one-out outputs)."""
    from simulate.inference import MASK, infer

    x = np.asarray(tokens, dtype=np.int64)
    emit = _hmm(model).emit
    out = np.empty(x.shape + (emit.shape[1],))
    for t in range(x.shape[1]):
        xm = x.copy()
        xm[:, t] = MASK
        out[:, t] = infer(model, xm).posteriors[:, t] @ emit
    return out


def masked_memory_posterior(model: MemoryHMM, tokens: np.ndarray, t: int) -> np.ndarray:
    """(B, N) P(M | x_-t) of a memory HMM: position t masked, the joint posterior summed over the syntax."""
    from simulate.inference import MASK, infer

    xm = np.asarray(tokens, dtype=np.int64).copy()
    xm[:, t] = MASK
    post = infer(model, xm).posteriors[:, t]
    return post.reshape(-1, model.num_memory, model.num_syntax).sum(axis=2)
