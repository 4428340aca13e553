"""ViT/MAE: parameter counts, the reference MAE's conventions and the loss against a NumPy computation. The
fused operations' backward passes are tested in test_fused.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sce_mae_jax.models.mae import MAE, random_masking_ids
from sce_mae_jax.models.vit import ViT, patchify, sincos_pos_embed_2d, unpatchify, vit_for


@pytest.mark.parametrize('size,count', [('tiny', 5_403_840), ('small', 21_424_512), ('base', 85_316_352)])
def test_encoder_parameter_counts(size, count):
    params = jax.eval_shape(vit_for(size).init, jax.random.PRNGKey(0), jnp.zeros((1, 96, 96, 3)))['params']
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == count


def test_patchify_order_and_inverse():
    x = np.random.default_rng(0).normal(size=(2, 16, 24, 3)).astype(np.float32)
    p = np.asarray(patchify(jnp.asarray(x), 8))
    assert p.shape == (2, 6, 192)
    # patch 4 = row 1, column 1; value index (r·8 + c)·3 + ch
    assert p[1, 4, (2 * 8 + 5) * 3 + 1] == x[1, 8 + 2, 8 + 5, 1]
    np.testing.assert_array_equal(np.asarray(unpatchify(jnp.asarray(p), 8, 2, 3)), x)


def test_sincos_first_half_encodes_column():
    pe = sincos_pos_embed_2d(16, 3, 4)  # 12 positions, row-major
    k = np.arange(4) / 4.0
    omega = 1 / 10000 ** k
    r, c = 2, 3
    np.testing.assert_allclose(pe[r * 4 + c, :4], np.sin(c * omega), rtol=1e-6)
    np.testing.assert_allclose(pe[r * 4 + c, 4:8], np.cos(c * omega), rtol=1e-6)
    np.testing.assert_allclose(pe[r * 4 + c, 8:12], np.sin(r * omega), rtol=1e-6)


def _tiny_mae(**kw):
    return MAE(embed_dim=48, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
               **kw)


def test_masking_is_reference_argsort():
    noise = np.random.default_rng(1).uniform(size=(3, 144)).astype(np.float32)
    ids_keep, ids_restore, mask = map(np.asarray, random_masking_ids(jnp.asarray(noise), 0.75))
    order = np.argsort(noise, axis=1)
    np.testing.assert_array_equal(ids_keep, order[:, :36])
    np.testing.assert_array_equal(ids_restore, np.argsort(order, axis=1))
    expected = np.ones((3, 144))
    for b in range(3):
        expected[b, order[b, :36]] = 0
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize('norm_pix', [True, False])
def test_loss_matches_numpy(norm_pix):
    model = _tiny_mae(norm_pix_loss=norm_pix)
    rng = np.random.default_rng(2)
    images = rng.normal(size=(2, 96, 96, 3)).astype(np.float32)
    noise = rng.uniform(size=(2, 144)).astype(np.float32)
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(images), noise=jnp.asarray(noise))['params']
    loss, pred, mask = model.apply({'params': params}, jnp.asarray(images), noise=jnp.asarray(noise))
    assert pred.shape == (2, 144, 192) and mask.shape == (2, 144)
    np.testing.assert_array_equal(np.asarray(mask).sum(1), [108, 108])

    # Plain NumPy: patches (row, col, channel), unbiased per-patch variance, mean over removed patches.
    target = images.reshape(2, 12, 8, 12, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 144, 192).astype(np.float64)
    if norm_pix:
        target = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
    m = np.ones((2, 144))
    for b in range(2):
        m[b, np.argsort(noise[b])[:36]] = 0
    per_patch = ((np.asarray(pred, np.float64) - target) ** 2).mean(-1)
    np.testing.assert_allclose(float(loss), (per_patch * m).sum() / m.sum(), rtol=1e-5)


def test_encoder_sees_only_visible_patches():
    model = _tiny_mae()
    rng = np.random.default_rng(3)
    images = rng.normal(size=(1, 96, 96, 3)).astype(np.float32)
    noise = rng.uniform(size=(1, 144)).astype(np.float32)
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(images), noise=jnp.asarray(noise))['params']
    _, pred, mask = model.apply({'params': params}, jnp.asarray(images), noise=jnp.asarray(noise))
    removed = int(np.argmax(np.asarray(mask)[0]))
    r, c = divmod(removed, 12)
    changed = images.copy()
    changed[0, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += 5.0
    _, pred2, _ = model.apply({'params': params}, jnp.asarray(changed), noise=jnp.asarray(noise))
    np.testing.assert_allclose(np.asarray(pred), np.asarray(pred2), atol=1e-6)


def test_noise_none_uses_masking_rng():
    model = _tiny_mae()
    x = jnp.zeros((2, 96, 96, 3))
    v = model.init({'params': jax.random.PRNGKey(0), 'masking': jax.random.PRNGKey(1)}, x)
    _, _, m1 = model.apply(v, x, rngs={'masking': jax.random.PRNGKey(5)})
    _, _, m2 = model.apply(v, x, rngs={'masking': jax.random.PRNGKey(5)})
    _, _, m3 = model.apply(v, x, rngs={'masking': jax.random.PRNGKey(6)})
    np.testing.assert_array_equal(m1, m2)
    assert not np.array_equal(m1, m3)


def test_capture_returns_block_tokens_and_cls_logits():
    vit = ViT(embed_dim=48, depth=3, num_heads=2)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 96, 96, 3)), jnp.float32)
    params = vit.init(jax.random.PRNGKey(0), x)['params']
    out = vit.apply({'params': params}, x, capture=(0, 2))
    assert out['tokens'].shape == (2, 144, 48) and out['cls'].shape == (2, 48)
    assert set(out['layers']) == {0, 2} and out['layers'][2].shape == (2, 144, 48)
    assert out['cls_logits'][0].shape == (2, 2, 144)
    # The captured logits are q_cls·k/√d of that block, recomputed here from its own weights.
    p0 = params['blocks_0']
    h = vit.apply({'params': params}, x, method=lambda m, im: m.prepend_cls(m.embed(im)))
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    hn = (h - mu) / jnp.sqrt(var + 1e-6) * p0['norm1']['scale'] + p0['norm1']['bias']
    qkv = (hn @ p0['attn']['qkv']['kernel'] + p0['attn']['qkv']['bias']).reshape(2, 145, 3, 2, 24)
    ref = jnp.einsum('bhd,bnhd->bhn', qkv[:, 0, 0], qkv[:, 1:, 1]) / np.sqrt(24)
    np.testing.assert_allclose(np.asarray(out['cls_logits'][0]), np.asarray(ref), rtol=1e-4, atol=1e-5)


def test_encoder_without_positions_sees_content_not_place():
    """position='none': moving patches around moves their tokens with them, unchanged; MAE's table does not.
    The decoder keeps its own table either way."""
    x = jnp.asarray(np.random.default_rng(5).normal(size=(1, 96, 96, 3)), jnp.float32)
    swapped = x.at[:, :8, :16].set(jnp.concatenate([x[:, :8, 8:16], x[:, :8, :8]], axis=2))  # patches 0 ⇄ 1
    order = np.r_[1, 0, 2:144]
    for position, equivariant in (('none', True), ('sincos', False)):
        vit = ViT(embed_dim=48, depth=2, num_heads=2, position=position)
        params = vit.init(jax.random.PRNGKey(0), x)['params']
        a, b = (vit.apply({'params': params}, im)['tokens'] for im in (x, swapped))
        assert np.allclose(a[:, order], b, atol=1e-5) == equivariant, position
    mae = _tiny_mae(position='none').init({'params': jax.random.PRNGKey(0), 'masking': jax.random.PRNGKey(1)}, x)
    assert not np.any(mae['params']['encoder']['pos_embed']) and np.any(mae['params']['decoder_pos_embed'])
    with pytest.raises(ValueError, match='position'):
        ViT(embed_dim=48, depth=1, num_heads=2, position='learned').init(jax.random.PRNGKey(0), x)


def _window_tokens(vit, params, x, r0, c0, size=4):
    """Final tokens and CLS when only the size x size window of patches at (r0, c0) exists (the rest hidden from
    attention), the window's tokens in row-major order."""
    rows, cols = np.meshgrid(np.arange(r0, r0 + size), np.arange(c0, c0 + size), indexing='ij')
    idx = (rows * 12 + cols).reshape(-1)
    visible = np.zeros((1, 145), bool)
    visible[0, 0] = visible[0, 1 + idx] = True
    h = vit.apply({'params': params}, x, method=lambda m, im: m.prepend_cls(m.embed(im)))
    h, _, _ = vit.apply({'params': params}, h, key_mask=jnp.asarray(visible), method=ViT.blocks_forward)
    h = vit.apply({'params': params}, h, method=ViT.final_norm)
    return np.asarray(h[0, 1 + idx]), np.asarray(h[0, 0])


def test_rope_encoder_knows_offsets_not_places():
    """position='rope': the same patches moved elsewhere on the grid give the same tokens and the same CLS
    (attention sees only offsets, CLS included); with MAE's table they differ. Swapping two patches (a change of
    offsets) does change them, unlike position='none'."""
    rng = np.random.default_rng(7)
    content = rng.normal(size=(32, 32, 3)).astype(np.float32)
    here, there = np.zeros((1, 96, 96, 3), np.float32), np.zeros((1, 96, 96, 3), np.float32)
    here[0, 8:40, 16:48], there[0, 48:80, 56:88] = content, content  # patch window (1, 2) and (6, 7)
    for position, invariant in (('rope', True), ('sincos', False)):
        vit = ViT(embed_dim=48, depth=2, num_heads=2, position=position)
        params = vit.init(jax.random.PRNGKey(0), jnp.asarray(here))['params']
        (a, cls_a), (b, cls_b) = (_window_tokens(vit, params, jnp.asarray(im), *rc)
                                  for im, rc in ((here, (1, 2)), (there, (6, 7))))
        assert np.allclose(a, b, atol=1e-4) == invariant and np.allclose(cls_a, cls_b, atol=1e-4) == invariant
    vit = ViT(embed_dim=48, depth=2, num_heads=2, position='rope')
    params = vit.init(jax.random.PRNGKey(0), jnp.asarray(here))['params']
    swapped = here.copy()
    swapped[0, 8:16, 16:32] = np.concatenate([here[0, 8:16, 24:32], here[0, 8:16, 16:24]], axis=1)
    a, _ = _window_tokens(vit, params, jnp.asarray(here), 1, 2)
    b, _ = _window_tokens(vit, params, jnp.asarray(swapped), 1, 2)
    assert not np.allclose(a[[1, 0, *range(2, 16)]], b, atol=1e-3)
    with pytest.raises(ValueError, match='divisible by 4'):
        ViT(embed_dim=36, depth=1, num_heads=2, position='rope').init(jax.random.PRNGKey(0), jnp.asarray(here))


def test_cyclic_rope_grid_is_a_torus():
    """position='rope_cyclic': rolling the image by whole patches rolls its tokens, unchanged, and leaves CLS as
    it was, border included (offsets count modulo the grid); with plain rotary offsets the border tells."""
    x = jnp.asarray(np.random.default_rng(9).normal(size=(1, 96, 96, 3)), jnp.float32)
    rolled = jnp.roll(x, (3 * 8, 5 * 8), axis=(1, 2))
    for position, torus in (('rope_cyclic', True), ('rope', False)):
        vit = ViT(embed_dim=48, depth=2, num_heads=2, position=position)
        params = vit.init(jax.random.PRNGKey(0), x)['params']
        a, b = (vit.apply({'params': params}, im) for im in (x, rolled))
        grid = lambda t: t['tokens'].reshape(1, 12, 12, 48)
        assert np.allclose(jnp.roll(grid(a), (3, 5), axis=(1, 2)), grid(b), atol=1e-4) == torus, position
        assert np.allclose(a['cls'], b['cls'], atol=1e-4) == torus, position


def test_rope_mae_encodes_visible_patches_at_their_places():
    """MAE's encoder on the visible patches alone (gathered in noise order) gives the tokens of the full encoder
    with the removed patches hidden from attention: the visible tokens' rotary angles follow their grid indices."""
    mae = _tiny_mae(position='rope')
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(2, 96, 96, 3)), jnp.float32)
    noise = jnp.asarray(rng.uniform(size=(2, 144)), jnp.float32)
    params = mae.init(jax.random.PRNGKey(0), x, noise=noise)['params']
    latent, _, mask = mae.apply({'params': params}, x, noise, method=MAE.encode_visible)
    ids_keep = np.asarray(random_masking_ids(noise, 0.75)[0])
    vit = ViT(embed_dim=48, depth=2, num_heads=2, position='rope')
    enc = {'params': params['encoder']}
    h = vit.apply(enc, x, method=lambda m, im: m.prepend_cls(m.embed(im)))
    visible = jnp.concatenate([jnp.ones((2, 1), bool), jnp.asarray(mask) == 0], axis=1)
    h, _, _ = vit.apply(enc, h, key_mask=visible, method=ViT.blocks_forward)
    full = np.asarray(vit.apply(enc, h, method=ViT.final_norm))
    np.testing.assert_allclose(np.asarray(latent[:, 1:]), np.take_along_axis(full[:, 1:], ids_keep[..., None], 1),
                               atol=1e-4)
    np.testing.assert_allclose(np.asarray(latent[:, 0]), full[:, 0], atol=1e-4)


def test_bfloat16_compute_keeps_float32_parameters():
    model = _tiny_mae(dtype='bfloat16')
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 96, 96, 3)), jnp.float32)
    noise = jnp.asarray(np.random.default_rng(6).uniform(size=(2, 144)), jnp.float32)
    params = model.init(jax.random.PRNGKey(0), x, noise=noise)['params']
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype('float32')}
    loss16, _, _ = model.apply({'params': params}, x, noise=noise)
    loss32, _, _ = _tiny_mae().apply({'params': params}, x, noise=noise)
    assert loss16.dtype == jnp.float32 and abs(float(loss16) - float(loss32)) < 0.05 * float(loss32)


def test_projector_upsampling_inside_equals_upsampling_before():
    """descriptor_map's size: the pointwise projector upsamples its logits instead of its input (cheaper); the
    values are those of projecting the upsampled map, for the softmax and the linear form, and its einsum
    layer is nn.Conv's 1x1 convolution with the same parameters."""
    import flax.linen as nn

    from sce_mae_jax.models.heads import Pointwise, Projector, descriptor_map, upsample
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 12, 24))
    for activation, atol in (('softmax', 1e-9), ('linear', 1e-5)):  # softmax values ~1e-4, linear ~1
        proj = Projector(8, activation=activation)
        params = proj.init(jax.random.PRNGKey(1), x)['params']
        fast = descriptor_map(proj, params, x, 96)
        slow = proj.apply({'params': params}, upsample(x, 96))
        assert fast.shape == (2, 96, 96, 8)
        np.testing.assert_allclose(np.asarray(fast), np.asarray(slow), rtol=1e-4, atol=atol)
    conv = nn.Conv(8, (1, 1))
    cp = conv.init(jax.random.PRNGKey(2), x)
    np.testing.assert_allclose(np.asarray(Pointwise(8).apply(cp, x)), np.asarray(conv.apply(cp, x)), rtol=1e-5,
                               atol=1e-6)
    assert jax.tree.map(jnp.shape, Pointwise(8).init(jax.random.PRNGKey(2), x)) == jax.tree.map(jnp.shape, cp)
