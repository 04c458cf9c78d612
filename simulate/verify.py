"""``ftsim verify hmm``: the exactness checks of the synthetic world, as a claims table.

Every number is compared with an independent oracle: brute-force enumeration of state paths, hmmlearn's
``CategoricalHMM``, and exact marginals by matrix powers (for the sampler, with a CLT tolerance).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
from scipy import stats

from ftsim.core.claims import Claim
from simulate.hmm import HMM, MemoryHMM, memory_hmm, random_hmm, wei2021_hmm
from simulate.inference import infer, memory_posterior, viterbi
from simulate.oracles import (
    brute_force_log_likelihood,
    brute_force_memory_posterior,
    brute_force_posteriors,
    brute_force_viterbi,
    state_marginals,
    token_marginals,
)
from simulate.sampling import sample

__all__ = ["verify_hmm", "hmmlearn_model", "marginal_z_scores", "stability_rows", "clt_threshold"]


def hmmlearn_model(hmm: HMM):
    """The same model as hmmlearn's ``CategoricalHMM`` (its parameters set, not fitted)."""
    from hmmlearn.hmm import CategoricalHMM

    ref = CategoricalHMM(n_components=hmm.num_states, n_features=hmm.vocab_size, init_params="", params="")
    ref.startprob_, ref.transmat_, ref.emissionprob_ = hmm.start, hmm.trans, hmm.emit
    return ref


def hmmlearn_posteriors(hmm: HMM, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sequence log-likelihoods (B,) and posteriors (B, T, m) from hmmlearn, one sequence at a time."""
    ref = hmmlearn_model(hmm)
    lls, posts = [], []
    for row in np.asarray(tokens):
        ll, post = ref.score_samples(row.astype(np.int64).reshape(-1, 1))
        lls.append(ll)
        posts.append(post)
    return np.array(lls), np.stack(posts)


def clt_threshold(num_cells: int, alpha: float = 1e-3) -> float:
    """Two-sided Bonferroni z threshold: if the sampler is exact, P(max |z| > threshold) <= alpha."""
    return float(stats.norm.isf(alpha / (2 * num_cells)))


def marginal_z_scores(model: HMM | MemoryHMM, num_sequences: int, length: int, seed: int) -> dict[str, np.ndarray]:
    """z-scores of sampled state and token frequencies at every position against the exact marginals.

    For cell (t, v) with exact probability p and N sequences, the count is Binomial(N, p): z =
    (count - N p) / sqrt(N p (1 - p)). Cells with N p (1 - p) < 5 are left out (the normal approximation is
    poor there).
    """
    s = sample(model, num_sequences, length, seed)
    out = {}
    for name, draws, exact in (("state", s.states, state_marginals(model, length)),
                               ("token", s.tokens, token_marginals(model, length))):
        k = exact.shape[1]
        counts = np.stack([np.bincount(draws[:, t].astype(np.int64), minlength=k) for t in range(length)])
        var = num_sequences * exact * (1 - exact)
        ok = var >= 5
        out[name] = ((counts - num_sequences * exact)[ok] / np.sqrt(var[ok]))
    return out


def stability_rows(seed: int = 0, lengths=(10, 100, 1000, 10_000)) -> list[dict]:
    """Log-likelihood and posterior agreement with hmmlearn as T grows (float64, one sequence per T)."""
    hmm = wei2021_hmm(16, 32, seed=seed)
    rows = []
    for T in lengths:
        tokens = sample(hmm, 2, T, seed + T).tokens
        ours = infer(hmm, tokens)
        ll_ref, post_ref = hmmlearn_posteriors(hmm, tokens)
        rows.append({
            "length": T,
            "loglik": float(ours.log_likelihood[0]),
            "loglik_abs_err": float(np.max(np.abs(ours.log_likelihood - ll_ref))),
            "loglik_rel_err": float(np.max(np.abs(ours.log_likelihood - ll_ref) / np.abs(ll_ref))),
            "posterior_max_abs_err": float(np.max(np.abs(ours.posteriors - post_ref))),
            "posterior_sum_err": float(np.max(np.abs(ours.posteriors.sum(-1) - 1))),
        })
    return rows


def _fmt(x: float) -> str:
    return f"{x:.1e}"


def verify_hmm(quick: bool = True, seed: int = 0) -> list[Claim]:
    """Run the exactness checks; ``quick`` uses fewer random models and samples (about 20 s here)."""
    rng = np.random.default_rng(seed)
    claims: list[Claim] = []
    n_models = 20 if quick else 100

    # 1. Forward-backward / Viterbi vs enumeration of every state path.
    err_ll = err_post = err_vit = 0.0
    vit_same = 0
    for i in range(n_models):
        m, n, T = int(rng.integers(1, 4)), int(rng.integers(2, 5)), int(rng.integers(1, 6))
        hmm = random_hmm(m, n, seed=rng, concentration=float(rng.choice([0.3, 1.0, 5.0])))
        x = rng.integers(0, n, size=(1, T))
        if T > 1 and rng.random() < 0.3:
            x[0, rng.integers(T)] = -1  # a masked position
        ours = infer(hmm, x)
        err_ll = max(err_ll, abs(ours.log_likelihood[0] - brute_force_log_likelihood(hmm, x[0])))
        err_post = max(err_post, float(np.abs(ours.posteriors[0] - brute_force_posteriors(hmm, x[0])).max()))
        path, lp = viterbi(hmm, x)
        bpath, blp = brute_force_viterbi(hmm, x[0])
        err_vit = max(err_vit, abs(lp[0] - blp))
        vit_same += int(np.array_equal(path[0], bpath))
    tol = 1e-12
    claims.append(Claim(
        "forward-backward posteriors and log-likelihood equal brute-force enumeration",
        f"{n_models} random HMMs, m<=3, n<=4, T<=5, some masked positions",
        f"max |dlogL|={_fmt(err_ll)}, max |dpost|={_fmt(err_post)} (tol {tol:g})",
        err_ll <= tol and err_post <= tol, "enumeration of all m^T paths"))
    claims.append(Claim(
        "Viterbi path is the most probable path",
        f"same {n_models} HMMs",
        f"max |dlogP(path)|={_fmt(err_vit)}; identical path {vit_same}/{n_models}",
        err_vit <= tol, "enumeration"))

    # 2. Against hmmlearn on larger random models.
    worst_ll = worst_post = 0.0
    sizes = [(4, 6), (8, 16), (32, 64)] if quick else [(4, 6), (8, 16), (16, 32), (32, 64), (64, 128)]
    for m, n in sizes:
        hmm = random_hmm(m, n, seed=rng, concentration=0.5)
        x = sample(hmm, 8, 50, int(rng.integers(1 << 31))).tokens
        ours = infer(hmm, x)
        ll_ref, post_ref = hmmlearn_posteriors(hmm, x)
        worst_ll = max(worst_ll, float(np.max(np.abs(ours.log_likelihood - ll_ref) / np.maximum(1, np.abs(ll_ref)))))
        worst_post = max(worst_post, float(np.max(np.abs(ours.posteriors - post_ref))))
    claims.append(Claim(
        "posteriors and log-likelihoods equal hmmlearn's CategoricalHMM",
        f"m,n in {sizes}, 8 seqs x T=50, Dirichlet(0.5)",
        f"max rel |dlogL|={_fmt(worst_ll)}, max |dpost|={_fmt(worst_post)} (tol 1e-10)",
        worst_ll <= 1e-10 and worst_post <= 1e-10, "hmmlearn 0.3"))

    # 3. Stability at T = 10^4.
    rows = stability_rows(seed)
    last = rows[-1]
    ok = (math.isfinite(last["loglik"]) and last["loglik_rel_err"] <= 1e-10
          and last["posterior_max_abs_err"] <= 1e-8 and last["posterior_sum_err"] <= 1e-10)
    claims.append(Claim(
        "inference is numerically stable for long sequences",
        "wei2021 m=16 n=32, T=10^4",
        f"logL={last['loglik']:.1f}, rel err vs hmmlearn {_fmt(last['loglik_rel_err'])}, "
        f"|dpost|={_fmt(last['posterior_max_abs_err'])}, |sum-1|={_fmt(last['posterior_sum_err'])}",
        ok, "hmmlearn (log-space implementation)"))

    # 4. Sampler vs exact marginals.
    N = 20_000 if quick else 200_000
    hmm = wei2021_hmm(8, 12, seed=seed)
    z = marginal_z_scores(hmm, N, 16, seed + 1)
    for name, zs in z.items():
        thr = clt_threshold(len(zs))
        claims.append(Claim(
            f"sampled {name} frequencies match exact marginals at every position",
            f"wei2021 m=8 n=12, N={N}, T=16, {len(zs)} cells",
            f"max |z|={np.abs(zs).max():.2f} < {thr:.2f} (Bonferroni, alpha=1e-3)",
            bool(np.abs(zs).max() < thr), "start^T trans^t (emit)"))

    # 5. Memory HMM.
    plain = wei2021_hmm(4, 6, seed=seed)
    as_memory = MemoryHMM(np.ones(1), plain.start, plain.trans, plain.emit[None])
    x = sample(plain, 16, 40, seed).tokens
    a, b = infer(plain, x), infer(as_memory, x)
    same = (np.array_equal(a.posteriors, b.posteriors) and np.array_equal(a.log_likelihood, b.log_likelihood)
            and np.array_equal(sample(plain, 8, 9, 3).tokens, sample(as_memory, 8, 9, 3).tokens))
    claims.append(Claim(
        "memory HMM with one memory value is the plain HMM",
        "wei2021 m=4 n=6: posteriors, log-likelihoods, samples",
        "bit-identical" if same else "differs",
        same, "construction"))
    mh = memory_hmm(3, 2, 5, seed=seed)
    errs = []
    for _ in range(5):
        x = rng.integers(0, 5, size=4)
        errs.append(float(np.abs(memory_posterior(mh, x[None])[0] - brute_force_memory_posterior(mh, x)).max()))
    mp = memory_posterior(mh, sample(mh, 64, 30, seed).tokens)
    claims.append(Claim(
        "posterior over the memory value equals enumeration and sums to one",
        "memory N=3 x S=2, n=5, T=4 (enumeration), T=30 (sums)",
        f"max |dP(M|x)|={_fmt(max(errs))}, max |sum-1|={_fmt(float(np.abs(mp.sum(1) - 1).max()))}",
        max(errs) <= 1e-12 and float(np.abs(mp.sum(1) - 1).max()) <= 1e-12, "enumeration over (M, S_1..T)"))

    # 6. Corpus round trip and tamper detection.
    from simulate.corpus import CorpusError, load_corpus, CorpusSpec, write_corpus

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "c"
        write_corpus(out, CorpusSpec("wei2021", {"num_states": 6, "vocab_size": 7}, num_sequences=3000, length=20,
                                     seed=seed, states=True, labels=True, shard_tokens=20_000), progress=False)
        corpus = load_corpus(out)
        ref = sample(corpus.model, 3000, 20, seed)
        round_trip = np.array_equal(corpus.tokens(), ref.tokens) and np.array_equal(corpus.states(), ref.states)
        shard = out / corpus.manifest["shards"][1]["tokens"]["file"]
        raw = bytearray(shard.read_bytes())
        raw[-1] ^= 1
        shard.write_bytes(bytes(raw))
        try:
            load_corpus(out)
            caught = False
        except CorpusError as exc:
            caught = shard.name in str(exc)
    claims.append(Claim(
        "a corpus on disk is exactly sample(hmm, N, T, seed); a flipped bit is caught by name",
        f"wei2021 m=6 n=7, 3000x20 tokens, {len(corpus.manifest['shards'])} shards",
        f"round trip {'identical' if round_trip else 'DIFFERS'}; corruption {'named' if caught else 'MISSED'}",
        round_trip and caught, "SHA-256 per shard"))
    return claims
