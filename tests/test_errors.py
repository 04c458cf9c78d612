"""The bad-input catalogue of the command line: every case gets one line naming the flag, file, field or line,
exit status 2, no traceback, and nothing written before is lost or altered (the results directory is hashed
before and after). The corpus and HMM cases of the library are catalogued in tests/test_corpus_hardening.py."""

from __future__ import annotations

import hashlib

import pytest

from ftsim.app.cli import main
from tests.conftest import NEG, POS

GEN = ["generate", "--preset", "wei2021", "--sequences", "10", "--length", "4", "--no-progress"]
TINY = ["run", "malladi", "--preset", "quick", "--model", "tiny-causal", "--k", "2", "--seeds", "13",
        "--test-size", "4", "--ft-steps", "2", "--no-progress", "--methods", "zero-shot"]


def _tree(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _data(tmp, name, content: bytes):
    d = tmp / name
    d.mkdir()
    (d / "rt-polarity.all").write_bytes(content)
    return d


def _sst2(tmp, train: bytes):
    d = tmp / "sst2"
    d.mkdir()
    (d / "stsa.binary.train").write_bytes(train)
    (d / "stsa.binary.dev").write_bytes(b"1 fine .\n0 dull .\n")
    return d


GOOD = "".join(f"1 {s} .\n" for s in POS) + "".join(f"0 {s} .\n" for s in NEG)

CASES = [
    ("dtype banana", lambda t: GEN + ["--out", str(t / "c"), "--dtype", "banana"], "--dtype: "),
    ("zero permutations", lambda t: GEN + ["--out", str(t / "c"), "--num-permutations", "0"], "--num-permutations: "),
    ("negative seed", lambda t: GEN + ["--out", str(t / "c"), "--seed", "-1"], "--seed: "),
    ("zero vocabulary", lambda t: GEN + ["--out", str(t / "c"), "--vocab-size", "0"], "--vocab-size: "),
    ("zero sequences", lambda t: ["generate", "--preset", "wei2021", "--sequences", "0", "--length", "4",
                                  "--out", str(t / "c")], "--sequences: "),
    ("parameter of another preset", lambda t: GEN + ["--out", str(t / "c"), "--concentration", "1"],
     "--concentration: does not apply"),
    ("non-integer preset parameter", lambda t: GEN + ["--out", str(t / "c"), "--num-states", "x"], "--num-states: "),
    ("cuda without a GPU", lambda t: ["run", "ntk-width", "--device", "cuda"], "--device cuda: "),
    ("unknown device", lambda t: ["run", "ntk-width", "--device", "tpu"], "--device 'tpu'"),
    ("negative k", lambda t: TINY + ["--k", "-3"], "--k: must be >= 1, got -3"),
    ("non-integer k", lambda t: TINY + ["--k", "many"], "--k: 'many' is not a valid int"),
    ("unknown method", lambda t: TINY + ["--methods", "ft-rmsprop"], "--methods: unknown"),
    ("empty learning-rate grid", lambda t: TINY + ["--sgd-lrs", ","], "--sgd-lrs: must not be empty"),
    ("zero widths", lambda t: ["run", "ntk-width", "--widths", "0"], "--widths: need positive widths"),
    ("bad wei2021 field", lambda t: ["run", "wei2021-exp1", "--num-heads", "3"], "--num-heads: d_model=64"),
    ("impossible memory budget", lambda t: TINY + ["--methods", "k-sgd", "--data-dir", str(_sst2(t, GOOD.encode())),
                                                   "--memory-budget-gb", "1e-6", "--union-ntk-implementation",
                                                   "streaming"], "memory budget"),
    ("40-line data file", lambda t: TINY + ["--task", "MR", "--data-dir",
                                            str(_data(t, "mr", GOOD.encode() * 2 + b"1 one more .\n" * 8))],
     "task MR ("),
    ("+1 label", lambda t: TINY + ["--data-dir", str(_sst2(t, b"0 fine .\n+1 good .\n"))],
     "stsa.binary.train:2: expected a label of ASCII digits"),
    ("Arabic-Indic label", lambda t: TINY + ["--data-dir", str(_sst2(t, "0 fine .\n\u0661 good .\n".encode()))],
     "stsa.binary.train:2: expected a label of ASCII digits"),
    ("unknown label", lambda t: TINY + ["--data-dir", str(_sst2(t, b"0 fine .\n7 good .\n"))],
     "stsa.binary.train:2: label 7 outside 0..1"),
    ("non-UTF-8 line without a label", lambda t: TINY + ["--data-dir", str(_sst2(t, b"0 fine .\n\xe9t\xe9 good .\n"))],
     "stsa.binary.train:2: "),
    ("empty data file", lambda t: TINY + ["--data-dir", str(_sst2(t, b""))], "stsa.binary.train: empty file"),
    ("missing data directory", lambda t: TINY + ["--data-dir", str(t / "nowhere")], "does not exist"),
    ("unknown task", lambda t: TINY + ["--task", "SST-9"], "--task: unknown task 'SST-9'"),
    ("output under a file", lambda t: ["verify", "hmm", "--out", str(_file(t) / "v")], "--out: "),
    ("run output under a file", lambda t: ["run", "ntk-width", "--out", str(_file(t) / "r")], "--out: "),
    ("status of a non-run", lambda t: ["status", str(t)], "no units_plan.json"),
    ("bad executor jobs", lambda t: ["run", "ntk-width", "--executor", "local", "--jobs", "0"], "--jobs: must be >= 1"),
]


def _file(t):
    f = t / "a-file"
    f.write_text("x")
    return f


@pytest.mark.parametrize("case, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_naming_the_culprit(case, argv, expected, tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "earlier-run.json").write_text('{"kept": true}\n')  # something written before
    monkeypatch.setenv("FTSIM_RESULTS", str(results))
    monkeypatch.setenv("FTSIM_CACHE", str(results / "cache"))
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    args = argv(work)
    before = _tree(results)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, (case, err)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], (expected, lines[0])
    after = _tree(results)
    assert all(after.get(k) == v for k, v in before.items())  # nothing written before was lost or altered
    new = set(after) - set(before)
    assert all(k.startswith("cache/") for k in new), new  # at most cache bookkeeping, no results
    assert not (work / "c").exists()  # rejected generate leaves no output directory
    assert not any((results / d).exists() for d in ("malladi", "ntk-width", "wei2021-exp1"))  # nor a run dir
