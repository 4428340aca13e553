"""Every number the evaluations report, as pure functions: the jobs, the figures and the training monitor import
them from here, and nothing here imports an evaluation back.

- Landmark matching (Table 1): `match_points` (CL's rule: the query is the L2-normalised feature at the source
  landmark's *rounded* pixel, the prediction the target pixel of highest cosine similarity) and `pixel_errors`,
  reported in a 70-px frame: CL measures at 96 px and scales by 69/95 (the (size - 1) ratio of the two frames);
  `geometry_predictions`, what the pairs allow a matcher that sees only where the faces are.
- Landmark detection (Tables 2 and 3): `iod_error`, the error in % of the inter-ocular distance.
- The t-SNE figure's `silhouette` of the landmark descriptors.
- CARB's premise (paper 001 §3.2): `split_stats` of an attentive split against the landmark cells.
Coordinates are (x, y) with pixel (row r, col c) centred at (x=c, y=r).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sce_mae_jax.carb import l2_normalize


# ---------------------------------------------------------------------------------------------- matching
def descriptors_at(feats: jax.Array, points: jax.Array) -> jax.Array:
    """L2-normalised features at the *rounded* (clipped) pixels of `points`: (B, H, W, C), (B, L, 2) xy → (B, L, C)."""
    feats = jnp.asarray(feats, jnp.float32)
    b, h, w, _ = feats.shape
    pts = jnp.rint(jnp.asarray(points, jnp.float32)).astype(jnp.int32)
    return l2_normalize(feats[jnp.arange(b)[:, None], jnp.clip(pts[..., 1], 0, h - 1), jnp.clip(pts[..., 0], 0, w - 1)])


def match_points(src_feats: jax.Array, tgt_feats: jax.Array, src_points: jax.Array) -> jax.Array:
    """src_feats, tgt_feats (B, H, W, C); src_points (B, L, 2) xy pixels -> predicted target points (B, L, 2).

    Ties resolve to the first pixel in row-major order (argmax), so the result is deterministic.
    """
    tgt_feats = jnp.asarray(tgt_feats, jnp.float32)
    b, h, w, c = tgt_feats.shape
    query = descriptors_at(src_feats, src_points)  # (B, L, C)
    tgt = l2_normalize(tgt_feats).reshape(b, h * w, c)
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


def geometry_predictions(src: np.ndarray, tgt: np.ndarray) -> dict[str, np.ndarray]:
    """What matchers that see only where the faces are would predict, from the true points of both images:
    (N, L, 2) xy x2 → {name: (N, L, 2)}. They read the target's points, so they are references for the pairs,
    not descriptors: how much of the difference between two faces is where they sit in the frame.

    - `same_place`: the source's pixel (a perfect position code; the `positions` row comes close to it);
    - `face_translation`: the source's points moved by the faces' mean offset (knows where the face is);
    - `face_similarity`: the least-squares similarity transform (scale, rotation, shift; Umeyama 1991) of the
      source's points onto the target's (knows the face's pose; what is left is the faces' own shapes).
    On aligned faces the three are close, and a position code is as good a matcher as content; a benchmark
    that measures content needs `same_place` well above the other two (docs/results.md)."""
    src, tgt = np.asarray(src, np.float64), np.asarray(tgt, np.float64)
    ms, mt = src.mean(1, keepdims=True), tgt.mean(1, keepdims=True)
    a, b = src - ms, tgt - mt
    # complex form of the 2-D Umeyama fit: z_t ≈ s·e^{iθ}·z_s, s·e^{iθ} = Σ conj(z_s)·z_t / Σ |z_s|²
    za, zb = a[..., 0] + 1j * a[..., 1], b[..., 0] + 1j * b[..., 1]
    rot = (np.conj(za) * zb).sum(1, keepdims=True) / np.maximum((np.abs(za) ** 2).sum(1, keepdims=True), 1e-12)
    zs = rot * za
    return {"same_place": src, "face_translation": a + mt,
            "face_similarity": np.stack([zs.real, zs.imag], -1) + mt}


# ---------------------------------------------------------------------------------------------- detection
def iod_error(pred_px: jax.Array, gt_px: jax.Array, iod_indices: tuple[int, int]) -> jax.Array:
    """Per image 100 × mean over landmarks of ‖pred − gt‖ / ‖gt[i0] − gt[i1]‖: (B, L, 2) x2 → (B,).

    `iod_indices` (0, 1), the eye centres, for 5-point sets; (36, 45), the outer eye corners, for 68 points.
    Per-image values so that sums over padded, sharded batches can be reduced (`_mask`).
    """
    pred_px, gt_px = jnp.asarray(pred_px, jnp.float32), jnp.asarray(gt_px, jnp.float32)
    i0, i1 = iod_indices
    iod = jnp.linalg.norm(gt_px[:, i0] - gt_px[:, i1], axis=-1)
    return 100.0 * jnp.linalg.norm(pred_px - gt_px, axis=-1).mean(-1) / jnp.maximum(iod, 1e-6)


# ---------------------------------------------------------------------------------------------- descriptors
def silhouette(desc: np.ndarray, runs: int, iters: int = 1000) -> tuple[list[float], np.ndarray, np.ndarray]:
    """([mean, std] over `runs` t-SNE seeds of the silhouette coefficient of the 2-D embedding labelled by
    landmark, the first run's embedding, the labels); `iters` gradient steps per run (scikit-learn's max_iter,
    at least 250)."""
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score

    n, l, _ = desc.shape
    x = desc.reshape(n * l, -1).astype(np.float64)
    labels = np.tile(np.arange(l), n)
    scores, first = [], None
    for seed in range(runs):
        # random init: with PCA init the seed would not change the embedding, and the spread is the point
        emb = TSNE(n_components=2, perplexity=min(30.0, (len(x) - 1) / 3), init='random',
                   random_state=seed, max_iter=iters).fit_transform(x)
        first = emb if first is None else first
        scores.append(float(silhouette_score(emb, labels)))
    return [float(np.mean(scores)), float(np.std(scores))], first, labels


# ---------------------------------------------------------------------------------------------- CARB premise
def landmark_tokens(landmarks, grid: int, patch: int) -> jax.Array:
    """(B, L, 2) xy pixels in the model frame → (B, grid·grid) bool: the token cell holds a landmark."""
    cells = jnp.clip(jnp.floor(landmarks / patch).astype(jnp.int32), 0, grid - 1)
    index = cells[..., 1] * grid + cells[..., 0]
    return jnp.any(index[..., None] == jnp.arange(grid * grid), axis=1)


def attentive_coverage(attentive, on_landmark) -> tuple[float, float]:
    """(share of attentive tokens on a landmark, share of all tokens on a landmark)."""
    attentive, on_landmark = np.asarray(attentive), np.asarray(on_landmark)
    return float(on_landmark[attentive].mean()), float(on_landmark.mean())


def position_concentration(attentive) -> float:
    """Share of attentive tokens that fall on the k grid cells most often attentive across the batch, k being
    the number of attentive tokens per image. attentive: (B, N) bool, the same count in every row."""
    attentive = np.asarray(attentive)
    k = int(attentive[0].sum())
    top = np.argsort(-attentive.mean(0), kind='stable')[:k]
    return float(attentive[:, top].sum() / attentive.sum())


def landmark_recall(attentive, on_landmark) -> float:
    """Share of the cells that hold a landmark which are attentive (the paper's premise: 100%)."""
    attentive, on_landmark = np.asarray(attentive), np.asarray(on_landmark)
    return float(attentive[on_landmark].mean())


def split_stats(attentive, on_landmark, on_recall) -> dict[str, float]:
    """`coverage` (attentive tokens on a landmark cell), `chance`, `recall` (the `on_recall` cells that are
    attentive) and `concentration` (attentive tokens on the most often attentive cells) of one (B, N) split."""
    coverage, chance = attentive_coverage(attentive, on_landmark)
    return {'coverage': coverage, 'chance': chance, 'recall': landmark_recall(attentive, on_recall),
            'concentration': position_concentration(attentive)}
