"""A model from a workdir: the one loader of every job that reads a trained (or untrained) stage 1 or stage 2.

    config(workdir)           the training config.json a workdir holds
    encoder_of(workdir)       the bare ViT of a stage-1 or stage-2 workdir (its `config.model`)
    encoder_params(source)    encoder parameters from a stage-1 workdir, a converted PyTorch checkpoint, or
                              `random_init` (MAE's initialisers, seeded): the frozen backbone of stage 2 and
                              the `mae` / `random_init` rows
    stage2(workdir)           a stage-2 workdir's frozen backbone, projector module and projector parameters
    exported_stage(path)      the stage folder of a directory written by `python -m sce_mae_jax.export`
Every problem is one `ConfigError` line naming the workdir and what to pass instead.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from sce_mae_jax import fileio
from sce_mae_jax.errors import ConfigError
from sce_mae_jax.models.heads import Projector
from sce_mae_jax.models.mae import RANDOM_INIT, encoder_from_model_config, random_encoder_params
from sce_mae_jax.models.vit import ViT
from sce_mae_jax.train import checkpoints


def config(workdir: str, what: str) -> dict:
    path = os.path.join(workdir, 'config.json')
    if not fileio.exists(path):
        raise ConfigError(f'{what}={workdir} is not a training workdir (no config.json); pass the --workdir a '
                          f'training job wrote')
    return json.loads(fileio.read_text(path))


def stage2(workdir: str, what: str, encoder: ViT) -> tuple[dict, dict, Projector, dict]:
    """(its config, backbone params, projector module, projector params) of a stage-2 workdir."""
    cfg = config(workdir, what)
    if cfg.get('job') != 'carb' or 'projector' not in cfg:
        raise ConfigError(f'{what}={workdir} is a {cfg.get("job")!r} workdir, not a stage-2 (carb) one; pass the '
                          'workdir of configs/carb_deit_*.py (or the stage2/ folder of a pipeline run)')
    saved = os.path.join(fileio.resolve(workdir), 'backbone')
    if not fileio.isdir(saved):
        raise ConfigError(f'{what}={workdir} has no backbone/ (stage 2 writes it before its first step); was the '
                          'run started?')
    backbone = checkpoints.restore_tree(saved)
    expected = jax.eval_shape(encoder.init, jax.random.PRNGKey(0),
                              jnp.zeros((1, encoder.image_size, encoder.image_size, 3)))['params']
    bad = checkpoints.shape_mismatches(backbone, expected)
    if bad:
        raise ConfigError(f'{what}={workdir}: its backbone is another architecture than the stage-1 model '
                          f'({"; ".join(bad[:3])}); pass the stage-1 workdir it was trained on')
    params = checkpoints.load_params(workdir)
    # workdirs from before the softmax default were trained with the plain linear map
    pc = {'activation': 'linear', **cfg['projector']}
    fields = {f.name for f in dataclasses.fields(Projector)} - {'parent', 'name'}
    unknown = sorted(set(pc) - fields)
    if unknown:
        raise ConfigError(f'{what}={workdir}: its config.json has projector fields {unknown} this version does not '
                          f'know ({sorted(fields)}); evaluate it with the version that trained it')
    projector = Projector(**{**pc, 'hidden': tuple(pc.get('hidden', ()))})
    return cfg, jax.tree.map(np.asarray, backbone), projector, params


EXPORTED = 'model.json'  # marks a directory written by `python -m sce_mae_jax.export`


def exported_stage(path: str, stage: str) -> str:
    """`path`, or its `stage` folder ('stage1', 'stage2') when it is an exported model: an export holds both
    stages, so one directory serves --config.stage1 and --config.stage2."""
    if path and fileio.exists(os.path.join(path, EXPORTED)):
        inner = os.path.join(path, stage)
        if not fileio.exists(os.path.join(inner, 'config.json')):
            raise ConfigError(f'{path} is an exported model without {stage}/ (its workdir had none)')
        return inner
    return path


def encoder_of(workdir: str, what: str) -> ViT:
    """The bare encoder of a stage-1 or stage-2 workdir, from its config.json's `model`."""
    return encoder_from_model_config(config(workdir, what)['model'])


def encoder_params(source: str, encoder: ViT, seed: int = 0) -> dict:
    """Encoder parameters (float32 NumPy) from a stage-1 workdir or a converted checkpoint (its MAE's `encoder`
    part, or the whole tree for an encoder-only one), or with `source='random_init'` freshly initialised with
    `seed`: the same for the same seed, so the `random_init` row and the `random_init_carb` control share them."""
    if source == RANDOM_INIT:
        return random_encoder_params(encoder, seed)
    params = checkpoints.load_params(source)
    return jax.tree.map(lambda a: np.asarray(a, np.float32), params.get('encoder', params))
