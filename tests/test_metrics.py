"""One definition per metric (theory/metrics.py): the tie rule of predictions, and the kernel distances against
their closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from theory.metrics import accuracy, kernel_distance, kernel_rel_change, predict, relative_distance


def test_accuracy_and_the_tie_rule():
    assert accuracy(torch.tensor([[1.0], [-2.0], [0.5]]), torch.tensor([1, 0, 0])) == pytest.approx(2 / 3)
    assert accuracy(torch.tensor([[1.0], [-2.0]]), torch.tensor([1, -1])) == 1.0  # +-1 labels of one output
    assert accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1])) == 0.5
    # ties go to the lower class index, in both representations of a binary classifier
    assert predict(np.array([[0.3, 0.3, 0.1]])).tolist() == [0]
    assert predict(np.array([0.0])).tolist() == [0] and predict(np.array([[0.0]])).tolist() == [0]
    with pytest.raises(ValueError, match="score rows"):
        accuracy(np.zeros((3, 2)), np.zeros(2))


@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 20), st.just(2)),
                  elements=st.sampled_from([-1.0, -0.5, 0.0, 0.5, 1.0])))
def test_binary_scores_and_their_difference_predict_the_same(scores):
    """A two-class score matrix (f_0, f_1) and its single output f_1 - f_0 give the same predictions, ties
    included (the kernel solvers use the single output, fine-tuning the pair)."""
    assert np.array_equal(predict(scores), predict(scores[:, 1] - scores[:, 0]))


def test_kernel_distances_against_closed_forms():
    a = np.eye(3)
    assert kernel_rel_change(a, a) == 0.0 and kernel_rel_change(a, 2 * a) == pytest.approx(1.0)
    assert kernel_distance(a, 2 * a) == pytest.approx(0.0, abs=1e-15)  # scale-free
    b = np.diag([1.0, 0.0, 0.0])
    assert kernel_distance(a, b) == pytest.approx(1 - 1 / math.sqrt(3))
    assert math.isnan(relative_distance(a, np.zeros((3, 3))))
