"""Speed of the synthetic world against hmmlearn, measured in one run on this machine.

* sampling: tokens/s of ``simulate.sampling.sample`` vs hmmlearn ``CategoricalHMM.sample`` (one call per
  sequence, as hmmlearn samples one sequence at a time);
* posteriors: tokens/s of ``simulate.inference.infer`` (batched) vs hmmlearn ``score_samples`` on the same
  concatenated sequences with ``lengths``;
* corpus writing: tokens/s of ``write_corpus`` for 10^8 tokens, and its peak RSS, in a child process.

Setting (issue 2): m = 32 states, n = 256 symbols, T = 128, 512 sequences. Targets: sampling >= 50x
hmmlearn, posteriors >= 20x hmmlearn, corpus writing >= 10 M tokens/s at < 1 GB RSS.

Usage: python benchmarks/bench_hmm.py [--repeats 3] [--corpus-tokens 100000000] [--out benchmarks/results/bench_hmm.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ftsim.core.io import write_json  # noqa: E402
from simulate.hmm import wei2021_hmm  # noqa: E402
from simulate.inference import infer  # noqa: E402
from simulate.sampling import sample  # noqa: E402
from simulate.verify import hmmlearn_model  # noqa: E402

M, N_VOCAB, T, NSEQ = 32, 256, 128, 512


def best_of(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), times


def corpus_child(tokens: int, out: str) -> None:
    """Runs in a fresh interpreter so its peak RSS is the writer's alone."""
    from simulate.corpus import CorpusSpec, write_corpus

    length = 128
    t0 = time.perf_counter()
    write_corpus(out, CorpusSpec("wei2021", {"num_states": M, "vocab_size": N_VOCAB}, num_sequences=tokens // length,
                                 length=length, seed=0), progress=False)
    dt = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": dt, "peak_rss_mb": peak_kb / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--corpus-tokens", type=int, default=100_000_000)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_hmm.json")
    ap.add_argument("--child", nargs=2, metavar=("TOKENS", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        corpus_child(int(args.child[0]), args.child[1])
        return

    hmm = wei2021_hmm(M, N_VOCAB, seed=0)
    ref = hmmlearn_model(hmm)
    tokens_total = NSEQ * T
    sample(hmm, 1, 1, 0)  # build the alias tables once (cached per model), as hmmlearn caches its cdfs

    ours_sample, ours_sample_all = best_of(lambda: sample(hmm, NSEQ, T, seed=1), args.repeats)
    ref_sample, ref_sample_all = best_of(
        lambda: [ref.sample(T, random_state=i) for i in range(NSEQ)], max(1, args.repeats - 1))

    x = sample(hmm, NSEQ, T, seed=2).tokens
    flat = x.reshape(-1, 1).astype(np.int64)
    lengths = [T] * NSEQ
    ours_post, ours_post_all = best_of(lambda: infer(hmm, x), args.repeats)
    ref_post, ref_post_all = best_of(lambda: ref.score_samples(flat, lengths), max(1, args.repeats - 1))
    # Same numbers: a benchmark of different answers would be meaningless.
    ll_ref, post_ref = ref.score_samples(flat, lengths)
    res = infer(hmm, x)
    max_post_diff = float(np.abs(res.posteriors.reshape(-1, M) - post_ref).max())
    ll_diff = float(abs(res.log_likelihood.sum() - ll_ref) / abs(ll_ref))

    with tempfile.TemporaryDirectory(dir=os.environ.get("FTSIM_BENCH_TMP")) as tmp:
        proc = subprocess.run([sys.executable, __file__, "--child", str(args.corpus_tokens), str(Path(tmp) / "c")],
                              capture_output=True, text=True, check=True)
        child = json.loads(proc.stdout.strip().splitlines()[-1])

    result = {
        "benchmark": "bench_hmm",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "numpy": np.__version__, "hmmlearn": __import__("hmmlearn").__version__},
        "setting": {"num_states": M, "vocab_size": N_VOCAB, "length": T, "num_sequences": NSEQ,
                    "tokens": tokens_total, "repeats": args.repeats, "timing": "best of repeats"},
        "sampling": {
            "ours_tokens_per_s": tokens_total / ours_sample, "hmmlearn_tokens_per_s": tokens_total / ref_sample,
            "ratio": ref_sample / ours_sample, "target_ratio": 50, "ours_seconds": ours_sample_all,
            "hmmlearn_seconds": ref_sample_all},
        "posteriors": {
            "ours_tokens_per_s": tokens_total / ours_post, "hmmlearn_tokens_per_s": tokens_total / ref_post,
            "ratio": ref_post / ours_post, "target_ratio": 20, "ours_seconds": ours_post_all,
            "hmmlearn_seconds": ref_post_all, "max_abs_posterior_diff": max_post_diff,
            "rel_loglik_diff": ll_diff},
        "corpus_writing": {
            "tokens": args.corpus_tokens, "seconds": child["seconds"],
            "tokens_per_s": args.corpus_tokens / child["seconds"], "target_tokens_per_s": 10_000_000,
            "peak_rss_mb": child["peak_rss_mb"], "target_peak_rss_mb": 1024},
    }
    result["targets_met"] = {
        "sampling": result["sampling"]["ratio"] >= 50,
        "posteriors": result["posteriors"]["ratio"] >= 20,
        "corpus_speed": result["corpus_writing"]["tokens_per_s"] >= 10_000_000,
        "corpus_memory": result["corpus_writing"]["peak_rss_mb"] < 1024,
    }
    write_json(args.out, result)
    s, p, c = result["sampling"], result["posteriors"], result["corpus_writing"]
    print("| measure | ftsim | hmmlearn | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| sampling (tokens/s) | {s['ours_tokens_per_s']:.3g} | {s['hmmlearn_tokens_per_s']:.3g} | "
          f"{s['ratio']:.0f}x | >= 50x |")
    print(f"| posteriors (tokens/s) | {p['ours_tokens_per_s']:.3g} | {p['hmmlearn_tokens_per_s']:.3g} | "
          f"{p['ratio']:.0f}x | >= 20x |")
    print(f"| corpus writing, {c['tokens']:.0e} tokens | {c['tokens_per_s']:.3g} tok/s, peak RSS "
          f"{c['peak_rss_mb']:.0f} MB | | | >= 1e7 tok/s, < 1024 MB |")
    print(f"targets met: {result['targets_met']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
