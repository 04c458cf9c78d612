"""Loaders, k-shot splits and test caps of real_tasks.data.

Oracles: LM-BFF's own sampling procedure written out literally (global ``numpy.random.seed`` + ``shuffle`` of the
line list), byte counts of the files, and hand-checked lines of the shared data for the label meanings.
"""

from __future__ import annotations

import re
import sys
import types

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from real_tasks.data import (LMBFF_SEEDS, TASKS, cap_test, decode_line, heldout_split, kshot_split, load_task,
                             read_glue_tsv, read_label_lines, read_lmbff_csv, task_spec)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------------------

def test_latin1_nel_byte_is_not_a_line_break(tmp_path):
    # 0x85 is NEL in Latin-1 (a line break for str.splitlines) and an ellipsis in Windows-1252.
    f = _write(tmp_path / "x.all", b"0 good \x85 bad\n1 caf\xe9 ok\n0 plain utf-8 \xc3\xa9\n")
    exs, skipped, codecs = read_label_lines(f, 2)
    assert len(exs) == 3 and not skipped
    assert exs[0].text_a == "good \u2026 bad"
    assert exs[1].text_a == "caf\u00e9 ok"
    assert exs[2].text_a == "plain utf-8 \u00e9"
    assert codecs == {"cp1252": 2, "utf-8": 1}
    assert [e.source for e in exs] == ["x.all:1", "x.all:2", "x.all:3"]


def test_decode_line_falls_back_to_latin1():
    # 0x81 is undefined in Windows-1252: only Latin-1 decodes it.
    assert decode_line(b"a\x81b") == ("a\x81b", "latin-1")


@pytest.mark.parametrize("content, message", [
    (b"0 fine\nnot-a-label text\n", "x.all:2: expected a label of ASCII digits"),
    (b"0 fine\n+1 text\n", "x.all:2: expected a label of ASCII digits 0..1 first, got '+1'"),
    ("0 fine\n\u0661 text\n".encode(), "x.all:2: expected a label of ASCII digits"),  # Arabic-Indic one
    (b"0 fine\n3 text\n", "x.all:2: label 3 outside 0..1"),
    (b"0 fine\n\n1 text\n", "x.all:2: blank line"),
    (b"", "x.all: empty file"),
    (b"  \n", "x.all: empty file"),
])
def test_malformed_lines_name_file_and_line(tmp_path, content, message):
    f = _write(tmp_path / "x.all", content)
    with pytest.raises(ValueError, match=re.escape(message)):
        read_label_lines(f, 2)


@pytest.mark.real_data
def test_the_label_counts_of_the_docstring_are_what_the_loader_keeps(real_data_dir):
    for task, counts in (("CR", [1366, 2405]), ("MPQA", [7292, 3311]), ("Subj", [5000, 5000]), ("MR", [5331, 5331])):
        d = load_task(task, real_data_dir)
        got = np.bincount([e.label for e in list(d.train) + list(d.test)]).tolist()
        assert got == counts, task


def test_empty_sentences_are_skipped_and_listed(tmp_path):
    f = _write(tmp_path / "x.all", b"0 a\n1 \n1 b\n")
    exs, skipped, _ = read_label_lines(f, 2)
    assert [e.text_a for e in exs] == ["a", "b"]
    assert skipped == ["x.all:2: empty sentence (label 1)"]


def test_glue_tsv_columns_by_name_and_errors(tmp_path):
    spec = task_spec("MNLI")
    f = _write(tmp_path / "train.tsv", b"index\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n"
                                       b"0\tfic\tA man sleeps.\tA person rests.\tentailment\tentailment\n"
                                       b"1\tfic\tIt rains.\tIt is dry.\tcontradiction\tcontradiction\n")
    exs, _, _ = read_glue_tsv(f, spec)
    assert [(e.text_a, e.text_b, e.label) for e in exs] == [("A man sleeps.", "A person rests.", 1),
                                                            ("It rains.", "It is dry.", 0)]
    _write(tmp_path / "bad.tsv", b"sentence1\tsentence2\tgold_label\na\tb\tmaybe\n")
    with pytest.raises(ValueError, match=r"bad\.tsv:2: unknown label 'maybe'"):
        read_glue_tsv(tmp_path / "bad.tsv", spec)
    _write(tmp_path / "nocol.tsv", b"premise\thypothesis\tgold_label\na\tb\tneutral\n")
    with pytest.raises(ValueError, match=r"nocol\.tsv:1: header has no text_a column"):
        read_glue_tsv(tmp_path / "nocol.tsv", spec)
    _write(tmp_path / "short.tsv", b"sentence1\tsentence2\tgold_label\nonly one field\n")
    with pytest.raises(ValueError, match=r"short\.tsv:2: 1 tab-separated fields"):
        read_glue_tsv(tmp_path / "short.tsv", spec)


def test_lmbff_csv_quoted_text_and_multi_columns(tmp_path):
    f = _write(tmp_path / "train.csv", b'2,"Title, with comma","Body text."\n1,plain,more\n')
    exs, _, _ = read_lmbff_csv(f, task_spec("AG News"))
    assert [(e.text_a, e.label) for e in exs] == [("Title, with comma Body text.", 1), ("plain more", 0)]
    _write(tmp_path / "bad.csv", b"1,ok\n9,bad\n")
    with pytest.raises(ValueError, match=r"bad\.csv:line 2: unknown label '9'"):
        read_lmbff_csv(tmp_path / "bad.csv", task_spec("AG News"))


# --------------------------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------------------------

def _sentconv_dir(tmp_path, n=40):
    lines = [f"{i % 2} sentence number {i} .\n" for i in range(n)]
    d = tmp_path / "sc"
    d.mkdir()
    (d / "stsa.binary.train").write_text("".join(lines))
    (d / "stsa.binary.dev").write_text("".join(lines[:10]))
    (d / "rt-polarity.all").write_text("".join(lines))
    return d


def test_sentconv_layout_and_heldout_split(tmp_path):
    d = _sentconv_dir(tmp_path)
    sst = load_task("sst2", d)
    assert sst.layout == "sent-conv" and len(sst.train) == 40 and len(sst.test) == 10 and not sst.test_is_heldout
    with pytest.raises(ValueError, match=r"task MR \(.*rt-polarity\.all\): 40 usable examples cannot give a "
                                         r"held-out test set of 2000"):
        load_task("MR", d)  # 40 lines cannot give LM-BFF's 2000 test examples


def test_lmbff_original_layout(tmp_path):
    root = tmp_path / "data"
    (root / "original" / "SST-2").mkdir(parents=True)
    (root / "original" / "SST-2" / "train.tsv").write_text("sentence\tlabel\n" + "".join(
        f"s{i}\t{i % 2}\n" for i in range(20)))
    (root / "original" / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nt0\t1\nt1\t0\n")
    (root / "original" / "subj").mkdir(parents=True)
    (root / "original" / "subj" / "train.csv").write_text("".join(f'{i % 2},"text {i}"\n' for i in range(30)))
    (root / "original" / "subj" / "test.csv").write_text('0,"a test"\n1,"b test"\n')
    sst = load_task("SST-2", root, layout="lm-bff")
    assert (len(sst.train), len(sst.test), sst.test[0].text_a, sst.test[0].label) == (20, 2, "t0", 1)
    subj = load_task("Subj", root)
    assert subj.layout == "lm-bff" and len(subj.test) == 2 and subj.test[1].label == 1


def test_missing_task_lists_what_was_tried(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found; tried"):
        load_task("QNLI", tmp_path)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        task_spec("nope")


def test_hf_layout_remaps_labels_by_name(monkeypatch):
    """A fake ``datasets`` module stands in for the local HF cache: TREC's HF coarse labels are ordered ABBR,
    ENTY, DESC, HUM, LOC, NUM; ours (LM-BFF's) DESC, ENTY, ABBR, HUM, LOC, NUM."""
    rows = {"train": [{"text": f"q{i}", "coarse_label": i % 6} for i in range(24)],
            "test": [{"text": "What does AIDS stand for ?", "coarse_label": 0}]}
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda path, *a: rows if path == "trec" else (_ for _ in ()).throw(OSError("offline"))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if name == "datasets" else None)
    trec = load_task("TREC", layout="hf")
    assert trec.layout == "hf"
    assert trec.test[0].label == task_spec("TREC").label_names.index("abbreviation") == 2
    assert [e.label for e in trec.train[:6]] == [2, 1, 0, 3, 4, 5]
    with pytest.raises(FileNotFoundError, match="not in the local cache"):
        load_task("MR", layout="hf")


# --------------------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------------------

def _lmbff_reference(lines: list[tuple[int, str]], k: int, seed: int):
    """LM-BFF's tools/generate_k_shot_data.py for a CSV task, written out literally."""
    np.random.seed(seed)
    lines = [list(x) for x in lines]
    np.random.shuffle(lines)
    label_list: dict = {}
    for line in lines:
        label_list.setdefault(line[0], []).append(line)
    train = [tuple(x) for lab in label_list for x in label_list[lab][:k]]
    dev = [tuple(x) for lab in label_list for x in label_list[lab][k:2 * k]]
    return train, dev


@pytest.mark.parametrize("seed", LMBFF_SEEDS)
def test_kshot_matches_lmbff_procedure(tmp_path, seed):
    d = _sentconv_dir(tmp_path, n=60)
    data = load_task("SST-2", d)
    split = kshot_split(data, 4, seed)
    ref_train, ref_dev = _lmbff_reference([(e.label, e.text_a) for e in data.train], 4, seed)
    assert [(e.label, e.text_a) for e in split.train] == ref_train
    assert [(e.label, e.text_a) for e in split.dev] == ref_dev
    assert not set(split.train_index) & set(split.dev_index)
    assert split == kshot_split(data, 4, seed)  # same seed, same split


def test_kshot_needs_2k_per_class(tmp_path):
    data = load_task("SST-2", _sentconv_dir(tmp_path, n=10))
    with pytest.raises(ValueError, match="fewer than 2k=12"):
        kshot_split(data, 6, 13)


@given(n=st.integers(1, 3000), m1=st.integers(1, 1200), extra=st.integers(0, 800), seed=st.integers(0, 2**31))
def test_cap_test_is_a_nested_seeded_draw(n, m1, extra, seed):
    small, large = cap_test(n, m1, seed), cap_test(n, m1 + extra, seed)
    assert len(small) == min(n, m1) and len(np.unique(small)) == len(small)
    assert set(small.tolist()) <= set(large.tolist())  # the quick test set is inside the full one
    assert np.all(np.diff(small) > 0) and (len(small) == 0 or (small[0] >= 0 and small[-1] < n))


@given(n=st.integers(3, 500), frac=st.floats(0.01, 0.99), seed=st.integers(0, 2**31))
def test_heldout_split_partitions(n, frac, seed):
    exs = list(range(n))
    size = min(n - 1, max(1, int(frac * n)))
    train, test = heldout_split(exs, size, seed)
    assert sorted(train + test) == exs and len(test) == size
    assert (train, test) == heldout_split(exs, size, seed)


# --------------------------------------------------------------------------------------------------------------
# The shared real data
# --------------------------------------------------------------------------------------------------------------

# (task, train pool size, test size): sizes from the data README, minus skipped empty lines, after the held-out
# split of 2000 for the tasks that have no test file.
_REAL = [("SST-2", 6920, 872), ("SST-5", 8544, 2210), ("MR", 8662, 2000), ("CR", 3775 - 4 - 2000, 2000),
         ("MPQA", 10606 - 3 - 2000, 2000), ("Subj", 8000, 2000), ("TREC", 5452, 500)]


@pytest.mark.real_data
@pytest.mark.parametrize("task, n_train, n_test", _REAL)
def test_real_tasks_load_completely(real_data_dir, task, n_train, n_test):
    data = load_task(task, real_data_dir)
    assert (len(data.train), len(data.test)) == (n_train, n_test)
    split = kshot_split(data, 16, 42)
    assert len(split.train) == len(split.dev) == 16 * data.spec.num_labels
    assert len(split.test) == min(1000, n_test)


@pytest.mark.real_data
def test_real_label_meanings(real_data_dir):
    """The evidence written in real_tasks.data's docstring, checked against the files."""
    def label_of(task, prefix):
        data = load_task(task, real_data_dir)
        hits = [e for e in data.train + data.test if e.text_a.startswith(prefix)]
        assert hits, prefix
        return data.spec.label_names[hits[0].label]

    assert label_of("Subj", "the movie begins in the past where a young boy named sam") == "objective"
    assert label_of("Subj", "smart and alert , thirteen conversations about one thing") == "subjective"
    assert label_of("TREC", "What does the abbreviation AIDS stand for") == "abbreviation"
    assert label_of("TREC", "How far is it from Denver to Aspen") == "numeric"
    assert label_of("TREC", "Who was Galileo") == "human"
    assert label_of("MR", "the rock is destined to be the 21st century's new") == "positive"
    assert label_of("MR", "simplistic , silly and tedious") == "negative"
    assert label_of("CR", "im a more happier person after discovering the i/p button") == "positive"
    assert label_of("MPQA", "complaining") == "negative"
    trec = load_task("TREC", real_data_dir)
    counts = np.bincount([e.label for e in trec.train], minlength=6).tolist()
    assert counts == [1162, 1250, 86, 1223, 835, 896]  # Li & Roth's DESC, ENTY, ABBR, HUM, LOC, NUM


@pytest.mark.real_data
def test_real_mr_keeps_every_line(real_data_dir):
    raw = (real_data_dir / "rt-polarity.all").read_bytes()
    data = load_task("MR", real_data_dir)
    assert len(data.train) + len(data.test) == raw.count(b"\n") == 10662
    assert data.encodings["cp1252"] == 202  # the lines with 0x85 and friends
    assert any("\u2026" in e.text_a for e in data.train + data.test)


def test_every_task_has_a_spec_with_labels():
    assert len(TASKS) == 14
    for spec in TASKS.values():
        assert spec.num_labels >= 2 and len(set(spec.label_names)) == spec.num_labels
