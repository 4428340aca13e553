r"""Landmark detection on frozen features (paper 001 Table 2) and with few annotations (Table 3; method.md §4).

    python -m sce_mae_jax.main --config=configs/eval_detection.py:data=mafl --workdir=DIR --config.stage1=S1 \
        --config.stage2=S2
    python -m sce_mae_jax.main --config=configs/eval_limited.py --workdir=DIR --config.stage1=S1 --config.stage2=S2

For every row of `rows.load_rows` a `models.heads.Regressor` is trained on the row's frozen dense features and
tested with the inter-ocular error. The backbone and projector never train: they are arguments of the jitted
step, their forward runs under `stop_gradient`, and only the regressor has parameters and optimiser state.

Regressor input per row kind (the map is H/s x W/s, s = `features.stride`, 48x48 at the default s = 2):
    projected   L2(stage-1 tokens) ⊕ L2(stage-2 projector output) by cover-and-stride (method.md §4)
    backbone    L2(stage-1 tokens) (`random_init`, `mae`)
    pixels      L2 of the raw normalised p x p pixel window of each cell, cut by the same cover-and-stride as
                the ViT's patches, so the regressor sees what a patch token is computed from, untransformed

Coordinates: landmarks are xy pixels of the 96-px crop with pixel (r, c) centred at x = c, y = r (the
project's convention); the regressor works in [−1, 1] with u = 2(x + 0.5)/96 − 1 (`to_normalized`), i.e.
half-pixel centres, the convention of its soft-argmax grid (`heads.cell_centres`).

Workdir layout (WORKDIR is `--workdir`):
    WORKDIR/results.json, report.md          the numbers (evals/report.py), merged with other evaluations
    WORKDIR/figures/detection_<set>.png      detections vs ground truth on test faces, one row per model row
    WORKDIR/detection/<set>/<row>/           that regressor's checkpoints, metrics.jsonl, tb/, regressor.json
    WORKDIR/limited/<set>/<row>/n<N>_seed<S>/   the same for one limited-annotation run
Training checkpoints and resumes through `common.train_loop`; rerunning a finished job with the same config and
checkpoints returns the stored numbers (`report.stored`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from PIL import Image, ImageDraw

from sce_mae_jax import fileio
from sce_mae_jax.data import pipeline, tps
from sce_mae_jax.evals import features, report
from sce_mae_jax.evals.report import SEED_MARK
from sce_mae_jax.evals.rows import Row, load_rows
from sce_mae_jax.models.heads import Regressor
from sce_mae_jax.models.vit import ViT, patchify
from sce_mae_jax.train import common, optim

DATA = ('synthetic', 'synthetic_plain', 'synthetic_wild', 'mafl', 'aflw_m', 'aflw_r', '300w')
AUGMENTS = ('none', 'tps')


# ---------------------------------------------------------------------------------------------- metric
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


def iod_error(pred_px: jax.Array, gt_px: jax.Array, iod_indices: tuple[int, int]) -> jax.Array:
    """Per image 100 × mean over landmarks of ‖pred − gt‖ / ‖gt[i0] − gt[i1]‖: (B, L, 2) x2 → (B,).

    `iod_indices` (0, 1), the eye centres, for 5-point sets; (36, 45), the outer eye corners, for 68 points.
    Per-image values so that sums over padded, sharded batches can be reduced (`_mask`).
    """
    pred_px, gt_px = jnp.asarray(pred_px, jnp.float32), jnp.asarray(gt_px, jnp.float32)
    i0, i1 = iod_indices
    iod = jnp.linalg.norm(gt_px[:, i0] - gt_px[:, i1], axis=-1)
    return 100.0 * jnp.linalg.norm(pred_px - gt_px, axis=-1).mean(-1) / jnp.maximum(iod, 1e-6)


# ---------------------------------------------------------------------------------------------- datasets
class LandmarkView:
    """A source seen as {'image', 'landmarks'} with the chosen landmark key ('landmarks' or 'landmarks68'),
    restricted to `indices` (default: the first `limit` items, 0 = all)."""

    def __init__(self, source, key: str = 'landmarks', limit: int = 0, indices=None):
        self.source, self.key = source, key
        n = len(source) if not limit else min(limit, len(source))
        self.indices = np.arange(n) if indices is None else np.asarray(indices, np.int64)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        item = self.source[int(self.indices[int(k)])]
        return {'image': item['image'], 'landmarks': np.asarray(item[self.key], np.float32)}


class Repeated:
    """`view` repeated to `length` examples (k → k mod len(view)): a few annotated images fill an epoch."""

    def __init__(self, view, length: int):
        self.view, self.length = view, length

    def __len__(self):
        return self.length

    def __getitem__(self, k):
        return self.view[int(k) % len(self.view)]


@dataclasses.dataclass
class Task:
    """One regressor training: a train split and the test splits (results columns) it is evaluated on."""
    name: str                          # the training set: its directory under WORKDIR/detection/, WORKDIR/limited/
    train: Any                         # LandmarkView
    tests: list[tuple[str, Any]]       # (results key, LandmarkView)
    num_landmarks: int
    iod_indices: tuple[int, int]
    epochs_field: str                  # the field of config.epochs (detection)


def check_data(data: str) -> None:
    if data not in DATA:
        hint = ' (AFLW_RC is evaluated by data=aflw_r)' if data == 'aflw_rc' else (
            ' (CelebA has no train/test landmark split; MAFL is its annotated subset)' if data == 'celeba' else '')
        raise common.ConfigError(f'data={data!r} cannot be used for detection{hint}; choose one of {DATA}')


def _epochs_field(data: str) -> str:
    return 'synthetic' if data.startswith('synthetic') else {'300w': 'w300'}.get(data, data)


def _check_landmarks(view, num_landmarks: int, what: str) -> None:
    item = view.source[0]
    if view.key not in item:
        raise common.ConfigError(f'{what}: its items have no {view.key!r} (keys: {sorted(item)}); use a '
                                 'dataset that provides them')
    shape = np.shape(item[view.key])
    if shape != (num_landmarks, 2):
        raise common.ConfigError(f'{what}: {view.key!r} has shape {shape}, expected ({num_landmarks}, 2)')


def tasks(config, *, limited: bool = False) -> list[Task]:
    """The trainings `config.data` asks for (method.md §4), keyed as results.json's detection columns:
    synthetic → synthetic_5 (MAFL points, IOD (0, 1)) and synthetic_68 (iBUG points, IOD (36, 45)); mafl;
    aflw_m; aflw_r → aflw_r and aflw_rc (the corrected test annotations, when supplied); 300w (IOD (36, 45)).
    `limited` keeps the first test set of the first 5-point task (Table 3 reports one number per N)."""
    from sce_mae_jax.data.sources import DatasetError, get_source

    data = config.data
    check_data(data)
    src = functools.partial(get_source, manual_dir=config.manual_dir or None, data_dir=config.data_dir or None,
                            seed=config.data_seed)
    ntr, nte = config.num_train_images, config.num_test_images
    train, test = src(data, 'train'), src(data, 'test')
    out = []
    if data.startswith('synthetic'):
        for key, num, iod in (('landmarks', 5, (0, 1)), ('landmarks68', 68, (36, 45))):
            name = f'{data}_{num}'
            out.append(Task(name, LandmarkView(train, key, ntr), [(name, LandmarkView(test, key, nte))], num, iod,
                            _epochs_field(data)))
    else:
        tests = [(data, LandmarkView(test, limit=nte))]
        if data == 'aflw_r' and not limited:
            try:
                tests.append(('aflw_rc', LandmarkView(src('aflw_rc', 'test'), limit=nte)))
            except DatasetError as e:
                logging.warning('detection: aflw_rc skipped, its corrected test annotations are not available '
                                '(%s)', e)
        out.append(Task(data, LandmarkView(train, limit=ntr), tests, train.num_landmarks, tuple(train.iod_indices),
                        _epochs_field(data)))
    for t in out:
        for what, view in [('train', t.train), *t.tests]:
            _check_landmarks(view, t.num_landmarks, f'data={data} ({what})')
    only = [k for k in (config.only or '').split(',') if k]
    if only:
        known = [k for t in out for k, _ in t.tests]
        unknown = [k for k in only if k not in known]
        if unknown:
            raise common.ConfigError(f'only={config.only!r}: {unknown} not among the sets of data={data} '
                                     f'({known}); leave it empty to run them all')
        out = [dataclasses.replace(t, tests=[(k, v) for k, v in t.tests if k in only]) for t in out]
        out = [t for t in out if t.tests]
    if limited:
        t = next((t for t in out if t.num_landmarks == 5), out[0])
        out = [dataclasses.replace(t, tests=t.tests[:1])]
    return out


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
def tps_transform(size: int, tc) -> Callable:
    """A single random TPS warp per example at 136 px (points follow with sub-pixel accuracy), then the centre
    crop to `size` (method.md §4, limited annotations)."""
    crop = pipeline.eval_transform(size)

    def fn(example, rng):
        warp = tps.random_tps(rng, noise_all=tc.noise_all, noise_half=tc.noise_half, translation=tc.translation,
                              scale=tc.scale, rotation_deg=tc.rotation_deg)
        image, points = tps.warp_example(example['image'], example['landmarks'], warp, subpixel=True)
        return crop({'image': image, 'landmarks': points})
    return fn


def _training_settings(config, row: Row, task: Task, train_len: int, total_steps: int, lr: float, extra) -> dict:
    """What a regressor checkpoint depends on: a mismatch with a directory's regressor.json stops the job."""
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
        if diff and common.has_checkpoint(unit_dir):
            shown = '; '.join(f'{k}: {old.get(k)!r} then, {settings.get(k)!r} now' for k in diff[:3])
            raise common.ConfigError(f'{unit_dir} holds a regressor trained with other settings ({shown}); remove '
                                     'that directory to retrain it, or pass another --workdir')
    if jax.process_index() == 0:
        fileio.makedirs(unit_dir)
        fileio.write_text(path, json.dumps(settings, indent=2, sort_keys=True))


class Regression:
    """The jitted functions of one (row, task, schedule), compiled once and shared by every training that
    differs only in seed and data (the limited-annotation runs of a row). All take the frozen tree as an
    argument; parameters and frozen trees are replicated, batches split on `data`."""

    def __init__(self, config, *, row: Row, encoder: ViT, mesh, task: Task, total_steps: int, lr: float):
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
        t0, every = time.time(), max(1, num_batches // 10)
        for b in range(num_batches):
            batch = common.global_batch(next(test_it), fns.data_sh)
            if b == 0 and figure_faces:
                faces = min(figure_faces, len(view))
                points[key] = np.asarray(fns.predict(params, fns.frozen, batch['image']))[:faces]
            acc = fns.evaluate(acc, params, fns.frozen, batch)
            if (b + 1) % every == 0 and b + 1 < num_batches:
                dt = time.time() - t0
                logging.info('testing %s on %s: batch %d/%d, ETA %.0f s', row.name, key, b + 1, num_batches,
                             dt / (b + 1) * (num_batches - b - 1))
        total, count = (float(v) for v in np.asarray(acc))
        if int(round(count)) != len(view):
            raise RuntimeError(f'{key}: counted {count} test images, expected {len(view)}')
        errors[key] = total / count
        logging.info('detection %s on %s: %.3f %% IOD over %d test images', row.name, key, errors[key], len(view))
    return errors, points


class Progress:
    """Job-level progress: after each finished unit, the elapsed time and an ETA for the remaining ones."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.done, self.t0 = what, total, 0, time.time()

    def step(self, name: str) -> None:
        self.done += 1
        dt = time.time() - self.t0
        logging.info('%s: %d/%d done (%s), %.0f s elapsed, ETA %.0f s', self.what, self.done, self.total, name, dt,
                     dt / self.done * (self.total - self.done))


# ---------------------------------------------------------------------------------------------- validation
def validate(config, *, limited: bool = False) -> None:
    """Config problems that do not need the model; `validate_model` checks the rest once rows are loaded."""
    check_data(config.data)
    problems = []
    if config.augment not in AUGMENTS:
        problems.append(f'augment={config.augment!r} must be one of {AUGMENTS}')
    rc = config.regressor
    if rc.heatmaps_per_landmark < 1 or rc.temperature <= 0 or rc.kernel_size < 1 or any(w < 1 for w in rc.hidden):
        problems.append(f'regressor={rc.to_dict()}: heatmaps_per_landmark, kernel_size and hidden widths must be '
                        '≥ 1 and temperature > 0')
    if config.lr <= 0 or config.weight_decay < 0:
        problems.append(f'lr={config.lr} must be > 0 and weight_decay={config.weight_decay} ≥ 0')
    if config.num_train_images < 0 or config.num_test_images < 0:
        problems.append('num_train_images and num_test_images must be ≥ 0 (0 = the whole split)')
    if limited:
        lc = config.limited
        if not lc.sizes or any(int(n) < 1 for n in lc.sizes):
            problems.append(f'limited.sizes={tuple(lc.sizes)} must be annotation counts ≥ 1')
        if not lc.seeds:
            problems.append('limited.seeds is empty; give at least one seed')
        if lc.epochs < 1 or lc.epoch_size < 0:
            problems.append(f'limited.epochs={lc.epochs} must be ≥ 1 and limited.epoch_size={lc.epoch_size} ≥ 0')
    elif config.epochs.get(_epochs_field(config.data), 0) < 1:
        problems.append(f'epochs.{_epochs_field(config.data)} must be ≥ 1 (the regressor epochs of {config.data})')
    if problems:
        raise common.ConfigError('; '.join(problems))


def validate_model(config, encoder: ViT) -> None:
    features.check_config(config.features, encoder)
    common.check_batch_size(config.batch_size)


def _check_train_size(n: int, config, what: str) -> None:
    if n < config.batch_size:
        raise common.ConfigError(f'{what} has {n} images, fewer than one batch (batch_size={config.batch_size}); '
                                 'lower --config.batch_size or raise the image count')


def _setup(config, workdir: str, limited: bool):
    if not workdir:
        raise common.ConfigError('pass --workdir (results.json and the regressors go there)')
    validate(config, limited=limited)
    encoder, rows, skipped = load_rows(config)
    validate_model(config, encoder)
    fileio.makedirs(workdir)
    return encoder, rows, skipped, common.make_mesh(), report.fingerprint(config, rows)


def _meta(config, rows, skipped, fp, **extra) -> dict:
    return {'fingerprint': fp, 'skipped_rows': skipped, 'rows': {r.name: r.source for r in rows},
            'config': json.loads(config.to_json_best_effort()), 'stride': config.features.stride, **extra}


# ---------------------------------------------------------------------------------------------- Table 2
def run(config, workdir: str) -> dict:
    """Detection (paper Table 2): per set and row, train a regressor and test it. → {'detection': {row: {set:
    error}}}; results.json gets the same under job key `detection/<set>`."""
    encoder, rows, skipped, mesh, fp = _setup(config, workdir, limited=False)
    results = {}
    todo = []
    for task in tasks(config):
        keys = [k for k, _ in task.tests]
        stored = [report.stored(workdir, f'detection/{k}', fp) for k in keys]
        if all(s is not None for s in stored):
            logging.info('detection %s: results with fingerprint %s already in %s; returning them without '
                         'recomputing', ','.join(keys), fp, os.path.join(workdir, report.RESULTS))
            for k, s in zip(keys, stored):
                for r in rows:
                    results.setdefault(r.name, {})[k] = s['detection'][r.name][k]
            continue
        _check_train_size(len(task.train), config, f'the {task.name} train split')
        todo.append(task)
    progress = Progress('detection', len(todo) * len([r for r in rows if r.kind != MEAN_SHAPE]))
    for task in todo:
        per_row, figure_points = {}, {}
        steps_per_epoch = len(task.train) // config.batch_size
        total = int(config.total_steps) if config.get('total_steps') else config.epochs[task.epochs_field] * \
            steps_per_epoch
        augment = config.augment == 'tps'
        transform = tps_transform(encoder.image_size, config.tps) if augment else pipeline.eval_transform(
            encoder.image_size)
        for row in rows:
            if row.kind == MEAN_SHAPE:
                continue
            unit = os.path.join(workdir, 'detection', task.name, row.name)
            fns = Regression(config, row=row, encoder=encoder, mesh=mesh, task=task, total_steps=total, lr=config.lr)
            settings = _training_settings(config, row, task, len(task.train), total, config.lr, {
                'augment': config.augment, 'tps': config.tps.to_dict() if augment else None})
            out = train_and_test(config, unit, fns, train_source=task.train, transform=transform,
                                 random_transform=augment, seed=config.seed, settings=settings,
                                 figure_faces=config.figures.faces)
            if out is None:
                logging.warning('detection stopped by a preemption signal; rerun the same command to resume')
                return {'detection': results}
            per_row[row.name], figure_points[row.name] = out
            progress.step(f'{task.name}/{row.name}')
        if any(r.kind == MEAN_SHAPE for r in rows):
            for key, err in mean_shape_errors(task, transform_size=encoder.image_size).items():
                per_row.setdefault(MEAN_SHAPE, {})[key] = err
        for key, view in task.tests:
            figs = []
            if config.figures.faces:
                rel = os.path.join('figures', f'detection_{key}.png')
                if jax.process_index() == 0:
                    save_detection_png(os.path.join(workdir, rel), view, rows_points={
                        r: (figure_points[r][key], per_row[r][key]) for r in figure_points if SEED_MARK not in r},
                        title=f'detection on {key} (test): ground truth green, prediction red',
                        size=encoder.image_size)
                figs = [(f'Detections on {key} test faces (paper Fig. S4)', rel)]
            section = {r: {key: per_row[r][key]} for r in per_row}
            report.update(workdir, {'detection': section}, job_key=f'detection/{key}', column=key, meta=_meta(
                config, rows, skipped, fp, figures=figs, dataset=key, train_images=len(task.train),
                test_images=len(view), steps=total, landmarks=task.num_landmarks,
                iod_indices=list(task.iod_indices)))
            for r, v in section.items():
                results.setdefault(r, {}).update(v)
    return {'detection': results}


MEAN_SHAPE = 'mean_shape'  # the detection row that predicts the training set's mean landmarks for every face


def mean_shape_errors(task: Task, *, transform_size: int) -> dict[str, float]:
    """{test set: error} of the `mean_shape` row: every test face gets the mean of the training faces' landmarks
    (in the centre-cropped frame the regressors see), no image read. On aligned faces this is a strong floor
    (it knows where landmarks usually are); on faces placed anywhere it is what a model that ignores the image
    scores."""
    crop = pipeline.eval_transform(transform_size)

    def landmarks(view):
        return np.stack([crop(view[i])['landmarks'] for i in range(len(view))])

    mean = landmarks(task.train).mean(0)
    out = {}
    for key, view in task.tests:
        gt = landmarks(view)
        out[key] = float(np.mean(iod_error(np.broadcast_to(mean, gt.shape), gt, task.iod_indices)))
        logging.info('detection %s/%s: %.2f', key, MEAN_SHAPE, out[key])
    return out


# ---------------------------------------------------------------------------------------------- Table 3
def limited_indices(num_train: int, n: int, seed: int) -> np.ndarray:
    """The N annotated training images of one seed: the first N of a seeded permutation, so for one seed the
    sets are nested (the 5 images include the 1) and the curves over N are less noisy."""
    if n > num_train:
        raise common.ConfigError(f'limited.sizes asks for {n} annotated images but the train split has '
                                 f'{num_train}; lower the size or raise num_train_images')
    return np.random.default_rng(seed).permutation(num_train)[:n]


def run_limited(config, workdir: str) -> dict:
    """Limited annotations (paper Table 3): for each row, size N and seed, a regressor trained on N random
    annotated images (repeated to fill an epoch, one random TPS warp per example) and tested on the full test
    set. → {'limited': {row: {str(N): [mean, std over seeds]}}}, job key `limited/<set>`."""
    encoder, rows, skipped, mesh, fp = _setup(config, workdir, limited=True)
    rows = [r for r in rows if r.kind != MEAN_SHAPE]  # Table 3 trains regressors only
    task = tasks(config, limited=True)[0]
    key, view = task.tests[0]
    job_key = f'limited/{key}'
    stored = report.stored(workdir, job_key, fp)
    if stored is not None:
        logging.info('limited annotations on %s: results with fingerprint %s already in %s; returning them without '
                     'recomputing', key, fp, os.path.join(workdir, report.RESULTS))
        return {'limited': {r.name: stored['limited'][r.name] for r in rows}}
    lc = config.limited
    sizes, seeds = [int(n) for n in lc.sizes], [int(s) for s in lc.seeds]
    base = task.train
    epoch = lc.epoch_size or len(base)
    _check_train_size(epoch, config, f'an epoch (limited.epoch_size={lc.epoch_size})')
    total = int(config.total_steps) if config.get('total_steps') else lc.epochs * (epoch // config.batch_size)
    augment = config.augment == 'tps'
    transform = tps_transform(encoder.image_size, config.tps) if augment else pipeline.eval_transform(
        encoder.image_size)
    progress = Progress('limited annotations', len(rows) * len(sizes) * len(seeds))
    section, runs = {}, {}
    for row in rows:
        fns = Regression(config, row=row, encoder=encoder, mesh=mesh, task=task, total_steps=total, lr=config.lr)
        for n in sizes:
            errs = []
            for seed in seeds:
                idx = limited_indices(len(base), n, seed)
                source = Repeated(LandmarkView(base.source, base.key, indices=base.indices[idx]), epoch)
                unit = os.path.join(workdir, 'limited', key, row.name, f'n{n}_seed{seed}')
                settings = _training_settings(config, row, task, len(source), total, config.lr, {
                    'annotated': [int(i) for i in base.indices[idx]], 'epoch_size': epoch,
                    'augment': config.augment, 'tps': config.tps.to_dict() if augment else None})
                out = train_and_test(config, unit, fns, train_source=source, transform=transform,
                                     random_transform=augment, seed=seed, settings=settings)
                if out is None:
                    logging.warning('limited annotations stopped by a preemption signal; rerun to resume')
                    return {'limited': section}
                errs.append(out[0][key])
                progress.step(f'{row.name} N={n} seed={seed}: {errs[-1]:.2f}')
            runs.setdefault(row.name, {})[str(n)] = errs
            # std over seeds with ddof=0 (NumPy's default): the spread of these seeds, not an estimate
            section.setdefault(row.name, {})[str(n)] = [float(np.mean(errs)), float(np.std(errs))]
            logging.info('limited %s N=%d: %.2f ± %.2f over seeds %s', row.name, n, *section[row.name][str(n)], seeds)
    report.update(workdir, {'limited': section}, job_key=job_key, meta=_meta(
        config, rows, skipped, fp, figures=[], dataset=key, runs=runs, sizes=sizes, seeds=seeds, epoch_size=epoch,
        steps=total, test_images=len(view), landmarks=task.num_landmarks, iod_indices=list(task.iod_indices)))
    return {'limited': section}


# ---------------------------------------------------------------------------------------------- figure
GT_COLOUR, PRED_COLOUR, LINK_COLOUR = (40, 230, 40), (255, 40, 40), (255, 220, 0)


def save_detection_png(path: str, view, rows_points: dict, title: str, size: int = 96, zoom: int = 3) -> None:
    """Paper Fig. S4: one row per model row (label and its test error on the left), one column per test face
    (the `size`-px crop, enlarged `zoom`x): ground truth green, prediction red, a yellow line between them.

    rows_points: {row: (predicted (n, L, 2) pixels, error)}; the faces are the first n test images of `view`.
    """
    crop = pipeline.eval_transform(size)
    n = min(len(p) for p, _ in rows_points.values())
    faces = [crop(view[i]) for i in range(n)]
    size *= zoom
    label_w, head_h, gap = 150, 22, 2
    canvas = Image.new('RGB', (label_w + n * (size + gap), head_h + len(rows_points) * (size + gap)), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 5), title, fill=(255, 255, 255))
    radius = 3 if faces[0]['landmarks'].shape[0] <= 10 else 1.5

    def centre(p):  # pixel-centre convention: pixel x = c is the centre of zoomed pixels [c·z, (c+1)·z)
        return p[0] * zoom + (zoom - 1) / 2.0, p[1] * zoom + (zoom - 1) / 2.0

    for r, (name, (pred, err)) in enumerate(rows_points.items()):
        y0 = head_h + r * (size + gap)
        draw.text((4, y0 + size // 2 - 12), name, fill=(255, 255, 255))
        draw.text((4, y0 + size // 2 + 2), f'{err:.2f} % IOD', fill=(200, 200, 200))
        for c, face in enumerate(faces):
            x0 = label_w + c * (size + gap)
            tile = Image.fromarray(face['image']).resize((size, size), Image.NEAREST)
            d = ImageDraw.Draw(tile)
            for g, p in zip(face['landmarks'], pred[c]):
                gx, gy = centre(g)
                px, py = centre(p)
                d.line([gx, gy, px, py], fill=LINK_COLOUR, width=1)
                d.ellipse([gx - radius, gy - radius, gx + radius, gy + radius], fill=GT_COLOUR)
                d.ellipse([px - radius, py - radius, px + radius, py + radius], fill=PRED_COLOUR)
            canvas.paste(tile, (x0, y0))
    fileio.makedirs(os.path.dirname(path))
    fileio.save_png(path, canvas)
