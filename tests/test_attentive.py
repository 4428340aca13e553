"""The attentive-coverage diagnostic."""
import jax.numpy as jnp
import numpy as np

from sce_mae_jax.evals.attentive import attentive_coverage, landmark_tokens


def test_landmark_tokens_marks_the_right_cells():
    lm = jnp.asarray([[[3.0, 3.0], [95.0, 9.0]]])  # cell (0, 0) and cell (row 1, col 11)
    cells = np.asarray(landmark_tokens(lm, 12, 8))[0]
    assert cells.sum() == 2 and cells[0] and cells[1 * 12 + 11]


def test_coverage_against_counts():
    on = np.array([[True, False, True, False]])
    att = np.array([[True, True, False, False]])
    assert attentive_coverage(att, on) == (0.5, 0.5)
