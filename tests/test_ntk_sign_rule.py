"""The sign rule of the SignGD kernels (:mod:`theory.gram`) on the case that motivated it: GPT-2's key-projection
bias has an exactly zero gradient (softmax is invariant to adding one constant to every score), which floating
point turns into +-1e-19 residues. Every implementation must agree with the explicit-Jacobian oracle under the
same rule, and the rule must count those residues as zero."""

from __future__ import annotations

import pytest
import torch

from theory.gram import SIGN_RTOL, mirror_lower, sign_rows
from theory.ntk import empirical_ntk, empirical_ntks
from theory.oracles import explicit_jacobian, reference_kernel


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny tensors: one torch thread (see ``tests/conftest.py``)."""


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=31, n_positions=12, n_embd=8, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).double().eval()
    model.set_attn_implementation("eager")
    params = {k: v.detach() for k, v in model.named_parameters()}
    labels = [3, 5, 7]

    def f(p, ids):
        logits = torch.func.functional_call(model, p, (ids,)).logits  # (B, T, V)
        return logits[:, -1, labels]

    return f, params


def test_key_bias_gradient_is_a_pure_rounding_residue():
    f, p = tiny_gpt2()
    x = torch.randint(0, 31, (3, 6), generator=torch.Generator().manual_seed(1))
    names = list(p)
    J = explicit_jacobian(f, p, x, names)
    sizes = [p[n].numel() for n in names]
    cols = dict(zip(names, torch.split(torch.arange(J.shape[1]), sizes)))
    d = p["transformer.h.0.attn.c_attn.bias"].numel() // 3
    key_cols = cols["transformer.h.0.attn.c_attn.bias"][d:2 * d]
    resid = J[:, key_cols].abs().max()
    scale = J.abs().amax(1).min()
    # exactly zero in exact arithmetic; in float64 at most a few ulps of the summands, far below the threshold
    assert float(resid) < 1e-14 * float(scale)
    assert float(resid) < SIGN_RTOL * float(scale)
    signed = sign_rows(J, SIGN_RTOL * J.abs().amax(1))
    assert torch.all(signed[:, key_cols] == 0)


@pytest.mark.parametrize("kernel", ["signgd", "asigngd"])
@pytest.mark.parametrize("implementation", ["jacobian", "streaming", "auto"])
def test_tiny_gpt2_sign_kernels_equal_the_oracle(kernel, implementation):
    f, p = tiny_gpt2()
    g = torch.Generator().manual_seed(2)
    x1, x2 = torch.randint(0, 31, (4, 6), generator=g), torch.randint(0, 31, (3, 6), generator=g)
    J1, J2 = explicit_jacobian(f, p, x1), explicit_jacobian(f, p, x2)
    for xb, Jb in ((x2, J2), (None, J1)):
        res = empirical_ntk(f, p, x1, xb, kernel=kernel, implementation=implementation, batch_size=2)
        ref = reference_kernel(kernel, J1, Jb)
        # with the rule both sides count the same coordinates as zero: what is left is float64 product rounding
        err = float((res.matrix() - ref).abs().max() / ref.abs().max())
        assert err <= 1e-12, (err, res.plan.describe())


def test_mirror_lower_makes_any_square_matrix_exactly_symmetric():
    m = torch.randn(7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    low = m.tril().clone()
    mirror_lower(m)
    assert torch.equal(m, m.T) and torch.equal(m.tril(), low)
    with pytest.raises(ValueError, match="square"):
        mirror_lower(torch.zeros(2, 3))


def tiny_gpt2_einsum_head(seed: int = 0):
    """The tiny GPT-2 body with its tied LM head written ``einsum(h, wte)``, which the factored engine does not
    capture: the token embedding is then an uncovered tensor (its kernel from the per-example engine)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=31, n_positions=12, n_embd=8, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).double().eval()
    model.set_attn_implementation("eager")
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, ids):
        body = {k[len("transformer."):]: v for k, v in p.items() if k.startswith("transformer.")}
        h = torch.func.functional_call(model.transformer, body, (ids,)).last_hidden_state[:, -1]  # (B, d)
        return torch.einsum("nd,vd->nv", h, p["transformer.wte.weight"])[:, [3, 5, 7]]

    return f, params


@pytest.mark.parametrize("uncovered", [False, True])
def test_fused_sign_scales_equal_the_separate_pass(monkeypatch, uncovered):
    """The factored engine takes the sign rule's row scales from the kernel's own captures (one capture pass
    fewer); the kernels are bit for bit those of the separate scale pass, with and without an uncovered remainder
    (whose own scale part still comes from per-example gradients)."""
    import theory.ntk as ntk

    f, p = tiny_gpt2_einsum_head(1) if uncovered else tiny_gpt2(1)
    g = torch.Generator().manual_seed(4)
    x1, x2 = torch.randint(0, 31, (5, 6), generator=g), torch.randint(0, 31, (4, 6), generator=g)
    J1, J2 = explicit_jacobian(f, p, x1), explicit_jacobian(f, p, x2)
    for xb, Jb in ((x2, J2), (None, J1)):
        fused = empirical_ntks(f, p, x1, xb, kernels=("sgd", "signgd", "asigngd"), implementation="factored")
        monkeypatch.setattr(ntk, "FUSE_SIGN_SCALES", False)
        separate = empirical_ntks(f, p, x1, xb, kernels=("sgd", "signgd", "asigngd"), implementation="factored")
        monkeypatch.setattr(ntk, "FUSE_SIGN_SCALES", True)
        for k in fused:
            a, b = fused[k], separate[k]
            assert a.plan.factored["sign_scales"].startswith("from the kernel's captures")
            assert b.plan.factored["sign_scales"] == "separate capture pass"
            assert set(a.plan.factored["uncovered"]) == ({"transformer.wte.weight"} if uncovered else set())
            assert torch.equal(a.kernel, b.kernel), k
            ref = reference_kernel(k, J1, Jb)
            assert float((a.matrix() - ref).abs().max() / ref.abs().max()) <= 1e-12
