"""Landmark matching by nearest neighbour in feature space (CL's rule, used by SCE-MAE's Table 1).

Pure jax.numpy functions so they can be jitted and batched over pairs; the feature extractor (backbone,
upsampling to 96x96, projection) lives elsewhere, which keeps the rule itself testable against a NumPy loop.

Rule: the query is the L2-normalised feature at the source landmark's *rounded* pixel; the prediction is the
target pixel with the highest cosine similarity.  Errors are reported in a 70-px frame: CL measures at 96 px and
scales by 69/95 (the (size - 1) ratio of the two frames), which ``mean_pixel_error`` reproduces.
Coordinates are (x, y) with pixel (row r, col c) centred at (x=c, y=r).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _l2_normalise(x: jax.Array, axis: int = -1, eps: float = 1e-8) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def match_points(src_feats: jax.Array, tgt_feats: jax.Array, src_points: jax.Array) -> jax.Array:
    """src_feats, tgt_feats (B, H, W, C); src_points (B, L, 2) xy pixels -> predicted target points (B, L, 2).

    Ties resolve to the first pixel in row-major order (argmax), so the result is deterministic.
    """
    src_feats = jnp.asarray(src_feats, jnp.float32)
    tgt_feats = jnp.asarray(tgt_feats, jnp.float32)
    b, h, w, c = src_feats.shape
    pts = jnp.rint(jnp.asarray(src_points, jnp.float32)).astype(jnp.int32)
    x = jnp.clip(pts[..., 0], 0, w - 1)
    y = jnp.clip(pts[..., 1], 0, h - 1)
    query = src_feats[jnp.arange(b)[:, None], y, x]  # (B, L, C)
    query = _l2_normalise(query)
    tgt = _l2_normalise(tgt_feats).reshape(b, h * w, c)
    sim = jnp.einsum("blc,bnc->bln", query, tgt, precision=jax.lax.Precision.HIGHEST)
    idx = jnp.argmax(sim, axis=-1)
    return jnp.stack([idx % w, idx // w], -1).astype(jnp.float32)


def pixel_errors(pred: jax.Array, gt: jax.Array, frame: int = 96, report_frame: int = 70) -> jax.Array:
    """Per-landmark Euclidean error rescaled to the report frame: (…, L, 2) x2 -> (…, L)."""
    d = jnp.linalg.norm(jnp.asarray(pred, jnp.float32) - jnp.asarray(gt, jnp.float32), axis=-1)
    return d * ((report_frame - 1) / (frame - 1))


def mean_pixel_error(pred: jax.Array, gt: jax.Array, frame: int = 96, report_frame: int = 70) -> float:
    """Mean over all pairs and landmarks of the error in the 70-px frame (CL: error at 96 px × 69/95)."""
    return float(jnp.mean(pixel_errors(pred, gt, frame, report_frame)))


def raw_pixel_features(images: jax.Array, patch: int = 7) -> jax.Array:
    """Baseline descriptors from raw pixels: (B, H, W, 3) uint8 or float -> (B, H, W, 3·patch²) float32.

    Each location gets the patch × patch neighbourhood (zero padded) of the image after per-image,
    per-channel standardisation, so global brightness / colour casts do not dominate; anything beyond that
    (identity, pose) is what a learned feature must overcome, which is why this number is reported.
    """
    x = jnp.asarray(images, jnp.float32)
    mean = x.mean(axis=(1, 2), keepdims=True)
    std = x.std(axis=(1, 2), keepdims=True)
    x = (x - mean) / jnp.maximum(std, 1e-3)
    r = patch // 2
    b, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
    shifts = [xp[:, dy:dy + h, dx:dx + w, :] for dy in range(patch) for dx in range(patch)]
    return jnp.concatenate(shifts, axis=-1)


def evaluate_pairs(pairs: dict[str, np.ndarray], features_fn, batch_size: int = 50) -> dict[str, float]:
    """Runs the matching rule over stored pairs (see ``sce_mae_jax.data.pairs``) with ``features_fn``
    mapping uint8 (B, 96, 96, 3) images to (B, 96, 96, C) features. -> {'same', 'diff', 'all'} mean errors
    in the 70-px frame."""
    match = jax.jit(match_points)
    errs = []
    n = len(pairs["kind"])
    for s in range(0, n, batch_size):
        sl = slice(s, s + batch_size)
        pred = match(features_fn(pairs["src_images"][sl]), features_fn(pairs["tgt_images"][sl]),
                     pairs["src_landmarks"][sl])
        errs.append(np.asarray(pixel_errors(pred, pairs["tgt_landmarks"][sl])))
    e = np.concatenate(errs, 0).mean(-1)  # (P,)
    kind = np.asarray(pairs["kind"])
    out = {"all": float(e.mean())}
    for name, k in (("same", 0), ("diff", 1)):
        if (kind == k).any():
            out[name] = float(e[kind == k].mean())
    return out
