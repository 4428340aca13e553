"""The landmark regressor of the detection jobs (paper 001 Table 2 and 3; method.md §4): its input per row, its
pure train/test steps, and one training with checkpoints, resumption and testing (`train_and_test`).

A `models.heads.Regressor` trains on a row's frozen dense features. The backbone and projector never train: they
are arguments of the jitted step, their forward runs under `stop_gradient`, and only the regressor has
parameters and optimiser state. The jobs that choose the rows, sets and seeds are in detection.py.

Regressor input per row kind (the map is H/s x W/s, s = `features.stride`, 48x48 at the default s = 2):
    projected   L2(stage-1 tokens) ⊕ L2(stage-2 projector output) by cover-and-stride (method.md §4)
    backbone    L2(stage-1 tokens) (`random_init`, `mae`)
    pixels      L2 of the raw normalised p x p pixel window of each cell, cut by the same cover-and-stride as
                the ViT's patches, so the regressor sees what a patch token is computed from, untransformed
    positions   L2 of the encoder's sin-cos position table (knows only where a cell is)

Coordinates: landmarks are xy pixels of the 96-px crop with pixel (r, c) centred at x = c, y = r (the
project's convention); the regressor works in [−1, 1] with u = 2(x + 0.5)/96 − 1 (`to_normalized`), i.e.
half-pixel centres, the convention of its soft-argmax grid (`heads.cell_centres`).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from sce_mae_jax import fileio, progress
from sce_mae_jax.data import pipeline
from sce_mae_jax.evals import features
from sce_mae_jax.evals.metrics import iod_error
from sce_mae_jax.evals.rows import Row
from sce_mae_jax.models.heads import Regressor
from sce_mae_jax.models.vit import ViT, patchify
from sce_mae_jax.train import common, optim
from sce_mae_jax.errors import ConfigError
from sce_mae_jax.train import checkpoints


# ---------------------------------------------------------------------------------------------- coordinates & loss
def to_normalized(points_px: jax.Array, size: int) -> jax.Array:
    """xy pixels of a `size`-px frame (pixel (r, c) centred at x = c, y = r) → [−1, 1]:
    u = 2(x + 0.5)/size − 1."""
    return 2.0 * (jnp.asarray(points_px, jnp.float32) + 0.5) / size - 1.0


def to_pixels(points: jax.Array, size: int) -> jax.Array:
    """Inverse of `to_normalized`: x = (u + 1)·size/2 − 0.5."""
    return (jnp.asarray(points, jnp.float32) + 1.0) * (size / 2.0) - 0.5


def smooth_l1(pred: jax.Array, target: jax.Array, *, scale: float = 10.0, beta: float = 1.0) -> jax.Array:
    """The detection loss: PyTorch's `smooth_l1_loss(scale·pred, scale·target, beta)` with mean reduction,
    0.5·d²/β where |d| < β, |d| − 0.5·β elsewhere, on coordinates scaled by 10 (method.md §4)."""
    d = jnp.abs(scale * (pred - target))
    return jnp.mean(jnp.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta))


# ---------------------------------------------------------------------------------------------- features
def pixel_windows(images: jax.Array, *, patch: int, stride: int) -> jax.Array:
    """Raw-pixel descriptors at the map resolution of the ViT rows: normalised (B, H, W, 3) →
    (B, H/s, W/s, 3·p²), each cell's p x p window (row, column, channel order), cut by cover-and-stride
    exactly where the ViT's patch token of that cell reads its pixels."""
    def windows(im):
        b, h, w, _ = im.shape
        return patchify(im, patch).reshape(b, h // patch, w // patch, -1)
    return features.cover_and_stride(windows, images, patch=patch, stride=stride)


def features_fn(row: Row, encoder: ViT, stride: int, block: int) -> Callable:
    """`fn(frozen, images_uint8) → (B, H/s, W/s, C)`, the regressor input of `row` (see the module docstring);
    `frozen` is {'backbone': ..., 'projector': ...}, the step argument."""
    if row.kind == 'positions':
        return lambda frozen, images: features.l2_normalize(features.position_features(
            encoder, images.shape[0], images.shape[1] // stride))
    if row.kind == 'pixels':
        return lambda frozen, images: features.l2_normalize(pixel_windows(
            pipeline.normalize(images), patch=encoder.patch_size, stride=stride))
    if row.kind == 'backbone':
        return lambda frozen, images: features.l2_normalize(features.dense_features(
            frozen['backbone'], None, images, encoder=encoder, stride=stride, block=block))
    # the projector was trained on the final tokens: its rows read those whatever `features.block` says
    return lambda frozen, images: features.dense_features(
        frozen['backbone'], frozen['projector'], images, encoder=encoder, projector=row.projector, stride=stride,
        block=-1, concat=True)


def frozen_of(row: Row) -> dict:
    return {'backbone': row.backbone, 'projector': row.proj_params}


# ---------------------------------------------------------------------------------------------- step functions
def init_state(regressor: Regressor, tx, seed, *, feature_shape):
    params = regressor.init(jax.random.PRNGKey(seed), jnp.zeros((1, *feature_shape[1:]), jnp.float32))['params']
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}


def train_step(state, frozen, batch, *, feats_fn, regressor, tx, schedule, size, loss_scale, iod_indices):
    """One regressor update on frozen features: features outside the gradient, Adam (+ L2) on the regressor."""
    feats = jax.lax.stop_gradient(feats_fn(frozen, batch['image']))
    target = to_normalized(batch['landmarks'], size)

    def loss_fn(params):
        pred = regressor.apply({'params': params}, feats)
        return smooth_l1(pred, target, scale=loss_scale), pred

    (loss, pred), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = jax.tree.map(lambda p, u: p + u, state['params'], updates)
    metrics = {'loss': loss, 'lr': schedule(state['step']), 'grad_norm': optax.tree.norm(grads),
               'train_error': iod_error(to_pixels(pred, size), batch['landmarks'], iod_indices).mean()}
    return {**state, 'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}, metrics


def predict(params, frozen, images, *, feats_fn, regressor, size):
    """uint8 (B, H, W, 3) → predicted landmarks (B, L, 2) in pixels of the `size` frame."""
    return to_pixels(regressor.apply({'params': params}, feats_fn(frozen, images)), size)


def eval_step(acc, params, frozen, batch, *, iod_indices, **kw):
    """acc (2,) += (Σ error·mask, Σ mask) over the global batch; XLA reduces across devices and hosts."""
    err = iod_error(predict(params, frozen, batch['image'], **kw), batch['landmarks'], iod_indices)
    mask = batch['_mask'].astype(jnp.float32)
    return acc + jnp.stack([jnp.sum(err * mask), jnp.sum(mask)])


# ---------------------------------------------------------------------------------------------- one training
def training_settings(config, row: Row, task, train_len: int, total_steps: int, lr: float, extra) -> dict:
    """What a regressor checkpoint depends on (`task`: a `detection.Task`): a mismatch with a directory's
    regressor.json stops the job."""
    return {'row': row.name, 'source': row.source, 'digest': row.digest, 'data': config.data,
            'data_seed': config.data_seed, 'set': task.name, 'train_images': train_len,
            'features': config.features.to_dict(), 'regressor': config.regressor.to_dict(), 'lr': lr,
            'weight_decay': config.weight_decay, 'b1': config.b1, 'b2': config.b2, 'batch_size': config.batch_size,
            'total_steps': total_steps, 'loss_scale': config.loss_scale, 'seed': config.seed, **extra}


def _check_settings(unit_dir: str, settings: dict) -> None:
    path = os.path.join(unit_dir, 'regressor.json')
    settings = json.loads(json.dumps(settings))  # tuples → lists, as stored
    if fileio.exists(path):
        old = json.loads(fileio.read_text(path))
        diff = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        if diff and checkpoints.has_checkpoint(unit_dir):
            shown = '; '.join(f'{k}: {old.get(k)!r} then, {settings.get(k)!r} now' for k in diff[:3])
            raise ConfigError(f'{unit_dir} holds a regressor trained with other settings ({shown}); remove '
                                     'that directory to retrain it, or pass another --workdir')
    if jax.process_index() == 0:
        fileio.makedirs(unit_dir)
        fileio.write_text(path, json.dumps(settings, indent=2, sort_keys=True))


class Regression:
    """The jitted functions of one (row, task, schedule), compiled once and shared by every training that
    differs only in seed and data (the limited-annotation runs of a row). All take the frozen tree as an
    argument; parameters and frozen trees are replicated, batches split on `data`. `task` is a `detection.Task`:
    its landmark count, inter-ocular indices and test views."""

    def __init__(self, config, *, row: Row, encoder: ViT, mesh, task, total_steps: int, lr: float):
        repl, self.data_sh = common.replicated(mesh), common.data_sharded(mesh)
        self.row, self.task, self.total_steps, self.size = row, task, total_steps, encoder.image_size
        size, rc = encoder.image_size, config.regressor
        self.regressor = Regressor(task.num_landmarks, rc.heatmaps_per_landmark, tuple(rc.hidden), rc.kernel_size,
                                   rc.temperature)
        feats_fn = features_fn(row, encoder, config.features.stride, config.features.block)
        schedule = optim.warmup_cosine(lr, total_steps, 0)
        tx = optim.projector_optimizer(schedule, config.weight_decay, config.b1, config.b2)
        self.frozen = common.replicate(frozen_of(row), mesh)
        self.feature_shape = jax.eval_shape(feats_fn, self.frozen,
                                            jax.ShapeDtypeStruct((1, size, size, 3), jnp.uint8)).shape
        init = functools.partial(init_state, self.regressor, tx, feature_shape=self.feature_shape)
        self.state_sh = jax.tree.map(lambda _: repl, jax.eval_shape(init, 0))
        self.init = jax.jit(init, out_shardings=self.state_sh)
        self.step = jax.jit(functools.partial(train_step, feats_fn=feats_fn, regressor=self.regressor, tx=tx,
                                              schedule=schedule, size=size, loss_scale=config.loss_scale,
                                              iod_indices=task.iod_indices),
                            in_shardings=(self.state_sh, repl, self.data_sh), out_shardings=(self.state_sh, repl),
                            donate_argnums=0)
        kw = dict(feats_fn=feats_fn, regressor=self.regressor, size=size)
        self.evaluate = jax.jit(functools.partial(eval_step, iod_indices=task.iod_indices, **kw),
                                in_shardings=(repl, repl, repl, self.data_sh), out_shardings=repl, donate_argnums=0)
        self.predict = jax.jit(functools.partial(predict, **kw), in_shardings=(repl, repl, self.data_sh),
                               out_shardings=repl)
        self.zeros = lambda: jax.device_put(jnp.zeros((2,), jnp.float32), repl)  # a fresh (donated) accumulator


def train_and_test(config, unit_dir: str, fns: Regression, *, train_source, transform: Callable,
                   random_transform: bool, seed: int, settings: dict, figure_faces: int = 0):
    """Trains one regressor (resuming from `unit_dir`) and tests it on every set of `fns.task`. Returns
    ({set: error}, {set: predicted pixels of its first `figure_faces` test faces}), or None when training
    stopped early on a preemption signal (rerun to resume)."""
    row, task = fns.row, fns.task
    _check_settings(unit_dir, settings)
    state = fns.init(seed)
    it = pipeline.train_iterator(train_source, global_batch=config.batch_size, seed=seed, transform=transform,
                                 random=random_transform)
    logging.info('regressor %s: %d landmarks on %s features, %s parameters, %d steps of %d', unit_dir,
                 task.num_landmarks, 'x'.join(map(str, fns.feature_shape[1:])),
                 f'{common.tree_size(state["params"]):,}', fns.total_steps, config.batch_size)
    out = common.train_loop(config, unit_dir, state=state, state_sharding=fns.state_sh,
                            step_fn=lambda s, b: fns.step(s, fns.frozen, b), data_iter=it,
                            batch_sharding=fns.data_sh, total_steps=fns.total_steps)
    if out['step'] < fns.total_steps:
        return None
    params = out['state']['params']
    crop = pipeline.eval_transform(fns.size)
    errors, points = {}, {}
    for key, view in task.tests:
        test_it, num_batches = pipeline.eval_iterator(view, global_batch=config.batch_size, transform=crop)
        acc = fns.zeros()
        done = progress.Progress(f'testing {row.name} on {key}: batch', num_batches, every=num_batches // 10)
        for b in range(num_batches):
            batch = common.global_batch(next(test_it), fns.data_sh)
            if b == 0 and figure_faces:
                faces = min(figure_faces, len(view))
                points[key] = np.asarray(fns.predict(params, fns.frozen, batch['image']))[:faces]
            acc = fns.evaluate(acc, params, fns.frozen, batch)
            done.step()
        total, count = (float(v) for v in np.asarray(acc))
        if int(round(count)) != len(view):
            raise RuntimeError(f'{key}: counted {count} test images, expected {len(view)}')
        errors[key] = total / count
        logging.info('detection %s on %s: %.3f %% IOD over %d test images', row.name, key, errors[key], len(view))
    return errors, points
