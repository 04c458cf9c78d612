"""Fine-tuning (theory.finetune methods on real-task classifiers), the linearised model and the eNTK plumbing of
real_tasks on tiny random models.

Oracles: explicit per-example Jacobians (``torch.func.jacrev``) for the kernel; exactness of the linearisation
for parameters the output is linear in (a linear head) and its second-order error elsewhere; numpy
pseudo-inverses for the kernel machines read out of a union kernel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from real_tasks.data import Example, KShotSplit
from real_tasks.classify import encode_set, functional_outputs, linearized_scores, make_classifier
from real_tasks.entk import compute_kernel, kernel_union, solve_seed
from real_tasks.models import tiny_model
from real_tasks.prompts import PROMPTS, get_prompt, label_token_ids, words_of
from theory.finetune import Method, Optimizer, evaluate, finetune, restore, snapshot
from theory.metrics import accuracy
from theory.oracles import sign_tau

POS = ["the film was fun", "I liked it a lot", "a fun film", "liked the plot", "fun fun fun", "a lot of fun"]
NEG = ["dull boring movie", "the plot was thin", "boring and dull", "a dull film", "thin boring plot", "dull dull"]
WORDS = " ".join(POS + NEG).split() + words_of(PROMPTS.values())


def _examples():
    return [Example(t, 1) for t in POS] + [Example(t, 0) for t in NEG]


@pytest.fixture(scope="module")
def setup():
    lm = tiny_model("causal", WORDS, seed=1)
    p = get_prompt("SST-2")
    lt = label_token_ids(lm.tokenizer, p, "causal")
    data = encode_set(lm, _examples(), prompt=p, label_tokens=lt)
    return lm, p, lt, data


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.5), ("adam", 3e-3)])
def test_finetuning_fits_the_training_set_reproducibly(setup, optimizer, lr):
    lm, p, lt, data = setup
    theta0 = snapshot(lm.model)
    runs = []
    for _ in range(2):
        restore(lm.model, theta0)
        clf = make_classifier(lm, use_prompt=True, label_tokens=lt)
        method = Method(optimizer, Optimizer(optimizer, lr=lr), steps=20, batch_size=4, eval_every=5,
                        max_grad_norm=None)
        res = finetune(clf, data, method, seed=7, device="cpu", dev=data)
        runs.append((res, evaluate(clf, data, "cpu")))
    (r1, s1), (r2, s2) = runs
    assert [h["train_loss"] for h in r1.history] == [h["train_loss"] for h in r2.history]  # same seed, same run
    assert torch.equal(s1, s2)
    first = np.mean([h["train_loss"] for h in r1.history[:3]])
    last = np.mean([h["train_loss"] for h in r1.history[-3:]])
    assert last < first  # it learns
    assert r1.best_dev_acc == accuracy(s1, data.labels)  # the module was left at the selected checkpoint
    restore(lm.model, theta0)


def test_divergence_is_reported(setup):
    lm, p, lt, data = setup
    theta0 = snapshot(lm.model)
    clf = make_classifier(lm, use_prompt=True, label_tokens=lt)
    with pytest.raises(FloatingPointError, match="loss became"):
        finetune(clf, data, Method("sgd", Optimizer("sgd", lr=1e12), steps=20, batch_size=4, max_grad_norm=None),
                 seed=0, device="cpu")
    restore(lm.model, theta0)


def test_linearisation_exact_for_the_head_and_second_order_elsewhere(setup):
    lm, p, lt, data = setup
    theta0_lm = snapshot(lm.model)
    clf = make_classifier(lm, use_prompt=False, num_classes=2, head_seed=3)
    t0 = snapshot(clf)
    # f is linear in the head's (W, b): moving only them, the linearisation is exact.
    t1 = {k: v.clone() for k, v in t0.items()}
    t1["head.weight"] += torch.randn_like(t1["head.weight"])
    t1["head.bias"] += 0.3
    restore(clf, t1)
    lin, f0 = linearized_scores(clf, t0, t1, data, "cpu")
    torch.testing.assert_close(lin, evaluate(clf, data, "cpu"), atol=1e-5, rtol=1e-5)
    # Moving the body by eps d: error O(eps^2), so relative error (vs the change) halves with eps.
    gen = torch.Generator().manual_seed(0)
    d = {k: torch.randn(v.shape, generator=gen) * v.std().clamp_min(1e-3) for k, v in t0.items()}
    rel = []
    for eps in (2e-2, 1e-2):
        te = {k: t0[k] + eps * d[k] for k in t0}
        restore(clf, te)
        lin, f0 = linearized_scores(clf, t0, te, data, "cpu")
        f1 = evaluate(clf, data, "cpu")
        rel.append(float((lin - f1).norm() / (f1 - f0).norm()))
    # slack: the ratio is 2 only asymptotically; third-order terms move it by a few percent at these eps
    assert 1.6 < rel[0] / rel[1] < 2.4, rel
    restore(lm.model, theta0_lm)


def test_kernel_matches_explicit_jacobians(setup):
    lm, p, lt, data = setup
    clf = make_classifier(lm, use_prompt=True, label_tokens=lt)
    res = compute_kernel(clf, data, kernel="sgd", implementation="jacobian")
    f = functional_outputs(clf)
    params = {k: v.detach() for k, v in clf.named_parameters()}
    rows = []
    for i in range(len(data)):
        one = data.select([i])
        jac = torch.func.jacrev(lambda q: f(q, one)[0, 0])(params)
        rows.append(torch.cat([g.reshape(-1) for g in jac.values()]).double())
    J = torch.stack(rows)
    np.testing.assert_allclose(res["kernel"], (J @ J.T).numpy(), rtol=1e-5, atol=1e-7 * float((J @ J.T).abs().max()))
    asym = compute_kernel(clf, data, kernel="asigngd", implementation="jacobian")["kernel"]
    np.testing.assert_allclose(asym, (J @ sign_tau(J).T).numpy(), rtol=1e-5, atol=1e-5)
    out = evaluate(clf, data, "cpu")
    np.testing.assert_allclose(res["outputs"][:, 0], (out[:, 1] - out[:, 0]).numpy(), atol=1e-5)


def _split(seed, train_index, test):
    pool = {i: Example(f"t{i}", i % 2) for i in range(20)}
    return KShotSplit("SST-2", 1, seed, tuple(pool[i] for i in train_index), (), tuple(test),
                      tuple(train_index), (), tuple(range(len(test))))


def test_kernel_union_dedupes_and_maps_rows():
    test = [Example("x", 0), Example("y", 1)]
    u = kernel_union([_split(13, [4, 7], test), _split(21, [7, 9], test)])
    assert [e.text_a for e in u.examples] == ["x", "y", "t4", "t7", "t9"]
    assert u.test_rows == (0, 1) and u.train_rows == {13: (2, 3), 21: (3, 4)}
    with pytest.raises(ValueError, match="do not share"):
        kernel_union([_split(13, [4], test), _split(21, [7], test[:1])])


def test_solve_seed_reads_the_right_blocks():
    """Kernel regression read out of a union kernel equals the pseudo-inverse solution on the blocks."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(9, 4))
    K = X @ X.T
    f0 = rng.normal(size=(9, 1))
    labels = np.array([0, 1, 0, 1, 1, 0, 1, 0, 1])
    train, test = [2, 5, 7], [0, 1, 8]
    out = solve_seed(K, K + 0.1 * X @ np.sign(X).T, f0, labels, train, test)
    y = np.where(labels[train] > 0, 1.0, -1.0)[:, None]
    ref = f0[test] + K[np.ix_(test, train)] @ np.linalg.pinv(K[np.ix_(train, train)]) @ (y - f0[train])
    np.testing.assert_allclose(out["K-SGD"], ref, rtol=1e-8, atol=1e-10)
    assert set(out) == {"K-SGD", "K-SGD (logistic)", "K-A-SignGD"}
    assert out["K-A-SignGD"].shape == (3, 1)
