"""Fine-tuning methods as values (theory/finetune.py), each against an oracle: a hand-written SGD loop (the LM-BFF
protocol spelled out), scikit-learn's logistic regression for a head trained on frozen features, the closed form
of a SignGD step, and bit-identity of every entry a method must not move (masks under AdamW's weight decay,
frozen backbones, LoRA's base weights)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from theory.finetune import (Head, Method, Optimizer, Params, Proximal, Regularizer, TensorData, evaluate, finetune,
                             restore, snapshot)
from theory.metrics import accuracy


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny tensors: one torch thread (see ``tests/conftest.py``)."""


class Net(nn.Module):
    """A feature map and a linear head: f(x) = V phi(x) + b, phi a tanh layer (the LP-FT classifier shape)."""

    def __init__(self, d=5, h=7, C=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(d, h)
        self.head = nn.Linear(h, C)

    def features(self, x):
        return torch.tanh(self.body(x))

    def forward(self, x):
        return self.head(self.features(x))


def _data(n=24, d=5, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long() * (C > 2)
    return TensorData(x, y)


def _sgd(lr=0.1, steps=12, bs=4, **kw):
    return Method("sgd", Optimizer("sgd", lr=lr), steps=steps, batch_size=bs, **kw)


def test_sgd_equals_a_hand_written_loop():
    """The LM-BFF protocol spelled out: per-epoch permutations from a seeded generator, cross-entropy in float32,
    clipping at 1, SGD, linear decay; validation every 3 steps, best (earliest) checkpoint kept."""
    data, dev = _data(seed=1), _data(n=12, seed=2)
    net = Net(seed=3)
    theta0 = snapshot(net)
    res = finetune(net, data, _sgd(lr=0.5, steps=10, bs=5, eval_every=3), seed=7, dev=dev)
    ours = snapshot(net)

    ref = Net(seed=3)
    restore(ref, theta0)
    opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / 10))
    torch.manual_seed(7)
    gen = torch.Generator().manual_seed(7)
    perm, cursor, best, losses = torch.randperm(len(data), generator=gen), 0, (-1.0, None), []
    for step in range(1, 11):
        if cursor >= len(data):
            perm, cursor = torch.randperm(len(data), generator=gen), 0
        idx = perm[cursor:cursor + 5]
        cursor += 5
        loss = nn.functional.cross_entropy(ref(data.select(idx)).float(), data.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 3 == 0 or step == 10:
            with torch.no_grad():
                acc = accuracy(ref(dev.inputs), dev.labels)
            if acc > best[0]:
                best = (acc, snapshot(ref) if step != 10 else None)
    if best[1] is not None:
        restore(ref, best[1])
    assert [h["train_loss"] for h in res.history] == losses
    assert all(torch.equal(ours[k], v) for k, v in snapshot(ref).items())
    assert res.best_dev_acc == best[0]


def test_same_seed_same_run_and_the_callers_rng_is_untouched():
    data = _data()
    states = []
    for _ in range(2):
        net = Net(seed=0)
        net.train()
        before = torch.random.get_rng_state()
        finetune(net, data, _sgd(), seed=5)
        assert torch.equal(torch.random.get_rng_state(), before)
        states.append(snapshot(net))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("fused", [False, True])
def test_masked_entries_stay_bit_identical_under_adamw_decay(fused):
    net = Net(seed=1)
    theta0 = snapshot(net)
    g = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(p.shape, generator=g) < 0.3 for n, p in net.named_parameters()}
    method = Method("sparse", Optimizer("adamw", lr=0.05, weight_decay=0.5, fused=fused), steps=15, batch_size=6,
                    params=Params(masks=masks), max_grad_norm=1.0)
    res = finetune(net, _data(), method, seed=0)
    for n, p in net.named_parameters():
        assert torch.equal(p.detach()[~masks[n]], theta0[n][~masks[n]]), n
        if masks[n].any():
            assert not torch.equal(p.detach()[masks[n]], theta0[n][masks[n]]), n  # the others moved
    assert res.trainable_entries == sum(int(m.sum()) for m in masks.values())


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_fused_adam_follows_the_default_kernel_to_rounding(name):
    """The fused kernel computes the same update in another order: after 15 steps the parameters agree with the
    default kernel's to float32 rounding amplified by 15 steps (rtol 1e-4), and its key differs only when on."""
    runs = []
    for fused in (False, True):
        net = Net(seed=2)
        finetune(net, _data(), Method("a", Optimizer(name, lr=0.01, weight_decay=0.1, fused=fused), steps=15,
                                      batch_size=6), seed=0)
        runs.append(snapshot(net))
    for k in runs[0]:
        torch.testing.assert_close(runs[1][k], runs[0][k], rtol=1e-4, atol=1e-6)
    assert "fused" not in Method("a", Optimizer(name), steps=1).describe()["optimizer"]
    assert Method("a", Optimizer(name, fused=True), steps=1).describe()["optimizer"]["fused"] is True


def test_linear_probe_moves_only_the_head_and_matches_logistic_regression():
    """Head only (LP) with an L2 regularizer on V: the objective is strongly convex in (V, b), so full-batch
    gradient descent converges to scikit-learn's L2 logistic regression on the frozen features."""
    from sklearn.linear_model import LogisticRegression

    data = _data(n=40, C=3, seed=4)
    net = Net(seed=2).double()
    data = TensorData(data.inputs.double(), data.labels)
    theta0 = snapshot(net)
    lam = 0.05
    l2 = Regularizer("l2-head", lam / 2, lambda m, b, out, y: (m.head.weight ** 2).sum())
    method = Method("lp", Optimizer("sgd", lr=2.0, schedule="constant"), steps=3000, batch_size=40,
                    params=Params.only("head.*"), regularizers=(l2,), max_grad_norm=None, head=Head("zero"))
    finetune(net, data, method, seed=0)
    assert torch.equal(net.body.weight, theta0["body.weight"]) and torch.equal(net.body.bias, theta0["body.bias"])
    with torch.no_grad():
        feats = net.features(data.inputs).numpy()
    # sklearn minimises C * sum_i loss_i + ||w||^2 / 2 = n C (mean loss + ||w||^2 / (2 n C)): C = 1 / (n lam)
    ref = LogisticRegression(C=1.0 / (len(data) * lam), tol=1e-12, max_iter=10_000).fit(feats, data.labels.numpy())
    np.testing.assert_allclose(net.head.weight.detach().numpy() - net.head.weight.detach().numpy().mean(0),
                               ref.coef_ - ref.coef_.mean(0), atol=2e-4)


def test_head_starts():
    net = Net(seed=0)
    finetune(net, _data(), _sgd(steps=1, lr=1e-12, head=Head("zero")), seed=0)
    assert float(net.head.weight.detach().abs().max()) < 1e-9
    w = {"weight": torch.full((3, 7), 0.5), "bias": torch.arange(3.0)}
    finetune(net, _data(), _sgd(steps=1, lr=1e-12, head=Head("given", weights=w, scale=2.0)), seed=0)
    assert torch.allclose(net.head.weight, torch.full((3, 7), 1.0)) and torch.allclose(net.head.bias, torch.arange(3.0))
    finetune(net, _data(), _sgd(steps=1, lr=1e-12, head=Head("random", seed=3, std=0.1)), seed=0)
    assert 0.03 < float(net.head.weight.std()) < 0.3 and float(net.head.bias.abs().max()) < 1e-9
    with pytest.raises(ValueError, match="do not match"):
        finetune(net, _data(), _sgd(head=Head("given", weights={"weight": w["weight"]})), seed=0)


def test_signgd_step_is_minus_lr_times_the_sign_of_the_gradient():
    net = Net(seed=4)
    data = _data(n=8)
    theta0 = snapshot(net)
    ref = Net(seed=4)
    restore(ref, theta0)
    loss = nn.functional.cross_entropy(ref(data.inputs).float(), data.labels)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    method = Method("signgd", Optimizer("signgd", lr=0.01, schedule="constant"), steps=1, batch_size=8,
                    max_grad_norm=None)
    finetune(net, data, method, seed=0)
    for (n, p), g in zip(net.named_parameters(), grads):
        torch.testing.assert_close(p.detach(), theta0[n] - 0.01 * g.sign(), rtol=0, atol=1e-7)


def test_proximal_anchors_pull_towards_the_anchor():
    data = _data()
    free = Net(seed=5)
    theta0 = snapshot(free)
    finetune(free, data, _sgd(lr=0.5, steps=30), seed=0)
    moved = sum(float((p.detach() - theta0[n]).norm()) for n, p in free.named_parameters())
    for prox in (Proximal("l2", mu=50.0), Proximal("bregman", mu=50.0, anchor="moving", beta=0.9, update_every=5)):
        net = Net(seed=5)
        finetune(net, data, _sgd(lr=0.5, steps=30, proximal=prox), seed=0)
        pulled = sum(float((p.detach() - theta0[n]).norm()) for n, p in net.named_parameters())
        assert pulled < 0.5 * moved, (prox, pulled, moved)
    # the vanilla Bregman anchor updated every step is theta_t itself: its term and gradient vanish
    same = Net(seed=5)
    finetune(same, data, _sgd(lr=0.5, steps=30, proximal=Proximal("bregman", mu=50.0, anchor="moving")), seed=0)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(same.parameters(), free.parameters()))


def test_lora_moves_only_the_adapter():
    from peft import LoraConfig

    net = Net(seed=6)
    theta0 = snapshot(net)
    method = Method("lora", Optimizer("adam", lr=0.05), steps=10, batch_size=6,
                    params=Params.lora(LoraConfig(r=2, lora_alpha=4, target_modules=["body"]), also=("head.*",)))
    before = evaluate(net, _data(), "cpu")
    finetune(net, _data(), method, seed=0)
    names = dict(net.named_parameters())
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    base = [n for n in names if n.startswith("body.") and "lora" not in n]
    assert base and all(torch.equal(names[n].detach(), theta0[n.replace("base_layer.", "")]) for n in base)
    assert not torch.allclose(evaluate(net, _data(), "cpu"), before)


def test_bad_methods_are_named():
    with pytest.raises(ValueError, match="lr must be > 0"):
        Optimizer("sgd", lr=0.0)
    with pytest.raises(ValueError, match="steps and batch_size"):
        Method("m", Optimizer(), steps=0)
    with pytest.raises(ValueError, match="no parameter matches"):
        finetune(Net(), _data(), _sgd(params=Params.only("nothing.*")), seed=0)
    with pytest.raises(ValueError, match=r"masks\['head.weight'\]"):
        finetune(Net(), _data(), _sgd(params=Params(masks={"head.weight": torch.ones(2, 2, dtype=torch.bool)})),
                 seed=0)


def test_divergence_is_reported():
    with pytest.raises(FloatingPointError, match="loss became"):
        finetune(Net(), _data(), _sgd(lr=1e38, max_grad_norm=None), seed=0)


def test_schedules():
    o = Optimizer("sgd", lr=1.0, schedule="linear")
    assert [o.factor(s, 4) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    c = Optimizer("sgd", lr=1.0, schedule="cosine", warmup_steps=2)
    assert c.factor(0, 10) == 0.5 and c.factor(1, 10) == 1.0 and c.factor(2, 10) == 1.0
    assert math.isclose(c.factor(6, 10), 0.5) and c.factor(10, 10) == 0.0
