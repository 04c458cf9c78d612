"""Prompt templates and label words of LM-BFF (Gao et al. 2021) as used by Malladi et al. (2023), and their
encoding for masked and causal language models.

Template language (a small, explicit version of LM-BFF's ``*sent_0*_It_was*mask*.``):

* ``<S1>``, ``<S2>`` -- the first / second sentence. ``<S1->`` drops one trailing punctuation mark (LM-BFF's
  ``sent-_0``); ``<S2l>`` lower-cases the first character (LM-BFF's ``sentl_1``).
* ``[MASK]`` -- where the label word goes.
* everything else is literal text; a space *before* a placeholder belongs to that placeholder (``" <S2>"`` is
  encoded as ``encode(" " + s2)``, and ``" [MASK]"`` means the label word is encoded with a leading space, as
  LM-BFF does for RoBERTa's byte-level BPE).

Each part is encoded on its own and the token ids are concatenated, as LM-BFF does, so truncating a sentence never
cuts the template.

Masked LMs use LM-BFF's templates verbatim: the model output for class c is the MLM logit of label word c at the
``[MASK]`` position. Causal LMs can only predict the *next* token, so the label word must come last: a causal
template is the prefix before ``[MASK]``, and the output for class c is the next-token logit of label word c after
that prefix. Where LM-BFF's mask is not at the end (TREC ``[MASK] : <S1>``, the sentence-pair tasks, AG News'
``... [MASK] news .``) we use our own causal wording with the same label words (:attr:`Prompt.causal_template`);
for SST-2/SST-5/MR/CR/MPQA/Subj it is LM-BFF's template with the text after ``[MASK]`` (a period) dropped.

Label words that are several tokens (multi-token words) are handled explicitly by ``label_mode``:

* ``"first"`` (default, LM-BFF's choice): the logit of the word's *first* token. Every LM-BFF word is a single
  token for RoBERTa and for SmolLM2's tokenizer with a leading space, so nothing is truncated in the paper's
  settings; :func:`label_token_ids` reports which words were truncated and rejects two classes sharing a first
  token.
* ``"sum"`` (causal LMs only): the summed log-probability of all of the word's tokens, scored by teacher forcing
  the word after the prefix (one extra sequence per class). For single-token words this differs from ``"first"``
  only by the log-softmax normalisation over the whole vocabulary.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal, Sequence

from real_tasks.data import Example, task_spec

__all__ = ["Prompt", "PROMPTS", "get_prompt", "EncodedPrompt", "encode_prompt", "encode_plain",
           "label_token_ids", "LabelTokens", "is_space_sensitive"]


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A task's prompt: LM-BFF template (masked LMs), causal template (mask last) and label words by label id."""

    task: str
    template: str
    causal_template: str
    label_words: tuple[str, ...]
    first_sent_limit: int | None = None
    other_sent_limit: int | None = None
    max_length: int = 128

    def __post_init__(self) -> None:
        if "[MASK]" not in self.template or self.template.count("[MASK]") != 1:
            raise ValueError(f"{self.task}: template {self.template!r} needs exactly one [MASK]")
        if not self.causal_template.rstrip().endswith("[MASK]") or self.causal_template.count("[MASK]") != 1:
            raise ValueError(f"{self.task}: causal template {self.causal_template!r} must end with its one [MASK]")


_SENT = "<S1> It was [MASK] ."
_SENT_CAUSAL = "<S1> It was [MASK]"

# LM-BFF templates and label words (run_fewshot.sh of LM-BFF / LM-Kernel-FT), label id order as in data.TASKS.
PROMPTS: dict[str, Prompt] = {p.task: p for p in [
    Prompt("SST-2", _SENT, _SENT_CAUSAL, ("terrible", "great")),
    Prompt("SST-5", _SENT, _SENT_CAUSAL, ("terrible", "bad", "okay", "good", "great")),
    Prompt("MR", _SENT, _SENT_CAUSAL, ("terrible", "great"), 110, 50),
    Prompt("CR", _SENT, _SENT_CAUSAL, ("terrible", "great"), 110, 50),
    Prompt("MPQA", _SENT, _SENT_CAUSAL, ("terrible", "great"), 110),
    Prompt("Subj", "<S1> This is [MASK] .", "<S1> This is [MASK]", ("subjective", "objective"), 110, 50),
    Prompt("TREC", "[MASK] : <S1>", "Question: <S1> Answer type: [MASK]",
           ("Description", "Entity", "Expression", "Human", "Location", "Number"), 110),
    Prompt("AG News", "<S1> This article is about [MASK] news .", "<S1> This article is about [MASK]",
           ("world", "sports", "business", "tech"), 240, max_length=256),
    # MNLI/SNLI label ids: contradiction, entailment, neutral.
    Prompt("MNLI", "<S1-> ? [MASK] , <S2l>", "<S1> Question: <S2> Yes, No, or Maybe? Answer: [MASK]",
           ("No", "Yes", "Maybe"), 240, max_length=256),
    Prompt("SNLI", "<S1-> ? [MASK] , <S2l>", "<S1> Question: <S2> Yes, No, or Maybe? Answer: [MASK]",
           ("No", "Yes", "Maybe"), max_length=256),
    # QNLI/RTE label ids: entailment, not_entailment.
    Prompt("QNLI", "<S1-> ? [MASK] , <S2l>", "<S1> Question: <S2> Yes or No? Answer: [MASK]", ("Yes", "No")),
    Prompt("RTE", "<S1-> ? [MASK] , <S2l>", "<S1> Question: <S2> Yes or No? Answer: [MASK]", ("Yes", "No"),
           240, max_length=256),
    Prompt("MRPC", "<S1> [MASK] , <S2l>", "<S1> Question: does this mean the same as \" <S2> \"? Answer: [MASK]",
           ("No", "Yes")),
    Prompt("QQP", "<S1> [MASK] , <S2l>", "<S1> Question: does this ask the same as \" <S2> \"? Answer: [MASK]",
           ("No", "Yes")),
]}


def get_prompt(task: str) -> Prompt:
    """The prompt of ``task`` (any spelling :func:`real_tasks.data.task_spec` accepts)."""
    spec = task_spec(task)
    prompt = PROMPTS[spec.name]
    if len(prompt.label_words) != spec.num_labels:  # pragma: no cover -- guarded by a test
        raise AssertionError(f"{spec.name}: {len(prompt.label_words)} label words for {spec.num_labels} labels")
    return prompt


_PART = re.compile(r"(\s?<S[12]-?l?>|\s?\[MASK\])")


def _parts(template: str) -> list[str]:
    return [p for p in _PART.split(template) if p != ""]


def is_space_sensitive(tokenizer) -> bool:
    """Whether the tokenizer encodes ``" word"`` differently from ``"word"`` (byte-level BPE does; WordPiece
    does not)."""
    a = tokenizer.encode(" great", add_special_tokens=False)
    b = tokenizer.encode("great", add_special_tokens=False)
    return a != b


def _special_prefix_suffix(tokenizer) -> tuple[list[int], list[int]]:
    """Special tokens the tokenizer adds around a single sequence (e.g. [CLS] ... [SEP], <s> ...)."""
    inner = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for i in range(len(full) - len(inner) + 1):
        if full[i:i + len(inner)] == inner:
            return full[:i], full[i + len(inner):]
    return [], []  # pragma: no cover -- tokenizers that rewrite the text itself


@dataclasses.dataclass(frozen=True)
class LabelTokens:
    """Token ids of the label words: ``first[c]`` (the scored token under ``"first"``) and ``full[c]`` (all the
    word's tokens, scored under ``"sum"``); ``truncated`` lists words longer than one token."""

    first: tuple[int, ...]
    full: tuple[tuple[int, ...], ...]
    truncated: tuple[str, ...]
    leading_space: bool

    def record(self) -> dict:
        return dataclasses.asdict(self)


def label_token_ids(tokenizer, prompt: Prompt, kind: Literal["masked", "causal"]) -> LabelTokens:
    """Token ids of ``prompt``'s label words for ``tokenizer``.

    The word gets a leading space when the template has a space before ``[MASK]`` and the tokenizer is
    space-sensitive (LM-BFF: ``" " + word`` for RoBERTa/GPT-2 style tokenizers).

    Raises:
        ValueError: a word encodes to no token, or two classes share the scored first token.
    """
    template = prompt.causal_template if kind == "causal" else prompt.template
    before = template[:template.index("[MASK]")]
    space = before.endswith(" ") and is_space_sensitive(tokenizer)
    full, truncated = [], []
    for word in prompt.label_words:
        ids = tokenizer.encode((" " if space else "") + word, add_special_tokens=False)
        if not ids:
            raise ValueError(f"{prompt.task}: label word {word!r} encodes to no token")
        if len(ids) > 1:
            truncated.append(word)
        full.append(tuple(int(i) for i in ids))
    first = tuple(ids[0] for ids in full)
    if len(set(first)) != len(first):
        dup = [w for w, f in zip(prompt.label_words, first) if first.count(f) > 1]
        raise ValueError(f"{prompt.task}: label words {dup} share their first token; use label_mode='sum' "
                         f"(causal LMs) or other label words")
    return LabelTokens(first, tuple(full), tuple(truncated), space)


@dataclasses.dataclass(frozen=True)
class EncodedPrompt:
    """Token ids of one prompted example and the position whose output is scored (the ``[MASK]`` for masked LMs,
    the last prefix token for causal LMs)."""

    input_ids: tuple[int, ...]
    pred_pos: int


def _sentence(example: Example, slot: str) -> str:
    which, flags = slot[2], slot[3:-1]
    text = example.text_a if which == "1" else example.text_b
    if text is None:
        raise ValueError(f"template uses <S{which}> but example {example.source or example.text_a[:30]!r} has no "
                         f"second sentence")
    text = text.strip()
    if "-" in flags and text and text[-1] in ".?!,;:":
        text = text[:-1].rstrip()
    if "l" in flags and text:
        text = text[0].lower() + text[1:]
    return text


def encode_prompt(tokenizer, prompt: Prompt, example: Example, kind: Literal["masked", "causal"],
                  max_length: int | None = None) -> EncodedPrompt:
    """Encode ``example`` with ``prompt``'s template for a masked or causal LM.

    Sentences are truncated to ``prompt.first_sent_limit`` / ``other_sent_limit`` tokens, then (if the whole is
    still longer than ``max_length``, default ``prompt.max_length``) the first sentence is cut further, so the
    template and the scored position always survive.
    """
    template = prompt.causal_template if kind == "causal" else prompt.template
    max_length = max_length or prompt.max_length
    pieces: list[tuple[str, list[int]]] = []  # (kind, ids)
    for part in _parts(template):
        stripped = part.strip()
        lead = " " if part.startswith(" ") else ""
        if stripped == "[MASK]":
            if kind == "causal":
                break  # the label word is predicted as the next token: the prefix ends here
            if tokenizer.mask_token_id is None:
                raise ValueError("masked-LM prompt needs a tokenizer with a mask token")
            pieces.append(("mask", [tokenizer.mask_token_id]))
        elif stripped.startswith("<S"):
            ids = tokenizer.encode(lead + _sentence(example, stripped), add_special_tokens=False)
            limit = prompt.first_sent_limit if stripped[2] == "1" else prompt.other_sent_limit
            if limit is not None:
                ids = ids[:limit]
            pieces.append(("s" + stripped[2], ids))
        else:
            pieces.append(("text", tokenizer.encode(part, add_special_tokens=False)))
    prefix, suffix = _special_prefix_suffix(tokenizer)
    if kind == "causal":
        suffix = []  # an end-of-sequence token after the prefix would be predicted from, not before, the word
    total = len(prefix) + len(suffix) + sum(len(ids) for _, ids in pieces)
    if total > max_length:
        excess = total - max_length
        for name in ("s1", "s2"):
            for i, (kind_i, ids) in enumerate(pieces):
                if kind_i == name and excess > 0:
                    cut = min(excess, max(len(ids) - 1, 0))
                    pieces[i] = (kind_i, ids[:len(ids) - cut])
                    excess -= cut
        if excess > 0:
            raise ValueError(f"{prompt.task}: template alone is longer than max_length={max_length}")
    ids = list(prefix)
    pred_pos = -1
    for kind_i, piece in pieces:
        if kind_i == "mask":
            pred_pos = len(ids)
        ids.extend(piece)
    if kind == "causal":
        pred_pos = len(ids) - 1
        if pred_pos < 0:
            raise ValueError(f"{prompt.task}: causal prefix is empty")
    ids.extend(suffix)
    return EncodedPrompt(tuple(int(i) for i in ids), pred_pos)


def encode_plain(tokenizer, example: Example, kind: Literal["masked", "causal", "encoder"],
                 max_length: int = 128) -> EncodedPrompt:
    """Encode ``example`` without a prompt (standard fine-tuning). Sentence pairs use the tokenizer's pair
    encoding for encoders; for causal LMs the two sentences are joined by a newline. ``pred_pos`` is the last
    token (the pooled position of a causal LM; encoders pool by mean)."""
    if kind == "causal":
        text = example.text_a if example.text_b is None else example.text_a + "\n" + example.text_b
        ids = tokenizer.encode(text, add_special_tokens=True)[:max_length]
    else:
        ids = tokenizer.encode(example.text_a, example.text_b, add_special_tokens=True, truncation=True,
                               max_length=max_length)
    return EncodedPrompt(tuple(int(i) for i in ids), len(ids) - 1)


def encode_sum_continuations(encoded: EncodedPrompt, labels: LabelTokens) -> list[tuple[tuple[int, ...], int, int]]:
    """For ``label_mode="sum"``: one sequence per class, prefix + that class's word tokens.

    Returns:
        per class c: (ids, start, length): the word's tokens sit at ``ids[start:start+length]``; their
        log-probabilities are read at positions ``start-1 .. start+length-2``.
    """
    out = []
    prefix = list(encoded.input_ids[:encoded.pred_pos + 1])
    for word in labels.full:
        out.append((tuple(prefix + list(word)), len(prefix), len(word)))
    return out


def render(prompt: Prompt, example: Example, kind: Literal["masked", "causal"], mask: str = "[MASK]") -> str:
    """The prompted text as a string (for logs and notes; encoding goes through :func:`encode_prompt`)."""
    template = prompt.causal_template if kind == "causal" else prompt.template
    out = []
    for part in _parts(template):
        stripped = part.strip()
        lead = " " if part.startswith(" ") else ""
        if stripped == "[MASK]":
            out.append(lead + mask)
        elif stripped.startswith("<S"):
            out.append(lead + _sentence(example, stripped))
        else:
            out.append(part)
    return "".join(out)


def words_of(prompts: Sequence[Prompt]) -> list[str]:
    """Every literal word of the templates and every label word (for a tiny model's vocabulary)."""
    words: list[str] = []
    for p in prompts:
        for t in (p.template, p.causal_template):
            for part in _parts(t):
                if not part.strip().startswith(("<S", "[MASK]")):
                    words.extend(part.split())
        words.extend(p.label_words)
    return words
