"""Matching rule: agrees with a straightforward NumPy loop, jits, and the 70-px error convention."""

import jax
import numpy as np

from sce_mae_jax.evals import matching as M, metrics


def _reference(src, tgt, pts):
    b, h, w, c = src.shape
    out = np.zeros(pts.shape, np.float32)
    for i in range(b):
        t = tgt[i].reshape(-1, c)
        t = t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-8)
        for l in range(pts.shape[1]):
            x = int(np.clip(np.rint(pts[i, l, 0]), 0, w - 1))
            y = int(np.clip(np.rint(pts[i, l, 1]), 0, h - 1))
            q = src[i, y, x] / max(np.linalg.norm(src[i, y, x]), 1e-8)
            k = int(np.argmax(t @ q))
            out[i, l] = (k % w, k // w)
    return out


def test_match_points_matches_numpy_loop():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(3, 12, 10, 8)).astype(np.float32)
    tgt = rng.normal(size=(3, 12, 10, 8)).astype(np.float32)
    pts = rng.uniform(-1, 12, (3, 5, 2)).astype(np.float32)  # includes points needing clipping
    got = np.asarray(jax.jit(metrics.match_points)(src, tgt, pts))
    np.testing.assert_array_equal(got, _reference(src, tgt, pts))


def test_recovers_known_displacement():
    # Target = source shifted by (+2, +1) px; unique random features -> exact recovery of the shift.
    rng = np.random.default_rng(1)
    f = rng.normal(size=(1, 20, 20, 16)).astype(np.float32)
    tgt = np.roll(f, (1, 2), axis=(1, 2))
    pts = np.array([[[5.2, 6.7], [10.0, 3.4]]], np.float32)
    pred = np.asarray(metrics.match_points(f, tgt, pts))
    np.testing.assert_array_equal(pred, np.rint(pts) + np.array([2, 1]))


def test_mean_pixel_error_convention():
    gt = np.zeros((2, 5, 2), np.float32)
    pred = gt.copy()
    pred[..., 0] = 95.0
    assert abs(metrics.mean_pixel_error(pred, gt) - 69.0) < 1e-4
    assert abs(metrics.mean_pixel_error(pred, gt, frame=96, report_frame=96) - 95.0) < 1e-4


def test_raw_pixel_features():
    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    feats = np.asarray(M.raw_pixel_features(imgs, patch=3))
    assert feats.shape == (2, 24, 24, 27)
    # Centre tap of the patch is the standardised pixel itself.
    x = imgs.astype(np.float32)
    z = (x - x.mean((1, 2), keepdims=True)) / x.std((1, 2), keepdims=True)
    np.testing.assert_allclose(feats[..., 12:15], z, atol=1e-4)


def test_geometry_references_recover_the_transform_they_fit():
    """A target that is the source moved / moved, turned and scaled: the reference that fits that transform
    lands on it exactly, the simpler ones do not; `same_place` is the source's pixel."""
    rng = np.random.default_rng(3)
    src = rng.uniform(20, 70, (4, 5, 2))
    shift = rng.uniform(-10, 10, (4, 1, 2))
    moved = metrics.geometry_predictions(src, src + shift)
    np.testing.assert_allclose(moved['face_translation'], src + shift, atol=1e-9)
    np.testing.assert_allclose(moved['face_similarity'], src + shift, atol=1e-9)
    np.testing.assert_array_equal(moved['same_place'], src)
    theta, scale = 0.4, 1.3
    rot = scale * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    tgt = src @ rot.T + shift
    posed = metrics.geometry_predictions(src, tgt)
    np.testing.assert_allclose(posed['face_similarity'], tgt, atol=1e-9)
    assert np.abs(posed['face_translation'] - tgt).max() > 1.0
    assert set(posed) == {'same_place', 'face_translation', 'face_similarity'}
