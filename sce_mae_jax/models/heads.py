"""Light heads on the frozen backbone: the stage-2 projector."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PROJECTOR_ACTIVATIONS = ('softmax', 'linear')


class Projector(nn.Module):
    """Feature map → per-position descriptors: (batch, H, W, C) → (batch, H, W, out_dim), or a square token
    sequence (batch, N, C) → (batch, N, out_dim).

    CL's projector, which SCE-MAE inherits (method.md §2.5): a 1x1 convolution, then `activation='softmax'`, a
    softmax over all spatial positions of each output channel with multiplier `softmax_scale` (CL's 7). Every
    channel becomes a soft part detector that competes across the image, so the result depends on the map it is
    applied to: training and evaluation both apply it through `descriptor_map`, to a smooth map upsampled to the
    image size. `activation='linear'` is the plain per-position linear map. `hidden` adds ReLU layers before the
    output layer and `kernel_size` > 1 makes every layer a spatial convolution over the grid.
    """
    out_dim: int
    hidden: Sequence[int] = ()
    kernel_size: int = 1
    activation: str = 'softmax'
    softmax_scale: float = 7.0

    @nn.compact
    def __call__(self, x, size: int | None = None):
        """`size`: the map is first bilinearly upsampled to size x size (`descriptor_map`). For the pointwise
        linear projector (no `hidden`, `kernel_size` 1) the logits are upsampled instead, the same values
        (interpolation weights sum to 1, so it commutes with an affine map) at 1/(stride²) of the work."""
        if self.activation not in PROJECTOR_ACTIVATIONS:
            raise ValueError(f'projector.activation={self.activation!r} must be one of {PROJECTOR_ACTIVATIONS}')
        tokens = x.ndim == 3
        if tokens:
            b, n, c = x.shape
            g = int(round(n ** 0.5))
            x = x.reshape(b, g, g, c)
        x = x.astype(jnp.float32)
        pointwise = self.kernel_size == 1 and not self.hidden
        if size is not None and not pointwise:
            x = upsample(x, size)
        for i, width in enumerate(self.hidden):
            x = nn.relu(self._layer(width, f'hidden_{i}')(x))
        x = self._layer(self.out_dim, 'out')(x)
        if size is not None and pointwise:
            x = upsample(x, size)
        b, h, w, _ = x.shape
        if self.activation == 'softmax':
            x = jax.nn.softmax(self.softmax_scale * x.reshape(b, h * w, self.out_dim), axis=1).reshape(x.shape)
        return x.reshape(b, h * w, self.out_dim) if tokens else x

    def _layer(self, width: int, name: str) -> nn.Module:
        if self.kernel_size == 1:
            return Pointwise(width, name=name)
        return nn.Conv(width, (self.kernel_size,) * 2, padding='SAME', name=name)


class Pointwise(nn.Module):
    """A 1x1 convolution as an einsum, with nn.Conv(features, (1, 1))'s parameters and initialisation (so
    checkpoints are interchangeable): XLA's CPU convolution is several times slower at this, its weight
    gradient above all (3.1 s against 0.5 s for a 16 x 96 x 96 x 96 map, 2026-12-02)."""
    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param('kernel', nn.initializers.lecun_normal(), (1, 1, x.shape[-1], self.features))
        bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
        return jnp.einsum('...c,cd->...d', x, kernel[0, 0], precision=jax.lax.Precision.HIGHEST) + bias


def upsample(maps: jax.Array, size: int) -> jax.Array:
    """Bilinear (half-pixel centres, as PyTorch's align_corners=False) (B, h, w, C) → (B, size, size, C)."""
    b, h, w, c = maps.shape
    if (h, w) == (size, size):
        return maps
    return jax.image.resize(maps, (b, size, size, c), method='bilinear')


def descriptor_map(projector: Projector, params, feature_map: jax.Array, size: int | None) -> jax.Array:
    """The one way descriptors are made, in stage-2 training and in every evaluation: a frozen feature map
    (B, h, w, C) → bilinear to (B, size, size, C) (None: as it is) → the projector, (B, size, size, D).

    One function, so that the map stage 2 shapes the projector's softmax on is the kind of map evaluation
    reads (method.md §2.5, the withdrawn decision: a spatial softmax over 144 tokens is not the same function as
    one over 9,216 upsampled positions)."""
    return projector.apply({'params': params}, feature_map, size)


def token_pixels(grid: int, patch: int, size: int) -> jax.Array:
    """(N,) flat indices into a size x size map of the pixels under the N = grid² token centres, row-major:
    token (r, c) at pixel ⌊(p·r + p/2)·size/(p·grid)⌋; at size = p·grid that is (8r + 4, 8c + 4), the token
    position of the LCR loss (carb.token_positions)."""
    centre = (np.arange(grid) * patch + patch / 2.0) * size / (patch * grid)
    idx = np.minimum(np.floor(centre).astype(np.int32), size - 1)
    return jnp.asarray((idx[:, None] * size + idx[None, :]).reshape(-1), jnp.int32)


def channel_support(proj: jax.Array) -> jax.Array:
    """Mean effective support of a softmax projector's channels as a fraction of the map: exp(entropy over
    positions) / positions, averaged over channels and images; (B, H, W, D) or (B, P, D) → scalar. 1 is a
    uniform channel, 1/P a one-hot one (every pixel's descriptor is then its one winning channel)."""
    p = proj.reshape(proj.shape[0], -1, proj.shape[-1]).astype(jnp.float32)
    entropy = -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=1)
    return jnp.mean(jnp.exp(entropy)) / p.shape[1]


# ---------------------------------------------------------------------------------------------- keypoint regressor
def cell_centres(n: int) -> jax.Array:
    """Normalised centres of n cells spanning [−1, 1]: u_c = 2(c + 0.5)/n − 1, (n,).

    Pixel-centre convention (half-pixel centres, as `jax.image.resize` and the cover-and-stride map): cell c of
    an n-cell axis over S pixels covers pixels [cS/n, (c+1)S/n) and is centred at pixel (c + 0.5)·S/n − 0.5,
    which `evals.regressor.to_pixels` maps u_c to exactly.
    """
    return 2.0 * (jnp.arange(n, dtype=jnp.float32) + 0.5) / n - 1.0


def soft_argmax(heatmaps: jax.Array, temperature: float = 100.0) -> jax.Array:
    """Expected cell centre under softmax(temperature · heatmap) over all h·w positions.

    heatmaps (B, h, w, K) → (B, K, 2) as (x, y) in [−1, 1]: x from the columns, y from the rows.
    """
    b, h, w, k = heatmaps.shape
    p = jax.nn.softmax(temperature * heatmaps.astype(jnp.float32).reshape(b, h * w, k), axis=1).reshape(b, h, w, k)
    x = jnp.einsum('bhwk,w->bk', p, cell_centres(w), precision=jax.lax.Precision.HIGHEST)
    y = jnp.einsum('bhwk,h->bk', p, cell_centres(h), precision=jax.lax.Precision.HIGHEST)
    return jnp.stack([x, y], axis=-1)


def _mean_of_points_init(num_points: int):
    """(L, 2K, 2) kernel that starts each landmark at the mean of its K intermediate points."""
    def init(key, shape, dtype=jnp.float32):
        del key
        l, two_k, _ = shape
        w = jnp.zeros((two_k, 2), dtype).at[0::2, 0].set(1.0 / num_points).at[1::2, 1].set(1.0 / num_points)
        return jnp.broadcast_to(w, (l, two_k, 2)).astype(dtype)
    return init


class Regressor(nn.Module):
    """Landmark regressor on frozen dense features (paper 001 §4.3, method.md §4): (B, h, w, C) → (B, L, 2).

    Convolution block → K = `heatmaps_per_landmark` (50) intermediate heatmaps per landmark (channel l·K + k
    belongs to landmark l) → `soft_argmax` of each (softmax × `temperature` (100) over all h·w positions,
    coordinates in [−1, 1]) → per landmark, a linear map of its K points' 2K = 100 coordinates (x0, y0, x1, …)
    to (x, y), without bias. Output in normalised [−1, 1] coordinates of the image (`evals.regressor.to_pixels`).

    The convolution block is our choice (the paper says only "a convolution block"): for each width in `hidden`
    a `kernel_size` x `kernel_size` convolution + ReLU (default one 3x3 of 256), then a 1x1 convolution to L·K
    heatmaps; `hidden=()` is a single linear 1x1 map from features to heatmaps. The last linear map starts as
    the mean of the K points (any start works; this one predicts the heatmaps' consensus from step 0).
    """
    num_landmarks: int
    heatmaps_per_landmark: int = 50
    hidden: Sequence[int] = (256,)
    kernel_size: int = 3
    temperature: float = 100.0

    @nn.compact
    def __call__(self, x, return_points: bool = False):
        b = x.shape[0]
        l, k = self.num_landmarks, self.heatmaps_per_landmark
        x = x.astype(jnp.float32)
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Conv(width, (self.kernel_size,) * 2, padding='SAME', name=f'hidden_{i}')(x))
        heat = nn.Conv(l * k, (1, 1), name='heatmaps')(x)                # (B, h, w, L·K)
        points = soft_argmax(heat, self.temperature).reshape(b, l, 2 * k)  # per landmark (x0, y0, x1, y1, ...)
        kernel = self.param('combine', _mean_of_points_init(k), (l, 2 * k, 2))
        out = jnp.einsum('blk,lkd->bld', points, kernel, precision=jax.lax.Precision.HIGHEST)
        return (out, points.reshape(b, l, k, 2)) if return_points else out
