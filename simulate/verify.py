"""``ftsim verify hmm``: the exactness checks of the synthetic world, as claim functions; and the
``hmm-exactness`` experiment whose tables feed the exactness figure.

Every number is compared with an independent oracle: brute-force enumeration of state paths, hmmlearn's
``CategoricalHMM``, and exact marginals by matrix powers (for the sampler, with a CLT tolerance). Each claim is a
function ``claim(quick, seed) -> Claim`` used by ``ftsim verify hmm`` and by the tests.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
from scipy import stats

import dataclasses

from ftsim.core.claims import Claim
from ftsim.core.experiment import Experiment, RunContext, UnitSpec, Verifier
from ftsim.core.io import write_table
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
from simulate.units import unit_spec

__all__ = ["VERIFIER", "EXACTNESS", "marginal_z_scores", "stability_rows", "clt_threshold",
           "ulps"]


def hmmlearn_model(hmm: HMM):
    """The same model as hmmlearn's ``CategoricalHMM`` (parameters set, not fitted): :meth:`HMM.to_hmmlearn`."""
    return hmm.to_hmmlearn(params="")


def hmmlearn_posteriors(hmm: HMM, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sequence log-likelihoods (B,) and posteriors (B, T, m) from hmmlearn, one sequence at a time."""
    ref = hmm.to_hmmlearn(params="")
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


def ulps(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| in units in the last place of the larger magnitude (0 for identical arrays)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.spacing(np.maximum(np.abs(a), np.abs(b)))
    return float(np.max(np.abs(a - b) / scale)) if a.size else 0.0


def _rng(seed: int, claim: int) -> np.random.Generator:
    return np.random.default_rng([seed, claim])


def _enumeration_cases(quick: bool, seed: int):
    rng = _rng(seed, 1)
    for _ in range(20 if quick else 100):
        m, n, T = int(rng.integers(1, 4)), int(rng.integers(2, 5)), int(rng.integers(1, 6))
        hmm = random_hmm(m, n, seed=rng, concentration=float(rng.choice([0.3, 1.0, 5.0])))
        x = rng.integers(0, n, size=(1, T))
        if T > 1 and rng.random() < 0.3:
            x[0, rng.integers(T)] = -1  # a masked position
        yield hmm, x


ENUM_TOL = 1e-12  # float64 sums of <= 3^5 paths: a few hundred ulps of O(1) quantities


def claim_forward_backward(quick: bool, seed: int) -> Claim:
    err_ll = err_post = 0.0
    cases = list(_enumeration_cases(quick, seed))
    for hmm, x in cases:
        ours = infer(hmm, x)
        err_ll = max(err_ll, abs(ours.log_likelihood[0] - brute_force_log_likelihood(hmm, x[0])))
        err_post = max(err_post, float(np.abs(ours.posteriors[0] - brute_force_posteriors(hmm, x[0])).max()))
    return Claim("forward-backward posteriors and log-likelihood equal brute-force enumeration",
                 f"{len(cases)} random HMMs, m<=3, n<=4, T<=5, some masked positions",
                 f"max |dlogL|={_fmt(err_ll)}, max |dpost|={_fmt(err_post)} (tol {ENUM_TOL:g})",
                 err_ll <= ENUM_TOL and err_post <= ENUM_TOL, "enumeration of all m^T paths")


def claim_viterbi(quick: bool, seed: int) -> Claim:
    err_vit, same = 0.0, 0
    cases = list(_enumeration_cases(quick, seed))
    for hmm, x in cases:
        path, lp = viterbi(hmm, x)
        bpath, blp = brute_force_viterbi(hmm, x[0])
        err_vit = max(err_vit, abs(lp[0] - blp))
        same += int(np.array_equal(path[0], bpath))
    return Claim("Viterbi path is the most probable path", f"the same {len(cases)} HMMs",
                 f"max |dlogP(path)|={_fmt(err_vit)} (tol {ENUM_TOL:g}); identical path {same}/{len(cases)}",
                 err_vit <= ENUM_TOL, "enumeration")


def claim_hmmlearn(quick: bool, seed: int) -> Claim:
    rng = _rng(seed, 2)
    worst_ll = worst_post = 0.0
    sizes = [(4, 6), (8, 16), (32, 64)] if quick else [(4, 6), (8, 16), (16, 32), (32, 64), (64, 128)]
    for m, n in sizes:
        hmm = random_hmm(m, n, seed=rng, concentration=0.5)
        x = sample(hmm, 8, 50, int(rng.integers(1 << 31))).tokens
        ours = infer(hmm, x)
        ll_ref, post_ref = hmmlearn_posteriors(hmm, x)
        worst_ll = max(worst_ll, float(np.max(np.abs(ours.log_likelihood - ll_ref) / np.maximum(1, np.abs(ll_ref)))))
        worst_post = max(worst_post, float(np.max(np.abs(ours.posteriors - post_ref))))
    return Claim("posteriors and log-likelihoods equal hmmlearn's CategoricalHMM",
                 f"m,n in {sizes}, 8 seqs x T=50, Dirichlet(0.5)",
                 f"max rel |dlogL|={_fmt(worst_ll)}, max |dpost|={_fmt(worst_post)} (tol 1e-10)",
                 worst_ll <= 1e-10 and worst_post <= 1e-10, "hmmlearn 0.3")


def claim_long_sequences(quick: bool, seed: int) -> Claim:
    last = stability_rows(seed)[-1]
    ok = (math.isfinite(last["loglik"]) and last["loglik_rel_err"] <= 1e-10
          and last["posterior_max_abs_err"] <= 1e-8 and last["posterior_sum_err"] <= 1e-10)
    return Claim("inference is numerically stable for long sequences", "wei2021 m=16 n=32, T=10^4",
                 f"logL={last['loglik']:.1f}, rel err vs hmmlearn {_fmt(last['loglik_rel_err'])} (tol 1e-10), "
                 f"|dpost|={_fmt(last['posterior_max_abs_err'])} (tol 1e-8), |sum-1|="
                 f"{_fmt(last['posterior_sum_err'])} (tol 1e-10)", ok, "hmmlearn (log-space implementation)")


def claim_sampler(quick: bool, seed: int) -> list[Claim]:
    N = 20_000 if quick else 200_000
    hmm = wei2021_hmm(8, 12, seed=seed)
    z = marginal_z_scores(hmm, N, 16, seed + 1)
    out = []
    for name, zs in z.items():
        thr = clt_threshold(len(zs))
        out.append(Claim(f"sampled {name} frequencies match exact marginals at every position",
                         f"wei2021 m=8 n=12, N={N}, T=16, {len(zs)} cells",
                         f"max |z|={np.abs(zs).max():.2f} < {thr:.2f} (Bonferroni over {len(zs)} cells, "
                         f"alpha=1e-3)", bool(np.abs(zs).max() < thr), "start^T trans^t (emit)"))
    return out


MEMORY_ULPS = 4  # the joint chain of one memory value is the plain chain's arrays: identical operations


def claim_memory_reduces_to_plain(quick: bool, seed: int) -> Claim:
    plain = wei2021_hmm(4, 6, seed=seed)
    as_memory = MemoryHMM(np.ones(1), plain.start, plain.trans, plain.emit[None])
    x = sample(plain, 16, 40, seed).tokens
    a, b = infer(plain, x), infer(as_memory, x)
    d_post, d_ll = ulps(a.posteriors, b.posteriors), ulps(a.log_likelihood, b.log_likelihood)
    same_samples = np.array_equal(sample(plain, 8, 9, 3).tokens, sample(as_memory, 8, 9, 3).tokens)
    return Claim("memory HMM with one memory value is the plain HMM",
                 "wei2021 m=4 n=6: posteriors, log-likelihoods (16 x 40 tokens), samples",
                 f"posteriors {d_post:.0f} ulps, log-likelihoods {d_ll:.0f} ulps (tol {MEMORY_ULPS}); samples "
                 f"{'identical' if same_samples else 'DIFFER'}",
                 d_post <= MEMORY_ULPS and d_ll <= MEMORY_ULPS and same_samples, "construction")


def claim_memory_posterior(quick: bool, seed: int) -> Claim:
    rng = _rng(seed, 5)
    mh = memory_hmm(3, 2, 5, seed=seed)
    errs = []
    for _ in range(5):
        x = rng.integers(0, 5, size=4)
        errs.append(float(np.abs(memory_posterior(mh, x[None])[0] - brute_force_memory_posterior(mh, x)).max()))
    mp = memory_posterior(mh, sample(mh, 64, 30, seed).tokens)
    sums = float(np.abs(mp.sum(1) - 1).max())
    return Claim("posterior over the memory value equals enumeration and sums to one",
                 "memory N=3 x S=2, n=5, T=4 (enumeration), T=30 (sums)",
                 f"max |dP(M|x)|={_fmt(max(errs))}, max |sum-1|={_fmt(sums)} (tol 1e-12)",
                 max(errs) <= 1e-12 and sums <= 1e-12, "enumeration over (M, S_1..T)")


def claim_corpus_round_trip(quick: bool, seed: int) -> Claim:
    from simulate.corpus import CorpusError, CorpusSpec, load_corpus, write_corpus

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
        shards = len(corpus.manifest["shards"])
    return Claim("a corpus on disk is exactly sample(hmm, N, T, seed); a flipped bit is caught by name",
                 f"wei2021 m=6 n=7, 3000x20 tokens, {shards} shards",
                 f"round trip {'identical' if round_trip else 'DIFFERS'}; corruption {'named' if caught else 'MISSED'}",
                 round_trip and caught, "SHA-256 per shard")


VERIFIER = Verifier(
    name="hmm",
    claims=(claim_forward_backward, claim_viterbi, claim_hmmlearn, claim_long_sequences, claim_sampler,
            claim_memory_reduces_to_plain, claim_memory_posterior, claim_corpus_round_trip),
    help="exact HMM inference vs brute force and hmmlearn; sampler vs exact marginals; corpora on disk",
)


# ---------------------------------------------------------------------------------------------------------------
# ``ftsim run hmm-exactness``: the tables behind the exactness figure
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ExactnessConfig:
    num_sequences: int = dataclasses.field(default=20_000, metadata={"help": "sequences behind the z-scores"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of the HMM and the samples"})

    def __post_init__(self) -> None:
        if self.num_sequences < 100:
            from ftsim.core.errors import InputError

            raise InputError(f"must be >= 100, got {self.num_sequences}", field="num_sequences")


EXACTNESS_UNIT_VERSION = 1


def compute_exactness(work, cfg: ExactnessConfig) -> dict:
    """The ``hmm.exactness`` unit: sampler z-scores against exact marginals, and agreement with hmmlearn as T grows."""
    rows: list[dict] = []
    z = marginal_z_scores(wei2021_hmm(8, 12, seed=cfg.seed), cfg.num_sequences, 16, cfg.seed + 1)
    for kind, zs in z.items():
        rows.extend({"kind": "z", "variable": kind, "z": float(v)} for v in zs)
    rows.extend({"kind": "stability", **r} for r in stability_rows(cfg.seed))
    return {"rows": rows}


def plan_exactness(cfg: ExactnessConfig, ctx: RunContext) -> list[UnitSpec]:
    """The run's one unit as data."""
    return [unit_spec("hmm.exactness", EXACTNESS_UNIT_VERSION, dataclasses.asdict(cfg), compute_exactness, cfg,
                      label="exactness")]


def run_exactness(cfg: ExactnessConfig, ctx: RunContext) -> dict:
    """z-scores of sampled marginals and agreement with hmmlearn as T grows: ``hmm_checks.jsonl``."""
    rows = ctx.unit_of(plan_exactness(cfg, ctx)[0]).result["rows"]
    write_table(ctx.out_dir / "hmm_checks", rows)
    nz = sum(r["kind"] == "z" for r in rows)
    longest = max(r["length"] for r in rows if r["kind"] == "stability")
    return {"headline": f"{nz} z-scores, T up to {longest:,}"}


EXACTNESS = Experiment(
    name="hmm-exactness", config_cls=ExactnessConfig,
    presets={"quick": ExactnessConfig(), "paper": ExactnessConfig(num_sequences=200_000)},
    run=run_exactness, plan=plan_exactness, figures=("figures.hmm:redraw",), verifier="hmm",
    reproduce=("quick", "paper"),
    help="Exactness of the synthetic world as a figure: sampler z-scores against exact marginals, and agreement "
         "with hmmlearn as T grows to 10^4.")
