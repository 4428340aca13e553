"""Random thin-plate-spline warps (NumPy), as used by the DVE/CL matching protocol (method.md §4).

The protocol fixes the warp family: a 10x10 control grid in normalised [-1, 1] coordinates, kernel
U(d) = d²·log(d² + 1e-5), control-point noise (sd 5e-4 for all points and 5e-3 for a random half), then a global
affine (translation, scale, rotation), bilinear sampling with zero padding, landmarks moved to the nearest output
pixel.  Everything here is deterministic given the ``np.random.Generator`` passed in, so matching pairs can be
regenerated bit-for-bit.

Convention: a warp is a *backward* map.  For an output pixel p (normalised coordinates) it gives the input
location s(p) = M · f(p) + t to sample, where f is the TPS that moves the control grid C onto C + noise and
M = scale · rotation.  Backward maps make image warping a gather (no holes); points are moved by inverting s on
the output pixel grid, which is exactly "the nearest output pixel" of the protocol.

Pixel coordinates: (x, y) with pixel (row r, col c) centred at (x=c, y=r); normalised u = 2x/(W-1) - 1.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np


def _kernel(d2: np.ndarray) -> np.ndarray:
    return d2 * np.log(d2 + 1e-5)


@functools.lru_cache(maxsize=8)
def _control_grid(grid: int) -> np.ndarray:
    """(grid², 2) control points, xy in [-1, 1]."""
    g = np.linspace(-1.0, 1.0, grid)
    gy, gx = np.meshgrid(g, g, indexing="ij")
    return np.stack([gx.ravel(), gy.ravel()], -1)


@functools.lru_cache(maxsize=8)
def _system_inverse(grid: int) -> np.ndarray:
    """Inverse of the (K+3)x(K+3) TPS interpolation system for the fixed control grid (shared by all warps)."""
    c = _control_grid(grid)
    k = len(c)
    d2 = ((c[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    p = np.concatenate([np.ones((k, 1)), c], 1)
    system = np.zeros((k + 3, k + 3))
    system[:k, :k] = _kernel(d2)
    system[:k, k:] = p
    system[k:, :k] = p.T
    return np.linalg.inv(system)


@functools.lru_cache(maxsize=8)
def _pixel_basis(h: int, w: int, grid: int) -> np.ndarray:
    """[1, u, v, U(|p - c_k|)] for every output pixel: (h*w, 3 + K) float64, so a warp is one matmul."""
    ys, xs = np.mgrid[0:h, 0:w]
    u = 2.0 * xs.ravel() / (w - 1) - 1.0
    v = 2.0 * ys.ravel() / (h - 1) - 1.0
    pts = np.stack([u, v], -1)
    c = _control_grid(grid)
    d2 = ((pts[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    return np.concatenate([np.ones((len(pts), 1)), pts, _kernel(d2)], 1)


@dataclasses.dataclass(frozen=True)
class TPSWarp:
    """A backward warp. ``coef`` (3 + K, 2): affine part [1, u, v] then kernel weights; ``matrix`` (2, 2) and
    ``offset`` (2,): the global affine applied after the spline, all in normalised coordinates."""

    grid: int
    coef: np.ndarray
    matrix: np.ndarray
    offset: np.ndarray

    def sample_coords(self, h: int, w: int) -> np.ndarray:
        """Input pixel (x, y) sampled by every output pixel: (h, w, 2) float64."""
        return self._finish(_pixel_basis(h, w, self.grid) @ self.coef, h, w).reshape(h, w, 2)

    def apply(self, points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """The backward map at arbitrary output locations: (…, 2) xy pixels of an (H, W) frame -> (…, 2).
        Used to compose warps exactly instead of through a resampled image."""
        h, w = shape
        p = np.asarray(points, np.float64)
        flat = p.reshape(-1, 2)
        uv = np.stack([2.0 * flat[:, 0] / (w - 1) - 1.0, 2.0 * flat[:, 1] / (h - 1) - 1.0], -1)
        c = _control_grid(self.grid)
        # |p - c|² expanded (no (N, K, 2) temporary); clipped at 0 against round-off before the log.
        d2 = np.maximum((uv ** 2).sum(-1)[:, None] - 2.0 * uv @ c.T + (c ** 2).sum(-1)[None], 0.0)
        f = uv @ self.coef[1:3] + self.coef[0] + _kernel(d2) @ self.coef[3:]
        return self._finish(f, h, w).reshape(p.shape)

    def _finish(self, f: np.ndarray, h: int, w: int) -> np.ndarray:
        s = f @ self.matrix.T + self.offset
        return np.stack([(s[:, 0] + 1.0) * (w - 1) / 2.0, (s[:, 1] + 1.0) * (h - 1) / 2.0], -1)


def random_tps(rng: np.random.Generator | int, grid: int = 10, noise_all: float = 5e-4, noise_half: float = 5e-3,
               translation: float = 0.05, scale: float = 0.05, rotation_deg: float = 2.5) -> TPSWarp:
    """Draws one protocol warp. ``rng``: a Generator or an int seed. Zero sds give the identity warp."""
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    c = _control_grid(grid)
    k = len(c)
    noise = rng.normal(0.0, noise_all, (k, 2))
    half = rng.choice(k, size=k // 2, replace=False)
    noise[half] += rng.normal(0.0, noise_half, (len(half), 2))
    rhs = np.zeros((k + 3, 2))
    rhs[:k] = c + noise
    sol = _system_inverse(grid) @ rhs  # [w (K); a (3)]
    coef = np.concatenate([sol[k:], sol[:k]], 0)  # reorder to match _pixel_basis columns
    t = rng.normal(0.0, translation, 2)
    sc = 1.0 + rng.normal(0.0, scale)
    th = math.radians(rng.normal(0.0, rotation_deg))
    m = sc * np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    return TPSWarp(grid=grid, coef=coef, matrix=m, offset=t)


def bilinear_sample(img: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """img (H, W, C), coords (h, w, 2) xy in pixels -> (h, w, C) float32; outside the image reads as zero."""
    h, w = img.shape[:2]
    x, y = coords[..., 0], coords[..., 1]
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = (x - x0)[..., None].astype(np.float32), (y - y0)[..., None].astype(np.float32)
    src = img.astype(np.float32)
    out = np.zeros(coords.shape[:2] + img.shape[2:], np.float32)
    for dy, dx, wgt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        xi, yi = x0 + dx, y0 + dy
        ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        vals = src[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)]
        out += np.where(ok[..., None], vals, 0.0) * wgt
    return out


def warp_image(img: np.ndarray, warp: TPSWarp) -> np.ndarray:
    """(H, W, C) image -> warped image of the same shape and dtype (uint8 is rounded)."""
    squeeze = img.ndim == 2
    if squeeze:
        img = img[..., None]
    out = bilinear_sample(img, warp.sample_coords(*img.shape[:2]))
    if np.issubdtype(img.dtype, np.integer):
        info = np.iinfo(img.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    out = out.astype(img.dtype)
    return out[..., 0] if squeeze else out


def warp_points(points: np.ndarray, warp: TPSWarp, shape: tuple[int, int] = (136, 136),
                subpixel: bool = False) -> np.ndarray:
    """Moves (…, L, 2) xy points along with the image content of an (H, W) = ``shape`` image.

    Default (protocol): the output pixel whose sampling location is nearest to the point, so results are
    integers.  ``subpixel=True`` adds one Newton step with the local Jacobian of the sampling map, for uses that
    want unquantised targets (e.g. augmentation).
    """
    return points_from_coords(points, warp.sample_coords(*shape), subpixel)


def warp_example(img: np.ndarray, points: np.ndarray, warp: TPSWarp,
                 subpixel: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Warps an (H, W, C) image and its (…, L, 2) points together, sharing one evaluation of the spline."""
    coords = warp.sample_coords(*img.shape[:2])
    out = bilinear_sample(img, coords)
    if np.issubdtype(img.dtype, np.integer):
        info = np.iinfo(img.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(img.dtype), points_from_coords(points, coords, subpixel)


def warp_points_composite(points: np.ndarray, first: TPSWarp, second: TPSWarp,
                          shape: tuple[int, int] = (136, 136), window: float = 3.0) -> np.ndarray:
    """Points of an image warped by ``first`` and then by ``second``, moved to the nearest output pixel of the
    exact composite map (one rounding instead of two compounding ones).  (…, L, 2) -> (…, L, 2) integers.

    Only output pixels whose ``second`` sampling location lies within ``window`` px of the (sub-pixel) point
    after ``first`` are candidates; that is where the composite minimiser must be, and it keeps the cost at a
    few hundred spline evaluations instead of a full-frame one.
    """
    h, w = shape
    pts = np.asarray(points, np.float64)
    flat = pts.reshape(-1, 2)
    mid = warp_points(flat, first, shape, subpixel=True).astype(np.float64)
    g2 = second.sample_coords(h, w).reshape(-1, 2)
    near = (np.abs(g2[None] - mid[:, None]).max(-1) <= window)  # (L, H*W)
    out = np.empty_like(flat)
    cand = np.flatnonzero(near.any(0))
    if len(cand):
        comp = first.apply(g2[cand], shape)
        d2 = ((comp[None] - flat[:, None]) ** 2).sum(-1)
        d2[~near[:, cand]] = np.inf
        best = cand[np.argmin(d2, axis=1)]
        out[:] = np.stack([best % w, best // w], -1)
    lost = ~near.any(1)  # a point pushed out of the frame: fall back to the exhaustive search
    if lost.any():
        comp = first.apply(g2, shape)
        out[lost] = points_from_coords(flat[lost], comp.reshape(h, w, 2))
    return out.reshape(pts.shape).astype(np.float32)


def points_from_coords(points: np.ndarray, coords: np.ndarray, subpixel: bool = False) -> np.ndarray:
    """Inverts a sampling grid ``coords`` (H, W, 2) at (…, L, 2) input points (see ``warp_points``)."""
    h, w = coords.shape[:2]
    pts = np.asarray(points, np.float64)
    flat = pts.reshape(-1, 2)
    coords = coords.reshape(-1, 2)
    # |s - q|² = |s|² - 2 s·q + |q|², argmin over output pixels, vectorised over points.
    d2 = (coords ** 2).sum(-1)[None, :] - 2.0 * flat @ coords.T
    idx = np.argmin(d2, axis=1)
    out = np.stack([idx % w, idx // w], -1).astype(np.float64)
    if subpixel:
        grid = coords.reshape(h, w, 2)
        xi, yi = out[:, 0].astype(int), out[:, 1].astype(int)
        x1, y1 = np.clip(xi + 1, 1, w - 1), np.clip(yi + 1, 1, h - 1)
        jx = grid[yi, x1] - grid[yi, x1 - 1]  # d s / d x (per pixel)
        jy = grid[y1, xi] - grid[y1 - 1, xi]
        jac = np.stack([jx, jy], -1)  # (n, 2, 2): columns are ds/dx, ds/dy
        resid = flat - grid[yi, xi]
        out = out + np.linalg.solve(jac, resid[..., None])[..., 0]
    return out.reshape(pts.shape).astype(np.float32)
