"""report.md as evals/report.py renders it from results.json."""
from sce_mae_jax.evals import report


def test_premise_table_says_which_landmarks_chance_counts():
    results = {'premise': {'mae': {'0': {'coverage': 0.05, 'chance': 0.035, 'recall': 0.2, 'concentration': 0.7}}}}
    text = report.render(results)
    assert 'attentive tokens on one of the 5 landmarks / chance (all tokens on one of the 5)' in text
    assert 'counts the 68 points for coverage and chance' in text
    assert '| `mae` | 5.0% / 3.5%, 20%, 70% |' in text
