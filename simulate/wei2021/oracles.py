"""Exact oracles for Wei, Xie & Ma (2021): head and prompt tuning on *exact* posteriors, no training noise.

The downstream data of the paper: a sequence x_0..x_T of the HMM whose first token is hidden behind a mask,
inputs ``[MASK, x_1, ..., x_T]`` and label y = 1[mu^T P(H_0 | x_1..T) >= 0]. From exact forward-backward
posteriors P (N, m) we get the exact pretrained output G_0 = P @ emit and score:

* the head oracle: the best linear head on G_0 (logistic regression on a training split, scored on a test
  split), next to the theorem's certificate b = W^{+T} mu (:func:`theory.wei2021.head_certificate`);
* the prompt oracle: a prompt likelihood vector u >= 0 optimised jointly with the head on the reweighted
  posteriors (:func:`theory.wei2021.prompt_oracle`), for two prompt kernels: ``identity`` (the prompt
  reweights H_0 directly: the theorem's idealisation) and ``reversal`` (a prompt token one position before
  H_0: it can only act through the transition matrix);
* the token-prompt oracle: the reversal-kernel prompt restricted to real tokens, u = W^T e_v
  (:func:`theory.wei2021.token_prompt_oracle`): what a masked LM whose slot held real tokens in
  pretraining can be shown to do;
* the memory oracle: an attention head over the exact per-position outputs G_t(x) = P(X_t | x_{-t}) of a
  memory HMM (:func:`leave_one_out_outputs`), against the vanilla-HMM head oracle with as many states.

Two constructed HMMs make the failure cases exact (:func:`mirror_twins_hmm`, :func:`identical_twins_hmm`).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from simulate.hmm import HMM, MemoryHMM, memory_hmm, wei2021_hmm
from simulate.inference import MASK, infer
from simulate.sampling import sample
from simulate.tasks import sparse_mu
from theory.wei2021 import (
    accuracy,
    bayes_ceiling,
    hard_margin,
    head_certificate,
    head_oracle,
    nondegeneracy,
    prompt_certificate,
    prompt_oracle,
    prompted_features,
    reversal_kernel,
    token_prompt_oracle,
)

__all__ = [
    "DownstreamData",
    "downstream_data",
    "mask_posteriors",
    "leave_one_out_outputs",
    "wei2021_task",
    "balanced_mu",
    "memory_task",
    "mirror_twins_hmm",
    "identical_twins_hmm",
    "enumerate_inputs",
    "head_ceiling",
    "exact_exp1_oracles",
    "memory_attention_oracle",
    "brute_force_prompted_posterior",
    "SUPPORT_SIZE",
    "BALANCE",
]

SUPPORT_SIZE = 6  # non-zeros of mu in the paper's code (all states when m < 6)


@dataclasses.dataclass(frozen=True)
class DownstreamData:
    """Downstream inputs with their exact posteriors and labels.

    Attributes:
        observed: (N, T) tokens x_1..x_T (int64); the model input is ``[MASK] + observed``.
        post0: (N, m) exact P(H_0 | x_1..T) (joint states for a memory HMM).
        G0: (N, n) exact G_0(x) = P(X_0 | x_1..T) = post0 @ emit.
        labels: (N,) int64.
        memory: (N, num_memory) exact P(M | x_1..T) for a memory HMM, else None.
    """

    observed: np.ndarray
    post0: np.ndarray
    G0: np.ndarray
    labels: np.ndarray
    memory: np.ndarray | None = None

    def split(self, sizes: tuple[int, ...]) -> list["DownstreamData"]:
        """Consecutive splits of the given sizes (e.g. train, validation, test)."""
        if sum(sizes) > len(self.labels):
            raise ValueError(f"splits {sizes} need {sum(sizes)} rows, have {len(self.labels)}")
        out, lo = [], 0
        for s in sizes:
            sl = slice(lo, lo + s)
            out.append(DownstreamData(self.observed[sl], self.post0[sl], self.G0[sl], self.labels[sl],
                                      None if self.memory is None else self.memory[sl]))
            lo += s
        return out


def _joint(model: HMM | MemoryHMM) -> HMM:
    return model.as_hmm()


def mask_posteriors(model: HMM | MemoryHMM, observed: np.ndarray) -> np.ndarray:
    """(N, m) P(H_0 | x_1..T) for inputs ``[MASK] + observed`` (observed: (N, T))."""
    observed = np.asarray(observed, dtype=np.int64)
    full = np.empty((observed.shape[0], observed.shape[1] + 1), dtype=np.int64)
    full[:, 0] = MASK
    full[:, 1:] = observed
    return infer(model, full).posteriors[:, 0]


def downstream_data(model: HMM | MemoryHMM, mu: np.ndarray, num: int, length: int, seed: int) -> DownstreamData:
    """Draw ``num`` sequences x_0..x_T (T = ``length``) and label them.

    For an :class:`HMM`, y = 1[mu^T P(H_0 | x_1..T) >= 0] with mu over the m states. For a
    :class:`MemoryHMM`, mu is over the memory values and y = 1[mu^T P(M | x_1..T) >= 0] (the memory is
    constant, so x_0 adds nothing the label needs).
    """
    full = sample(model, num, length + 1, seed).tokens.astype(np.int64)
    observed = full[:, 1:].copy()
    post0 = mask_posteriors(model, observed)
    G0 = post0 @ _joint(model).emit
    if isinstance(model, MemoryHMM):
        N, S = model.num_memory, model.num_syntax
        mem = post0.reshape(-1, N, S).sum(axis=2)  # P(M | x_1..T): M is the same at every position
        if np.asarray(mu).shape != (N,):
            raise ValueError(f"mu has shape {np.shape(mu)}; a memory task needs ({N},) = (num_memory,)")
        return DownstreamData(observed, post0, G0, (mem @ mu >= 0).astype(np.int64), mem)
    if np.asarray(mu).shape != (post0.shape[1],):
        raise ValueError(f"mu has shape {np.shape(mu)}; expected ({post0.shape[1]},) = (num_states,)")
    return DownstreamData(observed, post0, G0, (post0 @ mu >= 0).astype(np.int64))


def leave_one_out_outputs(model: HMM | MemoryHMM, tokens: np.ndarray) -> np.ndarray:
    """Exact per-position outputs G_t(x) = P(X_t = . | x_{-t}) for every t: (B, T, n).

    From one forward-backward pass: gamma_t(h) ∝ P(H_t = h | x_<t) E[h, x_t] P(x_>t | H_t = h), so
    P(H_t = h | x_{-t}) ∝ gamma_t(h) / E[h, x_t] (emissions must be positive where divided by).
    """
    hmm = _joint(model)
    tokens = np.asarray(tokens, dtype=np.int64)
    gamma = infer(hmm, tokens).posteriors  # (B, T, m)
    lik = hmm.emit.T[tokens]  # (B, T, m) E[h, x_t]
    if np.any(lik <= 0):
        raise ValueError("leave_one_out_outputs divides by emission probabilities; some are zero here")
    loo = gamma / lik
    loo /= loo.sum(axis=-1, keepdims=True)
    return loo @ hmm.emit


# ---------------------------------------------------------------------------------------------------------
# Tasks of the two experiments
# ---------------------------------------------------------------------------------------------------------


BALANCE = (0.3, 0.7)  # accepted fraction of positive labels for a drawn mu (see :func:`balanced_mu`)
PROBE_SEQUENCES = 1000
MAX_DRAWS = 200


def balanced_mu(model: HMM | MemoryHMM, dim: int, support_size: int, length: int, rng: np.random.Generator,
                balance: tuple[float, float] = BALANCE) -> np.ndarray:
    """Draw sparse mu (``support_size`` N(0,1) non-zeros) until the label y = 1[mu^T p >= 0] is positive on
    a fraction of a probe sample inside ``balance``; after ``MAX_DRAWS`` draws return the most balanced one.

    Why: with y = 1[mu^T P(H_0|x) >= 0] and an unconstrained draw, the positive rate over mu draws ranges
    from 0 to 1 (for m = 30, half of the draws give < 10% or > 90% of one class), so accuracy would mostly
    measure the class prior. The label stays the paper's (no threshold, mu stays sparse), which the
    prompt-tuning theorem needs.

    Args:
        dim: m (states) for an HMM task, N (memory values) for a memory task.
    """
    probe = downstream_data(model, np.ones(dim),
                            PROBE_SEQUENCES, length, int(rng.integers(2**31)))
    feats = probe.memory if isinstance(model, MemoryHMM) else probe.post0
    best = None
    for _ in range(MAX_DRAWS):
        mu = sparse_mu(dim, min(support_size, dim), rng)
        rate = float((feats @ mu >= 0).mean())
        gap = max(balance[0] - rate, rate - balance[1], 0.0)
        if best is None or gap < best[0]:
            best = (gap, mu)
        if gap == 0.0:
            break
    return best[1]


def wei2021_task(num_states: int, vocab_size: int, hmm_seed: int, task_seed: int, length: int = 16,
                 support_size: int = SUPPORT_SIZE) -> tuple[HMM, np.ndarray]:
    """The HMM of the ``wei2021`` preset and a sparse, label-balanced mu (:func:`balanced_mu`)."""
    hmm = wei2021_hmm(num_states, vocab_size, seed=hmm_seed)
    rng = np.random.default_rng(np.random.SeedSequence([hmm_seed, task_seed, 3]))
    return hmm, balanced_mu(hmm, num_states, support_size, length, rng)


def memory_task(num_memory: int, num_syntax: int, vocab_size: int, hmm_seed: int, task_seed: int,
                length: int = 16, support_size: int = SUPPORT_SIZE) -> tuple[MemoryHMM, np.ndarray]:
    """The ``memory`` preset and a label-balanced mu over memory values (min(support_size, N) non-zeros)."""
    model = memory_hmm(num_memory, num_syntax, vocab_size, seed=hmm_seed)
    rng = np.random.default_rng(np.random.SeedSequence([hmm_seed, task_seed, 4]))
    return model, balanced_mu(model, num_memory, support_size, length, rng)


# ---------------------------------------------------------------------------------------------------------
# Constructed failure cases
# ---------------------------------------------------------------------------------------------------------


def mirror_twins_hmm(signal: float = 0.7) -> tuple[HMM, np.ndarray]:
    """An HMM where *every* head on G_0 is at chance but prompt tuning is exact.

    States: A, B, A', B' (the values of H_0) and two signal states S_a, S_b; tokens 0..3.
    H_0 is uniform on {A, B, A', B'}; A, A' move to S_a and B, B' to S_b; S_a emits token 0 with probability
    ``signal`` (token 1 otherwise), S_b the reverse; both signal states move back uniformly to
    {A, B, A', B'}. Emissions: A and B' emit token 2, B and A' emit token 3 (so W has rank 4 < 6, and the
    columns of A and B', and of B and A', coincide). Task mu = e_A - e_B, supp(mu) = {A, B}.

    Why head tuning fails: x_1 tells A/A' (token 0 likely) from B/B' and nothing else, so
    P(H_0 | x) = (s, 1-s, s, 1-s)/2 with s in {signal, 1 - signal}, and G_0 = (s + 1 - s)/2 (e_2 + e_3)
    is the same for every input, while y = 1[s >= 1/2] is a fair coin: no head does better than 1/2.
    Why prompt tuning works: u = 1_{A,B} leaves (s, 1-s) on {A, B}, W_A = [e_2, e_3] has full column rank
    and G_0^u = s e_2 + (1-s) e_3 reveals s.
    """
    A, B, A2, B2, Sa, Sb = range(6)
    start = np.array([0.25, 0.25, 0.25, 0.25, 0.0, 0.0])
    trans = np.zeros((6, 6))
    trans[[A, A2], Sa] = 1.0
    trans[[B, B2], Sb] = 1.0
    trans[[Sa, Sb], :4] = 0.25
    emit = np.zeros((6, 4))
    emit[[A, B2], 2] = 1.0
    emit[[B, A2], 3] = 1.0
    emit[Sa] = [signal, 1 - signal, 0, 0]
    emit[Sb] = [1 - signal, signal, 0, 0]
    mu = np.zeros(6)
    mu[A], mu[B] = 1.0, -1.0
    return HMM(start, trans, emit), mu


def identical_twins_hmm(signal: float = 0.7) -> tuple[HMM, np.ndarray]:
    """The same chain as :func:`mirror_twins_hmm` but A and B emit *identically* (both token 2; A', B' token
    3): now W restricted to supp(mu) = {A, B} is rank one, the prompt-tuning condition fails too, and any
    prompt-reweighted G_0^u = (P_u(A) + P_u(B)) e_2 + ... cannot separate s from 1 - s on {A, B}."""
    hmm, mu = mirror_twins_hmm(signal)
    emit = np.array(hmm.emit)
    emit[[0, 1], :] = [0, 0, 1, 0]
    emit[[2, 3], :] = [0, 0, 0, 1]
    return HMM(hmm.start, hmm.trans, emit), mu


def enumerate_inputs(model: HMM | MemoryHMM, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Every input x_1..x_T (n^T of them) and its exact probability P(x_1..T) (position 0 unobserved).

    Returns:
        observed: (n^T, T) int64; probs: (n^T,).
    """
    n = _joint(model).vocab_size
    observed = np.array(list(itertools.product(range(n), repeat=length)), dtype=np.int64).reshape(-1, length)
    full = np.concatenate([np.full((len(observed), 1), MASK), observed], axis=1)
    return observed, np.exp(infer(model, full).log_likelihood)


def head_ceiling(model: HMM, mu: np.ndarray, length: int, u: np.ndarray | None = None,
                 kernel: np.ndarray | None = None) -> float:
    """The best accuracy of *any* head on the exact (optionally prompted) G_0, over the full input
    distribution of length-``length`` inputs (exact enumeration; see :func:`theory.wei2021.bayes_ceiling`)."""
    observed, probs = enumerate_inputs(model, length)
    keep = probs > 0
    observed, probs = observed[keep], probs[keep]
    post = mask_posteriors(model, observed)
    labels = (post @ mu >= 0).astype(np.int64)
    if u is None:
        feats = post @ model.emit
    else:
        feats = prompted_features(post, model.emit, np.eye(model.num_states) if kernel is None else kernel, u)
    return bayes_ceiling(feats, probs, labels)


# ---------------------------------------------------------------------------------------------------------
# Oracle bundles used by the experiments and the verifier
# ---------------------------------------------------------------------------------------------------------


def exact_exp1_oracles(hmm: HMM, mu: np.ndarray, train: DownstreamData, test: DownstreamData, *,
                       seed: int = 0, restarts: int = 2, steps: int = 100, margin_rows: int = 0) -> dict:
    """All exact quantities for one (HMM, mu): diagnostics, certificates and fitted oracles.

    Returns a flat dict: ``head_oracle`` / ``prompt_oracle_identity`` / ``prompt_oracle_reversal`` /
    ``prompt_oracle_token`` test accuracies, the certificates' accuracies on the test split, and the non-degeneracy diagnostics.
    ``margin_rows`` > 0 adds the hard-margin LP on that many training rows (is any linear head exact?).
    """
    diag = nondegeneracy(hmm.emit, mu)
    _, head_train, head_test = head_oracle(train.G0, train.labels, test.G0, test.labels)
    b = head_certificate(hmm.emit, mu)
    u_c, b_c = prompt_certificate(hmm.emit, mu)
    prompt_cert = accuracy(prompted_features(test.post0, hmm.emit, np.eye(hmm.num_states), u_c) @ b_c,
                           test.labels)
    ident = prompt_oracle(train.post0, train.labels, test.post0, test.labels, hmm.emit, None,
                          restarts=restarts, steps=steps, seed=seed)
    R = reversal_kernel(hmm.trans)
    rev = prompt_oracle(train.post0, train.labels, test.post0, test.labels, hmm.emit,
                        R, restarts=restarts, steps=steps, seed=seed)
    tok = token_prompt_oracle(train.post0, train.labels, test.post0, test.labels, hmm.emit, R)
    out = {
        **{k: v for k, v in diag.row().items() if k != "support"},
        "support_size": len(diag.support),
        "head_oracle_train": head_train,
        "head_oracle": head_test,
        "head_certificate": accuracy(test.G0 @ b, test.labels),
        "prompt_certificate": prompt_cert,
        "prompt_oracle_identity_train": ident.train_accuracy,
        "prompt_oracle_identity": ident.test_accuracy,
        "prompt_oracle_reversal_train": rev.train_accuracy,
        "prompt_oracle_reversal": rev.test_accuracy,
        "prompt_oracle_token_train": tok.train_accuracy,
        "prompt_oracle_token": tok.test_accuracy,
        "prompt_oracle_token_id": -1 if tok.token is None else tok.token,
        "label_balance": float(test.labels.mean()),
    }
    if margin_rows:
        t, _ = hard_margin(train.G0[:margin_rows], train.labels[:margin_rows])
        out["head_hard_margin"] = t
    return out


def memory_attention_oracle(model: MemoryHMM, train: DownstreamData, test: DownstreamData, *, seed: int = 0,
                            steps: int = 400, num_heads: int = 4) -> dict:
    """Fit the attention head of :mod:`simulate.wei2021.tuning` on exact per-position outputs
    G_t(x) = P(X_t | x_{-t}) of a memory HMM; return train/test accuracy."""
    from simulate.wei2021.tuning import fit_attention_head

    F_train = leave_one_out_outputs(model, train.observed)
    F_test = leave_one_out_outputs(model, test.observed)
    fit = fit_attention_head(F_train, train.labels, F_test, test.labels, steps=steps, num_heads=num_heads,
                             seed=seed)
    return {"memory_attention_oracle_train": fit["train_accuracy"], "memory_attention_oracle": fit["test_accuracy"]}


def brute_force_prompted_posterior(trans: np.ndarray, emit: np.ndarray, prior: np.ndarray, u: np.ndarray,
                                   observed: np.ndarray) -> np.ndarray:
    """P(H_0 | prompt at position -1, x_1..T) by enumerating every state path h_{-1}, h_0, ..., h_T.

    The chain starts at position -1 with H_{-1} ~ ``prior``; the prompt has likelihood u[h] = P(prompt |
    H_{-1} = h); position 0 is unobserved; x_t is emitted at t = 1..T. Shares no code with
    :mod:`simulate.inference` or :func:`theory.wei2021.reweight` (the test of the reweighting formula).

    Returns:
        (m,) the posterior over H_0.
    """
    trans, emit, prior, u = (np.asarray(a, dtype=np.float64) for a in (trans, emit, prior, u))
    m, T = trans.shape[0], len(observed)
    post = np.zeros(m)
    for path in itertools.product(range(m), repeat=T + 2):  # h_{-1}, h_0, ..., h_T
        p = prior[path[0]] * u[path[0]]
        for t in range(1, T + 2):
            p *= trans[path[t - 1], path[t]]
        for t in range(1, T + 1):
            p *= emit[path[t + 1], observed[t - 1]]
        post[path[1]] += p
    return post / post.sum()

