"""DeiT-style ViT encoder that exposes what stage 2 needs: the tokens and the CLS attention of any block.

Parameter names mirror facebookresearch/mae (`patch_embed`, `blocks_i/{norm1,attn/{qkv,proj},norm2,mlp/{fc1,fc2}}`,
`norm`) so that `convert.py` is a transpose per leaf, not a rename table.

Shapes: images (batch, H, W, 3) NHWC float; patch tokens (batch, N, D) with N = (H/p)·(W/p) in row-major order.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sce_mae_jax.models import fused

# Sizes of the DeiT family (paper 001 §4; encoder parameter counts 5.4M / 21.4M / 85.3M).
DEIT = {
    'tiny': dict(embed_dim=192, depth=12, num_heads=3),
    'small': dict(embed_dim=384, depth=12, num_heads=6),
    'base': dict(embed_dim=768, depth=12, num_heads=12),
}

LN_EPS = 1e-6  # the reference MAE/timm value; Flax's default is 1e-5.
xavier = nn.initializers.xavier_uniform()


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding, (grid_h·grid_w, dim), computed in float64 as the reference MAE.

    The first half of the channels encodes the column index and the second half the row index; that is the
    reference's (unintuitive) order and a converted PyTorch checkpoint only works with it.
    """
    if dim % 4:
        raise ValueError(f'position-embedding width must be divisible by 4, got {dim}')
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64),
                             indexing='ij')

    def embed_1d(pos):
        out = np.einsum('m,d->md', pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([embed_1d(cols), embed_1d(rows)], axis=1).astype(np.float32)


def sincos_init(grid_h: int, grid_w: int):
    """Initialiser for a (1, 1 + N, dim) position table: a zero CLS row, then `sincos_pos_embed_2d`."""
    def init(key, shape, dtype=jnp.float32):
        del key
        table = sincos_pos_embed_2d(shape[-1], grid_h, grid_w)
        return jnp.asarray(np.concatenate([np.zeros((1, shape[-1]), np.float32), table])[None], dtype)
    return init


ROPE_BASE = 100.0  # the axial 2-D RoPE of Heo et al. (ECCV 2024) for ViTs; 100, not 10,000, for a 12x12 grid


def rope_angles(coords: jax.Array, head_dim: int, period: int | None = None) -> jax.Array:
    """Rotary angles of patch tokens from their grid coordinates (..., 2) as (row, column): (..., head_dim/2).

    The first quarter of each head's channel pairs turns with the column and the second with the row, so a
    query·key product depends on the two tokens' offset on the grid only, never on where they are. `head_dim`
    must be a multiple of 4 (`ViT` checks). With `period` (the grid's side) every frequency is a whole number of
    turns per period, so offsets count modulo the grid: the grid becomes a torus, with no border to tell a
    token where it is.
    """
    m = jnp.arange(head_dim // 4, dtype=jnp.float32)
    freqs = (ROPE_BASE ** (-m / (head_dim // 4)) if period is None
             else 2 * np.pi * (1 + m % (period // 2)) / period)
    coords = coords.astype(jnp.float32)
    return jnp.concatenate([coords[..., 1:2] * freqs, coords[..., 0:1] * freqs], axis=-1)


def rotate(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotates channel pairs (i, i + hd/2) of x (batch, T, heads, hd) by angles (batch, T, hd/2)."""
    cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


def rope_attention(q, k, v, key_mask, scale, angles):
    """softmax(q·kᵀ·scale) v with rotary q·k between patches; CLS's logits, as query and as key, unrotated.

    A rotated CLS would sit at some place (angle 0 is the corner) and hand every patch its absolute position
    through the CLS-patch logits: with only patch-patch pairs rotated, nothing in the encoder depends on where
    the patches are, only on their offsets (tests/test_models.py). Plain autodiff: an ablation's small models.
    """
    qr, kr = rotate(q, angles), rotate(k, angles)
    logits = jnp.einsum('bqhd,bkhd->bhqk', qr, kr, preferred_element_type=jnp.float32)
    to_cls = jnp.einsum('bqhd,bhd->bhq', q, k[:, 0], preferred_element_type=jnp.float32)
    from_cls = jnp.einsum('bhd,bkhd->bhk', q[:, 0], k, preferred_element_type=jnp.float32)
    logits = logits.at[:, :, :, 0].set(to_cls).at[:, :, 0, :].set(from_cls) * scale
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum('bhqk,bkhd->bqhd', probs, v)


def grid_coords(grid_h: int, grid_w: int) -> np.ndarray:
    """(grid_h·grid_w, 2) integer (row, column) of the patch tokens in row-major order."""
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing='ij')
    return np.stack([rows.reshape(-1), cols.reshape(-1)], axis=1)


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """(batch, H, W, C) → (batch, N, patch·patch·C); N row-major, each patch ordered (row, column, channel)."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: jax.Array, patch: int, grid_h: int, grid_w: int) -> jax.Array:
    """Inverse of `patchify`: (batch, N, patch·patch·C) → (batch, H, W, C)."""
    b = patches.shape[0]
    c = patches.shape[-1] // (patch * patch)
    x = patches.reshape(b, grid_h, grid_w, patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, grid_h * patch, grid_w * patch, c)


def torch_linear_bias_init(fan_in: int):
    """PyTorch's default Linear/Conv bias init, U(±1/√fan_in): MAE leaves the patch-embedding bias at it."""
    bound = 1.0 / np.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class _LayerNormParams(nn.Module):
    """The parameters of an `nn.LayerNorm` (names `scale`, `bias`; ones and zeros), unapplied: the block's
    pre-norms run inside the sublayer that follows, fused with its first projection."""
    features: int

    @nn.compact
    def __call__(self):
        return (self.param('scale', nn.initializers.ones_init(), (self.features,)),
                self.param('bias', nn.initializers.zeros_init(), (self.features,)))


class _DenseParams(nn.Module):
    """The parameters of an `nn.Dense(features)` (same names, shapes, initialisers and init RNG), unapplied."""
    in_features: int
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self):
        kernel = self.param('kernel', xavier, (self.in_features, self.features))
        bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
        return kernel.astype(self.dtype), bias.astype(self.dtype)


class Attention(nn.Module):
    """Multi-head self-attention after the block's first LayerNorm, with one fused qkv projection (a D → 3D
    matrix, as in the reference).

    Returns the attended tokens and, when asked, the CLS query's logits against the patch keys,
    q_cls·K/√d per head, shape (batch, heads, N) — eq. 1 of the paper softmaxes these over the patches.
    """
    num_heads: int
    dtype: Any = jnp.float32
    fused_ops: bool = True

    @nn.compact
    def __call__(self, x, norm, key_mask=None, return_cls_logits=False, angles=None):
        """x: the block's input tokens, before the LayerNorm whose (scale, bias) is `norm`; `angles`
        (batch, T, hd/2): rotary angles of q and k (`rope_angles`), None for none."""
        ops = fused.select(self.fused_ops)
        b, t, d = x.shape
        hd = d // self.num_heads
        qkv = ops.norm_dense(x, *norm, *_DenseParams(d, 3 * d, self.dtype, name='qkv')(), LN_EPS)
        q, k, v = jnp.moveaxis(qkv.reshape(b, t, 3, self.num_heads, hd), 2, 0)
        scale = 1.0 / np.sqrt(hd)
        out = (ops.attention(q, k, v, key_mask, scale) if angles is None
               else rope_attention(q, k, v, key_mask, scale, angles))
        out = nn.Dense(d, dtype=self.dtype, kernel_init=xavier, name='proj')(out.reshape(b, t, d))
        if not return_cls_logits:
            return out, None
        cls_logits = jnp.einsum('bhd,bnhd->bhn', q[:, 0].astype(jnp.float32), k[:, 1:].astype(jnp.float32)) * scale
        return out, cls_logits


class Mlp(nn.Module):
    """fc1 → GELU → fc2 after the block's second LayerNorm."""
    hidden: int
    dtype: Any = jnp.float32
    fused_ops: bool = True

    @nn.compact
    def __call__(self, x, norm):
        """x: the tokens before the LayerNorm whose (scale, bias) is `norm`."""
        ops = fused.select(self.fused_ops)
        d = x.shape[-1]
        h = ops.norm_dense(x, *norm, *_DenseParams(d, self.hidden, self.dtype, name='fc1')(), LN_EPS)
        return ops.gelu_dense(h, *_DenseParams(self.hidden, d, self.dtype, name='fc2')())


class Block(nn.Module):
    """Pre-norm transformer block: x += attn(norm1(x)); x += mlp(norm2(x)). `key_mask` (batch, T) hides tokens
    from attention (CARB's mode A). `fused_ops` picks the custom-VJP operations or plain autodiff
    (models/fused.py); the parameters are the same either way."""
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    fused_ops: bool = True

    @nn.compact
    def __call__(self, x, key_mask=None, return_cls_logits=False, angles=None):
        d = x.shape[-1]
        h, cls_logits = Attention(self.num_heads, self.dtype, self.fused_ops, name='attn')(
            x, _LayerNormParams(d, name='norm1')(), key_mask, return_cls_logits, angles)
        x = x + h
        mlp = Mlp(int(d * self.mlp_ratio), self.dtype, self.fused_ops, name='mlp')
        x = x + mlp(x, _LayerNormParams(d, name='norm2')())
        return x, cls_logits


POSITIONS = ('sincos', 'none', 'rope', 'rope_cyclic')


class ViT(nn.Module):
    """The MAE encoder: patch embedding, fixed sin-cos positions, CLS token, blocks, final LayerNorm.

    Attributes mirror `DEIT` plus patch/image size. `dtype` is the compute dtype; parameters stay float32.
    Use `__call__` for the full forward; `embed`, `blocks_forward` and `final_norm` are the pieces the MAE
    masking and CARB's mode A need.
    """
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    patch_size: int = 8
    image_size: int = 96
    dtype: Any = jnp.float32
    fused_ops: bool = True  # custom-VJP operations (models/fused.py) or plain autodiff; same parameters
    # 'sincos': MAE's fixed table; 'none': a zero table, tokens know their content and not their place (an
    # ablation, docs/results.md; the parameter stays, so checkpoints keep one layout); 'rope': a zero table and
    # rotary q·k (`rope_angles`): attention knows how far apart two tokens are, no token knows where it is
    # (but a token at the border sees neighbours on one side only); 'rope_cyclic': the same with offsets modulo
    # the grid, which has no border then
    position: str = 'sincos'

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def setup(self):
        in_dim = self.patch_size * self.patch_size * 3
        # A Dense on patchified pixels is the reference's stride-p convolution, with its kernel in (row, col, ch)
        # order, so xavier here is xavier on the conv's (in → D) matrix view exactly as MAE initialises it.
        self.patch_embed = nn.Dense(self.embed_dim, dtype=self.dtype, kernel_init=xavier,
                                    bias_init=torch_linear_bias_init(in_dim))
        self.cls_token = self.param('cls_token', nn.initializers.normal(0.02), (1, 1, self.embed_dim))
        # A parameter (CLS row first, zeros) like the reference's requires_grad=False tensor, so counts and
        # converted checkpoints line up; the optimiser never updates it (see train/optim.py FROZEN_PARAMS).
        if self.position not in POSITIONS:
            raise ValueError(f'position={self.position!r}: expected one of {POSITIONS}')
        init = sincos_init(self.grid, self.grid) if self.position == 'sincos' else nn.initializers.zeros
        if self.position.startswith('rope') and (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f'position={self.position} needs a head width (embed_dim / num_heads) divisible by 4, got '
                             f'{self.embed_dim}/{self.num_heads}')
        self.pos_embed = self.param('pos_embed', init, (1, self.num_patches + 1, self.embed_dim))
        self.blocks = [Block(self.num_heads, self.mlp_ratio, self.dtype, self.fused_ops, name=f'blocks_{i}')
                       for i in range(self.depth)]
        self.norm = nn.LayerNorm(LN_EPS, dtype=self.dtype)

    def embed(self, images):
        """(batch, H, W, 3) → patch tokens with position embeddings, (batch, N, D). No CLS yet."""
        if images.shape[1] != self.image_size or images.shape[2] != self.image_size:
            raise ValueError(f'expected {self.image_size}x{self.image_size} images, got {images.shape[1:3]}')
        x = self.patch_embed(patchify(images.astype(self.dtype), self.patch_size))
        return x + self.pos_embed[:, 1:].astype(x.dtype)

    def prepend_cls(self, x):
        cls = (self.cls_token + self.pos_embed[:, :1]).astype(x.dtype)
        return jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.embed_dim)), x], axis=1)

    def blocks_forward(self, x, start: int = 0, stop: int | None = None, key_mask=None,
                       capture: Sequence[int] = (), keep=None):
        """Runs blocks[start:stop] on (batch, T, D) tokens (CLS first): all N patches in row-major order, or
        with `keep` (batch, T−1) the indices of the patches that x holds (MAE's visible tokens; only
        the rotary positions read it).

        Returns (x, outputs, cls_logits): `outputs[i]` is the token sequence after block i and `cls_logits[i]`
        the CLS-query logits (batch, heads, T−1) of block i's attention, for every i in `capture`.
        """
        stop = self.depth if stop is None else stop
        angles = self.rope(x.shape[0], keep) if self.position.startswith('rope') else None
        outputs, cls_logits = {}, {}
        for i in range(start, stop):
            x, logits = self.blocks[i](x, key_mask, i in capture, angles)
            if i in capture:
                outputs[i], cls_logits[i] = x, logits
        return x, outputs, cls_logits

    def rope(self, batch: int, keep=None):
        """Rotary angles (batch, 1 + T, hd/2) of CLS (unused: `rope_attention`) and the patches."""
        coords = jnp.asarray(grid_coords(self.grid, self.grid))
        coords = jnp.broadcast_to(coords, (batch, *coords.shape)) if keep is None else coords[keep]
        angles = rope_angles(coords, self.embed_dim // self.num_heads,
                             self.grid if self.position == 'rope_cyclic' else None)
        return jnp.concatenate([jnp.zeros_like(angles[:, :1]), angles], axis=1)

    def final_norm(self, x):
        return self.norm(x)

    def __call__(self, images, capture: Sequence[int] = ()):
        """Full encoder on all patches. Returns a dict:
        `tokens` (batch, N, D) final normed patch tokens, `cls` (batch, D) final normed CLS,
        `layers` {i: (batch, N, D)} patch tokens after block i (not normed), `cls_logits` {i: (batch, heads, N)}.
        """
        x = self.prepend_cls(self.embed(images))
        x, outputs, cls_logits = self.blocks_forward(x, capture=capture)
        x = self.norm(x)
        return dict(tokens=x[:, 1:], cls=x[:, 0], layers={i: o[:, 1:] for i, o in outputs.items()},
                    cls_logits=cls_logits)


def vit_for(size: str, **kwargs) -> ViT:
    """`vit_for('small')` → DeiT-S encoder."""
    return ViT(**DEIT[size], **kwargs)

