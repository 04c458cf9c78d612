"""The command line: every subcommand runs, help explains each flag once, errors are one clear line written
before any work, progress output is plain text in a log, and the main job caches its steps."""

from __future__ import annotations

import numpy as np
import pytest

import ftsim.app.reproduce as reproduce_mod
from ftsim.app.cli import main
from ftsim.core.io import read_json, read_jsonl
from simulate.corpus import load_corpus
from simulate.sampling import sample


def test_help_lists_every_subcommand_once(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("generate", "verify", "run", "figures", "reproduce", "docs"):
        assert sum(line.split()[:1] == [cmd] for line in out.splitlines()) == 1, (cmd, out)
    assert "``" not in out and ":mod:" not in out  # no developer docstring
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "wei2021-exp1" in out and "--preset" in out and "(default: None)" not in out
    for argv in (["verify", "--help"], ["generate", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert "(default: None)" not in out and "(default: False)" not in out, out  # no generated defaults
        assert all(line.count("default") <= 1 for line in out.splitlines()), out
    assert main(["run", "ntk-width", "--help"]) == 0
    out = capsys.readouterr().out
    assert "quick: 64,256,1024,4096" in out and sum(ln.strip().startswith("--widths") for ln in out.splitlines()) == 1


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
    assert "ftsim generate: error: " in capsys.readouterr().err
    assert before == {p.name: p.read_bytes() for p in out.iterdir()}


def test_generate_rejects_parameters_of_another_preset(tmp_path, capsys):
    assert main(["generate", "--preset", "wei2021", "--concentration", "2", "--sequences", "2", "--length", "2",
                 "--out", str(tmp_path / "x")]) == 2
    assert "ftsim generate: error: --concentration: does not apply to preset 'wei2021'" in capsys.readouterr().err
    assert main(["generate", "--preset", "memory", "--num-memory", "x", "--sequences", "2", "--length", "2",
                 "--out", str(tmp_path / "y")]) == 2
    assert "--num-memory: 'x' is not a valid int" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_verify_hmm_prints_claims_writes_them_and_caches_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FTSIM_CACHE", str(tmp_path / "cache"))
    rc = main(["verify", "hmm", "--out", str(tmp_path / "v")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "claims hold" in out and "FAIL" not in out and "(took " in out
    rows = read_jsonl(tmp_path / "v" / "claims.jsonl")
    assert len(rows) >= 8 and all(r["verdict"] == "PASS" for r in rows)
    first = read_json(tmp_path / "v" / "timing.json")
    assert main(["verify", "hmm", "--out", str(tmp_path / "v")]) == 0
    assert "cached result of a run that took" in capsys.readouterr().out
    again = read_json(tmp_path / "v" / "timing.json")
    assert again == {"seconds": first["seconds"], "cached": True}  # the computing run's time, not 0
    assert read_jsonl(tmp_path / "v" / "claims.jsonl") == rows


def test_output_paths_are_checked_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["verify", "hmm", "--out", str(blocker / "v")]) == 2
    err = capsys.readouterr().err
    assert "--out: " in err and "is a file" in err and "Traceback" not in err
    assert main(["run", "ntk-width", "--out", str(blocker / "r")]) == 2
    assert "--out: " in capsys.readouterr().err


def test_device_errors_are_one_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["run", "ntk-width", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA device is visible" in err and "Traceback" not in err


def test_reproduce_and_figures_on_a_tiny_registry(tmp_path, monkeypatch, capsys):
    """The main job's machinery end to end (corpora, a verifier, an experiment and its figure, summary), on
    tiny sizes; the registered experiments are exercised by their own tests."""
    monkeypatch.delenv("FTSIM_CACHE", raising=False)
    monkeypatch.setattr(reproduce_mod, "CORPORA", {"quick": [
        ("tiny", "wei2021", {"num_states": 3, "vocab_size": 4}, 50, 6)]})
    monkeypatch.setattr(reproduce_mod, "VERIFIERS", {"hmm": "simulate.verify:VERIFIER"})
    monkeypatch.setattr(reproduce_mod, "EXPERIMENTS", {"hmm-exactness": "simulate.verify:EXACTNESS"})
    assert main(["reproduce", "--preset", "quick", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "\x1b[" not in captured.err  # plain progress lines in a log, no cursor control
    assert "[reproduce] ftsim verify hmm: PASS" in captured.out  # each step's verdict as it finishes
    out_dir = tmp_path / "reproduce" / "quick"
    summary = read_jsonl(out_dir / "summary.jsonl")
    assert [r["step"] for r in summary] == ["generate corpora", "ftsim verify hmm",
                                            "ftsim run hmm-exactness --preset quick"]
    assert summary[1]["verdict"] == "PASS" and summary[2]["verdict"] == "done"
    run_dir = next((tmp_path / "hmm-exactness").glob("quick-*"))
    png = run_dir / "hmm_exactness.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (run_dir / "hmm_exactness.pdf").exists()
    # Every step is cached: a second run recomputes nothing and keeps the first run's compute times.
    assert main(["reproduce", "--preset", "quick", "--out", str(tmp_path)]) == 0
    again = read_jsonl(out_dir / "summary.jsonl")
    assert [r["compute_seconds"] for r in again] == [r["compute_seconds"] for r in summary]
    assert "cached" in read_json(out_dir / "verify" / "hmm" / "timing.json") and \
        read_json(out_dir / "verify" / "hmm" / "timing.json")["cached"] is True
    capsys.readouterr()
    png.unlink()
    assert main(["figures", "--results", str(tmp_path)]) == 0
    assert png.exists() and "figure(s) redrawn" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(__import__("ftsim.app.registry", fromlist=["EXPERIMENTS"]).EXPERIMENTS))
def test_every_experiment_has_a_help_page_without_flag_conflicts(name, capsys):
    assert main(["run", name, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--preset" in out and "--executor" in out and "--dry-run" in out
