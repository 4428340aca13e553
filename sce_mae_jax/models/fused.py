"""The transformer's memory-hungry operations with hand-written backward passes, and their plain forms.

`select(fused_ops)` gives the three operations a ViT block needs, with one signature for both forms:
    norm_dense(x, scale, shift, kernel, bias, eps)  LayerNorm(x) @ kernel + bias
    gelu_dense(h, kernel, bias)                     gelu(h) @ kernel + bias (exact erf GELU)
    attention(q, k, v, key_mask, scale)             softmax(q·kᵀ·scale) v; (batch, T, heads, hd) in and out
`FUSED` are custom VJPs that keep less for the backward pass and recompute the rest there; `PLAIN` is autodiff
of the textbook formulas with `jax.nn.dot_product_attention`. Both compute the same values (tests/test_fused.py).

Why the fused forms exist: they keep the MAE step's memory and time down on XLA:CPU (docs/benchmarks.md) and, in
the issue's H100 measurement, are 8% faster with 2.5x less memory than autodiff. The plain forms are the
reference, and the path for backends where a library kernel beats our formulation.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _after(g, dtype):
    """A zero that depends on the incoming gradient g, added to a residual before a backward pass recomputes
    something large from it. Without it XLA:CPU hoists the recomputation (it depends on forward values only)
    to right after the forward pass, or CSE merges it with the forward's identical computation, and its result
    lives until used: memory the recomputation was meant to save. (`jax.lax.optimization_barrier` does not
    help: XLA:CPU expands it before scheduling.) XLA does not fold x·0 for floats (NaN semantics); a non-finite
    g[0] turns the gradient non-finite, which it would be anyway."""
    return (g.reshape(-1)[0] * 0).astype(dtype)


def _gelu(x):
    return nn.gelu(x, approximate=False)  # exact erf GELU as in PyTorch; Flax's default is the tanh form.


# ---------------------------------------------------------------------------------------------- attention
def _logits(q, k, key_mask, scale):
    logits = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
    if key_mask is not None:  # the fill value of jax.nn.dot_product_attention
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    return logits


def _heads_first(*arrays):
    # On XLA:CPU the batched (b, h) matmuls run about twice as fast with the head axis next to the batch axis.
    return tuple(a.transpose(0, 2, 1, 3) for a in arrays)


def _attention_fwd_core(q, k, v, key_mask, scale):
    logits = _logits(q, k, key_mask, scale)
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    probs = jnp.exp(logits - lse).astype(v.dtype)
    return jnp.einsum('bhqk,bhkd->bqhd', probs, v), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def fused_attention(q, k, v, key_mask, scale):
    """softmax(q·kᵀ·scale) v whose backward pass keeps only q, k, v and the per-query log-sum-exp, and
    recomputes the probabilities from them (as flash attention does): no (b, h, T, T) array lives from the
    forward to the backward pass. Autodiff kept three of them per block (~2 GiB of the MAE step at batch 64 on
    CPU), keeping only the probabilities still one (~0.7 GiB); the price is one more q·kᵀ per block."""
    return _attention_fwd_core(*_heads_first(q, k, v), key_mask, scale)[0]


def _attention_fwd(q, k, v, key_mask, scale):
    q, k, v = _heads_first(q, k, v)
    out, lse = _attention_fwd_core(q, k, v, key_mask, scale)
    return out, (q, k, v, key_mask, lse)


def _attention_bwd(scale, res, g):
    q, k, v, key_mask, lse = res
    k = k + _after(g, k.dtype)
    p32 = jnp.exp(_logits(q, k, key_mask, scale) - lse)  # masked keys: p = 0
    # the gradients leave in the caller's (batch, T, heads, hd) layout
    dv = jnp.einsum('bhqk,bqhd->bkhd', p32.astype(v.dtype), g)
    dp = jnp.einsum('bqhd,bhkd->bhqk', g, v, preferred_element_type=jnp.float32)
    ds = (p32 * (dp - jnp.sum(dp * p32, axis=-1, keepdims=True)) * scale).astype(q.dtype)
    dq = jnp.einsum('bhqk,bhkd->bqhd', ds, k)
    dk = jnp.einsum('bhqk,bhqd->bkhd', ds, q)
    mask_ct = None if key_mask is None else np.zeros(key_mask.shape, jax.dtypes.float0)
    return dq, dk, dv, mask_ct


fused_attention.defvjp(_attention_fwd, _attention_bwd)


def plain_attention(q, k, v, key_mask, scale):
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)


# ---------------------------------------------------------------------------------------------- GELU → Dense
@jax.custom_vjp
def fused_gelu_dense(h, kernel, bias):
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


fused_gelu_dense.defvjp(_gelu_dense_fwd, _gelu_dense_bwd)


def plain_gelu_dense(h, kernel, bias):
    return _gelu(h) @ kernel + bias


# ---------------------------------------------------------------------------------------------- LayerNorm → Dense
def _normalise(x, scale, shift, eps):
    """LayerNorm with the statistics in float32; returns (y in x's dtype, mean, 1/std)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True) + eps)
    return ((x32 - mean) * rstd * scale + shift).astype(x.dtype), mean, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def fused_norm_dense(x, scale, shift, kernel, bias, eps):
    """LayerNorm(x)·kernel + bias, keeping only x and the per-token mean and 1/std for the backward pass, which
    recomputes the normalised x. Autodiff of LayerNorm → Dense kept the normalised tokens, the LayerNorm output
    and several broadcast (tokens, D) products per LayerNorm: with this, ~1 GiB less for the MAE step at
    batch 64."""
    return _norm_dense_fwd(x, scale, shift, kernel, bias, eps)[0]


def _norm_dense_fwd(x, scale, shift, kernel, bias, eps):
    y, mean, rstd = _normalise(x, scale, shift, eps)
    return y @ kernel + bias, (x, mean, rstd, scale, shift, kernel)


def _norm_dense_bwd(eps, res, g):
    del eps  # in rstd already
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


fused_norm_dense.defvjp(_norm_dense_fwd, _norm_dense_bwd)


def plain_norm_dense(x, scale, shift, kernel, bias, eps):
    return _normalise(x, scale, shift, eps)[0] @ kernel + bias


# ---------------------------------------------------------------------------------------------- selection
class Ops(NamedTuple):
    norm_dense: Callable
    gelu_dense: Callable
    attention: Callable


FUSED = Ops(fused_norm_dense, fused_gelu_dense, fused_attention)
PLAIN = Ops(plain_norm_dense, plain_gelu_dense, plain_attention)


def select(fused_ops: bool) -> Ops:
    """`config.model.fused_ops`: True (the default) for the custom VJPs, False for plain autodiff."""
    return FUSED if fused_ops else PLAIN
