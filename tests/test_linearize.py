"""Linearisation diagnostics: the Taylor model against explicit Jacobians, gradient descent on it against the
closed-form kernel dynamics, tiny-step training of a wide network against kernel gradient flow."""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_ntk import make_mlp
from theory.oracles import explicit_jacobian as jacobian
from theory.linearize import linearization_report, linearize, loss_value, train
from theory.metrics import accuracy, relative_distance
from theory.ntk import empirical_ntk
from theory.solvers import gradient_flow

# torch.func's first forward-mode call scripts a helper with the deprecated torch.jit.script (torch internals)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs on one torch thread (see ``tests/conftest.py``)."""


def test_linearized_model_is_the_first_order_taylor_expansion():
    f, p = make_mlp(seed=0)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    delta = {k: 0.3 * torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in p.items()}
    f_lin = linearize(f, p)
    J = jacobian(f, p, x)  # (N*C, P)
    flat = torch.cat([delta[k].reshape(-1) for k in p])
    expected = f(p, x) + (J @ flat).reshape(4, 3)
    got = f_lin({k: p[k] + delta[k] for k in p}, x)
    assert torch.allclose(got, expected, atol=1e-12)
    # a partial mapping keeps the missing parameters at theta_0
    only = f_lin({"layer2.bias": p["layer2.bias"] + 1.0}, x)
    assert torch.allclose(only, f(p, x) + 1.0, atol=1e-12)


def test_gradient_descent_on_the_linearized_model_is_discrete_kernel_gradient_descent():
    """GD with rate eta on L = 1/(2N) ||f(X) - y||^2 for a model linear in theta moves the training outputs by
    f_{k+1} = f_k - (eta/N) K (f_k - y) and test outputs by -(eta/N) K_xX (f_k - y): exact, for any width."""
    f, p = make_mlp(seed=2, width=16)
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    Xt = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    eta, steps = 0.3, 25
    res = train(linearize(f, p), p, (X, y), steps=steps, lr=eta, loss="mse")
    K = empirical_ntk(f, p, torch.cat([X, Xt])).matrix()
    Ktr, Kx = K[:18, :18], K[18:, :18]
    ft, fx = f(p, X).reshape(-1), f(p, Xt).reshape(-1)
    for _ in range(steps):
        r = ft - y.reshape(-1)
        ft, fx = ft - eta / 6 * Ktr @ r, fx - eta / 6 * Kx @ r
    f_lin = linearize(f, p)
    assert torch.allclose(f_lin(res.params, X).reshape(-1), ft, atol=1e-10)
    assert torch.allclose(f_lin(res.params, Xt).reshape(-1), fx, atol=1e-10)


def test_tiny_learning_rate_sgd_on_a_wide_network_follows_kernel_gradient_flow():
    """A 2-layer tanh network of width 2048 (NTK scaling), lr 0.02 for 250 steps (flow time 5): the trained
    outputs agree with the closed-form kernel gradient flow of its initial eNTK to 1% of the distance moved.
    Slack: the finite-width deviation is at most O(1/sqrt(n)) ~ 2% (Lee et al. 2019) and typically O(1/n) ~ 0.05%
    (Dyer & Gur-Ari 2020); GD vs flow adds O(lr * lambda_max) ~ 0.1% here."""
    gen = torch.Generator().manual_seed(3)
    d, n, width = 4, 10, 2048
    p = {"W0": torch.randn(width, d, generator=gen, dtype=torch.float64),
         "W1": torch.randn(1, width, generator=gen, dtype=torch.float64)}

    def f(q, x):
        return torch.tanh(x @ q["W0"].T / math.sqrt(d)) @ q["W1"].T / math.sqrt(width)

    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    Xt = torch.randn(5, d, generator=gen, dtype=torch.float64)
    y = torch.sin(X.sum(1, keepdim=True))
    eta, steps = 0.02, 250
    res = train(f, p, (X, y), steps=steps, lr=eta, loss="mse")
    K = empirical_ntk(f, p, torch.cat([X, Xt]))
    f0 = K.outputs1
    gf = gradient_flow(K.kernel[:n, :, :n, :], y, steps, k_test_train=K.kernel[n:, :, :n, :], f0_train=f0[:n],
                       f0_test=f0[n:], lr=eta / n)
    with torch.no_grad():
        out = f(res.params, Xt)
    assert relative_distance(out - f0[n:], gf - f0[n:]) < 0.01
    assert res.losses[-1] < 0.5 * res.losses[0]  # it did train


def test_train_optimizers_masks_and_divergence():
    f, p = make_mlp(seed=4)
    gen = torch.Generator().manual_seed(4)
    x, labels = torch.randn(8, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen)
    # one SignGD step is theta - lr sign(grad)
    one = train(f, p, (x, labels), steps=1, lr=0.01, optimizer="signgd", loss="ce")
    q = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    loss_value(f(q, x), labels, "ce").backward()
    for k in p:
        assert torch.allclose(one.params[k], p[k] - 0.01 * q[k].grad.sign())
    # masks freeze the unselected entries; unselected tensors do not move
    mask = torch.zeros_like(p["layer0.weight"], dtype=torch.bool)
    mask[0] = True
    res = train(f, p, (x, labels), steps=5, lr=0.1, optimizer="adam", loss="ce",
                params_subset={"layer0.weight": mask})
    assert torch.equal(res.params["layer0.weight"][1:], p["layer0.weight"][1:])
    assert not torch.equal(res.params["layer0.weight"][0], p["layer0.weight"][0])
    assert torch.equal(res.params["layer2.weight"], p["layer2.weight"])
    assert res.losses[-1] < res.losses[0]
    with pytest.raises(FloatingPointError, match="diverged"):
        train(f, p, (x, torch.randn(8, 3, dtype=torch.float64) * 1e3), steps=60, lr=1e3, loss="mse")
    with pytest.raises(ValueError, match="optimizer"):
        train(f, p, (x, labels), steps=1, lr=0.1, optimizer="lbfgs")


def test_report_for_models_linear_in_the_trained_parameters():
    """Training only the last layer of an MLP is training a linear model: f and f_lin coincide exactly, the
    linearised model recovers all of the gain, and the kernel (of the head) does not move."""
    f, p = make_mlp(seed=5, width=32)
    gen = torch.Generator().manual_seed(5)
    x, labels = torch.randn(30, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (30,), generator=gen)
    head = ["layer2.weight", "layer2.bias"]
    rep = linearization_report(f, p, (x, labels), (x, labels), steps=40, lr=1.0, loss="ce", params_subset=head,
                               kernel_inputs=x)
    assert rep.output_distance < 1e-10 and rep.kernel_rel_change == 0.0 and rep.prediction_agreement == 1.0
    assert rep.acc_finetuned > rep.acc_zero_shot and rep.gain_recovered == pytest.approx(1.0)
    assert rep.acc_zero_shot == accuracy(f(p, x), labels)
    # training everything moves the kernel and separates f from f_lin
    full = linearization_report(f, p, (x, labels), (x, labels), steps=40, lr=1.0, loss="ce", kernel_inputs=x)
    assert full.kernel_rel_change > 1e-3 and full.output_distance > 1e-6
    assert set(rep.summary()) >= {"gain_recovered", "output_distance", "kernel_rel_change", "acc_finetuned"}
