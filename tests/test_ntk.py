"""The eNTK engine against explicit Jacobians, kernel identities, parameter subsets, and the memory planner
(peak memory measured in a fresh process)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import REPO
from theory.ntk import NTKMemoryError, empirical_ntk, empirical_ntk_fn, select_parameters
from theory.oracles import explicit_jacobian as jacobian
from theory.oracles import reference_kernel as reference


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs on one torch thread (see ``tests/conftest.py``)."""


def make_mlp(seed: int = 0, d: int = 5, width: int = 7, C: int = 3, dtype=torch.float64, einsum: bool = False):
    """A 2-hidden-layer tanh MLP as a pure function of a parameter dict. With ``einsum`` the weights enter through
    ``torch.einsum``, which the factored engine does not capture, so "auto" plans with the per-example engine."""
    gen = torch.Generator().manual_seed(seed)
    dims = [d, width, width, C]
    p = {}
    for i in range(3):
        p[f"layer{i}.weight"] = (torch.randn(dims[i + 1], dims[i], generator=gen, dtype=torch.float64)
                                 / math.sqrt(dims[i])).to(dtype)
        p[f"layer{i}.bias"] = torch.randn(dims[i + 1], generator=gen, dtype=torch.float64).to(dtype)

    def f(q, x):
        h = x
        for i in range(3):
            w = q[f"layer{i}.weight"]
            h = (torch.einsum("nd,ed->ne", h, w) if einsum else h @ w.T) + q[f"layer{i}.bias"]
            if i < 2:
                h = torch.tanh(h)
        return h

    return f, p


@pytest.mark.parametrize("kernel", ["sgd", "signgd", "asigngd"])
@pytest.mark.parametrize("implementation", ["jacobian", "streaming", "auto"])
@pytest.mark.parametrize("per_example", ["vmap", "loop"])
def test_every_implementation_equals_explicit_jacobians(kernel, implementation, per_example):
    f, p = make_mlp()
    gen = torch.Generator().manual_seed(1)
    x1 = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    x2 = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    J1, J2 = jacobian(f, p, x1), jacobian(f, p, x2)
    for xb, Jb, bs in ((x2, J2, 2), (None, J1, 2), (None, J1, 5)):
        res = empirical_ntk(f, p, x1, xb, kernel=kernel, implementation=implementation, per_example=per_example,
                            batch_size=bs)
        ref = reference(kernel, J1, Jb)
        assert res.kernel.shape == (5, 3, Jb.shape[0] // 3, 3) and res.kernel.dtype == torch.float64
        assert torch.allclose(res.matrix(), ref, rtol=1e-12, atol=1e-12), res.plan.describe()
        if implementation == "auto":  # x @ W.T + b is captured: auto factors (tests/test_ntk_factored.py)
            assert res.plan.implementation == "factored" and res.plan.factored["uncovered"] == {}
        else:
            assert res.plan.per_example == per_example and res.plan.implementation == implementation
        assert torch.allclose(res.outputs1, f(p, x1))


@pytest.mark.parametrize("kernel", ["sgd", "signgd", "asigngd"])
def test_tiled_streaming_is_exact(kernel):
    """A budget with room for about two stored examples forces the training side into several tiles."""
    f, p = make_mlp(seed=3)
    gen = torch.Generator().manual_seed(2)
    x1 = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    x2 = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    J1, J2 = jacobian(f, p, x1), jacobian(f, p, x2)
    for xb, Jb in ((x2, J2), (None, J1)):
        res = empirical_ntk(f, p, x1, xb, kernel=kernel, implementation="streaming", memory_budget=(1 << 20) + 16000)
        assert res.plan.num_tiles > 1
        assert torch.allclose(res.matrix(), reference(kernel, J1, Jb), rtol=1e-12, atol=1e-12)


def test_mapping_batches_and_closure():
    """Batches may be mappings of tensors (plus non-tensor values), as for language-model inputs."""
    f, p = make_mlp(seed=4)

    def g(q, batch):
        return f(q, batch["x"] * batch["scale"]) + batch["offset"].unsqueeze(1)

    gen = torch.Generator().manual_seed(3)
    batch = {"x": torch.randn(4, 5, generator=gen, dtype=torch.float64),
             "offset": torch.randn(4, generator=gen, dtype=torch.float64), "scale": 2.0}
    J = jacobian(lambda q, x: f(q, x * 2.0), p, batch["x"])
    ntk = empirical_ntk_fn(g, kernel="sgd")
    assert torch.allclose(ntk(p, batch).matrix(), J @ J.T, atol=1e-12)
    assert torch.allclose(ntk(p, batch, per_example="loop").matrix(), J @ J.T, atol=1e-12)
    with pytest.raises(ValueError, match="disagree on the number of examples"):
        empirical_ntk(g, p, {"x": batch["x"], "offset": batch["offset"][:3], "scale": 2.0})


@settings(max_examples=15)
@given(n=st.integers(1, 6), d=st.integers(1, 5), C=st.integers(1, 4), seed=st.integers(0, 2**31 - 1),
       bias=st.booleans())
def test_linear_model_kernel_is_gram_times_identity(n, d, C, seed, bias):
    """f(x) = W x (+ b): d f_c / d W_{c'k} = delta_{cc'} x_k, so K = (X X^T (+ 1)) (x) I_C exactly."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    p = {"W": torch.randn(C, d, generator=gen, dtype=torch.float64)}
    if bias:
        p["b"] = torch.randn(C, dtype=torch.float64, generator=gen)
    K = empirical_ntk(lambda q, x: x @ q["W"].T + (q["b"] if bias else 0), p, X).kernel
    ref = torch.einsum("ij,ab->iajb", X @ X.T + (1.0 if bias else 0.0), torch.eye(C, dtype=torch.float64))
    assert torch.allclose(K, ref, atol=1e-12)
    Ks = empirical_ntk(lambda q, x: x @ q["W"].T + (q["b"] if bias else 0), p, X, kernel="signgd").kernel
    refs = torch.einsum("ij,ab->iajb", X.sign() @ X.sign().T + (1.0 if bias else 0.0),
                        torch.eye(C, dtype=torch.float64))
    assert torch.allclose(Ks, refs, atol=1e-12)


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 10))
def test_sgd_and_signgd_kernels_are_symmetric_psd(seed, n):
    f, p = make_mlp(seed=seed % 1000)
    x = torch.randn(n, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for kernel in ("sgd", "signgd"):
        M = empirical_ntk(f, p, x, kernel=kernel, batch_size=3).matrix()
        assert torch.equal(M, M.T)  # the symmetric path mirrors one triangle
        ev = torch.linalg.eigvalsh(M)
        assert float(ev.min()) >= -1e-10 * float(ev.abs().max())  # Gram matrix: PSD up to rounding
    A = empirical_ntk(f, p, x, kernel="asigngd").matrix()
    assert not torch.allclose(A, A.T)  # the asymmetric kernel is not mirrored


def test_parameter_subsets_and_exact_decompositions():
    f, p = make_mlp(seed=5)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    head = ["layer2.weight", "layer2.bias"]
    backbone = [n for n in p if n not in head]
    K_all = empirical_ntk(f, p, x).matrix()
    K_head = empirical_ntk(f, p, x, params_subset=head).matrix()
    K_back = empirical_ntk(f, p, x, params_subset=lambda name: not name.startswith("layer2")).matrix()
    assert torch.equal(K_back, empirical_ntk(f, p, x, params_subset=backbone).matrix())  # predicate == names
    assert torch.allclose(K_all, K_head + K_back, rtol=1e-13, atol=1e-13)  # LP-FT decomposition
    Jh = jacobian(f, p, x, head)
    assert torch.allclose(K_head, Jh @ Jh.T, atol=1e-12)
    # masks: a random split of every tensor into two disjoint halves also decomposes the kernel
    gen = torch.Generator().manual_seed(6)
    masks = {n: torch.rand(v.shape, generator=gen) < 0.5 for n, v in p.items()}
    K_m = empirical_ntk(f, p, x, params_subset=masks).matrix()
    K_c = empirical_ntk(f, p, x, params_subset={n: ~m for n, m in masks.items()}).matrix()
    assert torch.allclose(K_all, K_m + K_c, rtol=1e-13, atol=1e-13)
    J = jacobian(f, p, x)
    cols = torch.cat([m.reshape(-1) for m in masks.values()])
    assert torch.allclose(K_m, J[:, cols] @ J[:, cols].T, atol=1e-12)
    for kernel in ("signgd", "asigngd"):  # signs act entrywise, so masked SignGD kernels decompose too
        full = empirical_ntk(f, p, x, kernel=kernel).matrix()
        parts = sum(empirical_ntk(f, p, x, kernel=kernel, params_subset=s).matrix()
                    for s in (masks, {n: ~m for n, m in masks.items()}))
        assert torch.allclose(full, parts, atol=1e-12)
    sel = select_parameters(p, {"layer0.weight": masks["layer0.weight"], "layer1.bias": True})
    assert sel.names == ("layer0.weight", "layer1.bias")
    assert sel.num_params == int(masks["layer0.weight"].sum()) + 7
    with pytest.raises(KeyError, match="unknown parameter"):
        select_parameters(p, ["nope"])
    with pytest.raises(ValueError, match="bool mask of shape"):
        select_parameters(p, {"layer0.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="selects no parameter"):
        select_parameters(p, lambda name: False)


def test_float32_gradients_with_float64_accumulation():
    f, p64 = make_mlp(seed=7, width=64)
    p32 = {k: v.float() for k, v in p64.items()}
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    exact = empirical_ntk(f, p64, x).kernel
    res = empirical_ntk(f, p32, x.float())
    assert res.kernel.dtype == torch.float64 and res.plan.grad_dtype == "float32"
    assert float((res.kernel - exact).norm() / exact.norm()) < 1e-6
    low = empirical_ntk(f, p32, x.float(), dtype=torch.float32)
    assert low.kernel.dtype == torch.float32


def test_planner_reports_and_errors():
    f, p = make_mlp(seed=8, width=200, einsum=True)  # P ~ 42k float64: 1 MB of gradient rows per example
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    res = empirical_ntk(f, p, x, memory_budget=1 << 30)
    assert res.plan.implementation == "streaming" and res.plan.num_tiles == 1
    text = res.plan.describe()
    assert "streaming" in text and "N1=40" in text and "C=3" in text and "budget" in text
    assert res.plan.estimated_peak_bytes <= res.plan.memory_budget
    # exact streaming fits only in many tiles (8 here): auto still prefers it to a sketch, exact, and says why
    res = empirical_ntk(f, p, x, x[:30], memory_budget=8 << 20)
    assert res.plan.implementation == "streaming" and res.plan.num_tiles == 8, res.plan.describe()
    assert "8 tiles" in res.plan.reason and "exact is preferred" in res.plan.reason and res.error_bound is None
    J1, J2 = jacobian(f, p, x), jacobian(f, p, x[:30])
    assert torch.allclose(res.matrix(), J1 @ J2.T, rtol=1e-12, atol=1e-12)
    # no exact plan fits but a sketch does: auto sketches. With C=6 outputs one stored example and one block need
    # 8.05 MiB, a dim-64 sketch 7.44 MiB (the sketch stores no gradient row; its hashes are per column)
    f6, p6 = make_mlp(seed=8, width=200, C=6, einsum=True)
    res = empirical_ntk(f6, p6, x, x[:30], memory_budget=8_100_000)
    assert res.plan.implementation == "sketch" and res.error_bound is not None, res.plan.describe()
    assert "no exact plan fits" in res.plan.reason and "8.05 MiB" in res.plan.reason
    # an impossible budget is a clear error naming the sizes
    with pytest.raises(NTKMemoryError) as exc:
        empirical_ntk(f, p, x, memory_budget=100_000)
    msg = str(exc.value)
    for piece in ("N1=40", "C=3", f"P={sum(v.numel() for v in p.values()):,}", "needs at least", "97.7 KiB"):
        assert piece in msg, msg
    with pytest.raises(NTKMemoryError, match="implementation='jacobian'"):
        empirical_ntk(f, p, x, implementation="jacobian", memory_budget=4 << 20)
    res = empirical_ntk(f, p, x, implementation="streaming", batch_size=40, memory_budget=48 << 20)
    assert res.plan.batch_size < 40 and "batch_size reduced" in res.plan.reason


def test_bad_inputs_are_named():
    f, p = make_mlp()
    x = torch.randn(3, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="kernel must be one of"):
        empirical_ntk(f, p, x, kernel="adam")
    with pytest.raises(ValueError, match="implementation must be one of"):
        empirical_ntk(f, p, x, implementation="fast")
    with pytest.raises(ValueError, match=r"must return a \(B, C\) tensor"):
        empirical_ntk(lambda q, z: f(q, z).sum(1), p, x)


def test_models_vmap_cannot_batch_fall_back_to_a_loop():
    f, p = make_mlp(seed=9)

    def g(q, x):  # data-dependent Python control flow: vmap cannot batch .item()
        out = f(q, x)
        return out * 2 if float(x.sum().item()) > 0 else out

    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    res = empirical_ntk(g, p, x, implementation="streaming")
    assert res.plan.per_example == "loop" and "vmap failed" in res.plan.reason
    J = torch.cat([jacobian(g, p, x[i:i + 1]) for i in range(4)])
    assert torch.allclose(res.matrix(), J @ J.T, atol=1e-12)


def test_progress_bar_runs(capsys):
    f, p = make_mlp()
    x = torch.randn(4, 5, dtype=torch.float64)
    empirical_ntk(f, p, x, progress=True, batch_size=2)
    assert "eNTK" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    f, p = make_mlp(seed=10)
    x = torch.randn(6, 5, dtype=torch.float64)
    cpu = empirical_ntk(f, p, x).kernel
    gpu = empirical_ntk(f, p, x, device="cuda")
    assert gpu.plan.device.startswith("cuda") and torch.allclose(gpu.kernel, cpu, atol=1e-12)


# The measurement runs in a fresh interpreter whose C allocator returns every allocation above 64 KiB to the
# kernel on free (fixed mmap threshold), so peak resident memory (VmHWM, reset through /proc/self/clear_refs)
# sees every tensor the engine allocates.
_MEMORY_SCRIPT = textwrap.dedent("""
    import json, torch
    from theory.memory import PeakMemory
    from theory.ntk import empirical_ntk
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    dims = [32, 384, 384, 4]  # P = 163k float32 parameters: 2.6 MB of gradient rows per example (C = 4)
    p = {}
    for i in range(3):
        p[f"w{i}"] = torch.randn(dims[i + 1], dims[i], generator=gen) / dims[i] ** 0.5
        p[f"b{i}"] = torch.zeros(dims[i + 1])
    def f(q, x):  # einsum: not captured, so "auto" plans with the per-example engine
        h = x
        for i in range(3):
            h = torch.einsum("nd,ed->ne", h, q[f"w{i}"]) + q[f"b{i}"]
            h = torch.tanh(h) if i < 2 else h
        return h
    def g(q, x):  # the same model written x @ W.T: factored
        h = x
        for i in range(3):
            h = h @ q[f"w{i}"].T + q[f"b{i}"]
            h = torch.tanh(h) if i < 2 else h
        return h
    x1, x2 = torch.randn(24, 32, generator=gen), torch.randn(16, 32, generator=gen)
    for impl in ("streaming", "sketch", "jacobian", "factored"):  # warm-up: load every code path once
        empirical_ntk(g if impl == "factored" else f, p, x1[:2], x2[:2], implementation=impl)
        empirical_ntk(g if impl == "factored" else f, p, x1[:2], implementation=impl)
    out = []
    for impl, budget, sym in (("streaming", 24 << 20, False), ("streaming", 48 << 20, True),
                              ("auto", 16 << 20, False), ("sketch", 16 << 20, True), ("factored", 12 << 20, True),
                              ("factored", 12 << 20, False), ("auto", 9 << 20, False), ("jacobian", None, False)):
        with PeakMemory() as pm:
            r = empirical_ntk(g if impl == "factored" else f, p, x1, None if sym else x2, implementation=impl,
                              memory_budget=budget)
        out.append(dict(impl=impl, chosen=r.plan.implementation, tiles=r.plan.num_tiles, budget=budget,
                        peak=pm.peak_bytes, method=pm.method, estimate=r.plan.estimated_peak_bytes))
    print(json.dumps(out))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_measured_peak_memory_stays_under_the_budget():
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(r["method"] == "VmHWM" for r in rows)
    for r in rows[:-1]:
        assert r["peak"] <= r["budget"], r
        assert r["estimate"] <= r["budget"], r
    assert rows[0]["tiles"] > 1
    assert rows[2]["chosen"] == "streaming" and rows[2]["tiles"] > 1  # auto: exact in tiles while they fit
    assert rows[4]["chosen"] == rows[5]["chosen"] == "factored"
    assert rows[6]["chosen"] == "sketch"  # auto: a sketch only when no exact plan fits
    # The measurement sees the memory: materialising every gradient row (40 examples x 2.6 MB) exceeds the
    # budgets above, and the measured peak is at least the bytes of those rows.
    jac = rows[-1]
    assert jac["peak"] >= 40 * 4 * 163_460 * 4 * 0.95 > rows[0]["budget"]
