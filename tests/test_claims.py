"""Every claim of every registered verifier, each as its own test: the same claim functions ``ftsim verify`` runs
(quick settings), so a claim that fails in the main job fails here under its own name."""

from __future__ import annotations

import pytest

from ftsim.app.registry import VERIFIERS, load

CASES = [(name, fn) for name, target in VERIFIERS.items() for fn in load(target).claims]


@pytest.mark.parametrize("verifier, claim", CASES, ids=[f"{n}:{fn.__name__}" for n, fn in CASES])
def test_claim_holds(verifier, claim, one_torch_thread):
    got = claim(True, 0)
    claims = [got] if hasattr(got, "passed") else list(got)
    assert claims
    for c in claims:
        assert c.passed, f"{verifier}: {c.claim} -- {c.measured} ({c.setting})"
        assert c.measured and c.setting  # every claim states what it measured and where
