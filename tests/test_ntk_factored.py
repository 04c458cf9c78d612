"""The factored eNTK (``implementation="factored"``, :mod:`theory.ntk_factored`) against explicit Jacobians
(``torch.autograd.functional.jacobian``) on models that exercise every captured operation, its tiles and masks,
the per-example remainder for uncaptured uses, and the check that rejects models mixing examples."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_ntk import make_mlp
from theory.ntk import empirical_ntk
from theory.oracles import explicit_jacobian as jacobian
from theory.oracles import reference_kernel as reference


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs on one torch thread (see ``tests/conftest.py``)."""


class RMSNorm(nn.Module):
    """HF Llama's RMSNorm: an elementwise product with the weight (captured as ``mul``)."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class TinyLM(nn.Module):
    """Token + sliced position embeddings, LayerNorm and RMSNorm, causal attention, a GELU MLP, a bias add, and an
    LM head tied to the token embedding whose label-word logits are the outputs (padding index 0)."""

    def __init__(self, vocab=23, d=8, T=6, labels=(3, 5, 7)):
        super().__init__()
        self.tok = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Parameter(0.1 * torch.randn(T + 2, d))
        self.ln = nn.LayerNorm(d)
        self.rms = RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Parameter(torch.randn(2 * d, d) / math.sqrt(2 * d))  # used as h @ down
        self.shift = nn.Parameter(0.1 * torch.randn(d))  # a bare bias add
        self.labels = list(labels)

    def forward(self, ids):
        T = ids.shape[1]
        x = self.tok(ids) + self.pos[:T]
        q, k, v = self.qkv(self.ln(x)).chunk(3, dim=-1)
        mask = torch.full((T, T), float("-inf"), dtype=x.dtype).triu(1)
        x = x + torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask, -1) @ v
        x = x + F.gelu(self.up(self.rms(x))) @ self.down + self.shift
        logits = F.linear(x[:, -1], self.tok.weight)  # tied head over the whole vocabulary
        return logits[:, self.labels]


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    m = TinyLM().double().eval()
    params = {k: v.detach() for k, v in m.named_parameters()}

    def f(p, x):
        return torch.func.functional_call(m, p, (x,))

    return f, params


def ids(n, seed, vocab=23, T=6):
    x = torch.randint(1, vocab, (n, T), generator=torch.Generator().manual_seed(seed))
    x[0, :2] = 0  # padding tokens: their embedding row gets no gradient
    return x


@pytest.mark.parametrize("kernel", ["sgd", "signgd", "asigngd"])
def test_factored_equals_explicit_jacobians_on_a_tiny_lm(kernel):
    f, p = tiny_lm()
    x1, x2 = ids(5, 1), ids(4, 2)
    J1, J2 = jacobian(f, p, x1), jacobian(f, p, x2)
    for xb, Jb in ((x2, J2), (None, J1)):
        res = empirical_ntk(f, p, x1, xb, kernel=kernel, implementation="factored")
        assert res.plan.implementation == "factored"
        assert res.plan.factored["uncovered"] == {}, res.plan.describe()  # every tensor is captured
        assert res.plan.factored["check_rel_error"] < 1e-12
        ref = reference(kernel, J1, Jb)
        assert torch.all((res.matrix() - ref).abs() <= 1e-11 + 1e-11 * ref.abs())
        assert torch.allclose(res.outputs1, f(p, x1))


def test_auto_picks_factored_and_says_so():
    f, p = tiny_lm(1)
    res = empirical_ntk(f, p, ids(6, 3))
    assert res.plan.implementation == "factored" and res.plan.requested == "auto"
    text = res.plan.describe()
    assert "factored:" in text and "check on 3 examples" in text


@pytest.mark.parametrize("kernel", ["sgd", "asigngd"])
def test_factored_tiles_are_exact(kernel):
    """A budget with room for about one example's captures (15.3 KiB) beside the fixed reserve: the symmetric
    kernel captures its tensors in groups, the other one tiles the examples (inner tiles recaptured)."""
    f, p = tiny_lm(2)
    x1, x2 = ids(7, 4), ids(5, 5)
    J1, J2 = jacobian(f, p, x1), jacobian(f, p, x2)
    for xb, Jb in ((x2, J2), (None, J1)):
        res = empirical_ntk(f, p, x1, xb, kernel=kernel, implementation="factored", memory_budget=1_480_000)
        if xb is None:
            assert res.plan.factored["capture_groups"] > 1, res.plan.describe()
        else:
            assert res.plan.num_tiles > 1, res.plan.describe()
        ref = reference(kernel, J1, Jb)
        assert torch.all((res.matrix() - ref).abs() <= 1e-11 + 1e-11 * ref.abs())


@pytest.mark.parametrize("symmetric", [True, False])
def test_factored_capture_groups_are_exact(symmetric):
    """When the captures of all examples do not fit but each tensor's do, the tensors are captured in groups, one
    pass over all examples per group (no example tiles)."""
    f, p = tiny_lm(5)
    x1, x2 = ids(40, 8), ids(30, 9)
    J1, J2 = jacobian(f, p, x1), (None if symmetric else jacobian(f, p, x2))
    res = empirical_ntk(f, p, x1, None if symmetric else x2, implementation="factored", memory_budget=2_100_000)
    assert res.plan.factored["capture_groups"] > 1 and res.plan.num_tiles == 1, res.plan.describe()
    assert "passes over groups of tensors" in res.plan.describe()
    ref = J1 @ (J1 if symmetric else J2).T
    assert torch.allclose(res.matrix(), ref, rtol=1e-11, atol=1e-11)


def test_factored_masks_and_subsets():
    f, p = tiny_lm(3)
    x = ids(5, 6)
    gen = torch.Generator().manual_seed(0)
    masks = {k: torch.rand(v.shape, generator=gen) < 0.4 for k, v in p.items()}
    J = jacobian(f, p, x)
    keep = torch.cat([masks[k].reshape(-1) for k in p]).double()
    res = empirical_ntk(f, p, x, params_subset=masks, implementation="factored")
    assert torch.allclose(res.matrix(), (J * keep) @ (J * keep).T, rtol=1e-11, atol=1e-11)
    head = empirical_ntk(f, p, x, params_subset=["tok.weight"], implementation="factored")
    rest = empirical_ntk(f, p, x, params_subset=lambda n: n != "tok.weight", implementation="factored")
    assert torch.allclose(head.matrix() + rest.matrix(), J @ J.T, rtol=1e-11, atol=1e-11)


def test_uncaptured_uses_go_to_the_per_example_engine():
    f0, p = make_mlp(seed=4)

    def f(q, x):  # layer 1's weight enters through einsum, which the factored engine does not capture
        h = torch.tanh(x @ q["layer0.weight"].T + q["layer0.bias"])
        h = torch.tanh(torch.einsum("nd,ed->ne", h, q["layer1.weight"]) + q["layer1.bias"])
        return h @ q["layer2.weight"].T + q["layer2.bias"]

    gen = torch.Generator().manual_seed(4)
    x, x2 = torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randn(4, 5, generator=gen, dtype=torch.float64)
    res = empirical_ntk(f, p, x, implementation="factored")
    assert set(res.plan.factored["uncovered"]) == {"layer1.weight"}
    assert "per-example engine for 1 uncovered" in res.plan.describe()
    J, J2 = jacobian(f, p, x), jacobian(f, p, x2)
    assert torch.allclose(res.matrix(), J @ J.T, rtol=1e-11, atol=1e-11)
    for kernel in ("signgd", "asigngd"):  # the sign scales span both parts: per-example and captured
        for xb, Jb in ((None, J), (x2, J2)):
            res = empirical_ntk(f, p, x, xb, kernel=kernel, implementation="factored")
            assert res.plan.factored["sign_scales"] == ("from the kernel's captures and per-example gradients of "
                                                        "the uncovered tensors")
            ref = reference(kernel, J, Jb)
            assert torch.all((res.matrix() - ref).abs() <= 1e-11 + 1e-11 * ref.abs())


def test_models_that_mix_examples_are_refused():
    """Batch statistics break the factorisation (each example's output depends on the others in its batch): the
    check against per-example gradients catches it, auto falls back, and an explicit request errors."""
    f0, p = make_mlp(seed=5)

    def f(q, x):
        h = x @ q["layer0.weight"].T + q["layer0.bias"]
        h = torch.tanh(h - h.mean(0, keepdim=True))  # batch-norm-like centring across examples
        h = torch.tanh(h @ q["layer1.weight"].T + q["layer1.bias"])
        return h @ q["layer2.weight"].T + q["layer2.bias"]

    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    res = empirical_ntk(f, p, x)
    assert res.plan.implementation == "streaming" and "disagrees with per-example gradients" in res.plan.reason
    with pytest.raises(RuntimeError, match="disagrees with per-example gradients"):
        empirical_ntk(f, p, x, implementation="factored")
    # several kernels: after the refusal every kernel comes from the per-example engine, and equals the oracle
    from theory.ntk import empirical_ntks

    J = torch.cat([jacobian(f, p, x[i:i + 1]) for i in range(len(x))])  # per example: each its own batch
    both = empirical_ntks(f, p, x, kernels=("sgd", "asigngd"))
    assert [r.plan.implementation for r in both.values()] == ["streaming", "streaming"]
    for k, r in both.items():
        ref = reference(k, J, J)
        assert torch.all((r.matrix() - ref).abs() <= 1e-11 + 1e-11 * ref.abs())


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 6), width=st.integers(1, 9), depth=st.integers(1, 3), C=st.integers(1, 3),
       transposed=st.booleans(), seed=st.integers(0, 10_000))
def test_factored_mlps_match_jacobians(n, width, depth, C, transposed, seed):
    """Random MLPs (x @ W.T or x @ W layouts, any width, depth, outputs and batch size) against the oracle."""
    gen = torch.Generator().manual_seed(seed)
    dims = [4] + [width] * depth + [C]
    p = {}
    for i in range(len(dims) - 1):
        shape = (dims[i + 1], dims[i]) if transposed else (dims[i], dims[i + 1])
        p[f"w{i}"] = torch.randn(*shape, generator=gen, dtype=torch.float64) / math.sqrt(dims[i])
        p[f"b{i}"] = torch.randn(dims[i + 1], generator=gen, dtype=torch.float64)

    def f(q, x):
        h = x
        for i in range(len(dims) - 1):
            h = (h @ q[f"w{i}"].T if transposed else h @ q[f"w{i}"]) + q[f"b{i}"]
            h = torch.tanh(h) if i < len(dims) - 2 else h
        return h

    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    res = empirical_ntk(f, p, x, implementation="factored")
    assert res.plan.factored["uncovered"] == {}
    J = jacobian(f, p, x)
    assert torch.allclose(res.matrix(), J @ J.T, rtol=1e-10, atol=1e-10)


def test_several_kernels_from_one_set_of_captures():
    """empirical_ntks: the SGD and A-SignGD kernels from the same captures equal separate calls (and the oracle)."""
    from theory.ntk import empirical_ntks

    f, p = tiny_lm(6)
    x1, x2 = ids(6, 10), ids(4, 11)
    J1, J2 = jacobian(f, p, x1), jacobian(f, p, x2)
    for xb, Jb in ((None, J1), (x2, J2)):
        both = empirical_ntks(f, p, x1, xb, kernels=("sgd", "asigngd"))
        assert set(both) == {"sgd", "asigngd"}
        for k, res in both.items():
            assert res.plan.implementation == "factored" and res.plan.factored["kernels_from_same_captures"] == [
                "sgd", "asigngd"]
            alone = empirical_ntk(f, p, x1, xb, kernel=k, implementation="factored")
            assert torch.allclose(res.kernel, alone.kernel, rtol=1e-12, atol=1e-12)
            ref = reference(k, J1, Jb)
            assert torch.all((res.matrix() - ref).abs() <= 1e-11 + 1e-11 * ref.abs())
    with pytest.raises(ValueError, match="kernels must be"):
        empirical_ntks(f, p, x1, kernels=("adam",))


def test_the_check_uses_fewer_examples_when_three_do_not_fit():
    """The per-example reference of the check needs 2 * n * C * P gradient entries; with a budget whose half holds
    them for 2 examples but not for 3, the check runs on 2 (and still compares with the oracle)."""
    gen = torch.Generator().manual_seed(7)
    p = {"w0": torch.randn(512, 16, generator=gen, dtype=torch.float64) / 4,
         "w1": torch.randn(512, 512, generator=gen, dtype=torch.float64) / math.sqrt(512),
         "w2": torch.randn(1, 512, generator=gen, dtype=torch.float64) / math.sqrt(512)}

    def f(q, x):
        return torch.tanh(torch.tanh(x @ q["w0"].T) @ q["w1"].T) @ q["w2"].T

    x = torch.randn(6, 16, generator=gen, dtype=torch.float64)
    P = sum(v.numel() for v in p.values())
    per_example = 2 * P * 8  # reference rows of both sides, float64, C = 1
    budget = 2 * int(2.5 * per_example)  # half the budget holds 2.5 examples' reference rows
    res = empirical_ntk(f, p, x, implementation="factored", memory_budget=budget)
    assert res.plan.factored["check_examples"] == 2 and res.plan.factored["check_rel_error"] < 1e-12
    J = jacobian(f, p, x)
    assert torch.allclose(res.matrix(), J @ J.T, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("symmetric", [True, False])
def test_forced_factored_budget_error_names_the_sizes_and_the_bytes_needed(symmetric):
    """implementation="factored" with a budget too small for any layout: NTKMemoryError naming N1, N2, C, P and
    the least budget that works -- which does work (1% above it), while 3% below it does not."""
    import re

    from theory.ntk import NTKMemoryError

    f, p = tiny_lm(7)
    x1, x2 = ids(6, 12), ids(5, 13)
    xb = None if symmetric else x2
    with pytest.raises(NTKMemoryError) as exc:
        empirical_ntk(f, p, x1, xb, implementation="factored", memory_budget=1_300_000)
    msg = str(exc.value)
    P = sum(v.numel() for v in p.values())
    for piece in ("implementation='factored'", "N1=6", f"N2={6 if symmetric else 5}", "C=3", f"P={P:,}",
                  "per example", "for the kernel itself", "needs at least"):
        assert piece in msg, msg
    value, unit = re.search(r"needs at least ([\d.]+) (\w+)", msg).groups()
    need = float(value) * {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20}[unit]
    res = empirical_ntk(f, p, x1, xb, implementation="factored", memory_budget=int(need * 1.01))
    assert res.plan.estimated_peak_bytes <= int(need * 1.01)
    with pytest.raises(NTKMemoryError, match="needs at least"):
        empirical_ntk(f, p, x1, xb, implementation="factored", memory_budget=int(need * 0.97))
