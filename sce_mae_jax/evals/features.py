"""Dense features of a frozen backbone for evaluation: cover-and-stride, upsampling, then the projector.

Cover-and-stride (paper 001 §3.3, after MAESTER; method.md §3): a patch-p ViT gives one token per p x p cell.
For a map of stride s < p, run it on (p/s)² copies of the image translated by multiples of s pixels (zero
padding, in normalised units, i.e. the mean colour) and interleave the outputs. Pass (i, j) sees the image moved
so that its token grid starts at pixel (o_i, o_j), o_i = i·s − ⌊(p − s)/2⌋; its token (r, c) then covers the
p x p window centred on the s x s cell (r·p/s + i, c·p/s + j) of the image, and lands there in the output. The
output is therefore an ordinary stride-s grid of (H/s) x (W/s) cells, aligned the way `jax.image.resize`
(half-pixel centres) expects, so bilinear upsampling to H x W puts every descriptor at its own pixels. (For odd
p − s, e.g. s = 1, windows sit half a pixel off their cell's centre: integers cannot do better.)

Order (method.md §2.5): stage-1 map → bilinear upsampling → projector, through `heads.descriptor_map`, which
stage 2 trains through too. CL's projector ends in a softmax over all positions, so applying it before
upsampling would give a different map.

All functions are pure `jnp` over a batch; the evaluators jit them over the mesh with the batch on `data`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from sce_mae_jax.carb import l2_normalize
from sce_mae_jax.data import pipeline
from sce_mae_jax.models.heads import descriptor_map, upsample
from sce_mae_jax.models.vit import ViT, sincos_pos_embed_2d
from sce_mae_jax.errors import ConfigError


class StrideError(ConfigError):
    """A stride (or block) that the feature extraction cannot use; main.py prints it as one line."""


def check_stride(patch: int, stride: int) -> None:
    if stride < 1 or stride > patch or patch % stride:
        divisors = [d for d in range(1, patch + 1) if patch % d == 0]
        raise StrideError(f'features.stride={stride} must divide the patch size {patch}; use one of {divisors} '
                          f'({patch} is the plain forward)')


def check_config(fc, encoder: ViT) -> None:
    """`config.features` against the encoder: a stride dividing the patch, a block it has."""
    check_stride(encoder.patch_size, fc.stride)
    if not -1 <= fc.block < encoder.depth:
        raise StrideError(f'features.block={fc.block} must be -1 (final tokens) or a block of the backbone, '
                          f'0..{encoder.depth - 1}')


def shift_offsets(patch: int, stride: int) -> tuple[int, ...]:
    """Grid origins o_i = i·s − ⌊(p − s)/2⌋ of the p/s passes along one axis: (−2, 2) for p = 8, s = 4."""
    check_stride(patch, stride)
    base = (patch - stride) // 2
    return tuple(i * stride - base for i in range(patch // stride))


def cover_and_stride(token_map_fn, images: jax.Array, *, patch: int, stride: int) -> jax.Array:
    """(B, H, W, 3) normalised images → (B, H/s, W/s, C) interleaved token maps.

    `token_map_fn` maps (B, H, W, 3) images to their (B, H/p, W/p, C) token map. The (p/s)² passes run one
    after another (`lax.map`), so memory stays that of one forward whatever the stride.
    """
    offsets = shift_offsets(patch, stride)
    k = len(offsets)
    if k == 1:
        return token_map_fn(images)
    pad = max(abs(o) for o in offsets)
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    origins = jnp.asarray([(dy + pad, dx + pad) for dy in offsets for dx in offsets], jnp.int32)

    def one_pass(origin):  # copy[y, x] = image[y + o_y, x + o_x], zeros outside
        return token_map_fn(lax.dynamic_slice(padded, (0, origin[0], origin[1], 0), images.shape))

    maps = lax.map(one_pass, origins)                      # (k·k, B, g, g, C), pass index i·k + j
    _, b, g, _, c = maps.shape
    maps = maps.reshape(k, k, b, g, g, c).transpose(2, 3, 0, 4, 1, 5)  # (B, r, i, c, j, C)
    return maps.reshape(b, g * k, g * k, c)


def token_map(encoder: ViT, params, images: jax.Array, block: int = -1) -> jax.Array:
    """(B, H, W, 3) normalised → (B, g, g, C): the final normed patch tokens (`block=-1`) or the output of a
    0-based block, computed without running the blocks after it."""
    p = {'params': params}
    if block < 0:
        tokens = encoder.apply(p, images)['tokens']
    else:
        x = encoder.apply(p, images, method=lambda m, im: m.prepend_cls(m.embed(im)))
        tokens = encoder.apply(p, x, 0, block + 1, method=ViT.blocks_forward)[0][:, 1:]
    b, _, c = tokens.shape
    return tokens.reshape(b, encoder.grid, encoder.grid, c).astype(jnp.float32)


def position_features(encoder: ViT, batch: int, size: int) -> jax.Array:
    """The `positions` control, (batch, size, size, D): the encoder's fixed 2-D sin-cos position table
    (method.md §1) on its g x g token grid, bilinearly resized, the same for every image. Its dot products fall
    with distance, so matching with it predicts 'the same place in the frame'."""
    g, d = encoder.grid, encoder.embed_dim
    table = jnp.asarray(sincos_pos_embed_2d(d, g, g)).reshape(1, g, g, d)
    return jnp.broadcast_to(upsample(table, size), (batch, size, size, d))


def dense_features(backbone, proj_params, images_uint8: jax.Array, *, encoder: ViT, projector=None,
                   stride: int, block: int = -1, size: int | None = None, concat: bool = False) -> jax.Array:
    """The descriptor map an evaluation reads: uint8 (B, H, W, 3) → float32 (B, S, S, C').

    stage-1 map by cover-and-stride at `stride` (block `block`) → bilinear to `size` (None: keep H/s) → the
    projector when given (`proj_params` its parameters), whose output is returned. `concat=True` returns
    instead L2(stage-1) ⊕ L2(stage-2) at the map's own resolution, the stage-2 part projected at the image size
    and averaged back over each cell, each part normalised per position (the detection regressor's input,
    method.md §4: the LayerNorm'd stage-1 tokens have norm ~√C and would otherwise drown the unit-scale
    projector output).
    """
    images = pipeline.normalize(images_uint8, encoder.dtype)
    maps = cover_and_stride(lambda im: token_map(encoder, backbone, im, block), images,
                            patch=encoder.patch_size, stride=stride)
    if size is not None:
        maps = upsample(maps, size)
    if projector is None:
        return maps
    if not concat:
        return descriptor_map(projector, proj_params, maps, None)
    # The regressor reads a coarser map than the image, but the projector is applied, as in training, to the
    # map upsampled to the image size; each cell then takes the mean of its pixels' descriptors.
    b, h, w, _ = maps.shape
    full = images_uint8.shape[1]
    proj = descriptor_map(projector, proj_params, maps, full)
    proj = proj.reshape(b, h, full // h, w, full // w, -1).mean(axis=(2, 4))
    return jnp.concatenate([l2_normalize(maps), l2_normalize(proj)], axis=-1)
