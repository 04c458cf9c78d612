"""Prompts, label words, tiny models and the classifiers whose outputs are fine-tuned and whose eNTK is taken.

Oracles: the plain Hugging Face forward on one unpadded example (for padding, masks and the scored position),
teacher-forced log-probabilities computed one continuation at a time (for ``label_mode="sum"``), and the
word-level tokenizer's vocabulary (for template encodings).
"""

from __future__ import annotations

import pytest
import torch

from real_tasks.data import TASKS, Example
from real_tasks.classify import encode_set, make_classifier
from theory.finetune import evaluate
from real_tasks.models import (LinearHeadClassifier, PromptClassifier, attention_mask_4d, collate, kernel_outputs,
                               load_model, tiny_model, trim_batch)
from real_tasks.prompts import (PROMPTS, LabelTokens, Prompt, encode_prompt, get_prompt, label_token_ids, render,
                                words_of)

WORDS = ("the film was fun and the plot was thin but I liked it a lot ; dull boring movie ? what who where "
         "how many is are . , ! man woman").split() + words_of(PROMPTS.values())

EXAMPLES = [Example("the film was fun .", 1), Example("dull boring movie", 0),
            Example("the plot was thin but I liked it a lot ; the film was fun and the plot was thin .", 1),
            Example("a man is a woman", 0, "the man was fun .")]


@pytest.fixture(scope="module")
def tiny():
    return {kind: tiny_model(kind, WORDS, seed=0) for kind in ("causal", "masked", "encoder")}


def test_every_task_has_a_prompt_with_one_word_per_label():
    assert set(PROMPTS) == set(TASKS)
    for name, spec in TASKS.items():
        p = get_prompt(name)
        assert len(p.label_words) == spec.num_labels
        assert p.template.count("[MASK]") == 1 and p.causal_template.rstrip().endswith("[MASK]")
        assert ("<S2" in p.template) == spec.pair == ("<S2" in p.causal_template)


def test_template_mistakes_are_rejected():
    with pytest.raises(ValueError, match="exactly one"):
        Prompt("X", "<S1> no mask", "<S1> [MASK]", ("a", "b"))
    with pytest.raises(ValueError, match="must end"):
        Prompt("X", "<S1> [MASK] .", "[MASK] <S1>", ("a", "b"))


def test_causal_prompt_is_the_prefix_before_the_label_word(tiny):
    tok = tiny["causal"].tokenizer
    p = get_prompt("SST-2")
    e = encode_prompt(tok, p, EXAMPLES[0], "causal")
    assert tok.convert_ids_to_tokens(list(e.input_ids)) == "the film was fun . It was".split()
    assert e.pred_pos == len(e.input_ids) - 1
    assert render(p, EXAMPLES[0], "causal") == "the film was fun . It was [MASK]"


def test_masked_prompt_has_mask_and_special_tokens(tiny):
    tok = tiny["masked"].tokenizer
    p = get_prompt("TREC")
    e = encode_prompt(tok, p, Example("who was the man ?", 3), "masked")
    toks = tok.convert_ids_to_tokens(list(e.input_ids))
    assert toks == ["[CLS]", "[MASK]", ":", "who", "was", "the", "man", "?", "[SEP]"]
    assert toks[e.pred_pos] == "[MASK]"


def test_pair_template_modifiers(tiny):
    tok = tiny["masked"].tokenizer
    ex = Example("The man is fun .", 1, "The plot was thin .")
    assert render(get_prompt("RTE"), ex, "masked") == "The man is fun ? [MASK] , the plot was thin ."
    e = encode_prompt(tok, get_prompt("RTE"), ex, "masked")
    assert "[MASK]" in tok.convert_ids_to_tokens(list(e.input_ids))
    with pytest.raises(ValueError, match="no second sentence"):
        encode_prompt(tok, get_prompt("RTE"), Example("one sentence", 0), "masked")


def test_truncation_keeps_the_template(tiny):
    tok = tiny["causal"].tokenizer
    p = Prompt("SST-2", "<S1> It was [MASK] .", "<S1> It was [MASK]", ("terrible", "great"), first_sent_limit=None,
               max_length=6)
    e = encode_prompt(tok, p, EXAMPLES[2], "causal")
    assert len(e.input_ids) == 6
    assert tok.convert_ids_to_tokens(list(e.input_ids))[-2:] == ["It", "was"]
    p2 = Prompt("SST-2", "<S1> It was [MASK] .", "<S1> It was [MASK]", ("terrible", "great"), first_sent_limit=3)
    assert len(encode_prompt(tok, p2, EXAMPLES[2], "causal").input_ids) == 3 + 2


def test_label_words_single_multi_and_clashing(tiny):
    tok = tiny["causal"].tokenizer
    lt = label_token_ids(tok, get_prompt("SST-2"), "causal")
    assert tok.convert_ids_to_tokens(list(lt.first)) == ["terrible", "great"] and not lt.truncated
    # Unknown words map to [UNK]: two of them share a first token, which must be refused.
    clash = Prompt("X", "<S1> [MASK]", "<S1> [MASK]", ("zebra", "yak"))
    with pytest.raises(ValueError, match="share their first token"):
        label_token_ids(tok, clash, "causal")
    multi = Prompt("X", "<S1> [MASK]", "<S1> [MASK]", ("great", "the film"))
    lt2 = label_token_ids(tok, multi, "causal")
    assert lt2.truncated == ("the film",) and len(lt2.full[1]) == 2


def test_tiny_models_are_reproducible():
    a, b = tiny_model("causal", WORDS, seed=3), tiny_model("causal", WORDS, seed=3)
    c = tiny_model("causal", WORDS, seed=4)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.model.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


@pytest.mark.parametrize("kind", ["causal", "masked", "encoder"])
def test_batched_scores_equal_single_unpadded_forward(tiny, kind):
    """Padding, position ids and the 4-D additive mask must not change any example's output."""
    lm = tiny[kind]
    use_prompt = kind != "encoder"
    p = get_prompt("SST-2")
    lt = label_token_ids(lm.tokenizer, p, kind) if use_prompt else None
    exs = [Example(e.text_a, e.label) for e in EXAMPLES]
    data = encode_set(lm, exs, prompt=p if use_prompt else None, label_tokens=lt)
    clf = make_classifier(lm, use_prompt=use_prompt, label_tokens=lt, num_classes=2)
    batched = evaluate(clf, data, "cpu", batch_size=4)
    with torch.no_grad():
        for i in range(len(exs)):
            one = data.select([i])
            assert one["attention_mask"].all()  # trimmed to the example itself
            if use_prompt:
                logits = lm.model(input_ids=one["input_ids"]).logits[0, one["pred_pos"][0]]  # plain HF forward
                ref = logits[list(lt.first)]
            else:
                hidden = lm.model(input_ids=one["input_ids"]).last_hidden_state[0].mean(0)
                ref = clf.head(hidden)
            torch.testing.assert_close(batched[i].float(), ref.float(), atol=2e-5, rtol=1e-4)


def test_attention_mask_4d_semantics():
    m = attention_mask_4d(torch.tensor([[0, 1, 1]]), causal=True)
    allowed = (m == 0)[0, 0]
    assert allowed.tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    assert attention_mask_4d(torch.tensor([[1, 1, 0]]), causal=False)[0, 0, 0].tolist()[2] < -1e30


def test_sum_mode_equals_teacher_forced_log_probabilities(tiny):
    lm = tiny["causal"]
    p = Prompt("X", "<S1> It was [MASK] .", "<S1> It was [MASK]", ("great", "the film"))
    lt = label_token_ids(lm.tokenizer, p, "causal")
    data = encode_set(lm, EXAMPLES[:3], prompt=p, label_tokens=lt, label_mode="sum")
    clf = make_classifier(lm, use_prompt=True, label_tokens=lt, label_mode="sum")
    scores = evaluate(clf, data, "cpu", batch_size=2)
    with torch.no_grad():
        for i, ex in enumerate(EXAMPLES[:3]):
            prefix = list(encode_prompt(lm.tokenizer, p, ex, "causal").input_ids)
            for c, word in enumerate(lt.full):
                ids = torch.tensor([prefix + list(word)])
                logp = torch.log_softmax(lm.model(input_ids=ids).logits[0].double(), -1)
                ref = sum(logp[len(prefix) - 1 + j, w] for j, w in enumerate(word))
                assert abs(float(scores[i, c]) - float(ref)) < 1e-4


def test_prompt_needs_lm_head_and_sum_needs_causal(tiny):
    with pytest.raises(ValueError, match="LM head"):
        PromptClassifier(tiny["encoder"].model, "encoder", [1, 2])
    with pytest.raises(ValueError, match="causal LM"):
        PromptClassifier(tiny["masked"].model, "masked", [1, 2], label_mode="sum")
    with pytest.raises(ValueError, match="no LM head"):
        encode_set(tiny["encoder"], EXAMPLES[:1], prompt=get_prompt("SST-2"))


def test_linear_head_init_and_kernel_outputs(tiny):
    h1 = LinearHeadClassifier(tiny["causal"].model, "causal", 3, seed=5)
    h2 = LinearHeadClassifier(tiny["causal"].model, "causal", 3, seed=5)
    assert torch.equal(h1.head.weight, h2.head.weight) and float(h1.head.bias.detach().abs().sum()) == 0.0
    assert 0.01 < float(h1.head.weight.detach().std()) < 0.04  # N(0, 0.02^2)
    s = torch.tensor([[1.0, 3.0], [2.0, -1.0]])
    assert kernel_outputs(s).tolist() == [[2.0], [-3.0]]
    s3 = torch.randn(4, 3)
    assert torch.equal(kernel_outputs(s3), s3)


def test_collate_and_trim(tiny):
    tok = tiny["causal"].tokenizer
    encs = [encode_prompt(tok, get_prompt("SST-2"), e, "causal") for e in EXAMPLES[:2]]
    b = collate(encs, tok.pad_token_id, left_pad=True)
    assert (b["pred_pos"] == b["input_ids"].shape[1] - 1).all()
    assert b["position_ids"][1, -1] == len(encs[1].input_ids) - 1
    t = trim_batch({k: v[1:] for k, v in b.items()})
    assert t["attention_mask"].all() and t["input_ids"].shape[1] == len(encs[1].input_ids)
    assert int(t["pred_pos"][0]) == len(encs[1].input_ids) - 1


def test_unknown_model_specs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny model"):
        load_model("tiny-giant")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="no local directory or cached"):
        load_model(str(tmp_path / "not-a-model-dir"))


def test_label_tokens_record_is_json_ready():
    lt = LabelTokens((1, 2), ((1,), (2, 3)), ("b",), True)
    assert lt.record() == {"first": (1, 2), "full": ((1,), (2, 3)), "truncated": ("b",), "leading_space": True}
