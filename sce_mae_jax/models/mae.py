"""Masked autoencoder (stage 1), with the reference MAE's conventions so a PyTorch run is reproducible.

`MAE(**config.model).apply({'params': p}, images, noise=None, train=False, rngs=...)` takes NHWC float images
(already normalised) and returns `(loss, pred, mask)`:
  loss  scalar, mean per-patch MSE over removed patches;
  pred  (batch, N, p·p·3) per-patch pixels, patches row-major, values (row, column, channel);
  mask  (batch, N), 1 = removed.
Without `noise` the masking noise is drawn from the 'masking' RNG stream.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sce_mae_jax.models.vit import LN_EPS, Block, ViT, patchify, sincos_init, xavier

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def random_masking_ids(noise: jax.Array, mask_ratio: float):
    """The reference's argsort masking. noise (batch, N) → (ids_keep (batch, K), ids_restore, mask (batch, N)).

    Visible tokens stay in noise order (not spatial order), as in the reference; mask is 1 for removed patches,
    in the original patch order.
    """
    n = noise.shape[1]
    keep = int(n * (1 - mask_ratio))
    ids_shuffle = jnp.argsort(noise, axis=1)
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    mask = jnp.take_along_axis((jnp.arange(n) >= keep).astype(jnp.float32)[None].repeat(noise.shape[0], 0),
                               ids_restore, axis=1)
    return ids_shuffle[:, :keep], ids_restore, mask


def patch_errors(target_patches, pred, norm_pix_loss: bool):
    """(batch, N) per-patch MSE; with norm_pix_loss the target is normalised per patch with the *unbiased*
    variance (torch.var's default), eps 1e-6."""
    target = target_patches.astype(jnp.float32)
    if norm_pix_loss:
        mean = target.mean(-1, keepdims=True)
        var = target.var(-1, keepdims=True, ddof=1)
        target = (target - mean) / jnp.sqrt(var + 1e-6)
    return jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)


def reconstruction_loss(target_patches, pred, mask, norm_pix_loss: bool):
    """Per-patch MSE (`patch_errors`) averaged over removed patches."""
    return jnp.sum(patch_errors(target_patches, pred, norm_pix_loss) * mask) / jnp.sum(mask)


class MAE(nn.Module):
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    patch_size: int = 8
    image_size: int = 96
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    dtype: str = 'float32'
    fused_ops: bool = True   # models/fused.py: custom-VJP operations (True) or plain autodiff (False)
    position: str = 'sincos'  # the encoder's position table (vit.POSITIONS); the decoder always has its own

    def setup(self):
        dtype = DTYPES[self.dtype]
        self.encoder = ViT(self.embed_dim, self.depth, self.num_heads, self.mlp_ratio, self.patch_size,
                           self.image_size, dtype, self.fused_ops, self.position)
        self.decoder_embed = nn.Dense(self.decoder_embed_dim, dtype=dtype, kernel_init=xavier)
        self.mask_token = self.param('mask_token', nn.initializers.normal(0.02), (1, 1, self.decoder_embed_dim))
        self.decoder_pos_embed = self.param('decoder_pos_embed', sincos_init(self.grid, self.grid),
                                            (1, self.grid * self.grid + 1, self.decoder_embed_dim))
        self.decoder_blocks = [Block(self.decoder_num_heads, self.mlp_ratio, dtype, self.fused_ops,
                                     name=f'decoder_blocks_{i}') for i in range(self.decoder_depth)]
        self.decoder_norm = nn.LayerNorm(LN_EPS, dtype=dtype)
        self.decoder_pred = nn.Dense(self.patch_size ** 2 * 3, dtype=dtype, kernel_init=xavier)

    @property
    def grid(self):
        return self.image_size // self.patch_size

    def encode_visible(self, images, noise):
        """Encoder on the visible patches only. Returns (latent (batch, 1+K, D) normed, ids_restore, mask)."""
        x = self.encoder.embed(images)
        ids_keep, ids_restore, mask = random_masking_ids(noise, self.mask_ratio)
        x = jnp.take_along_axis(x, ids_keep[..., None], axis=1)
        x = self.encoder.prepend_cls(x)
        x, _, _ = self.encoder.blocks_forward(x, keep=ids_keep)
        return self.encoder.final_norm(x), ids_restore, mask

    def decode(self, latent, ids_restore):
        """latent (batch, 1+K, D) → per-patch predictions (batch, N, p·p·3)."""
        x = self.decoder_embed(latent)
        b, n = ids_restore.shape
        mask_tokens = jnp.broadcast_to(self.mask_token.astype(x.dtype), (b, n + 1 - x.shape[1], x.shape[2]))
        patches = jnp.concatenate([x[:, 1:], mask_tokens], axis=1)
        patches = jnp.take_along_axis(patches, ids_restore[..., None], axis=1)
        x = jnp.concatenate([x[:, :1], patches], axis=1) + self.decoder_pos_embed.astype(x.dtype)
        for blk in self.decoder_blocks:
            x, _ = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:]

    def __call__(self, images, noise=None, train: bool = False):
        del train  # the reference MAE has no dropout; kept for the documented signature.
        if noise is None:
            noise = jax.random.uniform(self.make_rng('masking'), (images.shape[0], self.grid * self.grid))
        latent, ids_restore, mask = self.encode_visible(images, noise)
        pred = self.decode(latent, ids_restore)
        loss = reconstruction_loss(patchify(images, self.patch_size), pred, mask, self.norm_pix_loss)
        return loss, pred.astype(jnp.float32), mask


def encoder_from_model_config(model_config) -> ViT:
    """The bare encoder (for stage 2 and evaluation) from the stage-1 `config.model`; a config.json written
    before a field existed gets the field's default."""
    m = dict(model_config)
    return ViT(m['embed_dim'], m['depth'], m['num_heads'], m.get('mlp_ratio', 4.0), m['patch_size'],
               m['image_size'], DTYPES[m.get('dtype', 'float32')], m.get('fused_ops', True),
               m.get('position', 'sincos'))


# The value of `init_from` (stage 2) that asks for an untrained backbone: the `random_init` control.
RANDOM_INIT = 'random_init'


def random_encoder_params(encoder: ViT, seed: int) -> dict:
    """Freshly initialised encoder parameters (MAE's initialisers): the `random_init` row and the backbone of
    the `random_init_carb` control, the same for the same seed."""
    size = encoder.image_size
    params = jax.jit(encoder.init)(jax.random.PRNGKey(seed), jnp.zeros((1, size, size, 3)))['params']
    return jax.tree.map(np.asarray, params)
