"""Dataset builders and sources on tiny fixture trees in the real file formats.

Each landmark is drawn in the raw image as a dot of its own colour; after preparation the dot's centroid in
the 136-px image must sit on the landmark the source returns. That checks the protocol geometry (crop,
Matlab offsets, y/x order, non-square resizes, 300W box crop with padding) independently of the formulas.
"""

from __future__ import annotations

import pickle
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import tensorflow_datasets as tfds
from PIL import Image

from sce_mae_jax.data import preprocess, prepare as prepare_cli, sources
from sce_mae_jax.data.sources import DatasetError

PALETTE = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255),
                    (255, 255, 255)], np.uint8)
TOL = 0.3  # px at 136: dots land within 0.07 px; the x -> x*s resize convention would miss 300W by ~0.5 px


# ----------------------------------------------------------------------------- drawing and finding dots


def draw_dots(height: int, width: int, points_xy, radius: int) -> np.ndarray:
    """Black image with a disk of PALETTE[k] centred on integer pixel points_xy[k]."""
    image = np.zeros((height, width, 3), np.uint8)
    rows, cols = np.mgrid[:height, :width]
    for k, (x, y) in enumerate(np.asarray(points_xy)):
        image[(cols - x) ** 2 + (rows - y) ** 2 <= radius ** 2] = PALETTE[k]
    return image


def find_dots(image: np.ndarray, count: int) -> np.ndarray:
    """``(count, 2)`` xy intensity-weighted centroids of the PALETTE colours (blur only scales a colour)."""
    img = image.astype(np.float64)
    value = img.max(-1)
    pattern = img > 0.5 * value[..., None]
    rows, cols = np.mgrid[:image.shape[0], :image.shape[1]]
    out = []
    for colour in PALETTE[:count]:
        mask = (value > 30) & np.all(pattern == (colour > 0), axis=-1)
        weight = value * mask
        assert weight.sum() > 0, f'dot of colour {colour} not found'
        out.append([(cols * weight).sum() / weight.sum(), (rows * weight).sum() / weight.sum()])
    return np.array(out)


def save(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == '.png':
        Image.fromarray(image).save(path)
    else:  # quality 100 without chroma subsampling keeps the dot colours
        Image.fromarray(image).save(path, format='JPEG', quality=100, subsampling=0)


def assert_dots_match(source, drawn: int | list[int], count: int | None = None) -> None:
    """Every record's drawn landmarks (indices `drawn`) coincide with the dots found in its image."""
    idx = list(range(drawn)) if isinstance(drawn, int) else drawn
    for i in range(len(source)):
        item = source[i]
        assert item['image'].shape == (136, 136, 3) and item['image'].dtype == np.uint8
        assert item['landmarks'].dtype == np.float32 and item['index'] == i
        found = find_dots(item['image'], len(idx))
        err = np.abs(found - item['landmarks'][idx]).max()
        assert err < TOL, (source, i, found, item['landmarks'][idx])


# ----------------------------------------------------------------------------- fixture trees


CELEBA_BASE = np.array([[60, 105], [118, 105], [89, 140], [65, 172], [113, 172]])
CELEBA_PARTITION = {'000001.jpg': 0, '000002.jpg': 0, '000003.jpg': 0, '000004.jpg': 0, '000005.jpg': 1,
                    '000006.jpg': 2}
MAFL = {'train': ['000002.jpg', '000005.jpg'], 'test': ['000006.jpg', '000003.jpg']}  # not sorted on purpose


def celeba_points(k: int) -> np.ndarray:
    return CELEBA_BASE + np.array([(-1) ** k * 3 * k, 2 * k - 5])


def make_celeba(root: Path) -> None:
    rows = []
    for k, name in enumerate(CELEBA_PARTITION):
        pts = celeba_points(k)
        save(root / 'Img/img_align_celeba' / name, draw_dots(218, 178, pts, 4))
        rows.append(name + ' ' + ' '.join(str(int(v)) for v in pts.reshape(-1)))
    header = 'lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y'
    (root / 'Anno').mkdir()
    (root / 'Anno/list_landmarks_align_celeba.txt').write_text(f'{len(rows)}\n{header}\n' + '\n'.join(rows) + '\n')
    (root / 'Eval').mkdir()
    (root / 'Eval/list_eval_partition.txt').write_text(''.join(f'{n} {p}\n' for n, p in CELEBA_PARTITION.items()))
    (root / 'MAFL').mkdir()
    (root / 'MAFL/training.txt').write_text('\n'.join(MAFL['train']) + '\n')
    (root / 'MAFL/testing.txt').write_text('\r\n'.join(MAFL['test']) + '\r\n')  # CRLF tolerated


AFLW_M_BASE = np.array([[45, 55], [100, 52], [74, 85], [50, 112], [98, 110]])


def make_aflw_m(root: Path) -> None:
    header = 'image_file,set,crop_file,face_id,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5\n'
    lines = []
    for k, (orig, set_) in enumerate([('image00001.jpg', 1), ('image00002.jpg', 1), ('image00003.jpg', 0)]):
        pts = AFLW_M_BASE + k * 2
        crop = f'cropped/{4000 + k}.jpg'
        save(root / 'aflw_cropped' / crop, draw_dots(150, 150, pts, 4))
        lines.append(f'{orig},{set_},{crop},{k},' + ','.join(str(int(v) + 1) for v in pts.reshape(-1)))
    (root / 'aflw_cropped/facedata_cropped.csv').write_text(header + '\n'.join(lines) + '\n')
    test = []
    for k, orig in enumerate(['image00003.jpg', 'image00004.jpg']):
        pts = AFLW_M_BASE + np.array([-k, 3 * k])
        name = f'AFLW/{k + 1:04d}-{orig}'
        save(root / 'MTFL' / name, draw_dots(150, 150, pts, 4))
        values = np.concatenate([pts[:, 0], pts[:, 1]]) + 1  # all x then all y, 1-based
        test.append(' ' + name.replace('/', '\\') + ' ' + ' '.join(f'{v:.1f}' for v in values) + ' 1 2 2 3')
    (root / 'MTFL/testing.txt').write_text('\n'.join(test) + '\n')


AFLW_R_IMAGES = {'train': [('a/1.jpg', 200, 160), ('2.jpg', 120, 150)], 'test': [('t/3.png', 170, 140)]}


def aflw_r_points(h: int, w: int) -> np.ndarray:
    return np.round(np.array([[0.3, 0.35], [0.7, 0.33], [0.5, 0.55], [0.35, 0.75], [0.66, 0.77]])
                    * [w, h]).astype(int)


def make_aflw_r(root: Path) -> None:
    for split, images in AFLW_R_IMAGES.items():
        gt = []
        for name, h, w in images:
            pts = aflw_r_points(h, w)
            save(root / 'output' / name, draw_dots(h, w, pts, 5))
            gt.append(pts[:, ::-1].astype(np.float64))  # stored (y, x)
        (root / f'aflw_{split}_images.txt').write_text('\n'.join(n for n, _, _ in images) + '\n')
        hw = [[h, w] for _, h, w in images]
        scipy.io.savemat(root / f'aflw_{split}_keypoints.mat', {'gt': np.stack(gt), 'hw': hw})
        if split == 'test':  # AFLW_RC: "corrected" test keypoints, 3 px lower
            scipy.io.savemat(root / 'aflw_test_keypoints_rc.mat', {'gt': np.stack(gt) + [3.0, 0.0]})


W300_DRAWN = [36, 45, 30, 48, 54, 8, 19]  # eye corners, nose tip, mouth corners, chin, a brow point


def w300_points(rng, box) -> np.ndarray:
    """68 integer points inside the box (0-based), the drawn ones well apart."""
    x0, y0, x1, y1 = box
    pts = np.stack([rng.integers(x0, x1, 68), rng.integers(y0, y1, 68)], 1)
    rel = np.array([[0.2, 0.3], [0.8, 0.3], [0.5, 0.55], [0.3, 0.8], [0.7, 0.8], [0.5, 1.0], [0.3, 0.05]])
    pts[W300_DRAWN] = np.round([x0, y0] + rel * [x1 - x0, y1 - y0]).astype(int)
    return pts


def make_w300(root: Path) -> None:
    rng = np.random.default_rng(0)
    sets = {'afw': ('afw', ['111_1.jpg']), 'helen_trainset': ('helen/trainset', ['222_1.jpg']),
            'lfpw_trainset': ('lfpw/trainset', ['image_0001.png']),
            'helen_testset': ('helen/testset', ['333_1.jpg']), 'lfpw_testset': ('lfpw/testset', ['image_0002.png']),
            'ibug': ('ibug', ['image_003_1.jpg', '3_not_shipped.jpg'])}
    # (height, width, box 0-based x0 y0 x1 y1): a small face, a big one, one at the image corner (padding).
    geometry = [(240, 300, (100, 60, 200, 170)), (400, 360, (60, 100, 300, 330)), (200, 180, (5, 8, 95, 108))]
    (root / 'Bounding Boxes').mkdir(parents=True)
    n = 0
    for set_name, (folder, names) in sets.items():
        cell = np.empty((1, len(names)), object)
        for i, name in enumerate(names):
            h, w, box = geometry[n % len(geometry)]
            n += 1
            pts = w300_points(rng, box)
            if not name.startswith('3_'):
                save(root / folder / name, draw_dots(h, w, pts[W300_DRAWN], 6))
                body = '\n'.join(f'{x + 1:.3f} {y + 1:.3f}' for x, y in pts)  # .pts are 1-based
                (root / folder / name).with_suffix('.pts').write_text(f'version: 1\nn_points:  68\n{{\n{body}\n}}\n')
            x0, y0, x1, y1 = box
            cell[0, i] = {'imgName': name, 'bb_detector': np.array([[1.0, 1.0, 2.0, 2.0]]),
                          'bb_ground_truth': np.array([[x0 + 1.0, y0 + 1.0, x1 + 1.0, y1 + 1.0]])}
        scipy.io.savemat(root / f'Bounding Boxes/bounding_boxes_{set_name}.mat', {'bounding_boxes': cell})


@pytest.fixture(scope='module')
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp('raw')
    out = {}
    for name, make in [('celeba', make_celeba), ('aflw_m', make_aflw_m), ('aflw_r', make_aflw_r),
                       ('300w', make_w300)]:
        (root / name).mkdir()
        make(root / name)
        out[name] = root / name
    out['mafl'] = out['celeba']
    out['aflw_rc'] = out['aflw_r']
    out['data_dir'] = tmp_path_factory.mktemp('tfds')
    return out


def src(trees, name, split):
    return sources.get_source(name, split, manual_dir=trees[name], data_dir=trees['data_dir'])


# ----------------------------------------------------------------------------- preprocessing primitives


def test_resize_points_matches_pil_pixel_centres():
    # A one-pixel dot at the source centre x lands where PIL puts it: (x + 0.5) * s - 0.5.
    image = draw_dots(50, 80, [[33, 17]], 0)
    out = preprocess.resize(image, 136, 136)
    found = find_dots(out, 1)[0]
    expected = preprocess.resize_points(np.array([[33, 17]]), (50, 80), (136, 136))[0]
    np.testing.assert_allclose(found, expected, atol=0.05)


def test_crop_pads_with_zeros():
    image = np.full((4, 5, 3), 7, np.uint8)
    out = preprocess.crop(image, -1, 3, 3, 4)
    assert out.shape == (3, 4, 3)
    assert (out[0] == 0).all() and (out[1:, 2:] == 0).all() and (out[1:, :2] == 7).all()


def test_celeba_formula():
    image = np.zeros((218, 178, 3), np.uint8)
    _, lm = preprocess.celeba_aligned(image, np.array([[0.0, 30.0], [177.0, 207.0]]))
    np.testing.assert_allclose(lm, [[0.5 * 136 / 178 - 0.5] * 2, [177.5 * 136 / 178 - 0.5] * 2], atol=1e-5)


# ----------------------------------------------------------------------------- builders and sources


def test_celeba_pretrain_excludes_mafl(trees):
    s = src(trees, 'celeba', 'pretrain')
    assert len(s) == 2 and s.num_landmarks == 5 and s.iod_indices == (0, 1)
    assert [s.filename(i) for i in range(2)] == ['Img/img_align_celeba/000001.jpg', 'Img/img_align_celeba/000004.jpg']
    assert_dots_match(s, 5)
    expected = (celeba_points(0) - [0, 30] + 0.5) * 136 / 178 - 0.5
    np.testing.assert_allclose(s[0]['landmarks'], expected, atol=1e-4)


@pytest.mark.parametrize('split', ['train', 'test'])
def test_mafl_file_order_and_dots(trees, split):
    s = src(trees, 'mafl', split)
    assert [Path(s.filename(i)).name for i in range(len(s))] == MAFL[split]
    assert_dots_match(s, 5)


@pytest.mark.parametrize('split,count', [('train', 2), ('test', 2)])
def test_aflw_m(trees, split, count):
    s = src(trees, 'aflw_m', split)
    assert len(s) == count
    assert_dots_match(s, 5)


@pytest.mark.parametrize('split', ['train', 'test'])
def test_aflw_r_non_square_and_yx(trees, split):
    s = src(trees, 'aflw_r', split)
    assert len(s) == len(AFLW_R_IMAGES[split])
    assert_dots_match(s, 5)


def test_aflw_rc_uses_corrected_test_keypoints(trees):
    r, rc = src(trees, 'aflw_r', 'test'), src(trees, 'aflw_rc', 'test')
    _, h, _ = AFLW_R_IMAGES['test'][0]
    shift = rc[0]['landmarks'] - r[0]['landmarks']
    np.testing.assert_allclose(shift, np.tile([0.0, 3.0 * 136 / h], (5, 1)), atol=1e-4)
    np.testing.assert_array_equal(rc[0]['image'], r[0]['image'])
    np.testing.assert_array_equal(src(trees, 'aflw_rc', 'train')[1]['landmarks'],
                                  src(trees, 'aflw_r', 'train')[1]['landmarks'])


@pytest.mark.parametrize('split,count', [('train', 3), ('test', 3)])
def test_300w(trees, split, count):
    s = src(trees, '300w', split)
    assert len(s) == count and s.num_landmarks == 68 and s.iod_indices == (36, 45)
    assert s[0]['landmarks'].shape == (68, 2)
    assert_dots_match(s, W300_DRAWN)
    if split == 'train':  # the box is 52/100 of the crop width after the protocol
        scale = 52 / 101 * 136 / 100
        lm = s[0]['landmarks']
        assert abs((lm[45, 0] - lm[36, 0]) - 0.6 * 100 * scale) < 1.0


def test_sources_are_grain_compatible(trees):
    import grain

    s = src(trees, 'mafl', 'test')
    ds = grain.MapDataset.source(s).batch(2)
    batch = ds[0]
    assert batch['image'].shape == (2, 136, 136, 3) and batch['landmarks'].shape == (2, 5, 2)
    assert len(s.__getitems__([0, 1])) == 2 and s[-1]['index'] == 1
    # grain worker processes receive the source pickled
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(s))[1]['image'], s[1]['image'])
    # the training pipeline's batched read of the images alone
    np.testing.assert_array_equal(s.read_images([1, 0, 1]), np.stack([s[i]['image'] for i in (1, 0, 1)]))


def test_prepared_dataset_needs_no_manual_dir(trees):
    src(trees, 'mafl', 'test')
    s = sources.get_source('mafl', 'test', data_dir=trees['data_dir'])
    assert len(s) == 2


def test_cli_prepares(trees, capsys):
    assert prepare_cli.main(['--dataset=aflw_m', f'--manual_dir={trees["aflw_m"]}',
                             f'--data_dir={trees["data_dir"]}']) == 0
    assert "'train': 2" in capsys.readouterr().out


def test_synthetic_dispatch_is_lazy(monkeypatch):
    import sce_mae_jax.data as data_pkg

    fake = types.ModuleType('sce_mae_jax.data.synthetic')
    fake.SPLITS = ('pretrain', 'train', 'test', 'match')  # the split check reads it before the dispatch
    fake.SyntheticFaces = lambda split, seed=0, clutter=True, placement='aligned': types.SimpleNamespace(
        split=split, seed=seed, clutter=clutter, placement=placement)
    monkeypatch.setitem(sys.modules, 'sce_mae_jax.data.synthetic', fake)
    monkeypatch.setattr(data_pkg, 'synthetic', fake, raising=False)
    s = sources.get_source('synthetic', 'train', seed=3)
    assert (s.split, s.seed, s.clutter, s.num_landmarks, s.iod_indices) == ('train', 3, True, 5, (0, 1))
    assert not sources.get_source('synthetic_plain', 'train').clutter
    wild = sources.get_source('synthetic_wild', 'train')
    assert wild.clutter and wild.placement == 'wild'


# ----------------------------------------------------------------------------- errors


def test_unknown_name_and_split():
    with pytest.raises(ValueError, match='unknown dataset'):
        sources.get_source('mafll', 'test')
    with pytest.raises(ValueError, match='splits'):
        sources.get_source('celeba', 'train')


def test_images_are_stored_as_raw_bytes(trees):
    s = src(trees, 'mafl', 'test')
    builder = sources.get_builder('mafl', trees['data_dir'])
    assert str(builder.version) == '1.1.0'
    assert builder.info.features['image']._encoding == tfds.features.Encoding.BYTES  # no public accessor
    assert s[0]['image'].dtype == np.uint8 and s[0]['image'].shape == (136, 136, 3)


def test_dataset_of_an_older_encoding_is_refused_with_the_prepare_command(trees, tmp_path):
    """A data_dir holding only version 1.0.0 (images as one int64 per byte) is never read as 1.1.0: one line
    says to prepare it again and how."""
    src(trees, 'mafl', 'test')
    new = sources.get_builder('mafl', trees['data_dir']).data_path
    old = tmp_path / 'tfds'
    shutil.copytree(new.parent, old / new.parent.name)
    (old / new.parent.name / '1.1.0').rename(old / new.parent.name / '1.0.0')
    with pytest.raises(DatasetError) as e:
        sources.get_source('mafl', 'test', data_dir=old)
    line = str(e.value)
    assert '\n' not in line and 'older version' in line and '1.0.0' in line
    assert f'python -m sce_mae_jax.data.prepare --dataset=mafl --manual_dir=<its raw files> --data_dir={old}' in line
    # with the raw files at hand it is prepared again in the current encoding
    assert len(sources.get_source('mafl', 'test', manual_dir=trees['mafl'], data_dir=old)) == 2


def test_not_prepared_without_manual_dir(tmp_path):
    with pytest.raises(DatasetError, match='not prepared.*manual_dir'):
        sources.get_source('300w', 'test', data_dir=tmp_path)


def test_missing_list_names_path_and_layout(tmp_path):
    make_celeba(tmp_path)
    (tmp_path / 'MAFL/testing.txt').unlink()
    with pytest.raises(DatasetError) as e:
        sources.get_source('mafl', 'test', manual_dir=tmp_path, data_dir=tmp_path / 'out')
    msg = str(e.value)
    assert 'MAFL/testing.txt' in msg and str(tmp_path) in msg and 'one image filename per line' in msg
    assert e.value.__cause__ is None and not (tmp_path / 'out/sce_mafl').exists()


def test_missing_image_is_named(tmp_path):
    make_celeba(tmp_path)
    (tmp_path / 'Img/img_align_celeba/000003.jpg').unlink()
    with pytest.raises(DatasetError, match='000003.jpg'):
        sources.get_source('mafl', 'test', manual_dir=tmp_path, data_dir=tmp_path / 'out')


@pytest.mark.parametrize('name, split, image', [('celeba', 'pretrain', '000001'), ('mafl', 'test', '000003')])
def test_wrong_image_size_names_the_file(tmp_path, name, split, image):
    make_celeba(tmp_path)
    save(tmp_path / f'Img/img_align_celeba/{image}.jpg', draw_dots(200, 200, celeba_points(0), 4))
    with pytest.raises(DatasetError, match=rf'img_align_celeba/{image}\.jpg: aligned CelebA images are 178x218.*'
                                           r'got 200x200'):
        sources.get_source(name, split, manual_dir=tmp_path, data_dir=tmp_path / 'out')


def test_malformed_files(tmp_path):
    make_w300(tmp_path / 'w')
    pts = tmp_path / 'w/afw/111_1.pts'
    pts.write_text(pts.read_text().replace('n_points:  68', 'n_points:  67'))
    with pytest.raises(DatasetError, match='111_1.pts'):
        sources.get_source('300w', 'train', manual_dir=tmp_path / 'w', data_dir=tmp_path / 'out')
    make_aflw_r(tmp_path / 'r')
    scipy.io.savemat(tmp_path / 'r/aflw_train_keypoints.mat', {'gt': np.zeros((3, 5, 2))})
    with pytest.raises(DatasetError, match=r'aflw_train_keypoints.mat.*\(2, 5, 2\)'):
        sources.get_source('aflw_r', 'train', manual_dir=tmp_path / 'r', data_dir=tmp_path / 'out')
    make_aflw_m(tmp_path / 'm')
    (tmp_path / 'm/MTFL/testing.txt').write_text('AFLW/x.jpg 1 2 3\n')
    with pytest.raises(DatasetError, match='line 1 of .*testing.txt'):
        sources.get_source('aflw_m', 'test', manual_dir=tmp_path / 'm', data_dir=tmp_path / 'out')
