"""The attentive-coverage diagnostic."""
import jax.numpy as jnp
import numpy as np

from sce_mae_jax.evals import attentive
from sce_mae_jax.evals.metrics import attentive_coverage, landmark_recall, landmark_tokens, position_concentration


def test_landmark_tokens_marks_the_right_cells():
    lm = jnp.asarray([[[3.0, 3.0], [95.0, 9.0]]])  # cell (0, 0) and cell (row 1, col 11)
    cells = np.asarray(landmark_tokens(lm, 12, 8))[0]
    assert cells.sum() == 2 and cells[0] and cells[1 * 12 + 11]


def test_coverage_against_counts():
    on = np.array([[True, False, True, False]])
    att = np.array([[True, True, False, False]])
    assert attentive_coverage(att, on) == (0.5, 0.5)


def test_position_concentration():
    fixed = np.zeros((4, 9), bool)
    fixed[:, [0, 8]] = True  # the same two cells in every image
    assert position_concentration(fixed) == 1.0
    moving = np.zeros((4, 9), bool)
    for i in range(4):
        moving[i, [i, 8]] = True  # cell 8 in every image, the other one moves
    assert position_concentration(moving) == 5 / 8  # top-2 cells: 8 (4 times) and 0 (once)


def test_landmark_recall():
    on = np.array([[True, True, False, False], [False, True, True, False]])
    att = np.array([[True, False, True, False], [False, True, True, False]])
    assert landmark_recall(att, on) == 3 / 4


def test_printed_line_says_which_landmarks_chance_counts():
    v = {'coverage': 0.25, 'chance': 0.304, 'recall': 0.4, 'concentration': 0.5}
    line = attentive.summary(v, covered=68, recalled=5)
    assert 'hold one of the 68 landmarks (chance 30.4%: the share of all tokens that hold one)' in line
    assert "40% of the 5 landmarks' cells attentive" in line
