"""CARB: the Correspondence Approximation and Refinement Block of SCE-MAE (paper 001 §3.2-3.3).

Pure, vectorised `jax.numpy` functions with fixed shapes, so the whole stage-2 step (attentive split, density-peak
clustering, substitution, LCR loss) runs inside one jitted, data-parallel computation:

    attentive_mask            eq. 1     which patch tokens the CLS token attends to most
    density_peak_clustering   eq. 2-3   cluster centres among the inattentive tokens (DPC-kNN, made deterministic)
    substitute / keep_mask              rebuild the full token map from cluster centres (mode B / mode A)
    token_positions                     token-grid centres in input pixels, for the locality term
    lcr_loss                  eq. 4-7   Locality-Constrained Repellence loss over attentive tokens and centres
    lead_loss                 LEAD eq. 2-3 (paper 003), the stage-2 baseline objective

Shapes: B = batch, N = patch tokens (CLS excluded), C = backbone width, D = projector width. Everything is
computed in float32 whatever the input dtype. Where the papers are silent, these functions follow the project's
decisions in the method reference (method.md §2 and §7): eq. 2 read as DPC-kNN, index tie-breaking, per-head
softmax then mean for eq. 1, positions at token-grid centres, the loss divided by |T|.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from sce_mae_jax.models.vit import grid_coords

_HIGHEST = lax.Precision.HIGHEST
# A finite "minus infinity": log(0) in eq. 3's score, where -inf would tie with the -inf that marks tokens that
# may never be picked, and the logit of a token outside the selected set, so that a row with nothing selected
# stays finite (no NaN).
_NEG = -1e30


# ----------------------------------------------------------------------------------------------------------------
# Eq. 1: attentive / inattentive split.
# ----------------------------------------------------------------------------------------------------------------


def num_attentive(eta: float, num_tokens: int) -> int:
    """ceil(eta * num_tokens), robust to float error (ceil(0.1 * 144) = 15, ceil(0.7 * 10) = 7, not 8)."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f'eta must be in [0, 1], got {eta}')
    # eta * N is a decimal fraction of small integers; a relative slack far below 1/N removes representation error
    # (0.7 * 10 = 7.000000000000001) without ever moving a genuinely fractional product past an integer.
    return min(num_tokens, max(0, math.ceil(eta * num_tokens - 1e-9 * max(1, num_tokens))))


def cls_similarity(cls_logits: jax.Array) -> jax.Array:
    """Sim_cls of eq. 1: per-head softmax over the patch keys, then the mean over heads.

    Args:
        cls_logits: (B, heads, N) attention logits q_cls · k_j / sqrt(d) of the CLS query against the N patch keys
            (the CLS key excluded, so each head's softmax runs over patches only).
    Returns:
        (B, N) float32, each row a probability distribution over the patch tokens.
    """
    probs = jax.nn.softmax(cls_logits.astype(jnp.float32), axis=-1)
    return jnp.mean(probs, axis=1)


def top_scores_mask(scores: jax.Array, eta: float) -> jax.Array:
    """The ceil(eta * N) highest-scoring tokens of each row: (B, N) float scores → (B, N) bool.

    Every split criterion (splits.py) is a score of this kind; equal scores go to the lower token index.
    """
    n = scores.shape[-1]
    # lax.top_k puts the lower index first among equal values, which is the tie rule we want.
    _, idx = lax.top_k(scores.astype(jnp.float32), num_attentive(eta, n))
    return jnp.any(idx[..., :, None] == jnp.arange(n), axis=-2)


def attentive_mask(cls_logits: jax.Array, eta: float) -> jax.Array:
    """Eq. 1: the ceil(eta * N) patch tokens most similar to the CLS token are attentive.

    Args:
        cls_logits: (B, heads, N) CLS-to-patch attention logits (see `cls_similarity`).
        eta: attentive rate in [0, 1], a Python float (static): 0 → no token attentive, 1 → all.
    Returns:
        (B, N) bool, exactly ceil(eta * N) True per image; equal similarities go to the lower token index.
    """
    return top_scores_mask(cls_similarity(cls_logits), eta)


# ----------------------------------------------------------------------------------------------------------------
# Eq. 2-3: density-peak clustering of the inattentive tokens.
# ----------------------------------------------------------------------------------------------------------------


def knn_sq_distance(d2: jax.Array, valid: jax.Array, k: int) -> jax.Array:
    """m_i = −log ρ_i of eq. 2 (DPC-kNN): the mean of the k smallest d_ij² over valid j, i itself included.

    Args:
        d2: (B, N, N) squared distances (`pairwise_sq_distances`).
        valid: (B, N, N) bool, the pairs that count.
        k: neighbours, static (capped at N); fewer than k valid neighbours → the mean over those there are.
    Returns:
        (B, N) float32; 0 for a row without a valid pair.
    """
    k = min(k, d2.shape[-1])
    neg_nearest, _ = lax.top_k(jnp.where(valid, -d2, -jnp.inf), k)  # ascending distances, -inf where missing
    count = jnp.minimum(jnp.sum(valid, axis=-1, dtype=jnp.int32), k)
    in_count = jnp.arange(k)[None, None, :] < count[..., None]
    return -jnp.sum(jnp.where(in_count, neg_nearest, 0.0), axis=-1) / jnp.maximum(count, 1).astype(jnp.float32)


def _fmix32(h: jax.Array) -> jax.Array:
    # MurmurHash3's 32-bit finaliser: spreads every input bit over the output.
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _token_hashes(tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two 32-bit hashes of each token's exact float32 bits, (B, N) uint32 each.

    A wrapping uint32 sum is associative, so the hash does not depend on reduction order or backend: bit-identical
    tokens get bit-identical hashes everywhere.
    """
    tokens = jnp.where(tokens == 0, jnp.zeros_like(tokens), tokens)  # -0.0 and +0.0 are the same token
    bits = lax.bitcast_convert_type(tokens, jnp.uint32)
    channel = jnp.arange(tokens.shape[-1], dtype=jnp.uint32)
    h1 = jnp.sum(_fmix32(bits ^ _fmix32(channel * jnp.uint32(0x9E3779B9) + jnp.uint32(1))), axis=-1,
                 dtype=jnp.uint32)
    h2 = jnp.sum(_fmix32((bits + jnp.uint32(0x7F4A7C15)) ^ _fmix32(channel + jnp.uint32(0x632BE5AB))), axis=-1,
                 dtype=jnp.uint32)
    return h1, h2


def _take_rows_cols(matrix: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """matrix[b, rows[b, i], cols[b, j]] for (B, N, N) matrix and (B, N) index arrays."""
    m = jnp.take_along_axis(matrix, rows[:, :, None], axis=1)
    return jnp.take_along_axis(m, cols[:, None, :], axis=2)


def pairwise_sq_distances(tokens: jax.Array) -> jax.Array:
    """d_ij² = ||t_i − t_j||² / C, Gram-matrix form in float32, clamped at 0; exactly 0 between identical tokens.

    Bit-identical tokens get bit-identical rows and columns (and a symmetric matrix), whatever the matmul's
    summation order per output element: rows of exact duplicates are replaced by the row of their first copy.
    Without this, two copies of one token could get densities 1 ulp apart, and the density tie rule of eq. 3 would
    be decided by rounding instead of by token index.

    Args:
        tokens: (B, N, C).
    Returns:
        (B, N, N) float32.
    """
    t = tokens.astype(jnp.float32)
    c = t.shape[-1]
    sq = jnp.sum(t * t, axis=-1)
    gram = jnp.einsum('bic,bjc->bij', t, t, precision=_HIGHEST)
    d2 = jnp.maximum(sq[:, :, None] + sq[:, None, :] - 2.0 * gram, 0.0) / c
    d2 = 0.5 * (d2 + jnp.swapaxes(d2, 1, 2))  # float addition commutes, so this is exactly symmetric

    h1, h2 = _token_hashes(t)
    # The distance check guards against hash collisions; its slack is far above the Gram form's rounding error.
    tol = 1e-4 * (sq[:, :, None] + sq[:, None, :]) / c + 1e-30
    same = (h1[:, :, None] == h1[:, None, :]) & (h2[:, :, None] == h2[:, None, :]) & (d2 <= tol)
    first_copy = jnp.argmax(same, axis=-1).astype(jnp.int32)  # the diagonal is always True, so first_copy <= i
    d2 = _take_rows_cols(d2, first_copy, first_copy)
    return jnp.where(first_copy[:, :, None] == first_copy[:, None, :], 0.0, d2)


def density_peak_clustering(tokens: jax.Array, inattentive: jax.Array, num_clusters: int,
                            k: int = 5) -> dict[str, jax.Array]:
    """Eq. 2-3: density-peak clustering (DPC-kNN) of the inattentive tokens, deterministic and fixed-shape.

    Over the inattentive tokens only (attentive tokens are masked out, never dropped):
        d_ij = ||t_i − t_j|| / sqrt(C);
        ρ_i = exp(−mean of the k smallest d_ij² over inattentive j, i itself included)  (eq. 2, read as DPC-kNN;
              fewer than k inattentive tokens → the mean over those there are);
        j is denser than i if ρ_j > ρ_i, or ρ_j = ρ_i and j < i;
        δ_i = min d_ij over denser inattentive j; for the densest token δ_i = max_j d_ij  (eq. 3);
        the `num_clusters` highest scores ρ_i·δ_i are the centres (equal scores → lower token index); every
        inattentive token joins its nearest centre in d (equal distances → lower centre token index), a centre joins
        itself. Fewer inattentive tokens than clusters → all of them are centres.
    Densities are compared through m_i = −log ρ_i and scores through log ρ_i + log δ_i: the same order as ρ and
    ρ·δ, without exp() underflowing distinct densities of far-apart features into ties.

    Args:
        tokens: (B, N, C) token features at the clustering layer (no gradient flows through the clustering).
        inattentive: (B, N) bool.
        num_clusters: K_c, static.
        k: neighbours in the density, static.
    Returns a dict of:
        centres: (B, K_c) int32 token indices of the centres, highest score first; 0 where not `centre_valid`.
        centre_valid: (B, K_c) bool, False for the padding when an image has fewer than K_c inattentive tokens.
        is_centre: (B, N) bool.
        assignment: (B, N) int32 token index of each token's centre; attentive tokens and centres map to themselves.
        cluster_id: (B, N) int32 in [0, K_c), the position of the token's centre in `centres`; −1 for attentive.
        rho, delta, score: (B, N) float32 ρ, δ, ρ·δ (0 for attentive tokens), for inspection.
    """
    n = tokens.shape[1]
    if not 0 < num_clusters <= n:
        raise ValueError(f'num_clusters must be in [1, {n}], got {num_clusters}')
    tokens = lax.stop_gradient(tokens)
    inatt = inattentive.astype(bool)
    index = jnp.arange(n, dtype=jnp.int32)
    d2 = pairwise_sq_distances(tokens)
    pair = inatt[:, :, None] & inatt[:, None, :]  # both ends inattentive

    # ρ (eq. 2): k nearest inattentive neighbours, self included (d_ii = 0).
    n_inatt = jnp.sum(inatt, axis=-1, dtype=jnp.int32)
    m = knn_sq_distance(d2, pair, k)
    rho = jnp.exp(-m)

    # δ (eq. 3): distance to the nearest denser token; a strict total order, so exactly one densest token.
    denser = pair & ((m[:, None, :] < m[:, :, None])
                     | ((m[:, None, :] == m[:, :, None]) & (index[None, :] < index[:, None])[None]))
    has_denser = jnp.any(denser, axis=-1)
    nearest_denser = jnp.min(jnp.where(denser, d2, jnp.inf), axis=-1)
    farthest = jnp.max(jnp.where(pair, d2, 0.0), axis=-1)
    delta = jnp.sqrt(jnp.where(has_denser, nearest_denser, farthest))
    delta = jnp.where(inatt, delta, 0.0)

    # Centres: top-K_c of ρ·δ, ranked in log space; -inf keeps attentive tokens below every inattentive one.
    log_score = -m + jnp.where(delta > 0, jnp.log(jnp.where(delta > 0, delta, 1.0)), _NEG)
    key = jnp.where(inatt, log_score, -jnp.inf)
    _, centres = lax.top_k(key, num_clusters)  # equal keys → lower token index first
    centre_valid = jnp.arange(num_clusters)[None, :] < n_inatt[:, None]
    centres = jnp.where(centre_valid, centres, 0).astype(jnp.int32)
    is_centre = jnp.any((centres[:, :, None] == index) & centre_valid[:, :, None], axis=1)

    # Assignment: argmin returns the first minimum, i.e. the lower centre token index among equidistant centres.
    nearest_centre = jnp.argmin(jnp.where(is_centre[:, None, :], d2, jnp.inf), axis=-1).astype(jnp.int32)
    assignment = jnp.where(inatt & ~is_centre, nearest_centre, index[None, :])
    member = (assignment[:, :, None] == centres[:, None, :]) & centre_valid[:, None, :]
    cluster_id = jnp.where(inatt, jnp.argmax(member, axis=-1).astype(jnp.int32), -1)

    return dict(centres=centres, centre_valid=centre_valid, is_centre=is_centre, assignment=assignment,
                cluster_id=cluster_id, rho=jnp.where(inatt, rho, 0.0), delta=delta,
                score=jnp.where(inatt, rho * delta, 0.0))


# ----------------------------------------------------------------------------------------------------------------
# Substitution (§3.3, first step of CARB).
# ----------------------------------------------------------------------------------------------------------------


def substitute(features: jax.Array, inattentive: jax.Array, assignment: jax.Array) -> jax.Array:
    """Mode B: every inattentive token takes its cluster centre's feature; the others keep their own.

    Args:
        features: (B, N, D) token features (any dtype, kept).
        inattentive: (B, N) bool.
        assignment: (B, N) int32 centre token index per token, from `density_peak_clustering`.
    Returns:
        (B, N, D) the rebuilt full token map.
    """
    index = jnp.arange(features.shape[1], dtype=jnp.int32)
    source = jnp.where(inattentive, assignment, index[None, :])
    return jnp.take_along_axis(features, source[:, :, None], axis=1)


def keep_mask(attentive: jax.Array, is_centre: jax.Array) -> jax.Array:
    """Mode A: (B, N) bool, the patch tokens the blocks after the clustering layer still see (with CLS).

    Attentive tokens and cluster centres; the outputs of the kept tokens are then spread back over the map with
    `substitute`, since every inattentive token's source is its (kept) centre.
    """
    return attentive | is_centre


def kept_indices(keep: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """Fixed-size list of kept tokens for mode A, for encoders that gather rather than mask attention.

    Args:
        keep: (B, N) bool from `keep_mask`.
        size: static length, e.g. ceil(eta·N) + K_c.
    Returns:
        indices (B, size) int32, the kept tokens in increasing token order, then padding (unkept tokens);
        valid (B, size) bool, False on the padding.
    """
    n = keep.shape[-1]
    # Kept tokens sort first; the index term keeps token order inside each group.
    order_key = jnp.where(keep, 0, n) + jnp.arange(n)
    _, idx = lax.top_k(-order_key, size)
    valid = jnp.take_along_axis(keep, idx, axis=-1)
    return idx.astype(jnp.int32), valid


# ----------------------------------------------------------------------------------------------------------------
# Eq. 4-7: Locality-Constrained Repellence loss.
# ----------------------------------------------------------------------------------------------------------------


def token_positions(grid_h: int, grid_w: int, patch: int) -> jax.Array:
    """(N, 2) float32 (row, column) pixel centres of the tokens, row-major: token (r, c) at (p·r + p/2, p·c + p/2)."""
    # Built with NumPy: it depends only on static sizes, so under jit it is a constant, not a chain of ops.
    return jnp.asarray(grid_coords(grid_h, grid_w) * patch + patch / 2.0, jnp.float32)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) along the last axis (PyTorch's F.normalize), float32."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


LOCALITIES = ('log', 'sqrt', 'linear', 'none')


def locality_weights(positions: jax.Array, locality: str = 'log', others: jax.Array | None = None) -> jax.Array:
    """f_loc of eq. 5 between every pair of tokens, (..., N, N) float32 from (..., N, 2) positions (or between
    `positions` and `others` (..., M, 2) in the same frame: (..., N, M)).

    'log': log(||pos_i − pos_j|| + 1) (eq. 5); 'sqrt': ||pos_i − pos_j||^0.5 (CL's correspondence loss,
    `pow=0.5`); 'linear': ||pos_i − pos_j||; 'none': 1 between distinct places, 0 at the same place (no
    locality term).
    """
    pos = positions.astype(jnp.float32)
    other = pos if others is None else others.astype(jnp.float32)
    diff = pos[..., :, None, :] - other[..., None, :, :]
    sq = jnp.sum(diff * diff, axis=-1)
    # sqrt has no finite gradient at 0; positions are constants, but keep the graph clean anyway.
    dist = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
    if locality == 'log':
        return jnp.log1p(dist)
    if locality == 'sqrt':
        return jnp.sqrt(dist)
    if locality == 'linear':
        return dist
    if locality == 'none':
        return (sq > 0).astype(jnp.float32)
    raise ValueError(f"locality must be one of {LOCALITIES}, got {locality!r}")


def lcr_loss(proj: jax.Array, selected: jax.Array, attentive: jax.Array, positions: jax.Array, *, tau: float,
             rep: tuple[float, float, float] = (5.0, 5.0, 2.0),
             locality: str = 'log') -> tuple[jax.Array, dict[str, Any]]:
    """Eq. 4-7: the Locality-Constrained Repellence loss over the selected tokens T = attentive ∪ centres.

        p(j|i) = softmax over j ∈ T of <Φ_i, Φ_j> / τ           (eq. 4; Φ L2-normalised, the self pair included)
        L_img  = (1/|T|) Σ_{i∈T} Σ_{j∈T} f_loc(i, j) · λ_rep(i, j) · p(j|i)     (eq. 5-7)
        loss   = mean of L_img over the batch.
    λ_rep (eq. 6) = rep[0] if i, j both attentive, rep[2] if both inattentive (cluster centres), rep[1] otherwise.
    For the "full correspondence" ablation pass `selected` all True.

    Args:
        proj: (B, N, D) projector outputs (any dtype; normalised in float32 here).
        selected: (B, N) bool, the set T.
        attentive: (B, N) bool; a selected token that is not attentive counts as inattentive.
        positions: (N, 2) or (B, N, 2) token positions in pixels (`token_positions`).
        tau: temperature τ.
        rep: (r_att-att, r_att-inatt, r_inatt-inatt).
        locality: one of `LOCALITIES` ('log' is eq. 5).
    Returns:
        loss: scalar float32.
        aux: dict with 'loss_per_image' (B,), 'num_selected' (B,) float32 |T|, and 'p_self' (B,) the mean over
            i ∈ T of p(i|i).
    """
    phi = l2_normalize(proj)
    sel = selected.astype(bool)
    att = attentive.astype(bool) & sel
    logits = jnp.einsum('bid,bjd->bij', phi, phi, precision=_HIGHEST) / tau
    logits = jnp.where(sel[:, None, :], logits, _NEG)
    p = jax.nn.softmax(logits, axis=-1)

    r_aa, r_ai, r_ii = rep
    both_att = att[:, :, None] & att[:, None, :]
    both_inatt = ~att[:, :, None] & ~att[:, None, :]
    lam = jnp.where(both_att, r_aa, jnp.where(both_inatt, r_ii, r_ai)).astype(jnp.float32)
    f_loc = locality_weights(positions, locality)
    if f_loc.ndim == 2:
        f_loc = f_loc[None]
    weight = f_loc * lam * (sel[:, :, None] & sel[:, None, :])

    num_sel = jnp.sum(sel, axis=-1).astype(jnp.float32)
    denom = jnp.maximum(num_sel, 1.0)
    per_image = jnp.sum(weight * p, axis=(1, 2)) / denom
    p_self = jnp.sum(jnp.where(sel, jnp.diagonal(p, axis1=1, axis2=2), 0.0), axis=-1) / denom
    aux = dict(loss_per_image=per_image, num_selected=num_sel, p_self=p_self)
    return jnp.mean(per_image), aux


def cross_view_lcr_loss(proj: jax.Array, selected: jax.Array, attentive: jax.Array, positions: jax.Array,
                        proj_b: jax.Array, positions_b: jax.Array, *, tau: float,
                        rep: tuple[float, float, float] = (5.0, 5.0, 2.0),
                        locality: str = 'log') -> tuple[jax.Array, dict[str, Any]]:
    """LCR across two views of each image (`carb.cross_view_shift`; not the paper's, which repels within one
    view): every selected token i of view A against every token j of view B, a crop of the same face moved by a
    whole number of tokens, with f_loc measured between their places on the face.

        p(j|i) = softmax over j ∈ B of <Φ_i, Φ^B_j> / τ
        L_img  = (1/|T'|) Σ_{i∈T'} λ_i Σ_j f_loc(pos_i, pos^B_j) · p(j|i),   λ_i = rep[0] attentive, rep[2] centre

    T' is T less the tokens whose place falls outside view B. Token i's own place in B is a distance 0 away, so
    the loss is lowest when Φ picks out i's content wherever it moved: the place in the frame, which satisfies
    the within-view loss (docs/results.md), no longer does.

    Args:
        proj, selected, attentive, positions: view A as in `lcr_loss` (positions (N, 2) or (B, N, 2)).
        proj_b: (B, M, D) every token of view B.
        positions_b: (B, M, 2) view B's token centres in view A's pixel frame (its grid plus the shift).
    Returns:
        loss, and aux with 'num_selected' (B,) |T'| and 'p_self' (B,) the mean over T' of p(i's place in B | i).
    """
    phi, phi_b = l2_normalize(proj), l2_normalize(proj_b)
    pos = jnp.broadcast_to(positions.astype(jnp.float32), proj.shape[:2] + (2,))
    lo, hi = positions_b.min(axis=1, keepdims=True), positions_b.max(axis=1, keepdims=True)
    sel = selected.astype(bool) & jnp.all((pos >= lo) & (pos <= hi), axis=-1)  # i's place is in view B
    logits = jnp.einsum('bid,bjd->bij', phi, phi_b, precision=_HIGHEST) / tau
    p = jax.nn.softmax(logits, axis=-1)
    f_loc = locality_weights(pos, locality, positions_b)
    lam = jnp.where(attentive.astype(bool), rep[0], rep[2]).astype(jnp.float32)
    num_sel = jnp.sum(sel, axis=-1).astype(jnp.float32)
    denom = jnp.maximum(num_sel, 1.0)
    per_image = jnp.sum(jnp.where(sel, lam * jnp.sum(f_loc * p, axis=-1), 0.0), axis=-1) / denom
    own = jnp.all(pos[:, :, None, :] == positions_b[:, None, :, :], axis=-1)
    p_self = jnp.sum(jnp.where(sel, jnp.sum(jnp.where(own, p, 0.0), axis=-1), 0.0), axis=-1) / denom
    return jnp.mean(per_image), dict(loss_per_image=per_image, num_selected=num_sel, p_self=p_self)


# ----------------------------------------------------------------------------------------------------------------
# LEAD (paper 003 eq. 2-3): the stage-2 baseline objective.
# ----------------------------------------------------------------------------------------------------------------


def lead_loss(teacher_a: jax.Array, teacher_b: jax.Array, student_a: jax.Array, student_b: jax.Array,
              tau: float = 0.05) -> jax.Array:
    """LEAD's correspondence-distribution matching (paper 003 eq. 2-3).

    For each location u of image a: p(·|u) = softmax over the locations v of image b of cos(T_a(u), T_b(v)) / τ
    (teacher, no gradient), q(·|u) likewise with the student; loss = −Σ_u Σ_v p log q, averaged over the batch.

    Args:
        teacher_a, teacher_b: (B, N, C_t) frozen stage-1 features of the two images.
        student_a, student_b: (B, N, C_s) projector outputs.
        tau: temperature τ (0.05 in LEAD).
    Returns:
        scalar float32.
    """
    ta = l2_normalize(lax.stop_gradient(teacher_a))
    tb = l2_normalize(lax.stop_gradient(teacher_b))
    sa, sb = l2_normalize(student_a), l2_normalize(student_b)
    p = jax.nn.softmax(jnp.einsum('buc,bvc->buv', ta, tb, precision=_HIGHEST) / tau, axis=-1)
    log_q = jax.nn.log_softmax(jnp.einsum('buc,bvc->buv', sa, sb, precision=_HIGHEST) / tau, axis=-1)
    return jnp.mean(-jnp.sum(p * log_q, axis=(1, 2)))
