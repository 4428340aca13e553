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


# Stage-2 ablations of the paper (Table 4, S6) and the LEAD baseline (Tables S2/S3), as named presets:
# `configs/carb_deit_s.py:ablation=no_locality`. Each is only a change of the fields below.
ABLATIONS = {
    'none': {},
    'no_clustering': {'carb.clustering': False},                       # full correspondence over all N tokens
    'no_lcr': {'lcr.locality': 'linear', 'lcr.rep': (1.0, 1.0, 1.0)},  # CL's plain correspondence loss
    'no_locality': {'lcr.locality': 'none'},                           # repellence without f_loc
    'no_att_att': {'lcr.rep': (0.0, 5.0, 2.0)},                        # Table S6 rows
    'no_att_inatt': {'lcr.rep': (5.0, 0.0, 2.0)},
    'no_inatt_inatt': {'lcr.rep': (5.0, 5.0, 0.0)},
    'lead': {'carb.objective': 'lead', 'carb.clustering': False},      # LEAD's stage 2 on the same frozen ViT
}

PROJECTOR_TAU = {64: 1 / 8, 128: 1 / 7, 256: 1 / 7}  # CL's temperatures (method.md §2.6)


def carb(size: str, arg: str | None, *, dim: int, eta: float) -> ml_collections.ConfigDict:
    """Stage-2 CARB + LCR on a frozen stage-1 DeiT (method.md §2)."""
    a = parse_arg(arg, data='synthetic', dim=dim, ablation='none')
    if a.ablation not in ABLATIONS:
        raise ValueError(f'unknown ablation {a.ablation!r}; known: {sorted(ABLATIONS)}')
    c = ml_collections.ConfigDict()
    c.job = 'carb'
    data_fields(c, a.data)
    c.split = 'pretrain'     # stage 2 trains on the stage-1 images (CelebA), no labels
    run_fields(c)
    c.checkpoint_every = 500
    c.figure_every = 500
    # CL's projector recipe (method.md §2.7): Adam(0.5, 0.999), L2 5e-4, cosine, 10 epochs, batch 32.
    c.batch_size = 32
    c.epochs = 10
    c.warmup_epochs = 0
    c.lr = 1e-3
    c.b1, c.b2 = 0.5, 0.999
    c.weight_decay = 5e-4
    c.model = dict(**DEIT[SIZES[size]], mlp_ratio=4.0, patch_size=8, image_size=96, dtype='float32')
    c.projector = dict(out_dim=a.dim, hidden=(), kernel_size=1)
    c.carb = dict(
        objective='lcr',     # 'lcr' (SCE-MAE) or 'lead' (LEAD's correspondence-distribution matching)
        eta=eta,             # attentive rate η (eq. 1)
        layer=2,             # clustering after this 0-based block: "after the third encoder layer"
        num_clusters=4,      # K_c
        density_k=5,         # neighbours in the DPC-kNN density
        mode='B',            # 'B': substitute final features; 'A': later blocks see only CLS+attentive+centres
        clustering=True,     # False: full correspondence over all tokens
        gather_selected=True,  # compute the loss on the |T| selected tokens only (same value, less work)
    )
    c.lcr = dict(tau=PROJECTOR_TAU.get(a.dim, 1 / 7), rep=(5.0, 5.0, 2.0), locality='log')
    c.lead = dict(tau=0.05)
    c.input = dict(flip=False, workers=0)
    for key, value in ABLATIONS[a.ablation].items():
        group, field = key.split('.')
        c[group][field] = value
    return c
