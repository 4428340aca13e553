"""The quick-start `pipeline` job: stage 1, stage 2 from it with the backbone architecture carried over, the
random_init_carb control, then matching and detection into one results.json / report.md."""
import json
import os

from conftest import losses, run_main

ROWS = ['mae', 'pixels', 'positions', 'random_init', 'random_init_carb', 'sce_mae', 'sce_mae@seed1']


def test_quickstart_pipeline_runs_both_stages_and_the_evaluations(tmp_path):
    wd = tmp_path / 'qs'
    args = ['--config=configs/quickstart.py', f'--workdir={wd}', '--config.stage1.total_steps=4',
            '--config.stage1.batch_size=8', '--config.stage1.model.depth=3', '--config.stage1.model.embed_dim=48',
            '--config.stage1.model.num_heads=2', '--config.stage1.model.decoder_embed_dim=32',
            '--config.stage1.model.decoder_num_heads=2', '--config.stage2.total_steps=3',
            '--config.stage2.batch_size=8', '--config.stage1.figure_every=0', '--config.stage2.figure_every=3',
            '--config.evals.matching.num_images=8', '--config.evals.matching.batch_size=4',
            f'--config.evals.matching.pairs_cache={tmp_path / "pairs"}', '--config.evals.matching.figures.tsne_images=8',
            '--config.evals.matching.figures.tsne_runs=1',
            '--config.evals.matching.figures.tsne_iters=250', '--config.evals.matching.premise.images=8',
            '--config.evals.detection.num_train_images=16', '--config.evals.detection.num_test_images=8',
            '--config.evals.detection.total_steps=2', '--config.evals.detection.batch_size=8',
            '--config.evals.detection.figures.faces=2', '--config.stage2_seeds=(0, 1)',
            '--config.stage1.monitor.every=4', '--config.stage2.monitor.every=3',
            '--config.stage1.monitor.pairs=8', '--config.stage2.monitor.pairs=8']
    run_main(args, timeout=600)
    assert sorted(losses(wd / 'stage1')) == [4]
    for stage in ('stage1', 'stage2'):  # the training monitor's matching errors beside the loss
        assert 'match_diff' in json.loads((wd / stage / 'metrics.jsonl').read_text().splitlines()[-1])
    assert sorted(losses(wd / 'stage2')) == [3] and sorted(losses(wd / 'stage2_seed1')) == [3]
    assert json.load(open(wd / 'stage2_seed1' / 'config.json'))['seed'] == 1
    stage2 = json.load(open(wd / 'stage2' / 'config.json'))
    assert (stage2['model']['depth'], stage2['model']['embed_dim'], stage2['model']['num_heads']) == (3, 48, 2) and stage2['init_from'] == str(wd / 'stage1')
    assert json.load(open(wd / 'stage2_random_init' / 'config.json'))['init_from'] == 'random_init'
    assert os.path.exists(wd / 'stage2' / 'figures' / 'clusters_0000003.png')
    results = json.load(open(wd / 'results.json'))
    # detection: the rows without stage-2 seeds over three regressor seeds (ROW@reg1, ROW@reg2)
    single = [r for r in ROWS if not r.startswith('sce_mae')]
    assert sorted(results['matching']) == ROWS and sorted(results['detection']) == sorted(
        ROWS + ['mean_shape'] + [f'{r}@reg{k}' for r in single for k in (1, 2)])
    assert results['spread']['detection']['mae']['synthetic_wild_5'][2] == 3
    assert set(results['detection']['sce_mae']) == {'synthetic_wild_5'}  # the 68-point set only on request
    # the seeds of stage 2 are folded into mean ± std (n = 2) in results.json and the report
    same = [results['matching'][r]['same'] for r in ('sce_mae', 'sce_mae@seed1')]
    mean, _, n = results['spread']['matching']['sce_mae']['same']
    assert n == 2 and abs(mean - sum(same) / 2) < 1e-9
    assert results['spread']['detection']['sce_mae']['synthetic_wild_5'][2] == 2
    assert sorted(results['premise']) == ['mae', 'random_init'] and len(results['premise']['mae']) == 3
    report = (wd / 'report.md').read_text()
    for needle in ('Table 1', 'Table 2', '| `mae` |', 'figures/matches.png', 'figures/detection_synthetic_wild_5.png',
                   'figures/monitor_mae.png', 'figures/monitor_sce_mae.png',
                   '`sce_mae` 2: stage-2 seeds', '- `sce_mae`: same ', '- `sce_mae`: synthetic_wild_5 '):
        assert needle in report
    # the pipeline's own config stays at the top; evaluations keep theirs in results.json
    assert json.load(open(wd / 'config.json'))['job'] == 'pipeline'
    proc = run_main(args, timeout=600)  # a rerun redoes nothing
    assert 'not recomputing' in proc.stderr and 'without recomputing' in proc.stderr


def test_variants_and_seeds_are_rows_of_their_own():
    """Each (variant, seed) is one stage-2 workdir and one row; the first seed's run is the row itself."""
    import pytest

    from sce_mae_jax import config_lib, quickstart
    from sce_mae_jax.errors import ConfigError
    config = config_lib.parse_arg('')  # a bare ConfigDict standing in for the pipeline config
    config.stage2 = config_lib.carb('t', None, dim=64, eta=0.1)
    config.stage2_seeds = (0, 5)
    config.variants = {'cl': 'ablation=cl;projector.softmax_scale=1.0'}
    runs = quickstart.stage2_runs(config)
    assert [(r, f) for r, f, _ in runs] == [('sce_mae', 'stage2'), ('sce_mae@seed5', 'stage2_seed5'),
                                             ('cl', 'stage2_cl'), ('cl@seed5', 'stage2_cl_seed5')]
    assert runs[3][2] == {**config_lib.ABLATIONS['cl'], 'projector.softmax_scale': 1.0, 'seed': 5}
    varied = quickstart._with(config.stage2, runs[3][2])
    assert (varied.seed, varied.carb.clustering, varied.projector.softmax_scale) == (5, False, 1.0)
    assert config.stage2.carb.clustering and config.stage2.seed == 0  # the base config is untouched
    with pytest.raises(ConfigError, match='unknown ablation'):
        quickstart.parse_overrides('ablation=nope')
    with pytest.raises(ConfigError, match='does not have'):
        quickstart._with(config.stage2, {'carb.nope': 1})


def test_spread_and_verdicts():
    from sce_mae_jax.evals import report
    section = {'mae': {'diff': 5.0, 'same': 1.0}, 'sce_mae': {'diff': 4.0, 'same': 1.1},
               'sce_mae@seed1': {'diff': 4.2, 'same': 0.9}, 'sce_mae@seed2': {'diff': 4.1, 'same': 1.2},
               'lin': {'diff': 4.9}, 'lin@seed1': {'diff': 5.3}}
    folded = report.spread(section)
    assert sorted(folded) == ['lin', 'sce_mae'] and folded['sce_mae']['diff'][2] == 3
    assert abs(folded['sce_mae']['diff'][0] - 4.1) < 1e-9 and abs(folded['sce_mae']['diff'][1] - 0.1) < 1e-9
    assert report.versus(section, 'sce_mae', 'mae', 'diff') == 'better'
    assert report.versus(section, 'sce_mae', 'mae', 'same') == 'no difference'  # seeds on both sides
    assert report.versus(section, 'lin', 'mae', 'diff') == 'no difference'
    assert report.versus(section, 'lin', 'mae', 'same') is None
    shown = report._with_spread(section)
    assert sorted(shown) == ['lin', 'mae', 'sce_mae'] and shown['mae'] == {'diff': 5.0, 'same': 1.0}
