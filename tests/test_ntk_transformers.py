"""The factored eNTK on Hugging Face transformers built from tiny configs (float64, eager attention), against
explicit Jacobians: GPT-2 (``Conv1D`` = ``addmm`` on ``x.view(-1, nx)``, position ids of shape (1, T) shared by
the batch, LM head tied to the token embedding), BERT as a masked LM (position ids from the (1, T) buffer, the
decoder tied to the word embeddings with its own bias) and BERT with a pooled classification head (a mapping batch
with an attention mask). Every tensor is captured (``plan.factored["uncovered"] == {}``), for the SGD, SignGD and
A-SignGD kernels, symmetric and not, in one tile, in example tiles and in groups of tensors.

The budgets that force tiles and groups are measured for these configs (transformers 5): each test asserts the
layout it meant to get, so a change of the models' capture sizes shows up as a failed layout assertion, not as
an untested path."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from theory.ntk import NTKMemoryError, empirical_ntk, empirical_ntks
from theory.ntk_factored import capture_block
from theory.oracles import explicit_jacobian, reference_kernel

transformers = pytest.importorskip("transformers")

KERNELS = ("sgd", "signgd", "asigngd")
LABELS = [3, 5, 7]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models: one torch thread (see ``tests/conftest.py``)."""


def tiny_gpt2(seed: int = 0, vocab: int = 31):
    """GPT2LMHeadModel, 2 layers of width 8; outputs: the label-word logits at the last position."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=12, n_embd=8, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    model.set_attn_implementation("eager")

    def f(p, ids):
        return torch.func.functional_call(model, p, (ids,)).logits[:, -1, LABELS]  # (B, T, V) -> (B, C)

    return f, {k: v.detach() for k, v in model.named_parameters()}, vocab


def _bert_config(vocab: int):
    return transformers.BertConfig(vocab_size=vocab, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=16, max_position_embeddings=16, type_vocab_size=2,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny_bert_mlm(seed: int = 0, vocab: int = 37, mask_pos: int = 2):
    """BertForMaskedLM; outputs: the label-word logits at the masked position."""
    torch.manual_seed(seed)
    model = transformers.BertForMaskedLM(_bert_config(vocab)).double().eval()
    model.set_attn_implementation("eager")

    def f(p, ids):
        return torch.func.functional_call(model, p, (ids,)).logits[:, mask_pos, LABELS]

    return f, {k: v.detach() for k, v in model.named_parameters()}, vocab


class PooledClassifier(nn.Module):
    """BertModel with its pooler (dense + tanh of the first token) and a linear head of C = 3 classes."""

    def __init__(self, vocab: int):
        super().__init__()
        self.bert = transformers.BertModel(_bert_config(vocab), add_pooling_layer=True)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        return self.head(self.bert(input_ids=input_ids, attention_mask=attention_mask).pooler_output)


def tiny_bert_pooled(seed: int = 0, vocab: int = 37):
    """The pooled classifier on a mapping batch {input_ids, attention_mask} (right padding)."""
    torch.manual_seed(seed)
    model = PooledClassifier(vocab).double().eval()
    model.bert.set_attn_implementation("eager")

    def f(p, batch):
        return torch.func.functional_call(model, p, (), dict(batch))

    return f, {k: v.detach() for k, v in model.named_parameters()}, vocab


MODELS = {"gpt2": tiny_gpt2, "bert_mlm": tiny_bert_mlm, "bert_pooled": tiny_bert_pooled}


def inputs(model: str, n: int, seed: int, vocab: int, T: int = 6):
    ids = torch.randint(1, vocab, (n, T), generator=torch.Generator().manual_seed(seed))
    if model != "bert_pooled":
        return ids
    mask = torch.ones(n, T, dtype=torch.long)
    mask[::2, T - 2:] = 0  # every other example padded by 2 tokens
    return {"input_ids": ids, "attention_mask": mask}


def jacobian(f, p, x):
    """Explicit (N*C, P) Jacobian, example by example (a mapping batch is sliced field by field)."""
    n = (x["input_ids"] if isinstance(x, dict) else x).shape[0]
    if not isinstance(x, dict):
        return explicit_jacobian(f, p, x)
    return torch.cat([explicit_jacobian(f, p, {k: v[i:i + 1] for k, v in x.items()}) for i in range(n)])


def assert_exact(res, kernel, J1, J2):
    ref = reference_kernel(kernel, J1, J2)
    err = float((res.matrix() - ref).abs().max() / ref.abs().max())
    assert err <= 1e-11, (err, res.plan.describe())  # float64 rounding of the products


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_tensor_is_captured(model):
    """GPT-2's Conv1D (addmm on a flattened (B*T, nx) view) and both models' (1, T) position embeddings are
    captured, so no tensor is left to the per-example engine; all three models factor entirely."""
    f, p, vocab = MODELS[model]()
    cap = capture_block(f, p, list(p), inputs(model, 3, 0, vocab), 3)
    assert cap.uncovered == {}
    captured = {u.name for u in cap.uses}
    assert captured == set(p), set(p) - captured
    if model == "gpt2":
        kinds = {(u.name.split(".")[-2], u.kind) for u in cap.uses}
        assert ("c_attn", "linear_t") in kinds and ("c_attn", "linear") in kinds  # addmm weight and bias
        assert any(u.name == "transformer.wpe.weight" and u.extra == (None, True) for u in cap.uses)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_factored_equals_explicit_jacobians(model, kernel):
    f, p, vocab = MODELS[model]()
    x1, x2 = inputs(model, 5, 1, vocab), inputs(model, 4, 2, vocab)
    J1, J2 = jacobian(f, p, x1), jacobian(f, p, x2)
    for xb, Jb in ((x2, J2), (None, J1)):
        res = empirical_ntk(f, p, x1, xb, kernel=kernel)
        assert res.plan.implementation == "factored" and res.plan.requested == "auto", res.plan.describe()
        assert res.plan.factored["uncovered"] == {} and res.plan.factored["covered_params"] == res.plan.num_params
        assert_exact(res, kernel, J1, Jb)
        if xb is None and kernel != "asigngd":
            assert torch.equal(res.matrix(), res.matrix().T)


def test_single_example_blocks_keep_position_ids_shared():
    """Blocks of one example are captured as a batch of two (a (1, T) index would otherwise look batched): the
    captured operations, and the kernel, are those of larger blocks."""
    f, p, vocab = tiny_gpt2(1)
    x = inputs("gpt2", 3, 3, vocab)
    J = jacobian(f, p, x)
    for kernel in ("sgd", "signgd"):
        res = empirical_ntk(f, p, x, kernel=kernel, implementation="factored", batch_size=1)
        assert res.plan.batch_size == 1 and res.plan.factored["uncovered"] == {}
        assert_exact(res, kernel, J, J)


# Budgets measured for these configs, N1 = 6, N2 = 4. A vocabulary of 193 makes the tied LM head's captures
# (C x T x V output gradients) the largest tensor's, so between "two examples' captures fit" and "one tensor's
# captures of every example fit" there is a window where only example tiles work (GPT-2: 1.73-1.78 MB,
# BERT: 1.71-1.74 MB); above it the tensors are captured in groups.
LAYOUTS = {("gpt2", "tiles"): 1_760_000, ("gpt2", "groups"): 2_020_000,
           ("bert_mlm", "tiles"): 1_725_000, ("bert_mlm", "groups"): 1_980_000}


@pytest.mark.parametrize("layout", ["tiles", "groups"])
@pytest.mark.parametrize("model", ["gpt2", "bert_mlm"])
def test_tiles_and_groups_are_exact(model, layout):
    """Budgets that force example tiles (inner tiles recaptured; sign scales from each tile's first capture) or
    groups of tensors (one capture pass per group; sign scales from a separate pass): every kernel exact."""
    f, p, vocab = MODELS[model](2, vocab=193)
    x1, x2 = inputs(model, 6, 4, vocab), inputs(model, 4, 5, vocab)
    J1, J2 = jacobian(f, p, x1), jacobian(f, p, x2)
    budget = LAYOUTS[(model, layout)]
    for xb, Jb in ((x2, J2), (None, J1)):
        res = empirical_ntks(f, p, x1, xb, kernels=KERNELS, implementation="factored", memory_budget=budget)
        for kernel, r in res.items():
            info = r.plan.factored
            if layout == "tiles":
                assert r.plan.num_tiles > 1 and info["capture_groups"] == 1, r.plan.describe()
                assert info["sign_scales"] == "from the kernel's captures"
            else:
                assert info["capture_groups"] > 1 and r.plan.num_tiles == 1, r.plan.describe()
                assert info["sign_scales"].startswith("separate capture pass")
            assert info["uncovered"] == {} and r.plan.estimated_peak_bytes <= budget
            assert_exact(r, kernel, J1, Jb)


def test_an_impossible_budget_names_the_sizes():
    f, p, vocab = tiny_gpt2()
    x = inputs("gpt2", 4, 6, vocab)
    with pytest.raises(NTKMemoryError) as exc:
        empirical_ntk(f, p, x, implementation="factored", memory_budget=1_200_000)
    msg = str(exc.value)
    P = sum(v.numel() for v in p.values())
    for piece in ("implementation='factored'", "N1=4", "N2=4", "C=3", f"P={P:,}", "per example", "needs at least"):
        assert piece in msg, msg


# ---------------------------------------------------------------------------------------------------------------
# The two new captures on plain functions, and the uses they must not claim
# ---------------------------------------------------------------------------------------------------------------

def _conv1d_lm(seed: int = 0, d: int = 6, T: int = 5, vocab: int = 11):
    gen = torch.Generator().manual_seed(seed)
    p = {"tok": torch.randn(vocab, d, generator=gen, dtype=torch.float64),
         "pos": torch.randn(T + 3, d, generator=gen, dtype=torch.float64),
         "w1": torch.randn(d, 2 * d, generator=gen, dtype=torch.float64) / d ** 0.5,  # Conv1D layout (nx, nf)
         "b1": torch.randn(2 * d, generator=gen, dtype=torch.float64),
         "w2": torch.randn(3, 2 * d, generator=gen, dtype=torch.float64) / d ** 0.5,  # nn.Linear layout (out, in)
         "b2": torch.randn(3, generator=gen, dtype=torch.float64)}
    return p


def test_addmm_and_shared_index_embeddings_on_plain_functions():
    """addmm(b, x.view(-1, nx), w) and addmm(b, x.reshape(-1, nx), w2.t()) with a 1-d and a (1, T) position index."""
    p = _conv1d_lm()

    def f(q, ids):
        B, T = ids.shape
        h = F.embedding(ids, q["tok"]) + F.embedding(torch.arange(T), q["pos"])  # (T,) index, shared
        h = h + F.embedding(torch.arange(T).unsqueeze(0), q["pos"])  # (1, T) index: a second use of pos
        h = torch.tanh(torch.addmm(q["b1"], h.view(-1, h.shape[-1]), q["w1"])).view(B, T, -1)
        z = torch.addmm(q["b2"], h.reshape(B * T, -1), q["w2"].t()).view(B, T, -1)
        return z.mean(1)

    x1 = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(1))
    x2 = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(2))
    J1, J2 = explicit_jacobian(f, p, x1), explicit_jacobian(f, p, x2)
    for kernel in KERNELS:
        for xb, Jb in ((x2, J2), (None, J1)):
            res = empirical_ntk(f, p, x1, xb, kernel=kernel, implementation="factored")
            assert res.plan.factored["uncovered"] == {}, res.plan.describe()
            assert_exact(res, kernel, J1, Jb)


def test_uses_that_are_not_captured_go_to_the_remainder():
    """Not claimed: addmm on rows that are not example-major (a (T, B) transpose flattened), a shared-index
    embedding used other than by a broadcast add, and a bias of another shape. Each such tensor is named
    uncovered, its kernel comes from the per-example engine, and the sum is exact (sign kernels included: the
    remainder's sign scales cover every selected tensor)."""
    p = _conv1d_lm(3)
    p["b_row"] = torch.randn(1, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def f(q, ids):
        B, T = ids.shape
        pe = F.embedding(torch.arange(T).unsqueeze(0), q["pos"])  # (1, T, d)
        h = F.embedding(ids, q["tok"]) + pe * 0.5  # pe scaled before the add: not a captured use
        hT = h.transpose(0, 1).reshape(T * B, -1)  # rows ordered (t, i): not example-major
        u = torch.tanh(torch.addmm(q["b1"], hT, q["w1"])).reshape(T, B, -1).transpose(0, 1)  # (B, T, 2d)
        z = torch.addmm(q["b_row"], u.reshape(B * T, -1), torch.eye(12, dtype=u.dtype))  # (1, nf) bias
        z = F.linear(z.view(B, T, -1), q["w2"], q["b2"])
        return z.mean(1)

    x = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(5))
    x2 = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(6))
    J, J2 = explicit_jacobian(f, p, x), explicit_jacobian(f, p, x2)
    for kernel in KERNELS:
        for xb, Jb in ((x2, J2), (None, J)):
            res = empirical_ntk(f, p, x, xb, kernel=kernel, implementation="factored")
            assert set(res.plan.factored["uncovered"]) == {"pos", "w1", "b1", "b_row"}, res.plan.describe()
            assert_exact(res, kernel, J, Jb)
