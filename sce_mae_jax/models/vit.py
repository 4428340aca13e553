"""DeiT-style ViT encoder that exposes what stage 2 needs: the tokens and the CLS attention of any block.

Parameter names mirror facebookresearch/mae (`patch_embed`, `blocks_i/{norm1,attn/{qkv,proj},norm2,mlp/{fc1,fc2}}`,
`norm`) so that `convert.py` is a transpose per leaf, not a rename table.

Shapes: images (batch, H, W, 3) NHWC float; patch tokens (batch, N, D) with N = (H/p)·(W/p) in row-major order.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


def _after(g, dtype):
    """A zero that depends on the incoming gradient g, added to a residual before a backward pass recomputes
    something large from it. Without it XLA:CPU hoists the recomputation (it depends on forward values only)
    to right after the forward pass, or CSE merges it with the forward's identical computation, and its result
    lives until used: memory the recomputation was meant to save. (`jax.lax.optimization_barrier` does not
    help: XLA:CPU expands it before scheduling.) XLA does not fold x·0 for floats (NaN semantics); a non-finite
    g[0] turns the gradient non-finite, which it would be anyway."""
    return (g.reshape(-1)[0] * 0).astype(dtype)


def _logits(q, k, key_mask, scale):
    logits = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
    if key_mask is not None:  # the fill value of jax.nn.dot_product_attention
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    return logits


def _attention_fwd_core(q, k, v, key_mask, scale):
    logits = _logits(q, k, key_mask, scale)
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    probs = jnp.exp(logits - lse).astype(v.dtype)
    return jnp.einsum('bhqk,bhkd->bqhd', probs, v), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, key_mask, scale):
    """softmax(q·kᵀ·scale) v for heads-leading q, k, v (batch, heads, T, hd) → (batch, T, heads, hd).

    A custom VJP so the backward pass keeps only q, k, v and the per-query log-sum-exp, and recomputes the
    probabilities from them (as flash attention does): no (b, h, T, T) array lives from the forward to the
    backward pass. Autodiff kept three of them per block (~2 GiB of the MAE step at batch 64), keeping only the
    probabilities still one (~0.7 GiB); the price is one more q·kᵀ per block.
    """
    return _attention_fwd_core(q, k, v, key_mask, scale)[0]


def _attention_fwd(q, k, v, key_mask, scale):
    out, lse = _attention_fwd_core(q, k, v, key_mask, scale)
    return out, (q, k, v, key_mask, lse)


def _attention_bwd(scale, res, g):
    q, k, v, key_mask, lse = res
    k = k + _after(g, k.dtype)
    p32 = jnp.exp(_logits(q, k, key_mask, scale) - lse)  # masked keys: p = 0
    dv = jnp.einsum('bhqk,bqhd->bhkd', p32.astype(v.dtype), g)
    dp = jnp.einsum('bqhd,bhkd->bhqk', g, v, preferred_element_type=jnp.float32)
    ds = (p32 * (dp - jnp.sum(dp * p32, axis=-1, keepdims=True)) * scale).astype(q.dtype)
    dq = jnp.einsum('bhqk,bhkd->bhqd', ds, k)
    dk = jnp.einsum('bhqk,bhqd->bhkd', ds, q)
    mask_ct = None if key_mask is None else np.zeros(key_mask.shape, jax.dtypes.float0)
    return dq, dk, dv, mask_ct


_attention.defvjp(_attention_fwd, _attention_bwd)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (a D → 3D matrix, as in the reference).

    Returns the attended tokens and, when asked, the CLS query's logits against the patch keys,
    q_cls·K/√d per head, shape (batch, heads, N) — eq. 1 of the paper softmaxes these over the patches.
    """
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, norm, key_mask=None, return_cls_logits=False):
        """x: the block's input tokens; norm: the (scale, bias) of the LayerNorm applied before the qkv
        projection (fused with it, see `_norm_dense`)."""
        b, t, d = x.shape
        hd = d // self.num_heads
        kernel, bias = _DenseParams(d, 3 * d, name='qkv')()
        qkv = _norm_dense(x, *norm, kernel.astype(self.dtype), bias.astype(self.dtype))
        scale = 1.0 / np.sqrt(hd)
        # Heads-leading (3, batch, heads, T, hd) layout, written out rather than `jax.nn.dot_product_attention`:
        # on XLA:CPU the batched (b, h) matmuls run about twice as fast with the head axis next to the batch
        # axis, and `_attention`'s backward pass keeps no (b, h, T, T) array (see there).
        qkv = qkv.reshape(b, t, 3, self.num_heads, hd).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        out = _attention(q, k, v, key_mask, scale)
        out = nn.Dense(d, dtype=self.dtype, kernel_init=xavier, name='proj')(out.reshape(b, t, d))
        if not return_cls_logits:
            return out, None
        cls_logits = jnp.einsum('bhd,bhnd->bhn', q[:, :, 0].astype(jnp.float32), k[:, :, 1:].astype(jnp.float32)) * scale
        return out, cls_logits


def _gelu(x):
    return nn.gelu(x, approximate=False)  # exact erf GELU as in PyTorch; Flax's default is the tanh form.


@jax.custom_vjp
def _gelu_dense(h, kernel, bias):
    """gelu(h) @ kernel + bias, keeping only h for the backward pass (gelu(h) is recomputed there, fused into
    the GELU-gradient loop): one (tokens, 4·D) array less per block, ~0.6 GiB of the MAE step at batch 64.
    (jax.checkpoint with a names policy does the same on paper, but on XLA:CPU its recomputation is hoisted
    back into the forward pass; see `_after`.)"""
    return _gelu_dense_fwd(h, kernel, bias)[0]


def _gelu_dense_fwd(h, kernel, bias):
    return _gelu(h) @ kernel + bias, (h, kernel)


def _gelu_dense_bwd(res, g):
    h, kernel = res
    h = h + _after(g, h.dtype)
    shape = h.shape
    h, g = h.reshape(-1, shape[-1]), g.reshape(-1, g.shape[-1])  # 2-D dots: XLA:CPU's fast matmul path
    dkernel = _gelu(h).T @ g
    dbias = jnp.sum(g, axis=0)
    h32 = h.astype(jnp.float32)  # d/dh gelu(h) = Φ(h) + h·φ(h)
    dgelu = (0.5 * (1.0 + jax.lax.erf(h32 * np.float32(1 / np.sqrt(2))))
             + h32 * jnp.exp(-0.5 * h32 * h32) * np.float32(1 / np.sqrt(2 * np.pi)))
    dh = (g @ kernel.T).astype(jnp.float32) * dgelu
    return dh.astype(h.dtype).reshape(shape), dkernel.astype(kernel.dtype), dbias.astype(kernel.dtype)


_gelu_dense.defvjp(_gelu_dense_fwd, _gelu_dense_bwd)


@jax.custom_vjp
def _norm_dense(x, scale, shift, kernel, bias):
    """LayerNorm(x)·kernel + bias (LayerNorm with eps `LN_EPS`, statistics in float32), keeping only x and the
    per-token mean and 1/std for the backward pass, which recomputes the normalised x. Autodiff of
    LayerNorm → Dense kept the normalised tokens, the LayerNorm output and several broadcast (tokens, D)
    products per LayerNorm: with this, ~1 GiB less for the MAE step at batch 64."""
    return _norm_dense_fwd(x, scale, shift, kernel, bias)[0]


def _norm_dense_fwd(x, scale, shift, kernel, bias):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True) + LN_EPS)
    y = ((x32 - mean) * rstd * scale + shift).astype(x.dtype)
    return y @ kernel + bias, (x, mean, rstd, scale, shift, kernel)


def _norm_dense_bwd(res, g):
    x, mean, rstd, scale, shift, kernel = res
    x = x + _after(g, x.dtype)
    shape = x.shape
    x32, g = x.astype(jnp.float32).reshape(-1, shape[-1]), g.reshape(-1, g.shape[-1])
    mean, rstd = mean.reshape(-1, 1), rstd.reshape(-1, 1)
    xhat = (x32 - mean) * rstd
    y = (xhat * scale + shift).astype(x.dtype)
    dkernel = y.T @ g
    dbias = jnp.sum(g, axis=0)
    dy = (g @ kernel.T).astype(jnp.float32)
    dscale = jnp.sum(dy * xhat, axis=0)
    dshift = jnp.sum(dy, axis=0)
    dxhat = dy * scale
    dx = rstd * (dxhat - jnp.mean(dxhat, axis=-1, keepdims=True)
                 - xhat * jnp.mean(dxhat * xhat, axis=-1, keepdims=True))
    return (dx.astype(x.dtype).reshape(shape), dscale.astype(scale.dtype), dshift.astype(shift.dtype),
            dkernel.astype(kernel.dtype), dbias.astype(kernel.dtype))


_norm_dense.defvjp(_norm_dense_fwd, _norm_dense_bwd)


class _LayerNormParams(nn.Module):
    """The parameters of an `nn.LayerNorm` (names `scale`, `bias`; ones and zeros), unapplied."""
    features: int

    @nn.compact
    def __call__(self):
        return (self.param('scale', nn.initializers.ones_init(), (self.features,)),
                self.param('bias', nn.initializers.zeros_init(), (self.features,)))


class _DenseParams(nn.Module):
    """The parameters of an `nn.Dense(features)` (same names, shapes, initialisers and init RNG), unapplied."""
    in_features: int
    features: int

    @nn.compact
    def __call__(self):
        return (self.param('kernel', xavier, (self.in_features, self.features)),
                self.param('bias', nn.initializers.zeros_init(), (self.features,)))


class Mlp(nn.Module):
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, norm):
        """x: the tokens before the LayerNorm whose (scale, bias) is `norm` (fused with fc1)."""
        d = x.shape[-1]
        kernel, bias = _DenseParams(d, self.hidden, name='fc1')()
        x = _norm_dense(x, *norm, kernel.astype(self.dtype), bias.astype(self.dtype))
        kernel, bias = _DenseParams(self.hidden, d, name='fc2')()
        return _gelu_dense(x, kernel.astype(self.dtype), bias.astype(self.dtype))


class Block(nn.Module):
    """Pre-norm transformer block. `key_mask` (batch, T) hides tokens from attention (CARB's mode A)."""
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask=None, return_cls_logits=False):
        d = x.shape[-1]
        h, cls_logits = Attention(self.num_heads, self.dtype, name='attn')(
            x, _LayerNormParams(d, name='norm1')(), key_mask, return_cls_logits)
        x = x + h
        x = x + Mlp(int(d * self.mlp_ratio), self.dtype, name='mlp')(x, _LayerNormParams(d, name='norm2')())
        return x, cls_logits


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
        self.pos_embed = self.param('pos_embed', sincos_init(self.grid, self.grid), (1, self.num_patches + 1,
                                                                                 self.embed_dim))
        self.blocks = [Block(self.num_heads, self.mlp_ratio, self.dtype, name=f'blocks_{i}')
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
                       capture: Sequence[int] = ()):
        """Runs blocks[start:stop] on (batch, T, D) tokens (CLS first).

        Returns (x, outputs, cls_logits): `outputs[i]` is the token sequence after block i and `cls_logits[i]`
        the CLS-query logits (batch, heads, T−1) of block i's attention, for every i in `capture`.
        """
        stop = self.depth if stop is None else stop
        outputs, cls_logits = {}, {}
        for i in range(start, stop):
            x, logits = self.blocks[i](x, key_mask, i in capture)
            if i in capture:
                outputs[i], cls_logits[i] = x, logits
        return x, outputs, cls_logits

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

