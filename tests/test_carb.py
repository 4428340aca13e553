"""Tests for `sce_mae_jax.carb`: every function against a plain NumPy loop implementation written here."""
from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import textwrap
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, cpu_env

from sce_mae_jax import carb, splits


# ----------------------------------------------------------------------------------------------------------------
# NumPy references: loops over images and tokens, float64, the rules of method.md §2 spelled out literally.
# ----------------------------------------------------------------------------------------------------------------


def ref_attentive(logits, eta):
    b, h, n = logits.shape
    n_att = math.ceil(Fraction(str(eta)) * n)
    out = np.zeros((b, n), bool)
    for bi in range(b):
        sim = np.zeros(n)
        for hi in range(h):
            e = np.exp(logits[bi, hi] - logits[bi, hi].max())
            sim += e / e.sum()
        sim /= h
        order = sorted(range(n), key=lambda i: (-sim[i], i))
        out[bi, order[:n_att]] = True
    return out


def ref_dpc(tokens, inattentive, num_clusters, k=5, log_space=False):
    """`log_space` ranks by −log ρ and log ρ + log δ, the same order where exp() does not underflow."""
    tokens = np.asarray(tokens, np.float64)
    b, n, c = tokens.shape
    res = dict(centres=np.zeros((b, num_clusters), np.int64), centre_valid=np.zeros((b, num_clusters), bool),
               is_centre=np.zeros((b, n), bool), assignment=np.tile(np.arange(n), (b, 1)),
               cluster_id=-np.ones((b, n), np.int64), rho=np.zeros((b, n)), delta=np.zeros((b, n)),
               score=np.zeros((b, n)))
    for bi in range(b):
        t = tokens[bi]
        d = np.sqrt(((t[:, None, :] - t[None, :, :]) ** 2).sum(-1) / c)  # direct differences, not the Gram form
        ids = [i for i in range(n) if inattentive[bi, i]]
        if not ids:
            continue
        rho, delta = {}, {}
        for i in ids:
            nearest = sorted(d[i, j] ** 2 for j in ids)[:k]
            rho[i] = -np.mean(nearest) if log_space else np.exp(-np.mean(nearest))
        for i in ids:
            denser = [j for j in ids if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)]
            delta[i] = min(d[i, j] for j in denser) if denser else max(d[i, j] for j in ids)
        if log_space:
            score = {i: rho[i] + (np.log(delta[i]) if delta[i] > 0 else -np.inf) for i in ids}
        else:
            score = {i: rho[i] * delta[i] for i in ids}
        centres = sorted(ids, key=lambda i: (-score[i], i))[:num_clusters]
        for pos, ci in enumerate(centres):
            res['centres'][bi, pos] = ci
            res['centre_valid'][bi, pos] = True
            res['is_centre'][bi, ci] = True
        for i in ids:
            res['rho'][bi, i], res['delta'][bi, i], res['score'][bi, i] = rho[i], delta[i], score[i]
            owner = i if i in centres else min(sorted(centres), key=lambda ci: d[i, ci])
            res['assignment'][bi, i] = owner
            res['cluster_id'][bi, i] = centres.index(owner)
    return res


def ref_lcr(proj, selected, attentive, positions, tau, rep=(5.0, 5.0, 2.0), locality='log'):
    proj = np.asarray(proj, np.float64)
    b, n, _ = proj.shape
    pos = np.asarray(positions, np.float64)
    losses = []
    for bi in range(b):
        phi = proj[bi] / np.maximum(np.linalg.norm(proj[bi], axis=-1, keepdims=True), 1e-12)
        ts = [i for i in range(n) if selected[bi, i]]
        total = 0.0
        for i in ts:
            logits = np.array([phi[i] @ phi[j] / tau for j in ts])
            p = np.exp(logits - logits.max())
            p /= p.sum()
            for pj, j in zip(p, ts):
                dist = np.linalg.norm(pos[i] - pos[j])
                f = {'log': np.log(dist + 1), 'sqrt': dist ** 0.5, 'linear': dist,
                     'none': float(i != j)}[locality]
                ai, aj = attentive[bi, i], attentive[bi, j]
                lam = rep[0] if (ai and aj) else rep[2] if (not ai and not aj) else rep[1]
                total += f * lam * pj
        losses.append(total / max(len(ts), 1))
    return float(np.mean(losses))


def ref_lead(ta, tb, sa, sb, tau):
    def unit(x):
        x = np.asarray(x, np.float64)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)
    total = 0.0
    for bi in range(ta.shape[0]):
        for u in range(ta.shape[1]):
            lp = unit(ta)[bi, u] @ unit(tb)[bi].T / tau
            lq = unit(sa)[bi, u] @ unit(sb)[bi].T / tau
            p = np.exp(lp - lp.max())
            p /= p.sum()
            log_q = lq - lq.max() - np.log(np.exp(lq - lq.max()).sum())
            total += -(p * log_q).sum()
    return total / ta.shape[0]


@functools.lru_cache(maxsize=None)
def jit_dpc(num_clusters, k=5):
    return jax.jit(functools.partial(carb.density_peak_clustering, num_clusters=num_clusters, k=k))


# tau and rep are traced, so one compilation serves every value; only the locality form is static.
_jit_lcr = jax.jit(carb.lcr_loss, static_argnames=('locality',))


def jit_lcr(tau, rep=(5.0, 5.0, 2.0), locality='log'):
    return functools.partial(_jit_lcr, tau=tau, rep=rep, locality=locality)


def random_inattentive(rng, b, n, n_att):
    inatt = np.ones((b, n), bool)
    for bi in range(b):
        inatt[bi, rng.choice(n, n_att, replace=False)] = False
    return inatt


def assert_dpc_equal(got, want):
    for name in ('centres', 'centre_valid', 'is_centre', 'assignment', 'cluster_id'):
        np.testing.assert_array_equal(np.asarray(got[name]), want[name], err_msg=name)
    for name in ('rho', 'delta', 'score'):
        np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=2e-4, atol=1e-6, err_msg=name)


# ----------------------------------------------------------------------------------------------------------------
# Eq. 1
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('eta,n,want', [(0.1, 144, 15), (0.25, 144, 36), (0.7, 10, 7), (0.3, 10, 3), (0.0, 144, 0),
                                        (1.0, 144, 144), (0.5, 3, 2), (0.01, 144, 2), (0.9, 10, 9)])
def test_num_attentive(eta, n, want):
    assert carb.num_attentive(eta, n) == want


def test_num_attentive_matches_exact_ceil():
    for n in (12, 144, 196):
        for eta in np.round(np.arange(0, 1.0001, 0.01), 2):
            assert carb.num_attentive(float(eta), n) == math.ceil(Fraction(str(eta)) * n), (eta, n)


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('n,eta', [(144, 0.1), (144, 0.25), (12, 0.5), (12, 0.0), (12, 1.0)])
def test_attentive_mask_matches_reference(seed, n, eta):
    logits = np.random.default_rng(seed).normal(size=(2, 3, n)).astype(np.float32) * 2
    got = np.asarray(carb.attentive_mask(jnp.asarray(logits), eta))
    np.testing.assert_array_equal(got, ref_attentive(logits, eta))
    assert (got.sum(-1) == carb.num_attentive(eta, n)).all()


def test_attentive_mask_ties_go_to_lower_index():
    logits = np.zeros((2, 2, 12), np.float32)  # image 0: all tied
    logits[1, :, [3, 5, 7, 9]] = 1.0  # image 1: four tied winners, then ties among the rest
    got = np.asarray(carb.attentive_mask(jnp.asarray(logits), 0.5))
    np.testing.assert_array_equal(np.flatnonzero(got[0]), np.arange(6))
    np.testing.assert_array_equal(np.flatnonzero(got[1]), [0, 1, 3, 5, 7, 9])
    np.testing.assert_array_equal(got, ref_attentive(logits, 0.5))


def test_attentive_mask_bf16_and_softmax_over_patches_only():
    logits = np.random.default_rng(3).normal(size=(2, 4, 12)).astype(np.float32)
    sim = np.asarray(carb.cls_similarity(jnp.asarray(logits)))
    np.testing.assert_allclose(sim.sum(-1), 1.0, rtol=1e-6)
    # A constant shift per head must not change anything: the softmax is per head.
    shifted = logits + np.arange(4, dtype=np.float32)[None, :, None] * 10
    np.testing.assert_allclose(np.asarray(carb.cls_similarity(jnp.asarray(shifted))), sim, rtol=1e-5)
    got = carb.attentive_mask(jnp.asarray(logits, jnp.bfloat16), 0.25)
    want = ref_attentive(np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)), 0.25)
    np.testing.assert_array_equal(np.asarray(got), want)


# ----------------------------------------------------------------------------------------------------------------
# Eq. 2-3
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_dpc_matches_reference_144(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.normal(size=(2, 144, 32)).astype(np.float32)
    inatt = random_inattentive(rng, 2, 144, 15)
    got = jit_dpc(4)(jnp.asarray(tokens), jnp.asarray(inatt))
    assert_dpc_equal(got, ref_dpc(tokens, inatt, 4))


@pytest.mark.parametrize('seed', [0, 1, 2, 3])
@pytest.mark.parametrize('num_clusters,k', [(4, 5), (2, 3), (8, 5)])
def test_dpc_matches_reference_small(seed, num_clusters, k):
    rng = np.random.default_rng(seed)
    # Clustered data: a few blobs, so the centres are meaningful and densities vary.
    means = rng.normal(size=(3, 8)) * 3
    tokens = (means[rng.integers(0, 3, size=(3, 12))] + rng.normal(size=(3, 12, 8)) * 0.5).astype(np.float32)
    inatt = random_inattentive(rng, 3, 12, int(rng.integers(0, 6)))
    got = jit_dpc(num_clusters, k)(jnp.asarray(tokens), jnp.asarray(inatt))
    assert_dpc_equal(got, ref_dpc(tokens, inatt, num_clusters, k))


def test_dpc_all_tokens_identical():
    tokens = np.ones((2, 16, 8), np.float32) * 0.3
    inatt = np.ones((2, 16), bool)
    inatt[1, [0, 2, 3]] = False
    got = jit_dpc(4)(jnp.asarray(tokens), jnp.asarray(inatt))
    assert_dpc_equal(got, ref_dpc(tokens, inatt, 4))
    # Everything ties: the lowest inattentive indices are the centres and everyone joins the lowest of them.
    np.testing.assert_array_equal(np.asarray(got['centres']), [[0, 1, 2, 3], [1, 4, 5, 6]])
    assert (np.asarray(got['assignment'])[1, 7:] == 1).all()
    np.testing.assert_array_equal(np.asarray(got['delta']), 0.0)


@pytest.mark.parametrize('seed', [0, 1])
def test_dpc_duplicated_tokens(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.normal(size=(2, 144, 24)).astype(np.float32)
    # Copies of a few tokens elsewhere (pairs and a triple), inattentive and attentive alike: exact ρ ties.
    for src, dst in [(3, 70), (3, 140), (10, 11), (50, 20), (99, 100), (7, 130)]:
        tokens[:, dst] = tokens[:, src]
    # A tight group of copies makes a density peak whose copies must not all become centres.
    tokens[:, 30:40] = tokens[:, 29:30]
    inatt = random_inattentive(rng, 2, 144, 15)
    inatt[:, [3, 70, 140, 10, 11, 29, 30, 31]] = True
    got = jit_dpc(4)(jnp.asarray(tokens), jnp.asarray(inatt))
    want = ref_dpc(tokens, inatt, 4)
    assert_dpc_equal(got, want)
    rho = np.asarray(got['rho'])
    assert (rho[:, 3] == rho[:, 70]).all() and (rho[:, 29:40][inatt[:, 29:40]] == rho[0, 29]).all()


def test_dpc_ties_in_density_on_a_lattice():
    # Integer lattice points: the Gram form is exact, so ρ, δ, scores and centre distances tie exactly where the
    # geometry says so, and only the index rules decide.
    r, c = np.meshgrid(np.arange(4), np.arange(4), indexing='ij')
    grid = np.stack([r.ravel(), c.ravel(), np.zeros(16), np.zeros(16)], -1).astype(np.float32)
    line = np.zeros((16, 4), np.float32)
    line[:, 0] = np.arange(16) // 2  # points 0,0,1,1,2,2,...: duplicated pairs on a line
    tokens = np.stack([grid, line, grid[::-1].copy()])
    inatt = np.ones((3, 16), bool)
    inatt[2, [5, 6]] = False
    for num_clusters, k in [(4, 5), (3, 2)]:
        got = jit_dpc(num_clusters, k)(jnp.asarray(tokens), jnp.asarray(inatt))
        assert_dpc_equal(got, ref_dpc(tokens, inatt, num_clusters, k))


def test_dpc_fewer_inattentive_than_clusters():
    rng = np.random.default_rng(5)
    tokens = rng.normal(size=(3, 12, 8)).astype(np.float32)
    inatt = np.zeros((3, 12), bool)
    inatt[0, [2, 9]] = True  # two inattentive tokens for four clusters
    inatt[1, 4] = True  # one
    # image 2: none (eta = 1)
    got = jit_dpc(4)(jnp.asarray(tokens), jnp.asarray(inatt))
    assert_dpc_equal(got, ref_dpc(tokens, inatt, 4))
    np.testing.assert_array_equal(np.asarray(got['centre_valid']),
                                  [[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(got['is_centre']), inatt)
    np.testing.assert_array_equal(np.asarray(got['assignment']), np.tile(np.arange(12), (3, 1)))
    np.testing.assert_array_equal(np.asarray(got['cluster_id'])[2], -1)
    assert np.isfinite(np.asarray(got['score'])).all()


def test_dpc_all_inattentive_and_bf16():
    rng = np.random.default_rng(6)
    tokens = jnp.asarray(rng.normal(size=(2, 12, 8)), jnp.bfloat16)
    inatt = np.ones((2, 12), bool)
    got = jit_dpc(4)(tokens, jnp.asarray(inatt))
    assert_dpc_equal(got, ref_dpc(np.asarray(tokens.astype(jnp.float32)), inatt, 4))
    assert got['rho'].dtype == jnp.float32


def test_dpc_large_feature_distances_keep_their_order():
    # Far-apart features: exp(-mean d²) underflows to 0 in float32, but the order of densities survives.
    rng = np.random.default_rng(7)
    tokens = (rng.normal(size=(2, 12, 8)) * 40).astype(np.float32)
    inatt = np.ones((2, 12), bool)
    got = jit_dpc(3)(jnp.asarray(tokens), jnp.asarray(inatt))
    want = ref_dpc(tokens, inatt, 3, log_space=True)
    assert (np.asarray(got['rho']) == 0).mean() > 0.9  # float32 ρ has underflowed almost everywhere
    np.testing.assert_array_equal(np.asarray(got['centres']), want['centres'])
    np.testing.assert_array_equal(np.asarray(got['assignment']), want['assignment'])


# ----------------------------------------------------------------------------------------------------------------
# Substitution and positions
# ----------------------------------------------------------------------------------------------------------------


def test_substitute_keep_mask_and_kept_indices():
    rng = np.random.default_rng(8)
    tokens = rng.normal(size=(2, 144, 16)).astype(np.float32)
    feats = rng.normal(size=(2, 144, 6)).astype(np.float32)
    att = ref_attentive(rng.normal(size=(2, 3, 144)), 0.1)
    out = jit_dpc(4)(jnp.asarray(tokens), jnp.asarray(~att))
    assign = np.asarray(out['assignment'])
    got = np.asarray(carb.substitute(jnp.asarray(feats), jnp.asarray(~att), out['assignment']))
    want = feats.copy()
    for bi in range(2):
        for i in range(144):
            if not att[bi, i]:
                want[bi, i] = feats[bi, assign[bi, i]]
    np.testing.assert_array_equal(got, want)
    assert len({tuple(r) for r in got[0][~att[0]]}) == 4  # four centres' features and nothing else
    keep = np.asarray(carb.keep_mask(jnp.asarray(att), out['is_centre']))
    np.testing.assert_array_equal(keep, att | np.asarray(out['is_centre']))
    assert (keep.sum(-1) == 15 + 4).all()
    idx, valid = carb.kept_indices(jnp.asarray(keep), 21)
    for bi in range(2):
        np.testing.assert_array_equal(np.asarray(idx)[bi, :19], np.flatnonzero(keep[bi]))
        np.testing.assert_array_equal(np.asarray(valid)[bi], [True] * 19 + [False] * 2)
    # bf16 features keep their dtype (a gather, no arithmetic).
    assert carb.substitute(jnp.asarray(feats, jnp.bfloat16), jnp.asarray(~att), out['assignment']).dtype == \
        jnp.bfloat16


def test_token_positions():
    pos = np.asarray(carb.token_positions(12, 12, 8))
    assert pos.shape == (144, 2) and pos.dtype == np.float32
    for r in range(12):
        for c in range(12):
            np.testing.assert_array_equal(pos[12 * r + c], [8 * r + 4, 8 * c + 4])
    np.testing.assert_array_equal(np.asarray(carb.token_positions(2, 3, 4)),
                                  [[2, 2], [2, 6], [2, 10], [6, 2], [6, 6], [6, 10]])


# ----------------------------------------------------------------------------------------------------------------
# Eq. 4-7
# ----------------------------------------------------------------------------------------------------------------


def lcr_inputs(seed, b=2, gh=12, gw=12, d=16, eta=0.1, k_c=4):
    rng = np.random.default_rng(seed)
    n = gh * gw
    proj = rng.normal(size=(b, n, d)).astype(np.float32)
    att = ref_attentive(rng.normal(size=(b, 3, n)), eta)
    centres = np.zeros((b, n), bool)
    for bi in range(b):
        centres[bi, rng.choice(np.flatnonzero(~att[bi]), min(k_c, int((~att[bi]).sum())), replace=False)] = True
    return proj, att | centres, att, np.asarray(carb.token_positions(gh, gw, 8))


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('locality', ['log', 'sqrt', 'linear', 'none'])
def test_lcr_loss_matches_reference(seed, locality):
    proj, sel, att, pos = lcr_inputs(seed)
    loss, aux = jit_lcr(1 / 7, locality=locality)(jnp.asarray(proj), jnp.asarray(sel), jnp.asarray(att),
                                                  jnp.asarray(pos))
    np.testing.assert_allclose(float(loss), ref_lcr(proj, sel, att, pos, 1 / 7, locality=locality), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux['num_selected']), sel.sum(-1))
    assert (np.asarray(aux['p_self']) > 0).all() and (np.asarray(aux['p_self']) < 1).all()


@pytest.mark.parametrize('rep', [(5.0, 5.0, 2.0), (0.0, 5.0, 2.0), (5.0, 0.0, 2.0), (5.0, 5.0, 0.0), (1.0, 2.0, 3.0)])
def test_lcr_loss_repellence_switches(rep):
    proj, sel, att, pos = lcr_inputs(3, gh=4, gw=6, d=8, eta=0.25)
    loss, _ = jit_lcr(1 / 8, rep=rep)(jnp.asarray(proj), jnp.asarray(sel), jnp.asarray(att), jnp.asarray(pos))
    np.testing.assert_allclose(float(loss), ref_lcr(proj, sel, att, pos, 1 / 8, rep=rep), rtol=1e-5)


def test_lcr_loss_full_correspondence_ablation():
    proj, _, att, pos = lcr_inputs(4)
    sel = np.ones_like(att)
    loss, aux = jit_lcr(1 / 7)(jnp.asarray(proj), jnp.asarray(sel), jnp.asarray(att), jnp.asarray(pos))
    np.testing.assert_allclose(float(loss), ref_lcr(proj, sel, att, pos, 1 / 7), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux['num_selected']), 144)


def test_lcr_loss_per_image_positions_and_bf16():
    proj, sel, att, pos = lcr_inputs(5, gh=3, gw=4)
    want, _ = jit_lcr(0.1)(jnp.asarray(proj), jnp.asarray(sel), jnp.asarray(att), jnp.asarray(pos))
    got, _ = jit_lcr(0.1)(jnp.asarray(proj), jnp.asarray(sel), jnp.asarray(att),
                          jnp.broadcast_to(jnp.asarray(pos), (2, 12, 2)))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    bf = jnp.asarray(proj, jnp.bfloat16)
    got, _ = jit_lcr(0.1)(bf, jnp.asarray(sel), jnp.asarray(att), jnp.asarray(pos))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), ref_lcr(np.asarray(bf.astype(jnp.float32)), sel, att, pos, 0.1),
                               rtol=1e-5)


@pytest.mark.parametrize('locality', ['log', 'none'])
def test_lcr_loss_gradient_matches_finite_differences(locality):
    rng = np.random.default_rng(9)
    proj = rng.normal(size=(2, 6, 3))
    sel = np.array([[1, 1, 0, 1, 1, 0], [0, 1, 1, 1, 0, 1]], bool)
    att = np.array([[1, 0, 0, 1, 0, 0], [0, 1, 0, 0, 1, 0]], bool)
    pos = np.asarray(carb.token_positions(2, 3, 8))
    rep = (5.0, 3.0, 2.0)
    grad = np.asarray(jax.jit(jax.grad(lambda x: carb.lcr_loss(
        x, jnp.asarray(sel), jnp.asarray(att), jnp.asarray(pos), tau=0.5, rep=rep, locality=locality)[0]))(
        jnp.asarray(proj, jnp.float32)))
    fd = np.zeros_like(proj)
    eps = 1e-6
    for idx in np.ndindex(*proj.shape):
        hi, lo = proj.copy(), proj.copy()
        hi[idx] += eps
        lo[idx] -= eps
        fd[idx] = (ref_lcr(hi, sel, att, pos, 0.5, rep, locality) - ref_lcr(lo, sel, att, pos, 0.5, rep, locality)) / (
            2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-5)
    assert (grad[~sel] == 0).all()  # tokens outside T receive no gradient
    assert np.abs(fd).max() > 1e-2


def test_lcr_loss_single_and_empty_selection_are_finite():
    proj = jnp.asarray(np.random.default_rng(10).normal(size=(2, 12, 8)), jnp.float32)
    sel = np.zeros((2, 12), bool)
    sel[0, 5] = True  # |T| = 1 in image 0, |T| = 0 in image 1
    pos = carb.token_positions(3, 4, 8)

    def f(x):
        return carb.lcr_loss(x, jnp.asarray(sel), jnp.asarray(sel), pos, tau=1 / 7)

    (loss, aux), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(proj)
    assert float(loss) == 0.0  # the only pair is the self pair, at distance 0
    assert np.isfinite(np.asarray(grad)).all() and np.isfinite(np.asarray(aux['p_self'])).all()
    np.testing.assert_allclose(np.asarray(aux['p_self']), [1.0, 0.0])


def test_lcr_loss_rejects_unknown_locality():
    with pytest.raises(ValueError):
        jax.eval_shape(functools.partial(carb.lcr_loss, tau=0.1, locality='cubic'), jnp.zeros((1, 4, 2)),
                       jnp.ones((1, 4), bool), jnp.ones((1, 4), bool), carb.token_positions(2, 2, 8))


def test_cross_view_loss_rewards_content_and_not_place():
    """View B is view A's face moved by one token right and one down: descriptors that follow the content (B's
    token at A's token's new place carries A's descriptor) score the minimum, near zero, and p_self ~1;
    descriptors of place (B's token at the same grid index as A's) score far more. Tokens whose place left the
    view are not counted."""
    g, d, tau = 4, 16, 0.05
    pos = carb.token_positions(g, g, 8)
    content = np.asarray(carb.l2_normalize(jax.random.normal(jax.random.PRNGKey(0), (g + 1, g + 1, d))))
    view_a = content[:g, :g].reshape(1, g * g, d)           # A sees content rows/cols 0..g-1
    view_b_content = content[1:, 1:].reshape(1, g * g, d)   # B sees rows/cols 1..g: moved by one token
    pos_b = (pos + 8.0)[None]                               # B's tokens in A's frame
    everything = jnp.ones((1, g * g), bool)
    args = dict(tau=tau, rep=(1.0, 1.0, 1.0), locality='log')
    follows, aux = carb.cross_view_lcr_loss(jnp.asarray(view_a), everything, everything, pos,
                                            jnp.asarray(view_b_content), pos_b, **args)
    place, _ = carb.cross_view_lcr_loss(jnp.asarray(view_a), everything, everything, pos,
                                        jnp.asarray(view_a), pos_b, **args)
    assert float(follows) < 0.05 < 0.5 < float(place)
    assert float(aux['num_selected'][0]) == (g - 1) ** 2 and float(aux['p_self'][0]) > 0.99
    # the per-token sum by hand, for one token of A: (1, 1) is B's token (0, 0)
    phi_a, phi_b = view_a[0], view_b_content[0]
    i = 1 * g + 1
    p = np.exp(phi_b @ phi_a[i] / tau)
    p /= p.sum()
    f = np.log1p(np.linalg.norm(np.asarray(pos)[i] - np.asarray(pos_b)[0], axis=-1))
    one = carb.cross_view_lcr_loss(jnp.asarray(view_a), jnp.arange(g * g)[None] == i, everything, pos,
                                   jnp.asarray(view_b_content), pos_b, **args)[0]
    np.testing.assert_allclose(float(one), float((f * p).sum()), rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# LEAD (paper 003 eq. 2-3)
# ----------------------------------------------------------------------------------------------------------------


def test_lead_loss_matches_reference_and_stops_teacher_gradient():
    rng = np.random.default_rng(11)
    ta, tb = (rng.normal(size=(2, 12, 10)).astype(np.float32) for _ in range(2))
    sa, sb = (rng.normal(size=(2, 12, 4)).astype(np.float32) for _ in range(2))
    args = [jnp.asarray(x) for x in (ta, tb, sa, sb)]
    loss = jax.jit(carb.lead_loss)(*args)
    np.testing.assert_allclose(float(loss), ref_lead(ta, tb, sa, sb, 0.05), rtol=1e-5)
    grads = jax.jit(jax.grad(carb.lead_loss, argnums=(0, 1, 2, 3)))(*args)
    assert (np.asarray(grads[0]) == 0).all() and (np.asarray(grads[1]) == 0).all()
    assert np.abs(np.asarray(grads[2])).max() > 0
    # Student equal to teacher: q = p, the cross-entropy's minimum over q, so the student gradient vanishes.
    g = jax.jit(jax.grad(lambda s_a, s_b: carb.lead_loss(args[0], args[1], s_a, s_b, tau=0.5), argnums=(0, 1)))(
        args[0], args[1])
    assert max(np.abs(np.asarray(x)).max() for x in g) < 1e-5


# ----------------------------------------------------------------------------------------------------------------
# jit, vmap and data parallelism
# ----------------------------------------------------------------------------------------------------------------


def pipeline(logits, tokens, proj, pos, eta=0.1, k_c=4):
    """Eq. 1 → clustering → mode-B substitution → LCR, as the training step chains them."""
    att = carb.attentive_mask(logits, eta)
    out = carb.density_peak_clustering(tokens, ~att, k_c)
    feats = carb.substitute(proj, ~att, out['assignment'])
    loss, aux = carb.lcr_loss(feats, att | out['is_centre'], att, pos, tau=1 / 7)
    return loss, att, out, aux


def test_jit_matches_eager():
    # Small shapes: eager mode compiles every op on its own, which costs seconds per new shape.
    rng = np.random.default_rng(12)
    logits = jnp.asarray(rng.normal(size=(2, 3, 20)), jnp.float32)
    tokens = jnp.asarray(rng.normal(size=(2, 20, 8)), jnp.float32)
    proj = jnp.asarray(rng.normal(size=(2, 20, 4)), jnp.float32)
    pos = carb.token_positions(4, 5, 8)
    eager = pipeline(logits, tokens, proj, pos, eta=0.25, k_c=3)
    jitted = jax.jit(pipeline, static_argnames=('eta', 'k_c'))(logits, tokens, proj, pos, eta=0.25, k_c=3)
    for e, j in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        if jnp.issubdtype(e.dtype, jnp.floating):
            np.testing.assert_allclose(np.asarray(j), np.asarray(e), rtol=1e-6, atol=1e-7)
        else:
            np.testing.assert_array_equal(np.asarray(j), np.asarray(e))
    assert int(eager[1].sum()) == 2 * 5 and int(eager[2]['is_centre'].sum()) == 2 * 3


def test_vmap_matches_batch():
    rng = np.random.default_rng(13)
    logits = jnp.asarray(rng.normal(size=(2, 3, 144)), jnp.float32)
    tokens = jnp.asarray(rng.normal(size=(2, 144, 32)), jnp.float32)
    proj = jnp.asarray(rng.normal(size=(2, 144, 16)), jnp.float32)
    pos = carb.token_positions(12, 12, 8)
    batch = jax.jit(pipeline)(logits, tokens, proj, pos)
    # vmap over a leading axis (e.g. two views) equals the flattened batch.
    vm = jax.jit(jax.vmap(pipeline, in_axes=(0, 0, 0, None)))(logits[:, None], tokens[:, None], proj[:, None], pos)
    np.testing.assert_allclose(np.asarray(vm[0]).mean(), float(batch[0]), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(vm[1])[:, 0], np.asarray(batch[1]))
    np.testing.assert_array_equal(np.asarray(vm[2]['assignment'])[:, 0], np.asarray(batch[2]['assignment']))
    lead = jax.jit(jax.vmap(carb.lead_loss))(tokens[:, None], tokens[::-1, None], proj[:, None], proj[::-1, None])
    np.testing.assert_allclose(np.asarray(lead).mean(), float(jax.jit(carb.lead_loss)(tokens, tokens[::-1], proj,
                                                                                      proj[::-1])), rtol=1e-6)


_SHARDED_SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from sce_mae_jax import carb
    assert jax.device_count() == 8, jax.devices()

    def step(logits, tokens, proj, pos):
        att = carb.attentive_mask(logits, 0.1)
        out = carb.density_peak_clustering(tokens, ~att, 4)
        feats = carb.substitute(proj, ~att, out['assignment'])
        loss, _ = carb.lcr_loss(feats, att | out['is_centre'], att, pos, tau=1 / 7)
        return loss, out['centres'], out['assignment'], carb.lead_loss(tokens, tokens[::-1], proj, proj[::-1])

    rng = np.random.default_rng(0)
    host = [rng.normal(size=(16, 3, 144)), rng.normal(size=(16, 144, 32)), rng.normal(size=(16, 144, 16))]
    host = [x.astype(np.float32) for x in host]
    pos = np.asarray(carb.token_positions(12, 12, 8))
    single = jax.jit(step)(*[jax.device_put(x, jax.devices()[0]) for x in host + [pos]])
    mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
    data, repl = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
    sharded = jax.jit(step)(*[jax.device_put(x, data) for x in host], jax.device_put(pos, repl))
    assert len(sharded[1].sharding.device_set) == 8
    np.testing.assert_allclose(float(sharded[0]), float(single[0]), rtol=1e-5)
    np.testing.assert_allclose(float(sharded[3]), float(single[3]), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(sharded[1]), np.asarray(single[1]))
    np.testing.assert_array_equal(np.asarray(sharded[2]), np.asarray(single[2]))
    print('OK', float(single[0]), float(sharded[0]))
''')


def test_eight_devices_match_one():
    env = cpu_env(8)
    env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
    proc = subprocess.run([sys.executable, '-c', _SHARDED_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith('OK')


# ----------------------------------------------------------------------------------------------------------------
# Split criteria (carb.split): NumPy references, and constructed inputs whose right answer is known.
# ----------------------------------------------------------------------------------------------------------------


def ref_top(scores, eta):
    b, n = scores.shape
    n_att = math.ceil(Fraction(str(eta)) * n)
    out = np.zeros((b, n), bool)
    for bi in range(b):
        order = sorted(range(n), key=lambda i: (-scores[bi, i], i))
        out[bi, order[:n_att]] = True
    return out


def ref_cls_sim(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).mean(1)


def test_top_scores_mask_matches_reference_and_ties():
    scores = np.random.default_rng(0).integers(0, 4, (3, 40)).astype(np.float32)  # many ties
    np.testing.assert_array_equal(np.asarray(carb.top_scores_mask(jnp.asarray(scores), 0.2)), ref_top(scores, 0.2))


def test_debiased_cls_matches_reference():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 3, 36)).astype(np.float32)
    prior = ref_cls_sim(rng.normal(size=(16, 3, 36))).mean(0)
    got = np.asarray(splits.debiased_cls_scores(jnp.asarray(logits), jnp.asarray(prior, jnp.float32)))
    np.testing.assert_allclose(got, np.log(ref_cls_sim(logits.astype(np.float64)) + 1e-12) - np.log(prior + 1e-12),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(splits.cls_prior(jnp.asarray(logits))), ref_cls_sim(logits).mean(0),
                               rtol=1e-5)


def test_debiased_cls_ignores_a_fixed_position_sink():
    """A sink on token 0 in every image wins eq. 1; against the prior only the token this image attends to
    more than usual (a different one per image) is attentive."""
    rng = np.random.default_rng(2)
    b, n = 8, 36
    logits = rng.normal(scale=0.1, size=(b, 2, n)).astype(np.float32)
    logits[:, :, 0] += 6.0
    content = rng.choice(np.arange(1, n), b, replace=False)
    logits[np.arange(b), :, content] += 2.0
    prior = splits.cls_prior(jnp.asarray(logits))
    one = 1 / n  # η giving one attentive token
    assert np.all(np.asarray(carb.top_scores_mask(carb.cls_similarity(jnp.asarray(logits)), one))[:, 0])
    debiased = np.asarray(carb.top_scores_mask(splits.debiased_cls_scores(jnp.asarray(logits), prior), one))
    np.testing.assert_array_equal(np.argmax(debiased, axis=1), content)


def ref_low_density(tokens, k):
    b, n, c = tokens.shape
    out = np.zeros((b, n))
    for bi in range(b):
        t = tokens[bi].astype(np.float64)
        d2 = ((t[:, None] - t[None]) ** 2).sum(-1) / c
        for i in range(n):
            out[bi, i] = np.sort(d2[i])[:min(k, n)].mean()
    return out


@pytest.mark.parametrize('k', [1, 5, 50])
def test_low_density_matches_reference(k):
    tokens = np.random.default_rng(3).normal(size=(2, 30, 8)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(splits.low_density_scores(jnp.asarray(tokens), k)),
                               ref_low_density(tokens, k), rtol=1e-4, atol=1e-5)


def _copies_and_one_distinct(grid=6, c=8, seed=4):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=c)
    tokens = np.tile(base, (2, grid * grid, 1)) + rng.normal(scale=0.01, size=(2, grid * grid, c))
    distinct = np.array([7, 22])  # one token per image unlike all the others
    tokens[np.arange(2), distinct] = rng.normal(size=(2, c)) * 3
    return tokens.astype(np.float32), distinct


def test_low_density_and_contrast_find_one_distinct_token_among_copies():
    tokens, distinct = _copies_and_one_distinct()
    one = 1 / 36
    for scores in (splits.low_density_scores(jnp.asarray(tokens), 5),
                   splits.neighbour_contrast_scores(jnp.asarray(tokens), 6, 6)):
        np.testing.assert_array_equal(np.argmax(np.asarray(carb.top_scores_mask(scores, one)), axis=1), distinct)


def ref_contrast(tokens, gh, gw):
    b, n, c = tokens.shape
    t = tokens.astype(np.float64)
    t = t / np.linalg.norm(t, axis=-1, keepdims=True)
    out = np.zeros((b, n))
    for bi in range(b):
        for r in range(gh):
            for col in range(gw):
                sims = [t[bi, r * gw + col] @ t[bi, rr * gw + cc]
                        for rr in range(r - 1, r + 2) for cc in range(col - 1, col + 2)
                        if (rr, cc) != (r, col) and 0 <= rr < gh and 0 <= cc < gw]
                out[bi, r * gw + col] = 1 - np.mean(sims)
    return out


def test_neighbour_contrast_matches_reference_on_a_rectangular_grid():
    tokens = np.random.default_rng(5).normal(size=(2, 4 * 7, 6)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(splits.neighbour_contrast_scores(jnp.asarray(tokens), 4, 7)),
                               ref_contrast(tokens, 4, 7), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match='grid'):
        splits.neighbour_contrast_scores(jnp.asarray(tokens), 5, 5)


def test_complementary_masks():
    masks = splits.complementary_masks(144, 36, seed=3)
    assert masks.shape == (4, 144)
    assert np.all(masks.sum(1) == 144 - 36)               # each removes what stage 1 trained to remove
    assert np.all((1 - masks).sum(0) == 1)                 # visible sets partition the tokens
    odd = splits.complementary_masks(10, 3)                  # 3 groups of 3, token left over always removed
    assert odd.shape == (3, 10) and np.all(odd.sum(0) >= 2)
    with pytest.raises(ValueError):
        splits.complementary_masks(10, 10)


def test_reconstruction_scores_average_over_the_masks_that_removed_the_token():
    rng = np.random.default_rng(6)
    masks = splits.complementary_masks(12, 3, seed=0)
    errors = rng.uniform(size=(4, 2, 12)).astype(np.float32)
    want = np.zeros((2, 12))
    for b in range(2):
        for i in range(12):
            want[b, i] = np.mean([errors[m, b, i] for m in range(4) if masks[m, i]])
    np.testing.assert_allclose(np.asarray(splits.reconstruction_scores(jnp.asarray(errors), jnp.asarray(masks))), want,
                               rtol=1e-6)
    # the token reconstructed worst whenever it is hidden is the attentive one
    errors[:, :, 5] += 10 * masks[:, None, 5]
    top = carb.top_scores_mask(splits.reconstruction_scores(jnp.asarray(errors), jnp.asarray(masks)), 1 / 12)
    assert np.all(np.asarray(top)[:, 5])
