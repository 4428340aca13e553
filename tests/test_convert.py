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

    from sce_mae_jax.errors import ConfigError
    from sce_mae_jax.train.checkpoints import load_params
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


# ---------------------------------------------------------------------------------------------- export to PyTorch
def _tiny_mae():
    import jax

    from sce_mae_jax.models.mae import MAE
    model = MAE(embed_dim=D, depth=DEPTH, num_heads=H, decoder_embed_dim=16, decoder_depth=2, decoder_num_heads=2)
    params = jax.jit(model.init)({'params': jax.random.PRNGKey(0), 'masking': jax.random.PRNGKey(1)},
                                 jnp.zeros((1, 96, 96, 3)))['params']
    # perturb every leaf: initial values (zeros, ones, sin-cos tables) would hide a swapped or transposed leaf
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(3)
    return model, jax.tree.unflatten(tree, [np.asarray(l) + 0.02 * rng.normal(size=l.shape).astype(np.float32)
                                            for l in leaves])


def _official_keys(depth, decoder_depth):
    """MaskedAutoencoderViT.state_dict() keys (facebookresearch/mae models_mae.py with timm's Block)."""
    block = ['norm1.weight', 'norm1.bias', 'attn.qkv.weight', 'attn.qkv.bias', 'attn.proj.weight', 'attn.proj.bias',
             'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias']
    keys = ['cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias', 'norm.weight', 'norm.bias',
            'mask_token', 'decoder_pos_embed', 'decoder_embed.weight', 'decoder_embed.bias', 'decoder_norm.weight',
            'decoder_norm.bias', 'decoder_pred.weight', 'decoder_pred.bias']
    keys += [f'blocks.{i}.{k}' for i in range(depth) for k in block]
    keys += [f'decoder_blocks.{i}.{k}' for i in range(decoder_depth) for k in block]
    return sorted(keys)


def test_mae_to_torch_is_the_inverse_of_the_importer():
    import jax

    from sce_mae_jax.convert import mae_to_torch
    _, params = _tiny_mae()
    sd = mae_to_torch(params)
    assert sorted(sd) == _official_keys(DEPTH, 2)
    assert sd['patch_embed.proj.weight'].shape == (D, 3, P, P) and sd['blocks.0.attn.qkv.weight'].shape == (3 * D, D)
    assert sd['decoder_embed.weight'].shape == (16, D) and sd['decoder_pred.weight'].shape == (P * P * 3, 16)
    back = mae_from_torch(sd)
    assert jax.tree.structure(back) == jax.tree.structure(jax.tree.map(np.asarray, params))
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))
    # the encoder part alone goes to an encoder-only state dict, which the importer reads back as ViT params
    enc = mae_to_torch(params['encoder'])
    assert not any(k.startswith(('decoder', 'mask_token')) for k in enc)
    jax.tree.map(np.testing.assert_array_equal, mae_from_torch(enc), jax.tree.map(np.asarray, params['encoder']))


def test_exported_state_dict_loads_strictly_into_the_official_layout_and_runs_the_same(tmp_path):
    """PyTorch (the optional `torch` extra): the state dict, saved as a .pth the way export --format=torch
    writes it, loads with strict=True into a module of MaskedAutoencoderViT's layout, whose forward (same
    masking noise) gives our loss and reconstruction."""
    torch = pytest.importorskip('torch')
    from torch import nn

    from sce_mae_jax.convert import load_torch_state_dict, mae_to_torch, save_torch_state_dict

    class Block(nn.Module):  # timm's Block, as models_mae.py builds it (qkv_bias=True, LayerNorm eps 1e-6)
        def __init__(self, dim, heads):
            super().__init__()
            self.heads = heads
            self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
            self.attn = nn.Module()
            self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.mlp = nn.Module()
            self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

        def forward(self, x):
            b, n, c = x.shape
            qkv = self.attn.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            a = (qkv[0] @ qkv[1].transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
            x = x + self.attn.proj((a @ qkv[2]).transpose(1, 2).reshape(b, n, c))
            return x + self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(self.norm2(x))))

    class MaskedAutoencoderViT(nn.Module):
        def __init__(self, dim, depth, heads, ddim, ddepth, dheads, n=144):
            super().__init__()
            self.patch_embed = nn.Module()
            self.patch_embed.proj = nn.Conv2d(3, dim, P, P)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim), requires_grad=False)
            self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
            self.norm = nn.LayerNorm(dim, eps=1e-6)
            self.decoder_embed = nn.Linear(dim, ddim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, ddim))
            self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, ddim), requires_grad=False)
            self.decoder_blocks = nn.ModuleList([Block(ddim, dheads) for _ in range(ddepth)])
            self.decoder_norm = nn.LayerNorm(ddim, eps=1e-6)
            self.decoder_pred = nn.Linear(ddim, P * P * 3)

        def forward(self, imgs, noise, mask_ratio=0.75):  # models_mae.py's forward_encoder / forward_decoder
            x = self.patch_embed.proj(imgs).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
            b, n, d = x.shape
            keep = int(n * (1 - mask_ratio))
            ids_shuffle = torch.argsort(noise, dim=1)
            ids_restore = torch.argsort(ids_shuffle, dim=1)
            x = torch.gather(x, 1, ids_shuffle[:, :keep, None].repeat(1, 1, d))
            mask = torch.ones(b, n)
            mask[:, :keep] = 0
            mask = torch.gather(mask, 1, ids_restore)
            x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1), x], 1)
            for blk in self.blocks:
                x = blk(x)
            x = self.decoder_embed(self.norm(x))
            tokens = torch.cat([x[:, 1:], self.mask_token.repeat(b, n + 1 - x.shape[1], 1)], 1)
            tokens = torch.gather(tokens, 1, ids_restore[..., None].repeat(1, 1, x.shape[2]))
            x = torch.cat([x[:, :1], tokens], 1) + self.decoder_pos_embed
            for blk in self.decoder_blocks:
                x = blk(x)
            pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
            target = imgs.reshape(b, 3, 12, P, 12, P).permute(0, 2, 4, 3, 5, 1).reshape(b, n, -1)  # patchify
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            loss = (((pred - (target - mean) / (var + 1e-6) ** 0.5) ** 2).mean(-1) * mask).sum() / mask.sum()
            return loss, pred, mask

    model, params = _tiny_mae()
    path = str(tmp_path / 'mae.pth')
    save_torch_state_dict(mae_to_torch(params), path)
    official = MaskedAutoencoderViT(D, DEPTH, H, 16, 2, 2)
    official.load_state_dict({k: v for k, v in load_torch_state_dict(path).items()}, strict=True)
    rng = np.random.default_rng(4)
    img = rng.normal(size=(2, 96, 96, 3)).astype(np.float32)
    noise = rng.uniform(size=(2, 144)).astype(np.float32)
    loss, pred, mask = model.apply({'params': params}, jnp.asarray(img), noise=jnp.asarray(noise))
    with torch.no_grad():
        t_loss, t_pred, t_mask = official(torch.from_numpy(img.transpose(0, 3, 1, 2).copy()), torch.from_numpy(noise))
    np.testing.assert_array_equal(np.asarray(mask), t_mask.numpy())
    np.testing.assert_allclose(np.asarray(pred), t_pred.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(float(loss), float(t_loss), rtol=1e-4)
