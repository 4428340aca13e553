"""Detection and limited annotations (evals/detection.py, the Regressor of models/heads.py): the pure pieces
against NumPy and hand cases, the regressor on a toy problem, and the jobs end to end on tiny synthetic runs."""
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO, TINY_FIELDS, cpu_env, run_main, train_here
from sce_mae_jax import config_lib
from sce_mae_jax.data import pipeline
from sce_mae_jax.evals import detection as D, metrics, regressor as R
from sce_mae_jax.models.heads import Regressor, cell_centres, soft_argmax
from sce_mae_jax.models.vit import patchify
from sce_mae_jax.errors import ConfigError


# ---------------------------------------------------------------------------------------------- pure functions
def _soft_argmax_reference(heat, temperature):
    b, h, w, k = heat.shape
    out = np.zeros((b, k, 2))
    xs = 2 * (np.arange(w) + 0.5) / w - 1
    ys = 2 * (np.arange(h) + 0.5) / h - 1
    for i in range(b):
        for j in range(k):
            z = temperature * heat[i, :, :, j].astype(np.float64)
            p = np.exp(z - z.max())
            p /= p.sum()
            out[i, j] = (p * xs[None, :]).sum(), (p * ys[:, None]).sum()
    return out


def test_soft_argmax_matches_numpy():
    heat = np.random.default_rng(0).normal(0, 0.03, (2, 5, 7, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(jax.jit(soft_argmax)(heat)), _soft_argmax_reference(heat, 100.0),
                               atol=1e-5)


def test_soft_argmax_of_one_hot_is_the_cell_centre():
    heat = np.zeros((1, 8, 12, 1), np.float32)
    heat[0, 3, 5, 0] = 1.0          # e^100 against 95 × e^0: all the mass on row 3, column 5
    xy = np.asarray(soft_argmax(heat, 100.0))[0, 0]
    np.testing.assert_allclose(xy, [2 * 5.5 / 12 - 1, 2 * 3.5 / 8 - 1], atol=1e-6)
    # on a 12x12 map of a 96-px image, the 8-px cell [40, 48) x [24, 32) is centred at pixel (43.5, 27.5)
    square = np.zeros((1, 12, 12, 1), np.float32)
    square[0, 3, 5, 0] = 1.0
    np.testing.assert_allclose(np.asarray(R.to_pixels(soft_argmax(square), 96))[0, 0], [43.5, 27.5], atol=1e-4)


def test_coordinates_round_trip_with_half_pixel_centres():
    x = np.array([[0.0, 95.0], [47.5, 12.25], [-0.5, 95.5]], np.float32)
    u = np.asarray(R.to_normalized(x, 96))
    np.testing.assert_allclose(u[2], [-1.0, 1.0], atol=1e-6)       # the image edges
    np.testing.assert_allclose(u[1, 0], 0.0, atol=1e-6)            # the image centre
    np.testing.assert_allclose(np.asarray(R.to_pixels(u, 96)), x, atol=1e-4)
    # cell centres of a 48-cell (stride-2) map sit at pixels 2c + 0.5
    np.testing.assert_allclose(np.asarray(R.to_pixels(cell_centres(48), 96)), 2 * np.arange(48) + 0.5, atol=1e-4)


def test_iod_error_five_points_by_hand():
    gt = np.array([[[30, 40], [60, 40], [45, 55], [35, 70], [55, 70]]], np.float32)  # eyes 30 px apart
    pred = gt.copy()
    pred[0, 0] += [3, 0]       # 3 px
    pred[0, 2] += [0, -6]      # 6 px
    pred[0, 4] += [3, 4]       # 5 px
    err = np.asarray(metrics.iod_error(pred, gt, (0, 1)))
    np.testing.assert_allclose(err, [100 * (3 + 6 + 5) / 5 / 30], rtol=1e-6)   # 9.333...


def test_iod_error_68_points_by_hand():
    rng = np.random.default_rng(0)
    gt = rng.uniform(10, 80, (2, 68, 2)).astype(np.float32)
    gt[0, 36], gt[0, 45] = (20, 50), (70, 50)     # outer eye corners 50 px apart
    gt[1, 36], gt[1, 45] = (30, 30), (54, 40)     # 26 px apart
    pred = gt + np.array([3, 4], np.float32)      # every point 5 px off
    np.testing.assert_allclose(np.asarray(metrics.iod_error(pred, gt, (36, 45))), [10.0, 100 * 5 / 26], rtol=1e-5)


def test_smooth_l1_on_ten_times_coordinates():
    rng = np.random.default_rng(1)
    pred, target = rng.uniform(-1, 1, (4, 5, 2)), rng.uniform(-1, 1, (4, 5, 2))
    d = np.abs(10 * (pred - target))
    want = np.where(d < 1, 0.5 * d ** 2, d - 0.5).mean()
    assert abs(float(R.smooth_l1(jnp.asarray(pred), jnp.asarray(target))) - want) < 1e-5
    # by hand: differences 0.05 and 0.3 → 10× = 0.5 and 3 → 0.125 and 2.5
    got = R.smooth_l1(jnp.array([0.05, 0.3]), jnp.zeros(2))
    assert abs(float(got) - (0.125 + 2.5) / 2) < 1e-6


def test_pixel_windows_are_the_patch_window_of_each_cell():
    img = np.random.default_rng(2).normal(size=(1, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(R.pixel_windows(img, patch=8, stride=8)).reshape(1, 16, -1),
                               np.asarray(patchify(img, 8)), atol=0)
    win = np.asarray(R.pixel_windows(img, patch=8, stride=2))      # (1, 16, 16, 192)
    padded = np.pad(img, ((0, 0), (3, 8), (3, 8), (0, 0)))         # window of cell r starts at 2r − 3
    for r, c in [(0, 0), (5, 9), (15, 15), (7, 2)]:
        want = padded[0, 2 * r:2 * r + 8, 2 * c:2 * c + 8].reshape(-1)
        np.testing.assert_allclose(win[0, r, c], want, atol=0)


def test_regressor_starts_at_the_mean_of_its_points():
    reg = Regressor(num_landmarks=3, heatmaps_per_landmark=4, hidden=(8,))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 5))
    params = reg.init(jax.random.PRNGKey(1), x)['params']
    out, points = reg.apply({'params': params}, x, return_points=True)
    assert out.shape == (2, 3, 2) and points.shape == (2, 3, 4, 2)
    np.testing.assert_allclose(np.asarray(out), np.asarray(points.mean(2)), atol=1e-6)
    # the per-landmark 2K → 2 map is one (L, 2K, 2) kernel and nothing else: no bias
    assert sorted(params) == ['combine', 'heatmaps', 'hidden_0'] and params['combine'].shape == (3, 8, 2)


def test_regressor_learns_a_toy_problem():
    """Two bumps in two channels of a 12x12 map (plus noise channels); the landmarks are the bump centres."""
    rng = np.random.default_rng(3)

    def batch(n):
        pos = rng.integers(1, 11, (n, 2, 2))           # (x, y) cells of 2 landmarks
        yy, xx = np.mgrid[0:12, 0:12]
        maps = rng.normal(0, 0.1, (n, 12, 12, 4)).astype(np.float32)
        for l in range(2):
            d2 = (xx[None] - pos[:, l, 0, None, None]) ** 2 + (yy[None] - pos[:, l, 1, None, None]) ** 2
            maps[..., l] += np.exp(-d2 / 2.0)
        return jnp.asarray(maps), jnp.asarray(2 * (pos + 0.5) / 12 - 1, jnp.float32)

    reg = Regressor(num_landmarks=2, heatmaps_per_landmark=8, hidden=(16,))
    x0, _ = batch(1)
    params = reg.init(jax.random.PRNGKey(0), x0)['params']
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y):
        loss, g = jax.value_and_grad(lambda p: R.smooth_l1(reg.apply({'params': p}, x), y))(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt, loss

    losses = []
    for _ in range(250):
        params, opt, loss = step(params, opt, *batch(16))
        losses.append(float(loss))
    assert np.mean(losses[-20:]) < 0.25 * np.mean(losses[:10]), (losses[:10], losses[-20:])
    x, y = batch(64)
    err_cells = np.abs(np.asarray(reg.apply({'params': params}, x)) - np.asarray(y)) * 6   # in cells
    assert err_cells.mean() < 0.75, err_cells.mean()


def test_limited_draws_are_seeded_and_nested():
    a, b = D.limited_indices(100, 5, 0), D.limited_indices(100, 20, 0)
    np.testing.assert_array_equal(a, b[:5])
    np.testing.assert_array_equal(a, D.limited_indices(100, 5, 0))
    assert not np.array_equal(a, D.limited_indices(100, 5, 1))
    assert len(set(b.tolist())) == 20
    with pytest.raises(ConfigError, match='limited.sizes'):
        D.limited_indices(10, 20, 0)


def test_tps_augmentation_moves_points_with_the_image():
    cfg = config_lib.eval_limited('data=synthetic')
    image = np.zeros((136, 136, 3), np.uint8)
    points = np.array([[50.0, 60.0], [80.0, 70.0]], np.float32)
    for x, y in points.astype(int):
        image[y - 1:y + 2, x - 1:x + 2] = 255
    # the configured warp, with zero sds, is the identity
    still = cfg.tps.copy_and_resolve_references()
    still.update(noise_all=0.0, translation=0.0, scale=0.0, rotation_deg=0.0)
    out = D.tps_transform(96, still)({'image': image, 'landmarks': points}, np.random.default_rng(0))
    np.testing.assert_array_equal(out['image'], pipeline.center_crop(image, 96))
    np.testing.assert_allclose(out['landmarks'], points - 20, atol=1e-3)
    # a strong warp: the bright blobs end where the moved points say
    strong = cfg.tps.copy_and_resolve_references()
    strong.update(translation=0.05, rotation_deg=5.0)
    out = D.tps_transform(96, strong)({'image': image, 'landmarks': points}, np.random.default_rng(1))
    assert np.abs(out['landmarks'] - (points - 20)).max() > 1.0   # it did move
    for x, y in out['landmarks']:
        yi, xi = int(round(y)), int(round(x))
        assert out['image'][yi - 1:yi + 2, xi - 1:xi + 2].max() > 128


def test_landmark_check_names_the_missing_key():
    view = D.LandmarkView(pipeline.ArraySource(image=np.zeros((2, 136, 136, 3), np.uint8),
                                               landmarks=np.zeros((2, 5, 2), np.float32)), 'landmarks68')
    with pytest.raises(ConfigError, match="no 'landmarks68'"):
        D._check_landmarks(view, 68, 'data=x (test)')


# ---------------------------------------------------------------------------------------------- jobs end to end
@pytest.fixture(scope='module')
def models(tmp_path_factory):
    """A tiny stage-1 workdir (2 steps) and a stage-2 workdir on it (2 steps): rows mae and sce_mae."""
    root = tmp_path_factory.mktemp('models')
    train_here('pretrain', root / 's1', {**TINY_FIELDS, 'batch_size': 8, 'total_steps': 2, 'figure_every': 0})
    train_here('carb', root / 's2', {'model.embed_dim': 48, 'model.depth': 2, 'model.num_heads': 2, 'carb.layer': 1,
                                     'batch_size': 8, 'total_steps': 2, 'figure_every': 0,
                                     'init_from': str(root / 's1')})
    return root / 's1', root / 's2'


def _quick(models, rows="('pixels','sce_mae')"):
    s1, s2 = models
    return ['--config=configs/eval_detection.py', f'--config.stage1={s1}', f'--config.stage2={s2}',
            f'--config.rows={rows}', '--config.total_steps=3', '--config.batch_size=8',
            '--config.num_train_images=16', '--config.num_test_images=10', '--config.features.stride=4',
            '--config.regressor.hidden=(16,)', '--config.regressor.heatmaps_per_landmark=10', '--config.log_every=1',
            '--config.figures.faces=3']


@pytest.fixture(scope='module')
def detection_run(models, tmp_path_factory):
    wd = tmp_path_factory.mktemp('detection')
    proc = run_main([*_quick(models), f'--workdir={wd}'], devices=2)
    return wd, proc


def test_detection_job_writes_every_row_and_set(detection_run):
    wd, _ = detection_run
    results = json.load(open(wd / 'results.json'))
    assert sorted(results['detection']) == ['pixels', 'sce_mae']
    for row, sets in results['detection'].items():
        assert sorted(sets) == ['synthetic_5', 'synthetic_68']
        assert all(np.isfinite(v) and v > 0 for v in sets.values()), (row, sets)
        for s in sets:   # every regressor trained the 3 steps and kept its checkpoint
            assert os.path.isdir(wd / 'detection' / s / row / 'checkpoints' / '3')
    meta = results['meta']['detection/synthetic_68']
    assert meta['landmarks'] == 68 and meta['iod_indices'] == [36, 45] and meta['test_images'] == 10
    assert results['meta']['detection/synthetic_5']['iod_indices'] == [0, 1]
    for key in ('synthetic_5', 'synthetic_68'):
        (_, rel), = results['meta'][f'detection/{key}']['figures']
        assert os.path.getsize(wd / rel) > 1000
    assert '## Landmark detection (paper Table 2)' in open(wd / 'report.md').read()


def test_rerun_returns_stored_results(detection_run, models):
    wd, _ = detection_run
    before = os.path.getmtime(wd / 'results.json'), json.load(open(wd / 'results.json'))
    proc = run_main([*_quick(models), f'--workdir={wd}'], devices=2)
    assert 'without recomputing' in proc.stderr and 'training steps' not in proc.stderr
    assert (os.path.getmtime(wd / 'results.json'), json.load(open(wd / 'results.json'))) == before


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(detection_run, models, tmp_path):
    wd, _ = detection_run
    args = [*_quick(models, rows="('sce_mae',)"), '--config.only=synthetic_5', f'--workdir={tmp_path}']
    env = cpu_env(1)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, '-m', 'sce_mae_jax.main', *args,
                               f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:  # one process failing leaves the other waiting on it: never leave it behind
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    multi = json.load(open(tmp_path / 'results.json'))['detection']
    single = json.load(open(wd / 'results.json'))['detection']
    assert json.load(open(tmp_path / 'results.json'))['meta']['detection/synthetic_5']['versions']['processes'] == 2
    np.testing.assert_allclose(multi['sce_mae']['synthetic_5'], single['sce_mae']['synthetic_5'], rtol=1e-5)


def test_bad_stride_is_one_line_and_nonzero_exit(models, tmp_path):
    proc = run_main([*_quick(models), '--config.features.stride=3', f'--workdir={tmp_path}'], check=False)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith('error: features.stride=3 must divide the patch size 8')


def _config(models, fn=config_lib.eval_detection, arg=None, **fields):
    c = fn(arg)
    s1, s2 = models
    c.stage1, c.stage2 = str(s1), str(s2)
    c.update(batch_size=8, num_train_images=16, num_test_images=8, figures=dict(faces=0))
    c.features.stride = 4
    c.regressor.update(hidden=(8,), heatmaps_per_landmark=4)
    for k, v in fields.items():
        c[k] = v
    return c


@pytest.mark.parametrize('fields, message', [
    ({'data': 'celeba'}, "data='celeba' cannot be used for detection"),
    ({'data': 'aflw_rc'}, 'AFLW_RC is evaluated by data=aflw_r'),
    ({'only': 'mafl'}, "only='mafl'"),
    ({'augment': 'flip'}, "augment='flip'"),
    ({'batch_size': 32}, 'fewer than one batch'),
    ({'rows': ('pixels', 'bogus')}, 'unknown row'),
    ({'regressor_seeds': 0}, 'regressor_seeds=0 must be an integer ≥ 1'),
    ({'extra': 'sce_mae@reg1=/x'}, '"@" only marks a stage-2 seed replicate'),
])
def test_bad_inputs_are_config_errors(models, tmp_path, fields, message):
    with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace(')', r'\)')):
        D.run(_config(models, **fields), str(tmp_path))


def test_changed_settings_in_a_used_workdir_are_a_config_error(detection_run, models):
    wd, _ = detection_run
    with pytest.raises(ConfigError, match='trained with other settings'):   # here: other regressor widths
        D.run(_config(models, rows=('pixels',)), str(wd))


def test_regressor_seeds_replicate_the_rows_without_stage2_replicates(models, tmp_path):
    s2 = str(models[1])
    config = _config(models, rows=('mae', 'sce_mae'), regressor_seeds=2, only='synthetic_5', total_steps=2,
                     extra=f'sce_mae@seed1={s2}')
    out = D.run(config, str(tmp_path))['detection']
    # mae has no stage-2 replicates: two regressors (seeds 0, 1); sce_mae has one: one regressor per replicate
    assert sorted(out) == ['mae', 'mae@reg1', 'sce_mae', 'sce_mae@seed1']
    unit = tmp_path / 'detection' / 'synthetic_5'
    assert [json.load(open(unit / r / 'regressor.json'))['seed'] for r in ('mae', 'mae@reg1', 'sce_mae')] == [0, 1, 0]
    assert out['mae']['synthetic_5'] != out['mae@reg1']['synthetic_5']   # another initialisation and batch order
    results = json.load(open(tmp_path / 'results.json'))
    assert results['spread']['detection']['mae']['synthetic_5'][2] == 2
    assert '- `sce_mae`: synthetic_5 ' in open(tmp_path / 'report.md').read()
    assert D.run(config, str(tmp_path))['detection'] == out   # stored: every replicate returned


def test_limited_job_reports_mean_and_std_over_seeds(models, tmp_path):
    config = _config(models, config_lib.eval_limited, 'data=synthetic', rows=('mae',))   # the backbone-only kind
    config.features.stride = 8
    config.limited.update(sizes=(1, 3), seeds=(0, 1), epochs=1, epoch_size=16)
    out = D.run_limited(config, str(tmp_path))
    results = json.load(open(tmp_path / 'results.json'))
    assert out['limited'] == results['limited'] and sorted(results['limited']['mae']) == ['1', '3']
    runs = results['meta']['limited/synthetic_5']['runs']['mae']
    for n in ('1', '3'):
        mean, std = results['limited']['mae'][n]
        assert len(runs[n]) == 2 and np.isclose(mean, np.mean(runs[n])) and np.isclose(std, np.std(runs[n]))
    annotated = [json.load(open(tmp_path / 'limited' / 'synthetic_5' / 'mae' / f'n3_seed{s}' / 'regressor.json'))
                 ['annotated'] for s in (0, 1)]
    assert len(annotated[0]) == 3 and annotated[0] != annotated[1]
    stamp = os.path.getmtime(tmp_path / 'results.json')
    assert D.run_limited(config, str(tmp_path)) == out and os.path.getmtime(tmp_path / 'results.json') == stamp
    # without results.json every run restores its finished regressor (no training) and tests it again
    unit = tmp_path / 'limited' / 'synthetic_5' / 'mae' / 'n1_seed0'
    logged = open(unit / 'metrics.jsonl').read()
    os.remove(tmp_path / 'results.json')
    assert D.run_limited(config, str(tmp_path)) == out
    assert os.listdir(unit / 'checkpoints') == ['2'] and open(unit / 'metrics.jsonl').read() == logged
    config.limited.sizes = (1, 40)
    with pytest.raises(ConfigError, match='asks for 40 annotated images'):
        D.run_limited(config, str(tmp_path / 'again'))


# ---------------------------------------------------------------------------------------------- real layouts
@pytest.mark.parametrize('job', ['detection', 'limited'])
def test_jobs_read_real_datasets_in_the_documented_layout(models, tmp_path, job):
    """`:data=mafl` (detection) and the default `aflw_m` (limited) on the dataset tests' fixture trees: 2 MAFL
    and 2 AFLW_M training images, prepared from the raw files on first use."""
    from test_datasets import make_aflw_m, make_celeba
    data, make, key = {'detection': ('mafl', make_celeba, 'mafl'), 'limited': ('aflw_m', make_aflw_m, 'aflw_m')}[job]
    raw = tmp_path / 'raw'
    raw.mkdir()
    make(raw)
    s1, s2 = models
    config = 'configs/eval_detection.py:data=mafl' if job == 'detection' else 'configs/eval_limited.py'
    args = [f'--config={config}', f'--config.stage1={s1}', f'--config.stage2={s2}', "--config.rows=('sce_mae',)",
            '--config.total_steps=2', '--config.batch_size=2', '--config.features.stride=8',
            '--config.regressor.hidden=(8,)', '--config.regressor.heatmaps_per_landmark=4',
            f'--config.manual_dir={raw}', f'--config.data_dir={tmp_path / "tfds"}', f'--workdir={tmp_path / "ev"}']
    if job == 'limited':
        args += ['--config.limited.sizes=(1,2)', '--config.limited.seeds=(0,1)', '--config.limited.epoch_size=4']
    run_main(args)
    results = json.load(open(tmp_path / 'ev' / 'results.json'))
    if job == 'detection':
        err = results['detection']['sce_mae'][key]
        assert np.isfinite(err) and err > 0
        assert results['meta'][f'detection/{key}']['test_images'] == 2
    else:
        assert sorted(results['limited']['sce_mae']) == ['1', '2']
        for mean, std in results['limited']['sce_mae'].values():
            assert np.isfinite(mean) and mean > 0 and std >= 0
