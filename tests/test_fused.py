"""models/fused.py: each custom VJP against autodiff of its plain form, and the MAE on either path (the same loss,
gradients and parameters; the default path unchanged by moving the operations out of vit.py)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sce_mae_jax.models import fused
from sce_mae_jax.models.mae import MAE, encoder_from_model_config
from sce_mae_jax.models.vit import LN_EPS


def _assert_vjp_matches(fn, ref, args, rtol=2e-5, atol=2e-5):
    out, back = jax.vjp(fn, *args)
    ref_out, ref_back = jax.vjp(ref, *args)
    ct = jax.random.normal(jax.random.PRNGKey(0), out.shape, out.dtype)
    np.testing.assert_allclose(out, ref_out, rtol=rtol, atol=atol)
    for g, r in zip(back(ct), ref_back(ct)):
        np.testing.assert_allclose(g, r, rtol=rtol, atol=atol)


def _softmax_attention(q, k, v, mask, scale):
    """The textbook formula in the (batch, T, heads, hd) layout, independent of both forms."""
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) * scale
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
    return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits, axis=-1), v)


@pytest.mark.parametrize('masked', [False, True])
@pytest.mark.parametrize('ops', [fused.FUSED, fused.PLAIN], ids=['fused', 'plain'])
def test_attention_matches_softmax_formula(ops, masked):
    q, k, v = (jax.random.normal(kk, (3, 7, 2, 4)) for kk in jax.random.split(jax.random.PRNGKey(1), 3))
    mask = jnp.asarray(np.random.default_rng(0).random((3, 7)) < 0.6).at[:, 0].set(True) if masked else None
    _assert_vjp_matches(lambda q, k, v: ops.attention(q, k, v, mask, 0.5),
                        lambda q, k, v: _softmax_attention(q, k, v, mask, 0.5), (q, k, v))


def test_gelu_dense_fused_matches_plain():
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    h = 2 * jax.random.normal(keys[0], (2, 5, 8))
    kernel, bias = jax.random.normal(keys[1], (8, 3)), jax.random.normal(keys[2], (3,))
    _assert_vjp_matches(fused.fused_gelu_dense, fused.plain_gelu_dense, (h, kernel, bias))
    np.testing.assert_allclose(fused.plain_gelu_dense(h, kernel, bias),
                               jax.nn.gelu(h, approximate=False) @ kernel + bias, rtol=1e-6)


def test_norm_dense_fused_matches_plain_and_flax_layernorm():
    keys = jax.random.split(jax.random.PRNGKey(3), 5)
    x = 3 + 2 * jax.random.normal(keys[0], (2, 5, 8))
    scale, shift = 1 + jax.random.normal(keys[1], (8,)), jax.random.normal(keys[2], (8,))
    kernel, bias = jax.random.normal(keys[3], (8, 6)), jax.random.normal(keys[4], (6,))
    args = (x, scale, shift, kernel, bias)
    _assert_vjp_matches(lambda *a: fused.fused_norm_dense(*a, LN_EPS), lambda *a: fused.plain_norm_dense(*a, LN_EPS),
                        args, rtol=1e-4, atol=1e-4)
    y = nn.LayerNorm(LN_EPS).apply({'params': {'scale': scale, 'bias': shift}}, x)
    np.testing.assert_allclose(fused.plain_norm_dense(*args, LN_EPS), y @ kernel + bias, rtol=1e-5, atol=1e-5)


def _tiny(fused_ops):
    m = MAE(embed_dim=48, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
            image_size=32, fused_ops=fused_ops)
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
    noise = jnp.asarray(rng.uniform(size=(2, 16)), jnp.float32)
    params = jax.jit(lambda x, n: m.init(jax.random.PRNGKey(0), x, noise=n))(x, noise)['params']
    loss, grads = jax.jit(jax.value_and_grad(lambda p: m.apply({'params': p}, x, noise=noise)[0]))(params)
    return params, loss, grads


@pytest.fixture(scope='module')
def both_paths():
    return _tiny(True), _tiny(False)


def test_default_path_unchanged_by_the_refactor(both_paths):
    # Loss and gradient norm of this exact setup with vit.py before the operations moved out (commit 70a129d,
    # 2-core CPU VM, jax 0.10.2). There the loss was bit-identical and every gradient within 5e-9.
    _, loss, grads = both_paths[0]
    norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))))
    np.testing.assert_allclose(float(loss), 1.2676950693130493, rtol=1e-6)
    np.testing.assert_allclose(norm, 0.5958031415939331, rtol=1e-6)


def test_fused_and_plain_paths_agree(both_paths):
    (p1, l1, g1), (p2, l2, g2) = both_paths
    # same parameter names, shapes and initial values: checkpoints and convert.py work with either
    jax.tree.map(np.testing.assert_array_equal, p1, p2)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)


def test_encoder_config_without_the_field_gets_fused_ops():
    old = dict(embed_dim=48, depth=2, num_heads=2, patch_size=8, image_size=96)  # a config.json from before
    assert encoder_from_model_config(old).fused_ops
    assert not encoder_from_model_config({**old, 'fused_ops': False}).fused_ops
