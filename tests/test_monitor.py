"""The training monitor (train/monitor.py): both trainers log the matching error of the features they train, on a
small fixed pair set, beside the loss; the numbers are the matching job's on the same pairs, checkpoint and
stride; a run shorter than one interval is not monitored; the report draws the curve."""
import json
import os

import numpy as np
import pytest

from sce_mae_jax import config_lib
from sce_mae_jax.evals import matching
from sce_mae_jax.train import carb, pretrain

TINY = dict(embed_dim=48, depth=2, num_heads=2)


def _records(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('monitor'))
    s1 = config_lib.mae('t', None)
    s1.model.update(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, **TINY)
    s1.update(total_steps=4, batch_size=8, figure_every=0, log_every=3)
    s1.monitor.update(every=2, pairs=8, batch_size=4)
    pretrain.train(s1, os.path.join(root, 'stage1'))
    s2 = config_lib.carb('t', None, dim=16, eta=0.1)
    s2.model.update(**TINY)
    s2.update(total_steps=3, batch_size=8, figure_every=0, log_every=1, init_from=os.path.join(root, 'stage1'))
    s2.carb.layer = 1
    s2.monitor.update(every=2, pairs=8, batch_size=4)
    carb.train(s2, os.path.join(root, 'stage2'))
    s2.monitor.every = 5  # longer than the run: no monitor, not even at the end
    carb.train(s2, os.path.join(root, 'stage2_unmonitored'))
    return root


def test_both_stages_log_matching_every_interval_and_at_the_end(runs):
    rec1 = _records(os.path.join(runs, 'stage1'))
    # log_every=3 and every=2: records at 2 (monitor), 3 (log), 4 (both, the end), each step once
    assert [r['step'] for r in rec1] == [2, 3, 4]
    assert [('match_diff' in r) for r in rec1] == [True, False, True]
    rec2 = _records(os.path.join(runs, 'stage2'))
    assert [r['step'] for r in rec2] == [1, 2, 3] and [('match_diff' in r) for r in rec2] == [False, True, True]
    for r in (rec1[0], rec1[2], rec2[1], rec2[2]):
        assert 0 <= r['match_same'] < 70 and 0 <= r['match_diff'] < 70 and r['monitor_s'] > 0
        assert np.isfinite(r['loss'])
    assert not any('match_diff' in r for r in _records(os.path.join(runs, 'stage2_unmonitored')))


def test_numbers_are_the_matching_jobs_on_the_same_pairs(runs, tmp_path):
    c = config_lib.eval_matching(None)
    c.update(stage1=os.path.join(runs, 'stage1'), stage2=os.path.join(runs, 'stage2'), rows=('mae', 'sce_mae'),
             num_images=8, batch_size=4, pairs_cache=str(tmp_path / 'pairs'))
    c.features.stride = 8   # the monitor's plain stride
    c.figures.update(pairs=0, tsne_runs=0)
    c.premise.images = 0
    table = matching.run(c, str(tmp_path / 'ev'))['matching']
    end1, end2 = _records(os.path.join(runs, 'stage1'))[-1], _records(os.path.join(runs, 'stage2'))[-1]
    np.testing.assert_allclose([end1['match_same'], end1['match_diff']], [table['mae']['same'], table['mae']['diff']],
                               rtol=1e-5)
    np.testing.assert_allclose([end2['match_same'], end2['match_diff']],
                               [table['sce_mae']['same'], table['sce_mae']['diff']], rtol=1e-5)


def test_report_draws_the_monitor_curve(runs, tmp_path):
    from sce_mae_jax.evals import plots, rows as rows_lib
    c = config_lib.eval_matching(None)
    c.update(stage1=os.path.join(runs, 'stage1'), stage2=os.path.join(runs, 'stage2'), rows=('mae', 'sce_mae'))
    _, rows, _ = rows_lib.load_rows(c)
    figs = dict((path, title) for title, path in plots.training_figures(str(tmp_path), rows))
    for row in ('mae', 'sce_mae'):
        assert (tmp_path / f'figures/monitor_{row}.png').stat().st_size > 500
        assert 'matching error' in figs[f'figures/monitor_{row}.png']
