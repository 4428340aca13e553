"""The quick-start `pipeline` job: stage 1, stage 2 from it with the backbone architecture carried over, the
random_init_carb control, then matching and detection into one results.json / report.md."""
import json
import os

from conftest import losses, run_main

ROWS = ['mae', 'pixels', 'positions', 'random_init', 'random_init_carb', 'sce_mae']


def test_quickstart_pipeline_runs_both_stages_and_the_evaluations(tmp_path):
    wd = tmp_path / 'qs'
    args = ['--config=configs/quickstart.py', f'--workdir={wd}', '--config.stage1.total_steps=4',
            '--config.stage1.batch_size=8', '--config.stage1.model.depth=3', '--config.stage2.total_steps=3',
            '--config.stage2.batch_size=8', '--config.stage1.figure_every=0', '--config.stage2.figure_every=3',
            '--config.evals.matching.num_images=8', '--config.evals.matching.batch_size=4',
            f'--config.evals.matching.pairs_cache={tmp_path / "pairs"}', '--config.evals.matching.figures.tsne_images=8',
            '--config.evals.matching.figures.tsne_runs=1', '--config.evals.matching.premise.images=8',
            '--config.evals.detection.num_train_images=16', '--config.evals.detection.num_test_images=8',
            '--config.evals.detection.total_steps=2', '--config.evals.detection.batch_size=8',
            '--config.evals.detection.figures.faces=2']
    run_main(args, timeout=600)
    assert sorted(losses(wd / 'stage1')) == [4]
    assert sorted(losses(wd / 'stage2')) == [3]
    stage2 = json.load(open(wd / 'stage2' / 'config.json'))
    assert stage2['model']['depth'] == 3 and stage2['init_from'] == str(wd / 'stage1')
    assert json.load(open(wd / 'stage2_random_init' / 'config.json'))['init_from'] == 'random_init'
    assert os.path.exists(wd / 'stage2' / 'figures' / 'clusters_0000003.png')
    results = json.load(open(wd / 'results.json'))
    assert sorted(results['matching']) == ROWS and sorted(results['detection']) == ROWS
    assert set(results['detection']['sce_mae']) == {'synthetic_5', 'synthetic_68'}
    assert sorted(results['premise']) == ['mae', 'random_init'] and len(results['premise']['mae']) == 3
    report = (wd / 'report.md').read_text()
    for needle in ('Table 1', 'Table 2', '| `mae` |', 'figures/matches.png', 'figures/detection_synthetic_5.png'):
        assert needle in report
    # the pipeline's own config stays at the top; evaluations keep theirs in results.json
    assert json.load(open(wd / 'config.json'))['job'] == 'pipeline'
    proc = run_main(args, timeout=600)  # a rerun redoes nothing
    assert 'not recomputing' in proc.stderr and 'without recomputing' in proc.stderr
