"""Cover-and-stride: the plain forward at s = p, every pass's tokens at the right pixels, upsampling aligned."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sce_mae_jax.evals import features as F
from sce_mae_jax.models.vit import ViT

PATCH, SIZE = 8, 96


def _position_model(images):
    """A stand-in 'ViT' whose token (r, c) reports the mean (y, x) written in the pixels of its 8x8 cell, over
    the pixels that are not padding (channel 2 = 1 on real pixels, 0 on padding)."""
    b, h, w, _ = images.shape
    cells = images.reshape(b, h // PATCH, PATCH, w // PATCH, PATCH, 3).sum(axis=(2, 4))
    return jnp.stack([cells[..., 0] / cells[..., 2], cells[..., 1] / cells[..., 2], cells[..., 2]], -1)


def _coordinate_image():
    y, x = np.meshgrid(np.arange(SIZE, dtype=np.float32), np.arange(SIZE, dtype=np.float32), indexing='ij')
    return jnp.asarray(np.stack([y, x, np.ones_like(y)], -1)[None])


@pytest.mark.parametrize('stride', [8, 4, 2, 1])
def test_each_pass_lands_on_its_cell(stride):
    out = np.asarray(jax.jit(lambda im: F.cover_and_stride(_position_model, im, patch=PATCH, stride=stride))(
        _coordinate_image()))[0]
    n = SIZE // stride
    assert out.shape == (n, n, 3)
    # a token's window is centred on its output cell: mean pixel index s·R + s/2 − 0.5 (half a pixel off when
    # p − s is odd); only windows fully inside the image have that mean (padding truncates the others)
    full = out[..., 2] == PATCH * PATCH
    assert full.sum() >= (n - PATCH // stride) ** 2
    centre = stride * np.arange(n) + stride / 2 - 0.5 + (0.5 if (PATCH - stride) % 2 else 0.0)
    np.testing.assert_allclose(out[..., 0][full], np.broadcast_to(centre[:, None], (n, n))[full], atol=1e-5)
    np.testing.assert_allclose(out[..., 1][full], np.broadcast_to(centre[None, :], (n, n))[full], atol=1e-5)


def test_offsets():
    assert F.shift_offsets(8, 8) == (0,)
    assert F.shift_offsets(8, 4) == (-2, 2)
    assert F.shift_offsets(8, 2) == (-3, -1, 1, 3)
    for bad in (0, 3, 5, 16):
        with pytest.raises(F.StrideError, match='must divide the patch size 8'):
            F.check_stride(8, bad)


def test_stride_equal_to_patch_is_the_plain_forward():
    enc = ViT(32, 2, 2, 4.0, PATCH, SIZE)
    params = enc.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))['params']
    images = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    got = F.dense_features(params, None, images, encoder=enc, stride=PATCH)
    from sce_mae_jax.data.pipeline import normalize
    want = enc.apply({'params': params}, normalize(images))['tokens'].reshape(2, 12, 12, 32)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # a block's output equals the full forward's captured layer
    got1 = F.token_map(enc, params, normalize(images), block=0)
    want1 = enc.apply({'params': params}, normalize(images), capture=(0,))['layers'][0].reshape(2, 12, 12, 32)
    np.testing.assert_allclose(np.asarray(got1), np.asarray(want1), atol=1e-6)


@pytest.mark.parametrize('stride', [8, 4])
def test_upsampled_map_puts_each_descriptor_at_its_pixels(stride):
    """A stride-s map of cell-centre coordinates, upsampled to 96 px, reads each pixel's own coordinate."""
    n = SIZE // stride
    centre = stride * np.arange(n) + stride / 2 - 0.5
    m = np.stack(np.meshgrid(centre, centre, indexing='ij'), -1)[None].astype(np.float32)
    up = np.asarray(F.upsample(jnp.asarray(m), SIZE))[0]
    inner = slice(stride, SIZE - stride)  # bilinear extrapolation clamps at the outer half cells
    np.testing.assert_allclose(up[inner, inner, 0], np.arange(SIZE)[inner, None].repeat(SIZE - 2 * stride, 1),
                               atol=1e-4)
    np.testing.assert_allclose(up[inner, inner, 1], np.arange(SIZE)[None, inner].repeat(SIZE - 2 * stride, 0),
                               atol=1e-4)


def test_projector_runs_after_upsampling():
    """The spatial softmax of CL's projector sums to 1 over the map it is applied to: the 96x96 one."""
    from sce_mae_jax.models.heads import Projector
    enc = ViT(32, 2, 2, 4.0, PATCH, SIZE)
    params = enc.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))['params']
    proj = Projector(16)
    pp = proj.init(jax.random.PRNGKey(1), jnp.zeros((1, 144, 32)))['params']
    images = np.random.default_rng(1).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    out = np.asarray(F.dense_features(params, pp, images, encoder=enc, projector=proj, stride=4, size=SIZE))
    assert out.shape == (2, SIZE, SIZE, 16)
    np.testing.assert_allclose(out.sum(axis=(1, 2)), 1.0, rtol=1e-4)
    both = np.asarray(F.dense_features(params, pp, images, encoder=enc, projector=proj, stride=4, size=SIZE,
                                       concat=True))
    assert both.shape == (2, SIZE, SIZE, 48)
    np.testing.assert_allclose(np.linalg.norm(both[..., :32], axis=-1), 1.0, rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(both[..., 32:], axis=-1), 1.0, rtol=1e-4)
