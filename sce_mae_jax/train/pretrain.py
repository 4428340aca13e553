"""Stage 1: MAE pretraining. One pure step jitted over the mesh, and the loop around it.

    python -m sce_mae_jax.main --config=configs/mae_deit_s.py --workdir=DIR
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import optax
from absl import logging

from sce_mae_jax import fileio, figures, workdir as workdir_lib
from sce_mae_jax.data import device_augment as device_augment_lib, pipeline
from sce_mae_jax.errors import ConfigError
from sce_mae_jax.models.mae import MAE, encoder_from_model_config
from sce_mae_jax.models.vit import patchify, unpatchify
from sce_mae_jax.train import checkpoints, common, monitor as monitor_lib, optim


# ---------------------------------------------------------------------------------------------- model & optimiser
def build(config, dataset_len: int):
    """(model, optimiser, schedule, total_steps) for a config."""
    model = MAE(**config.model)
    total, warmup = optim.steps_for(config, dataset_len)
    lr = config.base_lr * config.batch_size / 256  # the MAE linear scaling rule
    schedule = optim.warmup_cosine(lr, total, warmup)
    tx = optim.mae_optimizer(schedule, config.weight_decay, config.b1, config.b2)
    return model, tx, schedule, total


def state_and_step(config, mesh, dataset_len: int):
    """The replicated initial state and the step jitted over `mesh` (batch on `data`, state donated): what
    training runs and what `bench.py` times. Returns (model, tx, total_steps, state, state_sharding, step)."""
    repl, data_sh = common.replicated(mesh), common.data_sharded(mesh)
    model, tx, schedule, total_steps = build(config, dataset_len)
    init = functools.partial(init_state, model, tx, config.seed)
    state_sh = jax.tree.map(lambda _: repl, jax.eval_shape(init))
    state = jax.jit(init, out_shardings=state_sh)()
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=schedule, augment=device_augment(config)),
                   in_shardings=(state_sh, data_sh), out_shardings=(state_sh, repl), donate_argnums=0)
    return model, tx, total_steps, state, state_sh, step


def init_state(model, tx, seed: int):
    """{'step', 'params', 'opt_state', 'rng'}: a plain pytree so orbax and jit treat it as data."""
    rng = jax.random.PRNGKey(seed)
    size = model.image_size
    params = model.init({'params': jax.random.fold_in(rng, 0), 'masking': jax.random.fold_in(rng, 1)},
                        jnp.zeros((1, size, size, 3), jnp.float32))['params']
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
            'rng': jax.random.fold_in(rng, 2)}


def device_augment(config):
    """`fn(key, images)` of `input.device_augment` (the crop, resize and flip in the step), else None."""
    if not config.input.device_augment:
        return None
    return functools.partial(device_augment_lib.pretrain, size=config.model.image_size,
                             scale=tuple(config.input.crop_scale), flip=config.input.flip)


def host_transform(config):
    """The per-example transform of the input pipeline: the whole augmentation, or none of it when the step
    augments on the devices."""
    if config.input.device_augment:
        return None  # the image as read
    return pipeline.pretrain_augment(config.model.image_size, config.input.crop_scale, config.input.flip)


# ---------------------------------------------------------------------------------------------- the step
def train_step(state, batch, *, model, tx, schedule, augment=None):
    """One MAE update on a global batch of uint8 images. Pure; masking noise (and, with `augment`, every crop
    and flip) is a function of (rng, step), so the same step gives the same mask whatever the device count or a
    resume."""
    rng = jax.random.fold_in(state['rng'], state['step'])
    images = batch['image']
    if augment is not None:
        images = augment(jax.random.fold_in(rng, 1), images)
    images = pipeline.normalize(images)

    def loss_fn(params):
        loss, _, _ = model.apply({'params': params}, images, rngs={'masking': rng})
        return loss

    loss, grads = jax.value_and_grad(loss_fn)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'lr': schedule(state['step'])}
    return {**state, 'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}, metrics


def reconstruct(params, images_uint8, rng, *, model):
    """(images, masked images, reconstruction with visible patches pasted back), all normalised floats."""
    images = pipeline.normalize(images_uint8)
    _, pred, mask = model.apply({'params': params}, images, rngs={'masking': rng})
    p, g = model.patch_size, model.image_size // model.patch_size
    target = patchify(images, p)
    if model.norm_pix_loss:  # predictions are in per-patch normalised units: undo with the true patch stats
        mean = target.mean(-1, keepdims=True)
        std = jnp.sqrt(target.var(-1, keepdims=True, ddof=1) + 1e-6)
        pred = pred * std + mean
    m = mask[..., None]
    masked = unpatchify(target * (1 - m), p, g, g)
    recon = unpatchify(target * (1 - m) + pred * m, p, g, g)
    return images, masked, recon


# ---------------------------------------------------------------------------------------------- loop
def train(config, workdir: str) -> dict:
    from sce_mae_jax.data.sources import get_source

    workdir_lib.prepare_workdir(workdir, config)
    mesh = common.make_mesh()
    common.check_batch_size(config.batch_size)
    repl, data_sh = common.replicated(mesh), common.data_sharded(mesh)

    source = get_source(config.data, config.get('split', 'pretrain'), manual_dir=config.manual_dir or None,
                        data_dir=config.data_dir or None, seed=config.data_seed)
    it = pipeline.train_iterator(source, global_batch=config.batch_size, seed=config.seed,
                                 transform=host_transform(config), num_workers=config.input.workers,
                                 num_threads=config.input.read_threads)

    model, tx, total_steps, state, state_sh, step_fn = state_and_step(config, mesh, len(source))
    logging.info('model: %s parameters (encoder %s)', f'{common.tree_size(state["params"]):,}',
                 f'{common.tree_size(state["params"]["encoder"]):,}')

    if config.init_from and not checkpoints.has_checkpoint(workdir):  # a resume takes precedence
        params = checkpoints.load_params(config.init_from)
        bad = checkpoints.shape_mismatches(params, state['params'])
        if bad:
            raise ConfigError(f'init_from={config.init_from} does not fit config.model: ' + '; '.join(bad[:6]))
        params = common.replicate(params, mesh)
        state = {**state, 'params': params,
                 'opt_state': jax.jit(tx.init, out_shardings=state_sh['opt_state'])(params)}

    # Every process joins this call (the params span all hosts); only process 0 writes the PNG.
    recon_fn = jax.jit(functools.partial(reconstruct, model=model), out_shardings=repl)

    def figure_fn(step, state, batch):
        images = batch['image'][:8]
        if images.shape[1] != model.image_size:  # device_augment: the batch is as read; show its centre
            images = device_augment_lib.center_crop(images, model.image_size)
        rows = recon_fn(state['params'], images, jax.random.PRNGKey(step))
        if jax.process_index() == 0:
            fileio.makedirs(os.path.join(workdir, 'figures'))
            figures.save_reconstruction_png(os.path.join(workdir, 'figures', f'recon_{step:07d}.png'), rows)

    monitor = monitor_lib.build(config, encoder_from_model_config(config.model), mesh, total_steps)
    return common.train_loop(config, workdir, state=state, state_sharding=state_sh, step_fn=step_fn, data_iter=it,
                             batch_sharding=data_sh, total_steps=total_steps, figure_fn=figure_fn,
                             monitor_fn=monitor and (lambda state: monitor(state['params']['encoder'])))
