"""Import a facebookresearch/mae PyTorch checkpoint as a checkpoint stage 2 (or stage 1) can start from.

    python -m sce_mae_jax.convert --torch_checkpoint=mae_pretrain.pth --config=configs/mae_deit_s.py \\
        --workdir=workdirs/mae_deit_s_from_torch
    python -m sce_mae_jax.main --config=configs/carb_deit_s.py --config.init_from=workdirs/mae_deit_s_from_torch ...

`mae_from_torch(state_dict)` needs only NumPy arrays keyed as in `MaskedAutoencoderViT.state_dict()`;
PyTorch itself (the optional `torch` extra) is needed only to read a `.pth` file.
"""
from __future__ import annotations

import re

import numpy as np
from sce_mae_jax.errors import ConfigError
from sce_mae_jax.train import checkpoints
from sce_mae_jax import workdir as workdir_lib

_LINEARS = ('attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2')


def _block(sd: dict, prefix: str) -> dict:
    out = {'norm1': {'scale': sd[f'{prefix}.norm1.weight'], 'bias': sd[f'{prefix}.norm1.bias']},
           'norm2': {'scale': sd[f'{prefix}.norm2.weight'], 'bias': sd[f'{prefix}.norm2.bias']},
           'attn': {}, 'mlp': {}}
    for name in _LINEARS:
        group, leaf = name.split('.')
        # PyTorch Linear stores (out, in); a Dense kernel is (in, out). The fused qkv's output order
        # (3, heads, head_dim) is the order our Attention reshapes with, so one transpose suffices.
        out[group][leaf] = {'kernel': sd[f'{prefix}.{name}.weight'].T, 'bias': sd[f'{prefix}.{name}.bias']}
    return out


def _count(sd: dict, prefix: str) -> int:
    ids = {int(m.group(1)) for k in sd if (m := re.match(rf'{prefix}\.(\d+)\.', k))}
    return max(ids) + 1 if ids else 0


def mae_from_torch(state_dict: dict) -> dict:
    """facebookresearch/mae state dict (name → array) → our `MAE` params (or `ViT` params when the dict holds
    an encoder only). Arrays may be torch tensors or NumPy; the result is float32 NumPy."""
    sd = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, 'detach') else v, np.float32)
          for k, v in state_dict.items()}
    missing = [k for k in ('cls_token', 'pos_embed', 'patch_embed.proj.weight', 'norm.weight') if k not in sd]
    if missing:
        raise ValueError(f'not a facebookresearch/mae state dict: missing {missing}; expected keys like '
                         '"patch_embed.proj.weight", "blocks.0.attn.qkv.weight" (use checkpoint["model"])')
    w = sd['patch_embed.proj.weight']  # (D, 3, p, p) → (p·p·3, D) in our (row, column, channel) patch order
    encoder = {
        'patch_embed': {'kernel': w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]), 'bias': sd['patch_embed.proj.bias']},
        'cls_token': sd['cls_token'], 'pos_embed': sd['pos_embed'],
        'norm': {'scale': sd['norm.weight'], 'bias': sd['norm.bias']},
    }
    for i in range(_count(sd, 'blocks')):
        encoder[f'blocks_{i}'] = _block(sd, f'blocks.{i}')
    if 'decoder_embed.weight' not in sd:
        return encoder
    params = {
        'encoder': encoder, 'mask_token': sd['mask_token'], 'decoder_pos_embed': sd['decoder_pos_embed'],
        'decoder_embed': {'kernel': sd['decoder_embed.weight'].T, 'bias': sd['decoder_embed.bias']},
        'decoder_norm': {'scale': sd['decoder_norm.weight'], 'bias': sd['decoder_norm.bias']},
        'decoder_pred': {'kernel': sd['decoder_pred.weight'].T, 'bias': sd['decoder_pred.bias']},
    }
    for i in range(_count(sd, 'decoder_blocks')):
        params[f'decoder_blocks_{i}'] = _block(sd, f'decoder_blocks.{i}')
    return params


def _block_to_torch(p: dict, prefix: str) -> dict:
    out = {f'{prefix}.{n}.weight': p[n]['scale'] for n in ('norm1', 'norm2')}
    out.update({f'{prefix}.{n}.bias': p[n]['bias'] for n in ('norm1', 'norm2')})
    for name in _LINEARS:
        group, leaf = name.split('.')
        out[f'{prefix}.{name}.weight'] = p[group][leaf]['kernel'].T
        out[f'{prefix}.{name}.bias'] = p[group][leaf]['bias']
    return out


def mae_to_torch(params: dict) -> dict:
    """Inverse of `mae_from_torch`: our `MAE` params (or `ViT` params) → a `MaskedAutoencoderViT.state_dict()`
    (or its encoder part) as float32 NumPy arrays keyed as facebookresearch/mae names them."""
    p = params
    enc = p.get('encoder', p)
    kernel = np.asarray(enc['patch_embed']['kernel'], np.float32)   # (p·p·3, D), (row, column, channel) rows
    patch = int(round((kernel.shape[0] / 3) ** 0.5))
    sd = {'cls_token': enc['cls_token'], 'pos_embed': enc['pos_embed'],
          'patch_embed.proj.weight': kernel.reshape(patch, patch, 3, -1).transpose(3, 2, 0, 1),
          'patch_embed.proj.bias': enc['patch_embed']['bias'],
          'norm.weight': enc['norm']['scale'], 'norm.bias': enc['norm']['bias']}
    for i in range(_count_ours(enc, 'blocks')):
        sd.update(_block_to_torch(enc[f'blocks_{i}'], f'blocks.{i}'))
    if 'encoder' in params:
        sd.update({'mask_token': p['mask_token'], 'decoder_pos_embed': p['decoder_pos_embed'],
                   'decoder_norm.weight': p['decoder_norm']['scale'], 'decoder_norm.bias': p['decoder_norm']['bias']})
        for name in ('decoder_embed', 'decoder_pred'):
            sd[f'{name}.weight'], sd[f'{name}.bias'] = np.asarray(p[name]['kernel']).T, p[name]['bias']
        for i in range(_count_ours(p, 'decoder_blocks')):
            sd.update(_block_to_torch(p[f'decoder_blocks_{i}'], f'decoder_blocks.{i}'))
    return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in sd.items()}


def _count_ours(tree: dict, prefix: str) -> int:
    return sum(1 for k in tree if re.fullmatch(rf'{prefix}_\d+', k))


def save_torch_state_dict(state_dict: dict, path: str) -> None:
    """Writes `{'model': state_dict}` as torch tensors, the layout of the official MAE checkpoints (which
    `load_torch_state_dict` and facebookresearch/mae's own loaders read)."""
    try:
        import torch
    except ImportError as e:
        raise SystemExit('writing a .pth file needs PyTorch: pip install "sce_mae_jax[torch]" (or call '
                         'sce_mae_jax.convert.mae_to_torch, which returns NumPy arrays)') from e
    torch.save({'model': {k: torch.from_numpy(np.array(v, np.float32)) for k, v in state_dict.items()}}, path)


def load_torch_state_dict(path: str) -> dict:
    try:
        import torch
    except ImportError as e:
        raise SystemExit('reading a .pth file needs PyTorch: pip install "sce_mae_jax[torch]" '
                         '(or convert the state dict to NumPy elsewhere and call mae_from_torch)') from e
    ckpt = torch.load(path, map_location='cpu', weights_only=False)
    return ckpt.get('model', ckpt) if isinstance(ckpt, dict) else ckpt


def write_checkpoint(params: dict, config, workdir: str) -> str:
    """Checks `params` against `config.model` and writes them as step 0 of `workdir/checkpoints`."""
    import jax
    import jax.numpy as jnp
    from sce_mae_jax.models.mae import MAE

    model = MAE(**config.model)
    size = model.image_size
    expected = jax.eval_shape(lambda: model.init({'params': jax.random.PRNGKey(0), 'masking': jax.random.PRNGKey(1)},
                                                 jnp.zeros((1, size, size, 3))))['params']
    if 'encoder' not in params:  # encoder-only import: compare that part
        expected = expected['encoder']
    bad = checkpoints.shape_mismatches(params, expected)
    if bad:
        raise ConfigError('the PyTorch checkpoint does not fit config.model: ' + '; '.join(bad[:6]))
    workdir_lib.prepare_workdir(workdir, config)
    mngr = checkpoints.checkpoint_manager(workdir, max_to_keep=1, save_interval_steps=1, with_data_iter=False)
    state = {'params': params if 'encoder' in params else {'encoder': params}}
    checkpoints.save_checkpoint(mngr, 0, state, force=True)
    mngr.wait_until_finished()
    mngr.close()
    return mngr.directory


if __name__ == '__main__':
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file('config', None, 'Stage-1 config whose model the checkpoint holds.')
    flags.DEFINE_string('torch_checkpoint', None, 'Path to a facebookresearch/mae .pth file.')
    flags.DEFINE_string('workdir', None, 'Output directory (a workdir that init_from accepts).')

    def _main(argv):
        del argv
        from sce_mae_jax.errors import ConfigError
        f = flags.FLAGS
        try:
            out = write_checkpoint(mae_from_torch(load_torch_state_dict(f.torch_checkpoint)), f.config, f.workdir)
        except (ConfigError, ValueError) as e:
            raise SystemExit(f'error: {e}')
        print(f'wrote {out}')

    flags.mark_flags_as_required(['config', 'torch_checkpoint', 'workdir'])
    app.run(_main)
