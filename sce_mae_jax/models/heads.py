"""Light heads on the frozen backbone: the stage-2 projector."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class Projector(nn.Module):
    """Token map (batch, N, C) on a square grid → (batch, N, out_dim).

    Default: one per-token linear layer (a 1x1 convolution, as in CL). `hidden` adds ReLU layers before it and
    `kernel_size` > 1 makes every layer a spatial convolution over the token grid.
    """
    out_dim: int
    hidden: Sequence[int] = ()
    kernel_size: int = 1

    @nn.compact
    def __call__(self, tokens):
        b, n, c = tokens.shape
        g = int(round(n ** 0.5))
        x = tokens.astype(jnp.float32).reshape(b, g, g, c)
        k = (self.kernel_size, self.kernel_size)
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Conv(width, k, padding='SAME', name=f'hidden_{i}')(x))
        x = nn.Conv(self.out_dim, k, padding='SAME', name='out')(x)
        return x.reshape(b, n, self.out_dim)
