"""PyTorch import: a state dict in facebookresearch/mae layout, run through a NumPy re-implementation of the
PyTorch forward (NCHW conv patch embedding, fused qkv split as (3, heads, head_dim)), must give our output."""
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from sce_mae_jax.convert import mae_from_torch
from sce_mae_jax.models.vit import ViT

D, H, DEPTH, P = 32, 2, 2, 8


def _torch_layout_state_dict(rng):
    sd = {'cls_token': rng.normal(size=(1, 1, D)), 'pos_embed': rng.normal(size=(1, 145, D)),
          'patch_embed.proj.weight': rng.normal(size=(D, 3, P, P)) * 0.05, 'patch_embed.proj.bias': rng.normal(size=D),
          'norm.weight': rng.normal(size=D), 'norm.bias': rng.normal(size=D)}
    for i in range(DEPTH):
        b = f'blocks.{i}'
        for n in ('norm1', 'norm2'):
            sd[f'{b}.{n}.weight'], sd[f'{b}.{n}.bias'] = 1 + 0.1 * rng.normal(size=D), 0.1 * rng.normal(size=D)
        for n, (o, i_) in {'attn.qkv': (3 * D, D), 'attn.proj': (D, D), 'mlp.fc1': (4 * D, D), 'mlp.fc2': (D, 4 * D)}.items():
            sd[f'{b}.{n}.weight'] = rng.normal(size=(o, i_)) / np.sqrt(i_)
            sd[f'{b}.{n}.bias'] = 0.1 * rng.normal(size=o)
    return {k: v.astype(np.float32) for k, v in sd.items()}


def _ln(x, w, b):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6) * w + b


def _torch_forward(sd, img_nchw):
    b = img_nchw.shape[0]
    w = sd['patch_embed.proj.weight']
    patches = img_nchw.reshape(b, 3, 12, P, 12, P)  # conv with stride = kernel = P
    x = np.einsum('bcyixj,dcij->byxd', patches, w).reshape(b, 144, D) + sd['patch_embed.proj.bias']
    x = x + sd['pos_embed'][:, 1:]
    x = np.concatenate([np.broadcast_to(sd['cls_token'] + sd['pos_embed'][:, :1], (b, 1, D)), x], 1)
    for i in range(DEPTH):
        p = lambda n: sd[f'blocks.{i}.{n}']
        h = _ln(x, p('norm1.weight'), p('norm1.bias'))
        qkv = (h @ p('attn.qkv.weight').T + p('attn.qkv.bias')).reshape(b, 145, 3, H, D // H).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv
        a = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D // H)
        a = np.exp(a - a.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = (a @ v).transpose(0, 2, 1, 3).reshape(b, 145, D)
        x = x + o @ p('attn.proj.weight').T + p('attn.proj.bias')
        h = _ln(x, p('norm2.weight'), p('norm2.bias')) @ p('mlp.fc1.weight').T + p('mlp.fc1.bias')
        h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
        x = x + h @ p('mlp.fc2.weight').T + p('mlp.fc2.bias')
    return _ln(x, sd['norm.weight'], sd['norm.bias'])


def test_encoder_import_matches_pytorch_semantics():
    rng = np.random.default_rng(0)
    sd = _torch_layout_state_dict(rng)
    params = mae_from_torch(sd)
    img = rng.normal(size=(2, 3, 96, 96)).astype(np.float32)
    ours = ViT(embed_dim=D, depth=DEPTH, num_heads=H).apply({'params': params}, jnp.asarray(img.transpose(0, 2, 3, 1)))
    ref = _torch_forward({k: v.astype(np.float64) for k, v in sd.items()}, img.astype(np.float64))
    np.testing.assert_allclose(np.asarray(ours['tokens']), ref[:, 1:], rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(np.asarray(ours['cls']), ref[:, 0], rtol=2e-4, atol=2e-4)


def test_not_a_mae_state_dict_is_a_clear_error():
    with pytest.raises(ValueError, match='patch_embed.proj.weight'):
        mae_from_torch({'fc.weight': np.zeros((2, 2))})


def test_converted_checkpoint_is_what_init_from_loads(tmp_path):
    import ml_collections

    from sce_mae_jax.train.common import ConfigError, load_params
    from sce_mae_jax.convert import write_checkpoint

    sd = _torch_layout_state_dict(np.random.default_rng(1))
    config = ml_collections.ConfigDict({'model': dict(embed_dim=D, depth=DEPTH, num_heads=H, patch_size=8,
                                                      image_size=96, decoder_embed_dim=32, decoder_depth=1,
                                                      decoder_num_heads=2)})
    write_checkpoint(mae_from_torch(sd), config, str(tmp_path / 'conv'))
    params = load_params(str(tmp_path / 'conv'))
    np.testing.assert_array_equal(params['encoder']['blocks_1']['mlp']['fc2']['bias'], sd['blocks.1.mlp.fc2.bias'])
    config.model.embed_dim = 64
    with pytest.raises(ConfigError, match='does not fit config.model'):
        write_checkpoint(mae_from_torch(sd), config, str(tmp_path / 'conv2'))
