"""TPS warps: identity, determinism, exact affine behaviour, and that points move with the image content."""

import numpy as np
import pytest

from sce_mae_jax.data import tps


def _dots(points, size=136):
    img = np.zeros((size, size, 3), np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    for x, y in points:
        img[(xx - x) ** 2 + (yy - y) ** 2 <= 2.25] = 255
    return img


def _centroid(img, near, r=6):
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    w = img[..., 0].astype(np.float64) * ((np.abs(xx - near[0]) <= r) & (np.abs(yy - near[1]) <= r))
    return np.array([(w * xx).sum(), (w * yy).sum()]) / w.sum()


def test_zero_noise_is_identity():
    w = tps.random_tps(0, noise_all=0, noise_half=0, translation=0, scale=0, rotation_deg=0)
    img = np.random.default_rng(0).integers(0, 256, (136, 136, 3), dtype=np.uint8)
    np.testing.assert_array_equal(tps.warp_image(img, w), img)
    pts = np.array([[10.0, 20.0], [67.0, 68.0], [120.0, 5.0]])
    np.testing.assert_array_equal(tps.warp_points(pts, w), pts)
    np.testing.assert_allclose(tps.warp_points(pts + 0.3, w, subpixel=True), pts + 0.3, atol=1e-4)


def test_deterministic_by_seed():
    a, b, c = tps.random_tps(5), tps.random_tps(np.random.default_rng(5)), tps.random_tps(6)
    np.testing.assert_array_equal(a.coef, b.coef)
    np.testing.assert_array_equal(a.offset, b.offset)
    assert not np.allclose(a.sample_coords(136, 136), c.sample_coords(136, 136))


def test_pure_translation_shifts_content():
    # With only the affine translation, sampling moves by t·(W-1)/2 px, so content moves the other way.
    rng = np.random.default_rng(1)
    w = tps.random_tps(rng, noise_all=0, noise_half=0, translation=0.05, scale=0, rotation_deg=0)
    shift = w.offset * (136 - 1) / 2
    grid = w.sample_coords(136, 136)
    np.testing.assert_allclose(grid[40, 30], [30 + shift[0], 40 + shift[1]], atol=1e-6)
    p = np.array([[70.0, 60.0]])
    np.testing.assert_allclose(tps.warp_points(p, w, subpixel=True), p - shift, atol=1e-3)


def test_kernel_is_protocol_kernel():
    d2 = np.array([0.0, 0.25, 4.0])
    np.testing.assert_allclose(tps._kernel(d2), d2 * np.log(d2 + 1e-5))
    assert tps._control_grid(10).shape == (100, 2)


def test_warp_magnitude_is_protocol_scale():
    # sd 0.05 translation/scale at 136 px means a few pixels of motion, never tens.
    disp = []
    for s in range(20):
        g = tps.random_tps(s).sample_coords(136, 136)
        ys, xs = np.mgrid[0:136, 0:136]
        disp.append(np.hypot(g[..., 0] - xs, g[..., 1] - ys).mean())
    assert 0.5 < np.mean(disp) < 12


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_dot_ends_up_at_warped_point(seed):
    pts = np.array([[30.0, 40.0], [100.0, 90.0], [68.0, 68.0], [50.0, 100.0], [95.0, 35.0]])
    w = tps.random_tps(seed)
    warped = tps.warp_image(_dots(pts), w)
    for subpixel in (False, True):
        q = tps.warp_points(pts, w, subpixel=subpixel)
        for k in range(len(pts)):
            assert np.linalg.norm(_centroid(warped, q[k]) - q[k]) < 1.0
    q = tps.warp_points(pts, w)
    assert np.array_equal(q, np.rint(q))  # protocol: nearest output pixel
    img2, q2 = tps.warp_example(_dots(pts), pts, w)
    np.testing.assert_array_equal(img2, warped)
    np.testing.assert_array_equal(q2, q)


def test_zero_padding_outside():
    w = tps.random_tps(0, noise_all=0, noise_half=0, translation=0, scale=0, rotation_deg=0)
    w = tps.TPSWarp(w.grid, w.coef, w.matrix, np.array([0.5, 0.0]))  # shift sampling right by ~34 px
    out = tps.warp_image(np.full((136, 136, 3), 200, np.uint8), w)
    assert (out[:, -20:] == 0).all() and (out[:, :60] == 200).all()


def test_apply_agrees_with_grid():
    w = tps.random_tps(3)
    g = w.sample_coords(136, 136)
    pts = np.array([[0.0, 0.0], [17.0, 99.0], [135.0, 64.0]])
    np.testing.assert_allclose(w.apply(pts, (136, 136)), g[pts[:, 1].astype(int), pts[:, 0].astype(int)], atol=1e-9)


def test_composite_points_match_exhaustive_search():
    w1, w2 = tps.random_tps(7), tps.random_tps(8)
    pts = np.array([[30.0, 40.0], [100.0, 90.0], [68.3, 68.8], [1.0, 1.0]])
    got = tps.warp_points_composite(pts, w1, w2)
    comp = w1.apply(w2.sample_coords(136, 136), (136, 136))
    np.testing.assert_array_equal(got, tps.points_from_coords(pts, comp))
    # and the double-warped dots sit there
    img = tps.warp_image(tps.warp_image(_dots(pts[:3]), w1), w2)
    for k in range(3):
        assert np.linalg.norm(_centroid(img, got[k]) - got[k]) < 1.0
