"""The matching job end to end on tiny workdirs: results, report, figures, stored reruns, device and process
counts, and the bad inputs a user meets."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, TINY_FIELDS, cpu_env, run_main, train_here


@pytest.fixture(scope='module')
def workdirs(tmp_path_factory):
    """Stage 1 and stage 2 on it and on an untrained backbone, trained in this process."""
    root = tmp_path_factory.mktemp('eval')
    stage1 = {**TINY_FIELDS, 'batch_size': 8, 'total_steps': 3, 'figure_every': 0}
    train_here('pretrain', root / 's1', stage1)
    stage2 = {k: TINY_FIELDS[k] for k in ('model.embed_dim', 'model.depth', 'model.num_heads')}
    stage2.update({'carb.layer': 0, 'batch_size': 8, 'total_steps': 3, 'figure_every': 0})
    for name, init in (('s2', root / 's1'), ('s2r', 'random_init')):
        train_here('carb', root / name, {**stage2, 'init_from': str(init)})
    return root


def _args(root, workdir, *extra):
    return ['--config=configs/eval_matching.py', f'--config.stage1={root / "s1"}', f'--config.stage2={root / "s2"}',
            f'--config.random_init_carb={root / "s2r"}', '--config.num_images=12', '--config.batch_size=8',
            f'--config.pairs_cache={root / "pairs"}', '--config.figures.tsne_runs=0', '--config.figures.pairs=2',
            f'--workdir={workdir}', *extra]


def _matching(workdir):
    with open(os.path.join(workdir, 'results.json')) as f:
        return json.load(f)['matching']


@pytest.fixture(scope='module')
def full_run(workdirs, tmp_path_factory):
    """Every row (and a repeated one), the figures, on 1 device → (args, its workdir, the matching numbers as
    first written: the test below rewrites them, the device-count test compares with them)."""
    wd = tmp_path_factory.mktemp('full') / 'ev'
    args = _args(workdirs, wd, '--config.figures.tsne_runs=2', '--config.figures.tsne_images=12',
                 '--config.figures.tsne_iters=250',
                 f'--config.extra=again={workdirs / "s2"}')
    run_main(args)
    return args, wd, _matching(wd)


def test_rows_report_figures_and_stored_rerun(full_run):
    args, wd, _ = full_run
    with open(wd / 'results.json') as f:
        results = json.load(f)
    rows = ['random_init', 'positions', 'pixels', 'mae', 'sce_mae', 'random_init_carb', 'again']
    assert sorted(results['matching']) == sorted(rows)
    for r in rows:
        assert set(results['matching'][r]) == {'same', 'diff', 'positional'}
        assert 0 <= results['matching'][r]['same'] < 70 and 0 <= results['matching'][r]['diff'] < 70
        assert 0 <= results['matching'][r]['positional'] <= 1 + 1e-5  # float32 sums
        m, s = results['silhouette'][r]
        assert -1 <= m <= 1 and s >= 0
    assert results['matching']['again'] == results['matching']['sce_mae']  # same workdir, same numbers
    # the sin-cos table is the same map for every image: all of its variance is place
    assert results['matching']['positions']['positional'] == pytest.approx(1.0, abs=1e-6)
    assert results['matching']['pixels']['positional'] < 0.5
    assert sorted(results['geometry']) == sorted(('same_place', 'face_translation', 'face_similarity'))
    for ref in results['geometry'].values():
        assert set(ref) == {'same', 'diff'} and all(0 <= v < 70 for v in ref.values())
    meta = results['meta']['matching']
    assert meta['pairs'] == 12 and meta['stride'] == 4 and meta['command'].startswith('python -m sce_mae_jax.main')
    report = (wd / 'report.md').read_text()
    assert '| `sce_mae` |' in report and 'Table 1' in report and '| `face_similarity` |' in report
    for png in ('matches', 'similarity', 'tsne'):
        assert (wd / 'figures' / f'{png}.png').stat().st_size > 1000
        assert f'figures/{png}.png' in report
    before = (wd / 'results.json').stat().st_mtime_ns
    proc = run_main(args)
    assert 'not recomputing' in proc.stderr
    assert (wd / 'results.json').stat().st_mtime_ns == before
    # a run with fewer rows replaces the matching section: no row of the earlier run lingers under its meta
    run_main([*args, '--config.rows=("pixels",)', '--config.extra='])
    assert sorted(_matching(wd)) == ['pixels']


def test_pixels_and_positions_match_exactly_on_unwarped_pairs(workdirs, tmp_path):
    """A pair whose target is its source: the rows that see the image itself, or only where a pixel is, find
    each landmark at 0 px."""
    from sce_mae_jax.data import pairs as pairs_lib
    from sce_mae_jax.data.sources import get_source
    p = pairs_lib.make_matching_pairs(get_source('synthetic', 'match'), num_images=12)
    ident = {k: v for k, v in p.items()}
    ident['tgt_images'], ident['tgt_landmarks'] = p['src_images'], np.rint(p['src_landmarks'])
    ident['src_landmarks'] = ident['tgt_landmarks']
    pairs_lib.save_pairs(tmp_path / 'ident.npz', ident)
    run_main(_args(workdirs, tmp_path / 'ev', f'--config.pairs_file={tmp_path / "ident.npz"}',
                   '--config.rows=("pixels","positions")'))
    got = _matching(tmp_path / 'ev')
    assert {r: {k: got[r][k] for k in ('same', 'diff')} for r in got} == \
        {r: {'same': 0.0, 'diff': 0.0} for r in ('pixels', 'positions')}
    with open(tmp_path / 'ev' / 'results.json') as f:
        geometry = json.load(f)['geometry']
    assert geometry['same_place'] == {'same': 0.0, 'diff': 0.0}  # so are the references
    assert all(v < 1e-4 for ref in geometry.values() for v in ref.values())


def test_positional_share_is_one_for_a_position_code_and_zero_for_a_place_free_one():
    """Sums as `matching_sums` leaves them: per-location sums of unit descriptors over the images."""
    from sce_mae_jax.evals import matching
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    place = unit(rng.normal(size=(6, 6, 8)))                       # one descriptor per location, every image
    assert matching.positional_share(place * 30, 30) == pytest.approx(1.0)
    per_image = unit(rng.normal(size=(30, 1, 1, 8))) * np.ones((30, 6, 6, 8))   # one per image, every location
    assert matching.positional_share(per_image.sum(0), 30) == pytest.approx(0.0, abs=1e-12)
    half = unit(place + unit(rng.normal(size=(30, 6, 6, 8))))        # place and noise in equal parts
    assert 0.2 < matching.positional_share(half.sum(0), 30) < 0.8


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_same_numbers_on_one_and_eight_devices_and_two_processes(workdirs, full_run, tmp_path):
    # the numbers only: figures and the premise statistics read the same features (tested above and in
    # test_attentive), and drawing them here again cost a third of the test; 1 device is the run above
    numbers = ['--config.figures.pairs=0', '--config.premise.images=0']
    run_main(_args(workdirs, tmp_path / 'd8', *numbers), devices=8)
    port = _free_port()
    env = cpu_env(2)
    procs = [subprocess.Popen([sys.executable, '-m', 'sce_mae_jax.main', *_args(workdirs, tmp_path / 'p2', *numbers),
                               f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    one = full_run[2]
    for other in (_matching(tmp_path / 'd8'), _matching(tmp_path / 'p2')):
        assert sorted(other) == sorted(set(one) - {'again'})
        for row in other:
            np.testing.assert_allclose([other[row][k] for k in ('same', 'diff', 'positional')],
                                       [one[row][k] for k in ('same', 'diff', 'positional')], rtol=1e-5)


@pytest.mark.parametrize('case', ['other_backbone', 'bad_pairs', 'stride', 'not_stage2', 'no_model',
                                  'control_seed'])
def test_bad_input_is_one_line_and_writes_nothing(workdirs, tmp_path, case):
    wd = tmp_path / 'ev'
    extra, expect = {
        # a stage 2 of the untrained backbone offered as stage 1's
        'other_backbone': ([f'--config.stage2={workdirs / "s2r"}'], 'trained on another backbone'),
        'bad_pairs': ([f'--config.pairs_file={tmp_path / "bad.npz"}'], 'expected layout'),
        'stride': (['--config.features.stride=3'], 'must divide the patch size 8'),
        'not_stage2': ([f'--config.stage2={workdirs / "s1"}'], 'not a stage-2'),
        'no_model': (['--config.stage1=', '--config.stage2='], 'needs a model'),
        'control_seed': (['--config.seed=1'], 'froze the untrained backbone of seed 0'),
    }[case]
    np.savez(tmp_path / 'bad.npz', src_images=np.zeros((2, 96, 96, 3), np.uint8))
    proc = run_main(_args(workdirs, wd, *extra), check=False)
    assert proc.returncode != 0 and expect in proc.stderr, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr
    assert not wd.exists()


def test_mafl_pairs_from_a_prepared_tree(workdirs, tmp_path):
    """`:data=mafl` reads the MAFL test split of a CelebA tree laid out as docs/datasets.md says (the dataset
    tests' fixture: 2 test images → 1 same + 1 different pair, padded into one batch of 8)."""
    from test_datasets import make_celeba
    raw = tmp_path / 'celeba'
    raw.mkdir()
    make_celeba(raw)
    args = _args(workdirs, tmp_path / 'ev', '--config.num_images=2', '--config.rows=("pixels","mae")',
                 f'--config.manual_dir={raw}', f'--config.data_dir={tmp_path / "tfds"}')
    args[0] = '--config=configs/eval_matching.py:data=mafl'
    run_main(args)
    with open(tmp_path / 'ev' / 'results.json') as f:
        results = json.load(f)
    assert results['meta']['matching']['data'] == 'mafl' and results['meta']['matching']['pairs'] == 2
    assert sorted(results['matching']) == ['mae', 'pixels']
    assert set(results['matching']['mae']) == {'same', 'diff', 'positional'}
