"""Synthetic faces: contract (shapes, dtypes, determinism, random access), identity structure, and that the
ground truth sits on the rendered features."""

import os
import pickle

import numpy as np
import pytest

from sce_mae_jax.data.synthetic import SPLITS, SyntheticFaces, mafl_from_68


def _lum(img):
    return img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def test_item_contract():
    src = SyntheticFaces("train", num_examples=10)
    assert len(src) == 10
    it = src[3]
    assert it["image"].dtype == np.uint8 and it["image"].shape == (136, 136, 3)
    assert it["landmarks"].dtype == np.float32 and it["landmarks"].shape == (5, 2)
    assert it["landmarks68"].dtype == np.float32 and it["landmarks68"].shape == (68, 2)
    assert it["identity"].dtype == np.int32 and it["index"].dtype == np.int64 and int(it["index"]) == 3
    np.testing.assert_allclose(it["landmarks"], mafl_from_68(it["landmarks68"]), atol=1e-5)
    with pytest.raises(IndexError):
        src[10]
    assert int(src[-1]["index"]) == 9
    with pytest.raises(ValueError):
        SyntheticFaces("validation")


def test_default_sizes():
    assert [len(SyntheticFaces(s)) for s in SPLITS] == [50_000, 5_000, 1_000, 1_000]


def test_deterministic_random_access_and_picklable():
    a = SyntheticFaces("pretrain", seed=3)
    b = pickle.loads(pickle.dumps(SyntheticFaces("pretrain", seed=3)))
    for i in (7, 49_999, 7):  # out of order, repeated: no hidden state
        x, y = a[i], b[i]
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert not np.array_equal(a[7]["image"], SyntheticFaces("pretrain", seed=4)[7]["image"])
    assert not np.array_equal(a[7]["image"], a[8]["image"])


def test_identity_ranges_disjoint_and_match_pairs_differ():
    ids = {s: {int(SyntheticFaces(s).identity_of(i)) for i in range(0, len(SyntheticFaces(s)), 7)} for s in SPLITS}
    for i, s in enumerate(SPLITS):
        for t in SPLITS[i + 1:]:
            assert not ids[s] & ids[t], (s, t)
    m = SyntheticFaces("match")
    for b in range(0, 500, 37):
        assert m.identity_of(2 * b) != m.identity_of(2 * b + 1)
    assert int(m[4]["identity"]) != int(m[5]["identity"])


def test_same_identity_shares_shape_different_identities_differ():
    src = SyntheticFaces("train", num_examples=20)
    assert int(src[0]["identity"]) == int(src[1]["identity"])  # 5 images per identity
    assert int(src[0]["identity"]) != int(src[5]["identity"])
    from sce_mae_jax.data import synthetic as syn

    a, b, c = (syn._identity_params(0, i) for i in (src.identity_of(0), src.identity_of(0), src.identity_of(5)))
    np.testing.assert_array_equal(a["shape"], b["shape"])
    assert np.abs(a["shape"] - c["shape"]).mean() > 0.01
    # Same identity, different images: pose and background change, so images differ.
    assert np.abs(src[0]["image"].astype(int) - src[1]["image"].astype(int)).mean() > 10


def test_landmark_geometry_is_face_like():
    src = SyntheticFaces("test", num_examples=40)
    for i in range(40):
        lm = src[i]["landmarks"]
        assert lm[0, 0] < lm[1, 0]  # CelebA convention: landmark 0 is the eye on the image's left
        assert lm[3, 0] < lm[4, 0]
        eyes_y, mouth_y = lm[:2, 1].mean(), lm[3:, 1].mean()
        assert eyes_y < lm[2, 1] < mouth_y
        assert (lm > 20).all() and (lm < 116).all()  # inside the 96-px model crop
        iod = np.linalg.norm(lm[1] - lm[0])
        assert 15 < iod < 45


def test_eye_centres_are_darker_than_cheeks():
    # The eye landmark must sit on the iris/pupil: a 3x3 minimum there is darker than the cheek below it.
    src = SyntheticFaces("train", num_examples=60)
    hits = 0
    for i in range(60):
        it = src[i]
        lum, p68 = _lum(it["image"]), it["landmarks68"]
        for e, cheek in ((it["landmarks"][0], (p68[2] + p68[31] + p68[41]) / 3),
                         (it["landmarks"][1], (p68[14] + p68[35] + p68[46]) / 3)):
            x, y = np.rint(e).astype(int)
            cx, cy = np.rint(cheek).astype(int)
            hits += lum[y - 1:y + 2, x - 1:x + 2].min() < lum[cy - 1:cy + 2, cx - 1:cx + 2].mean() - 15
    assert hits >= 0.9 * 120, hits


def test_mouth_corners_on_lip_boundary():
    # Between the two mouth corners (on the lip line) the image differs from the skin just outside the corner.
    src = SyntheticFaces("train", num_examples=30)
    diffs = []
    for i in range(30):
        it = src[i]
        img = it["image"].astype(np.float32)
        l, r = it["landmarks"][3], it["landmarks"][4]
        mid = np.rint((l + r) / 2).astype(int)
        out = np.rint(l + (l - r) * 0.35).astype(int)
        diffs.append(np.abs(img[mid[1], mid[0]] - img[out[1], out[0]]).sum())
    assert np.median(diffs) > 40


def test_preview_writes_png(tmp_path):
    from PIL import Image

    from sce_mae_jax.data import preview
    from sce_mae_jax.figures import LANDMARK_COLOURS, LEGEND_HEIGHT

    out = tmp_path / "grid.png"
    preview.main(["--data=synthetic", "--split=test", f"--out={out}", "--n=2"])
    im = Image.open(out)
    assert im.size == (2 * 272 + 2, 272 + LEGEND_HEIGHT + 4)  # two tiles above the landmark legend
    # the MAFL colours are drawn: the pure left-eye red must appear, on the tiles and in the legend
    rgb = np.asarray(im.convert("RGB"))
    assert (rgb[:272] == LANDMARK_COLOURS[0]).all(-1).any() and (rgb[272:] == LANDMARK_COLOURS[0]).all(-1).any()


def test_preview_cli_describes_every_flag_and_writes_relative_to_the_caller(tmp_path, monkeypatch, capsys):
    from sce_mae_jax.data import preview

    text = ' '.join(preview.parser().format_help().split())
    for action in preview.parser()._actions:
        assert action.help and action.help.strip(), action.option_strings
    assert 'a relative path is taken from the current directory' in text
    monkeypatch.chdir(tmp_path)  # not the checkout: the grid lands where the caller is
    out = preview.main(["--data=synthetic", "--split=test", "--out=figs/grid.png", "--n=1"])
    assert out == str(tmp_path / "figs" / "grid.png") and os.path.isfile(out)
    assert out in capsys.readouterr().out


def test_plain_variant_same_faces_without_background_clutter():
    from sce_mae_jax.data.sources import get_source

    clutter, plain = get_source('synthetic', 'pretrain'), get_source('synthetic_plain', 'pretrain')
    assert 'clutter=False' in repr(plain)

    def corner_roughness(src):  # mean |horizontal step| in the top-left 24x24 corner, background there
        return np.mean([np.abs(np.diff(src[i]['image'][:24, :24].astype(np.float32), axis=1)).mean()
                        for i in range(24)])

    for i in range(5):
        np.testing.assert_array_equal(clutter[i]['landmarks68'], plain[i]['landmarks68'])
    assert corner_roughness(plain) < 0.7 * corner_roughness(clutter)


def test_wild_variant_places_faces_anywhere_in_the_crop():
    """synthetic_wild (the content benchmark): the same identities, their faces spread over the crop, scaled and
    rolled far beyond CelebA's alignment, every one of the 68 points still inside the 96-px centre crop."""
    from sce_mae_jax.data.sources import get_source

    aligned, wild = get_source('synthetic', 'match'), get_source('synthetic_wild', 'match')
    assert "placement='wild'" in repr(wild)

    def eye_midpoints_and_iods(src, n=60):
        lm = np.stack([src[i]['landmarks'] for i in range(n)])
        return 0.5 * (lm[:, 0] + lm[:, 1]), np.linalg.norm(lm[:, 0] - lm[:, 1], axis=-1), lm

    mid_a, iod_a, _ = eye_midpoints_and_iods(aligned)
    mid_w, iod_w, _ = eye_midpoints_and_iods(wild)
    assert mid_a.std(0).max() < 4.0 and mid_w.std(0).min() > 3 * mid_a.std(0).max()
    assert np.log(iod_w).std() > 1.5 * np.log(iod_a).std()
    lm68 = np.stack([wild[i]['landmarks68'] for i in range(60)])
    assert lm68.min() >= 20 and lm68.max() <= 116  # the centre crop spans pixels 20..116 of the 136-px frame
    assert wild[0]['identity'] == aligned[0]['identity']
    np.testing.assert_array_equal(wild[3]['image'], wild[3]['image'])  # deterministic
    with pytest.raises(ValueError, match='placement'):
        SyntheticFaces('train', placement='tilted')
