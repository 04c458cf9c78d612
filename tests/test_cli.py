"""The command line: every subcommand runs, help explains them, errors are one clear line."""

from __future__ import annotations

import json

import numpy as np
import pytest

import ftsim.app.reproduce as reproduce_mod
from ftsim.app.cli import main
from ftsim.core.io import read_jsonl
from simulate.corpus import load_corpus
from simulate.sampling import sample


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("generate", "verify", "run", "figures", "reproduce"):
        assert cmd in out
    assert main(["run", "--help"]) == 0
    assert "wei2021-exp1" in capsys.readouterr().out


def test_generate_writes_the_requested_corpus(tmp_path, capsys):
    out = tmp_path / "corpus"
    rc = main(["generate", "--preset", "wei2021", "--num-states", "6", "--vocab-size", "5", "--sequences", "300",
               "--length", "9", "--seed", "4", "--out", str(out), "--states", "--text", "--no-progress",
               "--trans-temp", "0.5"])
    assert rc == 0 and "wrote 2,700 tokens" in capsys.readouterr().out
    corpus = load_corpus(out)
    assert corpus.manifest["params"]["trans_temp"] == 0.5 and corpus.manifest["params"]["emit_temp"] == 0.1
    assert np.array_equal(corpus.tokens(), sample(corpus.model, 300, 9, 4).tokens)
    # A second run into the same directory is refused with a one-line error, and nothing is lost.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["generate", "--preset", "wei2021", "--sequences", "3", "--length", "2", "--out", str(out)]) == 2
    assert "directory is not empty" in capsys.readouterr().err
    assert before == {p.name: p.read_bytes() for p in out.iterdir()}


def test_generate_rejects_parameters_of_another_preset(tmp_path, capsys):
    assert main(["generate", "--preset", "wei2021", "--concentration", "2", "--sequences", "2", "--length", "2",
                 "--out", str(tmp_path / "x")]) == 2
    assert "ftsim generate: error: --concentration does not apply to preset 'wei2021'" in capsys.readouterr().err
    assert main(["generate", "--preset", "memory", "--num-memory", "x", "--sequences", "2", "--length", "2",
                 "--out", str(tmp_path / "y")]) == 2
    assert "--num-memory: 'x' is not a valid int" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_verify_hmm_prints_claims_and_writes_them(tmp_path, capsys):
    rc = main(["verify", "hmm", "--out", str(tmp_path / "v")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "claims hold" in out and "FAIL" not in out
    rows = read_jsonl(tmp_path / "v" / "claims.jsonl")
    assert len(rows) >= 8 and all(r["verdict"] == "PASS" for r in rows)


def test_reproduce_and_figures_on_a_tiny_preset(tmp_path, monkeypatch, capsys):
    """The main job's machinery end to end (corpora, a verifier, summary, figure), on tiny sizes; the
    registered experiments are exercised by their own tests."""
    monkeypatch.setattr(reproduce_mod, "CORPORA", {"quick": [
        ("tiny", "wei2021", {"num_states": 3, "vocab_size": 4}, 50, 6)]})
    monkeypatch.setattr(reproduce_mod, "STEPS", [reproduce_mod.Step("verify:hmm")])
    assert main(["reproduce", "--preset", "quick", "--out", str(tmp_path)]) == 0
    out_dir = tmp_path / "reproduce" / "quick"
    summary = read_jsonl(out_dir / "summary.jsonl")
    assert [r["step"] for r in summary] == ["generate corpora", "ftsim verify hmm", "exactness figure"]
    assert summary[1]["verdict"] == "PASS"
    png = out_dir / "hmm_exactness.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out_dir / "hmm_exactness.pdf").exists()
    # The corpus is cached: a second run reuses it.
    assert main(["reproduce", "--preset", "quick", "--out", str(tmp_path)]) == 0
    corpora = read_jsonl(out_dir / "corpora.jsonl")
    assert corpora[0]["reused"] is True
    capsys.readouterr()
    png.unlink()
    assert main(["figures", "--results", str(tmp_path)]) == 0
    assert png.exists() and "figure(s) redrawn" in capsys.readouterr().out
    assert json.loads((out_dir / "summary.jsonl").read_text().splitlines()[0])["verdict"] == "done"
