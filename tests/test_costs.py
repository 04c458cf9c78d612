"""A-priori unit costs (real_tasks/costs.py) against oracles, and ``--dry-run``'s estimate from them.

Oracles: ``torch.utils.flop_counter.FlopCounterMode`` counts the matmul flops of a real forward (and backward)
pass; the saved-tensor bytes of a two-layer MLP are known in closed form.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ftsim.app.cli import main
from real_tasks.costs import forward_flops, lm_cost_basis, output_gradient_flops, training_bytes, training_flops
from tests.conftest import NEG, POS
from theory.memory import saved_activation_bytes


def _tiny_classifier(hidden=64, layers=2):
    from real_tasks.classify import encode_set, make_classifier
    from real_tasks.data import Example
    from real_tasks.models import tiny_model
    from real_tasks.prompts import get_prompt, label_token_ids, words_of, PROMPTS

    lm = tiny_model("causal", " ".join(POS + NEG).split() + words_of(PROMPTS.values()), seed=0, hidden=hidden,
                    layers=layers)
    prompt = get_prompt("SST-2")
    labels = label_token_ids(lm.tokenizer, prompt, lm.kind)
    clf = make_classifier(lm, use_prompt=True, label_tokens=labels)
    enc = encode_set(lm, [Example(s, 1) for s in POS[:4]], prompt=prompt, label_tokens=labels)
    return clf, enc


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("hidden", [64, 128])
def test_forward_and_training_flops_match_the_flop_counter(hidden):
    """2 N per token forward and 6 N per token for a training step, N without the embedding table, counted over
    the positions the model multiplies (padding included). Slack 5%: attention's 4 T^2 d flops per layer and
    sequence, which the rule leaves out, are under 3% at T = 8. That N leaves the embedding table out is checked
    separately at 3%, below the 3.6% and 7% of the parameters the table holds here."""
    clf, enc = _tiny_classifier(hidden=hidden)
    batch = enc.select(range(len(enc)))
    positions = batch["input_ids"].numel()
    basis = lm_cost_basis(clf, batch, int(enc.lengths.sum()))
    assert basis.embedding_params > 0.03 * basis.params
    fwd = _counted(lambda: clf(batch))
    assert fwd == pytest.approx(forward_flops(basis, positions), rel=0.05)
    assert not fwd == pytest.approx(2.0 * basis.params * positions, rel=0.03)  # N must leave the embeddings out

    def step():
        clf.zero_grad()
        clf(batch).sum().backward()

    assert _counted(step) == pytest.approx(training_flops(basis, positions), rel=0.05)


def test_output_gradient_flops_match_c_backward_passes():
    clf, enc = _tiny_classifier()
    batch = enc.select([0])
    tokens = int(enc.lengths[0])
    basis = lm_cost_basis(clf, batch, tokens)

    def rows():
        out = clf(batch)  # (1, C)
        for c in range(out.shape[1]):
            torch.autograd.grad(out[0, c], list(clf.parameters()), retain_graph=True, allow_unused=True)

    C = 2  # one example, no padding; slack as above
    assert _counted(rows) == pytest.approx(output_gradient_flops(basis, tokens, C), rel=0.05)


def test_saved_activation_bytes_of_an_mlp_is_the_closed_form():
    """Linear saves its input (B x d_in), ReLU its output (B x h), the second Linear its input: the ReLU output
    again (one storage, counted once). float32: 4 bytes."""
    B, d, h = 5, 7, 11
    mlp = torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.ReLU(), torch.nn.Linear(h, 3))
    x = torch.randn(B, d, requires_grad=False)
    assert saved_activation_bytes(mlp, x) == 4 * (B * d + B * h)


def test_training_bytes_counts_weights_grads_adam_and_activations():
    clf, enc = _tiny_classifier()
    basis = lm_cost_basis(clf, enc.select([0]), int(enc.lengths[0]))
    sgd = training_bytes(basis, optimizer="sgd", batch_tokens=100)
    adam = training_bytes(basis, optimizer="adam", batch_tokens=100, snapshots=1)
    assert adam - sgd == 3 * basis.weight_bytes  # two moments and a snapshot
    assert sgd == int(2 * basis.weight_bytes + 100 * basis.activation_bytes_per_token)


def _dry(args, capsys) -> dict:
    assert main(["run", "malladi", "--preset", "quick", *args, "--dry-run"]) == 0
    return json.loads(capsys.readouterr().out)


def test_dry_run_turns_flops_into_seconds_at_the_measured_rate(task_dir, results_tmp, capsys):
    """Before anything ran: flops and memory a priori, no time. After a run: a config with more steps gets a
    time from the measured seconds per flop, larger than the measured units' total (it has more flops)."""
    from tests.test_real_malladi import TINY

    base = ["--model", "tiny-causal", "--data-dir", str(task_dir), *TINY, "--methods", "ft-sgd,k-sgd",
            "--threads", "1"]
    fresh = _dry(base, capsys)["kinds"]
    ft = fresh["malladi.finetune"]
    assert ft["estimated_seconds"] is None and ft["estimate_basis"] == "nothing measured yet"
    assert ft["pending_tflop"] > 0 and ft["estimated_peak_memory_gib"] > 0
    assert main(["run", "malladi", "--preset", "quick", *base]) == 0
    capsys.readouterr()
    records = [json.loads(p.read_text()) for p in (results_tmp.parent / "cache" / "units" / "malladi.finetune")
               .glob("*/*/record.json")]
    assert records and all(r["cost"]["flops"] > 0 and r["cost"]["device"] == "cpu" for r in records)
    rates = sorted(r["seconds"] / r["cost"]["flops"] for r in records)
    longer = _dry([*base, "--ft-steps", "12"], capsys)["kinds"]["malladi.finetune"]
    assert longer["cached"] == 0 and longer["estimate_basis"].startswith("flops x seconds/flop of 2 measured")
    assert longer["pending_tflop"] > ft["pending_tflop"]
    # the rule: the median measured rate (upper median of two) times the pending flops (printed to 4 digits)
    assert longer["estimated_seconds"] == pytest.approx(rates[1] * longer["pending_tflop"] * 1e12, rel=1e-3, abs=0.1)
    again = _dry(base, capsys)["kinds"]["malladi.finetune"]
    assert again["cached"] == 2 and again["estimated_seconds"] == 0.0 and again["estimate_basis"] == "all cached"
