"""The attentive-split criteria of `carb.split`: which tokens CARB keeps as attentive, beside eq. 1.

Eq. 1 (`carb.attentive_mask`) assumes the CLS token attends to the landmarks. On every backbone this project
trained it does not: it settles on a few fixed grid cells whatever the face (docs/results.md). Each criterion
here is a (B, N) score, higher = more landmark-like, whose top ceil(η·N) tokens are the attentive ones
(`carb.top_scores_mask`, the same ranking as eq. 1); `SPLITS` names them for the config and `split_scores`
computes the one chosen, inside the jitted stage-2 step and in the premise diagnostic (evals/attentive.py).
What a criterion reads besides the backbone (a CLS prior, the stage-1 decoder) is made once per run by
`train/split_inputs.py`. None of these is in the paper; docs/ablations.md compares them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sce_mae_jax import carb
from sce_mae_jax.models.mae import MAE, patch_errors
from sce_mae_jax.models.vit import ViT, patchify

SPLITS = ('cls', 'cls_debiased', 'density', 'contrast', 'recon')


def cls_prior(cls_logits: jax.Array) -> jax.Array:
    """(N,) float32 mean of Sim_cls over a batch of images: the per-position prior of eq. 1's similarity,
    estimated once from training images at stage-2 start (`cls_debiased`)."""
    return jnp.mean(carb.cls_similarity(cls_logits), axis=0)


def debiased_cls_scores(cls_logits: jax.Array, prior: jax.Array, eps: float = 1e-12) -> jax.Array:
    """log Sim_cls − log prior: eq. 1 against what the CLS token gives each position in an average image, so a
    sink on the same cells in every image scores ~0 and only attention this image draws counts.

    Args:
        cls_logits: (B, heads, N).
        prior: (N,) from `cls_prior`.
    Returns:
        (B, N) float32.
    """
    sim = carb.cls_similarity(cls_logits)
    return jnp.log(sim + eps) - jnp.log(prior.astype(jnp.float32) + eps)[None]


def low_density_scores(tokens: jax.Array, k: int = 5) -> jax.Array:
    """The paper's own argument (§3.2: landmarks are "sparse and distinct", the rest "dense and uniform") as a
    score: −log ρ of eq. 2 over all tokens of the image, i.e. the mean squared distance to the k nearest tokens
    (itself included). The sparsest tokens are attentive.

    Args:
        tokens: (B, N, C) token features (at the clustering block).
    Returns:
        (B, N) float32.
    """
    d2 = carb.pairwise_sq_distances(lax.stop_gradient(tokens))
    return carb.knn_sq_distance(d2, jnp.ones(d2.shape, bool), k)


def neighbour_contrast_scores(tokens: jax.Array, grid_h: int, grid_w: int) -> jax.Array:
    """1 − mean cosine similarity of each token to its (up to 8) spatial neighbours on the token grid: a token
    unlike its surroundings (an eye corner on skin) scores high, one inside a uniform region (cheek, background)
    low.

    Args:
        tokens: (B, N, C) with N = grid_h · grid_w, row-major.
    Returns:
        (B, N) float32 in [0, 2].
    """
    b, n, c = tokens.shape
    if n != grid_h * grid_w:
        raise ValueError(f'{n} tokens are not a {grid_h}x{grid_w} grid')
    t = carb.l2_normalize(lax.stop_gradient(tokens)).reshape(b, grid_h, grid_w, c)
    padded = jnp.pad(t, ((0, 0), (1, 1), (1, 1), (0, 0)))  # zero vectors: similarity 0, excluded by the count
    inside = np.pad(np.ones((grid_h, grid_w), np.float32), 1)
    total = jnp.zeros((b, grid_h, grid_w), jnp.float32)
    count = np.zeros((grid_h, grid_w), np.float32)
    for dr in (-1, 0, 1):  # 8 static shifts, unrolled at trace time
        for dc in (-1, 0, 1):
            if dr == dc == 0:
                continue
            window = padded[:, 1 + dr:1 + dr + grid_h, 1 + dc:1 + dc + grid_w]
            total = total + jnp.einsum('bhwc,bhwc->bhw', t, window, precision=lax.Precision.HIGHEST)
            count = count + inside[1 + dr:1 + dr + grid_h, 1 + dc:1 + dc + grid_w]
    return (1.0 - total / count[None]).reshape(b, n)


def complementary_masks(num_tokens: int, num_visible: int, seed: int = 0) -> np.ndarray:
    """(M, N) float32 MAE masks (1 = removed) whose visible sets are disjoint groups of `num_visible` tokens of one
    fixed random permutation, M = N // num_visible: each mask removes as many tokens as stage 1 trained with,
    and every token is removed in at least M − 1 of them (`recon`). Static, so built with NumPy."""
    if not 0 < num_visible < num_tokens:
        raise ValueError(f'num_visible must be in [1, {num_tokens - 1}], got {num_visible}')
    order = np.random.default_rng(seed).permutation(num_tokens)
    groups = num_tokens // num_visible
    masks = np.ones((groups, num_tokens), np.float32)
    for g in range(groups):
        masks[g, order[g * num_visible:(g + 1) * num_visible]] = 0.0
    return masks


def reconstruction_scores(errors: jax.Array, masks: jax.Array) -> jax.Array:
    """The MAE-reconstruction criterion (paper §3.1, Mechanism 1: landmarks dominate the reconstruction loss):
    each token's mean reconstruction error over the masks that removed it.

    Args:
        errors: (M, B, N) per-patch reconstruction error of the frozen stage-1 MAE under each mask.
        masks: (M, N) or (M, B, N), 1 = removed (`complementary_masks`).
    Returns:
        (B, N) float32.
    """
    m = masks.astype(jnp.float32)
    if m.ndim == 2:
        m = m[:, None, :]
    return jnp.sum(errors.astype(jnp.float32) * m, axis=0) / jnp.maximum(jnp.sum(m, axis=0), 1.0)


def reconstruction_errors(mae: MAE, params, images, masks) -> jax.Array:
    """(M, B, N) per-patch error of the frozen stage-1 MAE under each of the M static `masks` (1 = removed):
    each mask's visible tokens are put first in the noise order, so the MAE keeps exactly those."""
    target = patchify(images, mae.patch_size)

    def one(mask):
        _, pred, _ = mae.apply({'params': params}, images, noise=jnp.broadcast_to(mask, images.shape[:1] + mask.shape))
        return patch_errors(target, pred, mae.norm_pix_loss)

    return jax.lax.map(one, jnp.asarray(masks))


def split_scores(split: str, *, logits, tokens, encoder: ViT, density_k: int = 5, images=None, backbone=None,
                 aux=None, mae: MAE | None = None) -> jax.Array:
    """(B, N) scores of the criterion `split` (SPLITS); the top ceil(η·N) are the attentive tokens.

    logits (B, heads, N) CLS logits and tokens (B, N, C) patch tokens of one block (the clustering block in
    stage 2; any block in the diagnostic); `recon` reads the images instead, through the frozen MAE (`mae`,
    parameters {'encoder': backbone, **aux['decoder']}); `cls_debiased` reads aux['prior'].
    """
    if split == 'cls':
        return carb.cls_similarity(logits)
    if split == 'cls_debiased':
        return debiased_cls_scores(logits, aux['prior'])
    if split == 'density':
        return low_density_scores(tokens, density_k)
    if split == 'contrast':
        return neighbour_contrast_scores(tokens, encoder.grid, encoder.grid)
    if split == 'recon':
        # as many visible tokens as the MAE keeps (models/mae.py's int(N·(1 − ratio))), so it sees what it trained on
        masks = complementary_masks(encoder.num_patches, int(encoder.num_patches * (1 - mae.mask_ratio)))
        errors = reconstruction_errors(mae, {'encoder': backbone, **aux['decoder']}, images, masks)
        return reconstruction_scores(errors, masks)
    raise ValueError(f'carb.split must be one of {SPLITS}, got {split!r}')
