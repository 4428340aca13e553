"""Light heads on the frozen backbone: the stage-2 projector."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

PROJECTOR_ACTIVATIONS = ('softmax', 'linear')


class Projector(nn.Module):
    """Feature map → per-position descriptors: (batch, H, W, C) → (batch, H, W, out_dim), or a square token
    sequence (batch, N, C) → (batch, N, out_dim).

    CL's projector, which SCE-MAE inherits (method.md §2.5): a 1x1 convolution, then `activation='softmax'`, a
    softmax over all spatial positions of each output channel with multiplier `softmax_scale` (7). Every channel
    becomes a soft part detector that competes across the image, so the result depends on the map it is applied
    to: stage 2 applies it to the 12x12 token map, evaluation to the upsampled map (method.md §2.5).
    `activation='linear'` is the plain per-position linear map. `hidden` adds ReLU layers before the output
    layer and `kernel_size` > 1 makes every layer a spatial convolution over the grid.
    """
    out_dim: int
    hidden: Sequence[int] = ()
    kernel_size: int = 1
    activation: str = 'softmax'
    softmax_scale: float = 7.0

    @nn.compact
    def __call__(self, x):
        if self.activation not in PROJECTOR_ACTIVATIONS:
            raise ValueError(f'projector.activation={self.activation!r} must be one of {PROJECTOR_ACTIVATIONS}')
        tokens = x.ndim == 3
        if tokens:
            b, n, c = x.shape
            g = int(round(n ** 0.5))
            x = x.reshape(b, g, g, c)
        b, h, w, _ = x.shape
        x = x.astype(jnp.float32)
        k = (self.kernel_size, self.kernel_size)
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Conv(width, k, padding='SAME', name=f'hidden_{i}')(x))
        x = nn.Conv(self.out_dim, k, padding='SAME', name='out')(x)
        if self.activation == 'softmax':
            x = jax.nn.softmax(self.softmax_scale * x.reshape(b, h * w, self.out_dim), axis=1).reshape(x.shape)
        return x.reshape(b, h * w, self.out_dim) if tokens else x


# ---------------------------------------------------------------------------------------------- keypoint regressor
def cell_centres(n: int) -> jax.Array:
    """Normalised centres of n cells spanning [−1, 1]: u_c = 2(c + 0.5)/n − 1, (n,).

    Pixel-centre convention (half-pixel centres, as `jax.image.resize` and the cover-and-stride map): cell c of
    an n-cell axis over S pixels covers pixels [cS/n, (c+1)S/n) and is centred at pixel (c + 0.5)·S/n − 0.5,
    which `evals.detection.to_pixels` maps u_c to exactly.
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
    to (x, y), without bias. Output in normalised [−1, 1] coordinates of the image (`evals.detection.to_pixels`).

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
