"""Building blocks of the job configs in `configs/`: each config file is `get_config(arg)` over these.

`arg` is the text after ':' in `--config=configs/x.py:arg`, a comma-separated list of `key=value` pairs
(e.g. `data=synthetic`) that select variants; any single field is still changed with `--config.x=y`.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from sce_mae_jax.models.vit import DEIT

SIZES = {'t': 'tiny', 's': 'small', 'b': 'base'}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """'data=synthetic,size=s' → ConfigDict(data='synthetic', size='s'), with types taken from `defaults`."""
    out = dict(defaults)
    for item in filter(None, (arg or '').split(',')):
        key, _, value = item.partition('=')
        if key not in defaults:
            raise ValueError(f'unknown config argument {key!r}; known: {sorted(defaults)}')
        default = defaults[key]
        out[key] = type(default)(value) if default is not None and not isinstance(default, bool) else (
            value.lower() in ('1', 'true', 'yes') if isinstance(default, bool) else value)
    return ml_collections.ConfigDict(out)


def data_fields(c: ml_collections.ConfigDict, data: str) -> None:
    c.data = data            # dataset name: synthetic (embedded default), celeba, mafl, aflw_m, aflw_r, aflw_rc, 300w
    c.data_seed = 0          # seed of the synthetic generator (which faces exist), not of shuffling
    c.data_dir = ''          # where prepared TFDS datasets live (real data only)
    c.manual_dir = ''        # the user-prepared raw files (real data only; docs/datasets.md)


def run_fields(c: ml_collections.ConfigDict) -> None:
    c.seed = 0
    c.total_steps = config_dict.placeholder(int)  # when set, overrides epochs
    c.init_from = ''         # a workdir or checkpoint to start from
    c.log_every = 50
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.figure_every = 2000


def mae(size: str, arg: str | None) -> ml_collections.ConfigDict:
    """Stage-1 MAE pretraining with the paper's recipe (method.md §1)."""
    a = parse_arg(arg, data='synthetic')
    c = ml_collections.ConfigDict()
    c.job = 'pretrain'
    data_fields(c, a.data)
    c.split = 'pretrain'
    run_fields(c)
    c.batch_size = 512
    c.epochs = 400
    c.warmup_epochs = 40
    c.base_lr = 1.5e-4       # × batch_size / 256 (= 3e-4 at 512, the paper's value)
    c.weight_decay = 0.05
    c.b1, c.b2 = 0.9, 0.95
    c.model = dict(**DEIT[SIZES[size]], mlp_ratio=4.0, patch_size=8, image_size=96, decoder_embed_dim=512,
                   decoder_depth=8, decoder_num_heads=16, mask_ratio=0.75, norm_pix_loss=True, dtype='float32')
    c.input = dict(crop_scale=(0.2, 1.0), flip=True, workers=0)
    return c
