"""Documentation that cannot go stale: README's measured blocks are what the stored results give, and the stored
exact claims are what the code computes now (numbers at the rounding level, |x| < 1e-6, are compared as such:
they differ between BLAS kernels and CPUs, everything else must be equal)."""

from __future__ import annotations

import re

import pytest

from ftsim.app import docs
from ftsim.app.registry import VERIFIERS, load
from ftsim.core.io import read_jsonl

_NUM = re.compile(r"[-+]?\d+\.?\d*(?:[eE][-+]?\d+)?")


def _mask(text: str) -> str:
    def repl(m: re.Match) -> str:
        try:
            x = float(m.group(0))
        except ValueError:
            return m.group(0)
        return "<rounding>" if x != 0 and abs(x) < 1e-6 else m.group(0)

    return _NUM.sub(repl, text)


def test_readme_blocks_are_what_the_stored_results_give():
    assert not docs.render_readme(check=True), "README.md is stale: run `ftsim docs`"
    text = (docs.REPO / "README.md").read_text()
    names = re.findall(r"<!-- ftsim:block ([\w.-]+) -->", text)
    assert len(names) == len(set(names))
    assert all(n in docs.RENDERERS for n in names)


@pytest.mark.parametrize("name", sorted(VERIFIERS))
def test_stored_claims_are_what_the_code_computes_now(name, one_torch_thread):
    stored = docs.MEASURED / "verify" / f"{name}.jsonl"
    if not stored.is_file():
        pytest.skip(f"no stored claims for {name} (README shows none)")
    now = [c.row() for c in load(VERIFIERS[name]).check(quick=True, seed=0)]
    then = read_jsonl(stored)
    assert [r["claim"] for r in now] == [r["claim"] for r in then]
    for a, b in zip(now, then):
        assert (a["verdict"], a["setting"], _mask(a["measured"])) == (b["verdict"], b["setting"], _mask(b["measured"])), a["claim"]


def test_render_block_rejects_unknown_names(tmp_path):
    with pytest.raises(KeyError, match="no renderer"):
        docs.render_block("nope")
    p = tmp_path / "R.md"
    p.write_text("x\n<!-- ftsim:block quick-summary -->\nstale\n<!-- ftsim:end -->\n")
    assert docs.render_readme(check=True, path=p)
    assert "stale" in p.read_text()
    docs.render_readme(path=p)
    assert "stale" not in p.read_text() and not docs.render_readme(check=True, path=p)
