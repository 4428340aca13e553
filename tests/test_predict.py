"""predict.py, landmarker.py and export.py on one tiny quick-start-style workdir (stage1/, stage2/, a detection
regressor), trained a step each in-process: landmarks on a folder of faces of several sizes and formats come
back in each file's own pixels, equal to the evaluation's predictions on the same crops; bad files are one
line each; the export loads in the Landmarker and in the evaluations' row loader with the same weights."""
import contextlib
import csv
import io
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from sce_mae_jax import Landmarker, config_lib, export, predict
from sce_mae_jax.data import framing, pipeline
from sce_mae_jax.data.sources import get_source
from sce_mae_jax.errors import ConfigError
from sce_mae_jax.evals import detection, regressor, rows as rows_lib
from sce_mae_jax.train import carb, common, pretrain
from sce_mae_jax.train import checkpoints

TINY = dict(embed_dim=48, depth=2, num_heads=2)
PAD = 32   # face1.png: the 136-px face with 32 black columns each side


@pytest.fixture(scope='module')
def model(tmp_path_factory):
    """root/stage1 (MAE, 1 step), root/stage2 (CARB on it, 1 step), root/detection/synthetic_5/sce_mae
    (a regressor, 1 step) and root/results.json: the quick start's layout, in-process to share compilations."""
    root = str(tmp_path_factory.mktemp('quickstart'))
    s1 = config_lib.mae('t', None)
    s1.model.update(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, **TINY)
    s1.update(total_steps=1, batch_size=8, figure_every=0, log_every=1)
    pretrain.train(s1, os.path.join(root, 'stage1'))
    s2 = config_lib.carb('t', None, dim=16, eta=0.1)
    s2.model.update(**TINY)
    s2.update(total_steps=1, batch_size=8, figure_every=0, log_every=1, init_from=os.path.join(root, 'stage1'))
    s2.carb.layer = 1
    carb.train(s2, os.path.join(root, 'stage2'))
    det = config_lib.eval_detection(None)
    det.update(stage1=os.path.join(root, 'stage1'), stage2=os.path.join(root, 'stage2'), rows=('sce_mae',),
               only='synthetic_5', total_steps=1, batch_size=8, num_train_images=8, num_test_images=8)
    det.features.stride = 8
    det.figures.faces = 0
    det.regressor.update(hidden=(16,), heatmaps_per_landmark=10)
    detection.run(det, root)
    return root, det


@pytest.fixture(scope='module')
def faces():
    """Three synthetic test faces (136-px protocol frames) and their evaluation crops."""
    src = get_source('synthetic', 'test')
    images = [src[i]['image'] for i in range(3)]
    return images, np.stack([pipeline.eval_transform(96)({'image': im})['image'] for im in images])


def _evaluation_predict(model, crops):
    """The detection job's own jitted `predict` (evals/regressor.Regression) with the regressor it trained."""
    root, det = model
    encoder, rows, _ = rows_lib.load_rows(det)
    task = detection.Task('synthetic_5', None, [], 5, (0, 1), 'synthetic')
    fns = regressor.Regression(det, row=rows[0], encoder=encoder, mesh=common.make_mesh(), task=task, total_steps=1,
                               lr=det.lr)
    params = checkpoints.load_params(os.path.join(root, 'detection', 'synthetic_5', 'sce_mae'))
    return np.asarray(fns.predict(params, fns.frozen, jax.numpy.asarray(crops)))


@pytest.fixture(scope='module')
def folder(tmp_path_factory, faces):
    d = tmp_path_factory.mktemp('faces')
    images, _ = faces
    Image.fromarray(images[0]).save(d / 'face0.png')
    Image.fromarray(np.pad(images[1], ((0, 0), (PAD, PAD), (0, 0)))).save(d / 'face1.png')      # 200 x 136
    Image.fromarray(images[2]).resize((272, 272), Image.NEAREST).save(d / 'face2.jpg', quality=95)
    whole = (d / 'face2.jpg').read_bytes()
    (d / 'broken.jpg').write_bytes(whole[:len(whole) // 2])
    (d / 'notes.txt').write_text('not a face\n')
    (d / 'empty.png').write_bytes(b'')
    return d


@pytest.fixture(scope='module')
def cli_run(model, folder, tmp_path_factory):
    """The command line, in this process so that it shares the compilations (a subprocess would pay JAX's
    start and every compile again); batches of 2 for 3 images, so the last one is padded."""
    out = tmp_path_factory.mktemp('pred')
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture):
        status = predict.main([f'--model={model[0]}', f'--images={folder}', f'--out={out}', '--overlays',
                               '--batch_size=2'])
    assert status == 0
    return out, capture.getvalue()


def _csv(path):
    with open(path) as f:
        rows = list(csv.reader(f))
    return rows[0], {r[0]: np.array(r[1:], np.float64).reshape(-1, 2) for r in rows[1:]}


def test_cli_gives_landmarks_in_each_files_own_pixels(model, faces, folder, cli_run):
    out, _ = cli_run
    header, got = _csv(out / 'landmarks.csv')
    assert header[:3] == ['file', 'x0', 'y0'] and len(header) == 11 and sorted(got) == [
        'face0.png', 'face1.png', 'face2.jpg']
    _, crops = faces
    ev = _evaluation_predict(model, crops[:2])
    # the 136-px PNG is the evaluation's own crop: its predictions, moved by the 20-px margin
    np.testing.assert_allclose(got['face0.png'], ev[0] + 20, atol=0.006)
    # padded sideways: the same crop, the points 32 px further right in the file
    np.testing.assert_allclose(got['face1.png'], ev[1] + [20 + PAD, 20], atol=0.006)
    # a 2x JPEG: the evaluation's predictions on the crop the model saw, mapped by x → 2(x + 20 + 0.5) − 0.5
    image = np.asarray(Image.open(folder / 'face2.jpg').convert('RGB'))
    seen = framing.to_model_image(image, framing.frame_for(image.shape[:2], 96))
    np.testing.assert_allclose(got['face2.jpg'], 2 * (_evaluation_predict(model, seen[None])[0] + 20.5) - 0.5,
                               atol=0.006)
    assert all(((p >= 0) & (p < 272)).all() for p in got.values())


def test_cli_skips_bad_files_with_one_line_each(cli_run):
    out, stdout = cli_run
    lines = stdout.strip().splitlines()
    skipped = [l for l in lines if l.startswith('skipped ')]
    assert len(skipped) == 3
    for name, why in (('broken.jpg', 'unreadable image data'), ('notes.txt', 'not an image'),
                      ('empty.png', 'empty file')):
        assert sum(name in l for l in skipped) == 1 and any(name in l and why in l for l in skipped), skipped
    assert lines[-1].startswith('predict: read 3 images, skipped 3')
    meta = json.load(open(out / 'landmarks.json'))
    assert meta['read'] == 3 and sorted(s['file'] for s in meta['skipped']) == ['broken.jpg', 'empty.png',
                                                                                  'notes.txt']
    face1 = next(r for r in meta['images'] if r['file'] == 'face1.png')
    assert (face1['width'], face1['height']) == (200, 136) and face1['window'] == {
        'top': 0, 'left': PAD, 'height': 136, 'width': 136}
    assert sorted(os.listdir(out / 'overlays')) == ['face0.png', 'face1.png', 'face2.png']
    assert Image.open(out / 'overlays' / 'face2.png').size == (272, 272)


def test_nothing_readable_is_a_nonzero_exit(model, tmp_path, capsys):
    (tmp_path / 'a.txt').write_text('x')
    with pytest.raises(SystemExit) as e:
        predict.main([f'--model={model[0]}', f'--images={tmp_path}', f'--out={tmp_path / "out"}'])
    assert 'no image could be read' in str(e.value.code)
    assert capsys.readouterr().out.splitlines()[0].startswith(f'skipped {tmp_path / "a.txt"}: not an image')


def test_api_equals_the_cli_and_batches_do_not_matter(model, faces, folder, cli_run):
    _, got = _csv(cli_run[0] / 'landmarks.csv')
    lm = Landmarker.load(model[0], batch_size=1)
    images = [np.asarray(Image.open(folder / n).convert('RGB')) for n in ('face0.png', 'face1.png', 'face2.jpg')]
    pts = lm.landmarks(images)
    assert pts.shape == (3, 5, 2) and lm.regressor_name == 'synthetic_5/sce_mae'
    np.testing.assert_allclose(pts, np.stack([got[n] for n in ('face0.png', 'face1.png', 'face2.jpg')]), atol=0.006)
    padded = np.pad(images[0], ((0, 0), (PAD, PAD), (0, 0)))      # the same crop as face0.png
    feats = lm.features([images[0], padded, images[1]])
    assert feats.shape == (3, 96, 96, 16)
    np.testing.assert_array_equal(feats[0], feats[1])
    assert np.abs(feats[0] - feats[2]).max() > 1e-3


def test_match_follows_points_into_the_other_image(model, faces, tmp_path, capsys):
    """A face and the same face padded sideways: the model sees the same crop, so every point must land on its
    own (rounded) pixel, 32 px to the right; the CLI prints them and writes the figure."""
    images, _ = faces
    a = tmp_path / 'a.png'
    b = tmp_path / 'b.png'
    Image.fromarray(images[0]).save(a)
    Image.fromarray(np.pad(images[0], ((0, 0), (PAD, PAD), (0, 0)))).save(b)
    points = np.array([[60.2, 70.0], [75.0, 66.4], [48.0, 90.0]])
    lm = Landmarker.load(model[0])
    got = lm.match(images[0], np.asarray(Image.open(b)), points)
    np.testing.assert_allclose(got, np.rint(points - 20) + [20 + PAD, 20], atol=1e-9)
    predict.main([f'--model={model[0]}', '--match', str(a), str(b), '--points=60.2,70;75,66.4;48,90',
                  f'--out={tmp_path / "m"}'])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f'point 0: {a} (60.2, 70.0) → {b} ({got[0, 0]:.1f}, {got[0, 1]:.1f})'
    assert len([l for l in lines if l.startswith('point ')]) == 3
    assert Image.open(tmp_path / 'm' / 'match.png').size[0] >= 3 * 288


def test_export_is_the_same_model(model, faces, tmp_path):
    root, _ = model
    out = str(tmp_path / 'exported')
    meta = export.export(root, out)
    assert meta['trained_on']['stage1']['steps'] == 1 and meta['trained_on']['stage2']['steps'] == 1
    assert meta['trained_on']['stage2']['projector']['out_dim'] == 16
    assert list(meta['regressors']) == ['synthetic_5/sce_mae'] and meta['regressors']['synthetic_5/sce_mae'][
        'landmarks'] == 5
    results = json.load(open(os.path.join(root, 'results.json')))
    assert meta['evaluation']['detection'] == results['detection'] == json.load(
        open(os.path.join(out, 'model.json')))['evaluation']['detection']
    # the whole MAE (decoder too) and nothing of the training (no optimiser state)
    params = checkpoints.load_params(os.path.join(out, 'stage1'))
    assert {'encoder', 'decoder_pred', 'decoder_blocks_0', 'mask_token'} <= set(params)
    assert not os.path.exists(os.path.join(out, 'stage1', 'metrics.jsonl'))
    images, _ = faces
    np.testing.assert_array_equal(Landmarker.load(out).landmarks(images), Landmarker.load(root).landmarks(images))
    # the evaluations' loader (every evaluation job starts with it) takes the export for both stages
    cfg = ml_collections.ConfigDict({'stage1': out, 'stage2': out, 'random_init_carb': '', 'extra': '',
                                     'rows': ('mae', 'sce_mae'), 'seed': 0})
    _, exported, _ = rows_lib.load_rows(cfg)
    cfg.stage1, cfg.stage2 = os.path.join(root, 'stage1'), os.path.join(root, 'stage2')
    _, original, _ = rows_lib.load_rows(cfg)
    assert [r.digest for r in exported] == [r.digest for r in original]
    with pytest.raises(ConfigError, match='not empty'):
        export.export(root, out)


def test_torch_export_is_the_stage1_mae(model, tmp_path):
    """--format=torch (the optional `torch` extra): mae.pth holds the stage-1 MAE, encoder and decoder."""
    pytest.importorskip('torch')
    import jax

    from sce_mae_jax.convert import load_torch_state_dict, mae_from_torch
    root, _ = model
    meta = export.export(root, str(tmp_path / 't'), 'torch')
    assert meta['trained_on']['stage1']['steps'] == 1 and 'mae.pth' in meta['files']
    back = mae_from_torch(load_torch_state_dict(str(tmp_path / 't' / 'mae.pth')))
    jax.tree.map(np.testing.assert_array_equal, back, checkpoints.load_params(os.path.join(root, 'stage1')))
