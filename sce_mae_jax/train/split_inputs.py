"""What an attentive split reads besides the backbone (splits.py), made once per stage-2 run and kept in
`workdir/split`, so that a resumed run splits exactly as the first did: split=cls_debiased's per-position CLS
prior, split=recon's stage-1 decoder. The premise diagnostic (evals/attentive.py) makes the same inputs here.
"""
from __future__ import annotations

import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from sce_mae_jax import carb, fileio
from sce_mae_jax.data import pipeline
from sce_mae_jax.models.mae import MAE, RANDOM_INIT
from sce_mae_jax.models.vit import ViT
from sce_mae_jax.train import common
from sce_mae_jax.errors import ConfigError
from sce_mae_jax.train import checkpoints

SPLIT_DIR = 'split'
MAE_FIELDS = ('decoder_embed_dim', 'decoder_depth', 'decoder_num_heads', 'mask_ratio', 'norm_pix_loss')


def estimate_cls_prior(backbone, source, *, encoder: ViT, layer: int, num_images: int, batch_size: int,
                       mesh) -> np.ndarray:
    """(N,) mean CLS similarity (eq. 1) at `layer` over the first `num_images` of `source` (centre crop, no
    flip): the prior of split=cls_debiased. One jitted reduction over the mesh, the last batch masked."""
    repl, data_sh = common.replicated(mesh), common.data_sharded(mesh)

    def sums(bb, batch):
        images = pipeline.normalize(batch['image'], encoder.dtype)
        logits = encoder.apply({'params': bb}, images, capture=(layer,))['cls_logits'][layer]
        w = batch['_mask'].astype(jnp.float32)
        return jnp.sum(carb.cls_similarity(logits) * w[:, None], axis=0), jnp.sum(w)

    fn = jax.jit(sums, in_shardings=(repl, data_sh), out_shardings=repl)
    it, num_batches = pipeline.eval_iterator(grain.MapDataset.source(source)[:num_images], global_batch=batch_size,
                                             transform=pipeline.eval_transform(encoder.image_size))
    total, count = 0.0, 0.0
    for _ in range(num_batches):
        local = next(it)
        s, c = fn(backbone, common.global_batch({'image': local['image'], '_mask': local['_mask']}, data_sh))
        total, count = total + np.asarray(s), count + float(c)
    return (total / max(count, 1.0)).astype(np.float32)


def stage1_decoder(config) -> tuple[dict, dict]:
    """(decoder parameters, MAE model fields) of the stage-1 MAE in `init_from`, for split=recon. With
    init_from=random_init the whole MAE is untrained: a decoder of `carb.untrained_decoder`'s fields initialised
    with `config.seed` (the pipeline copies stage 1's fields there, so the control matches its stage 1)."""
    if config.init_from == RANDOM_INIT:
        fields = {k: config.carb.untrained_decoder[k] for k in MAE_FIELDS}
        m = config.model
        mae = MAE(m.embed_dim, m.depth, m.num_heads, m.mlp_ratio, m.patch_size, m.image_size, **fields)
        size = m.image_size
        params = jax.jit(mae.init)(jax.random.PRNGKey(config.seed), jnp.zeros((1, size, size, 3)),
                                   noise=jnp.zeros((1, mae.grid ** 2)))['params']
        return jax.tree.map(np.asarray, {k: v for k, v in params.items() if k != 'encoder'}), fields
    params = checkpoints.load_params(config.init_from)
    decoder = {k: v for k, v in params.items() if k != 'encoder'}
    cfg_path = os.path.join(fileio.resolve(config.init_from), 'config.json')
    if 'encoder' not in params or not decoder or not fileio.exists(cfg_path):
        raise ConfigError(f'carb.split=recon needs the stage-1 MAE decoder and its config.json in '
                                 f'init_from={config.init_from} (a stage-1 workdir); this one has '
                                 f'{"no decoder" if not decoder else "no config.json"}; choose another carb.split')
    model = json.loads(fileio.read_text(cfg_path))['model']
    missing = [k for k in MAE_FIELDS if k not in model]
    if missing:
        raise ConfigError(f'{cfg_path} lacks the MAE fields {missing}: is init_from a stage-1 workdir?')
    return decoder, {k: model[k] for k in MAE_FIELDS}


def prepare_split(config, workdir: str, source, *, encoder: ViT, backbone, mesh) -> tuple[dict, MAE | None]:
    """What the attentive split reads besides the backbone, made once and kept in `workdir/split` so that a
    resumed run splits exactly as the first did: cls_debiased's per-position prior (from the first
    `carb.prior_images` training images) or recon's stage-1 decoder. → (split_aux replicated, frozen MAE or None);
    ({}, None) for the criteria that need nothing."""
    cc = config.carb
    split = cc.get('split', 'cls')
    if split not in ('cls_debiased', 'recon'):
        return {}, None
    path = os.path.join(fileio.resolve(workdir), SPLIT_DIR)
    meta_path, aux_path = os.path.join(path, 'split.json'), os.path.join(path, 'aux')
    if fileio.exists(meta_path):
        meta = json.loads(fileio.read_text(meta_path))
        if meta['split'] != split:
            raise ConfigError(f'{workdir} was trained with carb.split={meta["split"]}, not {split}; '
                                     'use a new workdir to change the split')
        aux = checkpoints.restore_tree(aux_path)
    else:
        if split == 'cls_debiased':
            aux = {'prior': estimate_cls_prior(backbone, source, encoder=encoder, layer=cc.layer,
                                               num_images=cc.prior_images, batch_size=config.batch_size, mesh=mesh)}
            meta = {'split': split, 'prior_images': min(cc.prior_images, len(source)), 'layer': cc.layer}
            logging.info('split=cls_debiased: CLS prior at block %d from %d images (max/mean %.1f)', cc.layer,
                         meta['prior_images'], aux['prior'].max() / aux['prior'].mean())
        else:
            decoder, model = stage1_decoder(config)
            aux, meta = {'decoder': decoder}, {'split': split, 'model': model, 'init_from': config.init_from}
        aux = jax.tree.map(lambda a: np.asarray(a, np.float32), aux)
        if jax.process_index() == 0 and fileio.exists(aux_path):
            fileio.rmtree(aux_path)  # left by a run stopped before split.json, the commit mark, was written
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(aux_path, aux)
        ckptr.wait_until_finished()
        if jax.process_index() == 0:
            fileio.write_text(meta_path, json.dumps(meta, indent=2))
    mae = None
    if split == 'recon':
        m = config.model
        mae = MAE(m.embed_dim, m.depth, m.num_heads, m.mlp_ratio, m.patch_size, m.image_size, **meta['model'],
                  dtype=m.get('dtype', 'float32'))
    return common.replicate(aux, mesh), mae
