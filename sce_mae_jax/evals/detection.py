r"""Landmark detection on frozen features (paper 001 Table 2) and with few annotations (Table 3; method.md §4).

    python -m sce_mae_jax.main --config=configs/eval_detection.py:data=mafl --workdir=DIR --config.stage1=S1 \
        --config.stage2=S2
    python -m sce_mae_jax.main --config=configs/eval_limited.py --workdir=DIR --config.stage1=S1 --config.stage2=S2

The two jobs: for every row of `rows.load_rows` and every landmark set of the dataset, a regressor
(evals/regressor.py: its input per row, its steps, one training) is trained on the row's frozen features and
tested with the inter-ocular error (`metrics.iod_error`); `run_limited` repeats that on N annotated faces,
seeds apart. This file holds what the jobs choose: the datasets' views and sets (`tasks`), the checks, the
report sections and the figure.

Workdir layout (WORKDIR is `--workdir`):
    WORKDIR/results.json, report.md          the numbers (evals/report.py), merged with other evaluations
    WORKDIR/figures/detection_<set>.png      detections vs ground truth on test faces, one row per model row
    WORKDIR/detection/<set>/<row>/           that regressor's checkpoints, metrics.jsonl, tb/, regressor.json
    WORKDIR/detection/<set>/<row>@reg<K>/    the same row's regressor of seed `seed` + K (`regressor_seeds`)
    WORKDIR/limited/<set>/<row>/n<N>_seed<S>/   the same for one limited-annotation run
Training checkpoints and resumes through `common.train_loop`; rerunning a finished job with the same config and
checkpoints returns the stored numbers (`report.stored`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable

import grain
import jax
import numpy as np
from absl import logging
from PIL import Image, ImageDraw

from sce_mae_jax import fileio, progress
from sce_mae_jax.data import pipeline, tps
from sce_mae_jax.evals import features, regressor, report
from sce_mae_jax.evals.metrics import iod_error
from sce_mae_jax.evals.rows import load_rows
from sce_mae_jax.models.vit import ViT
from sce_mae_jax.train import common
from sce_mae_jax.errors import ConfigError

DATA = ('synthetic', 'synthetic_plain', 'synthetic_wild', 'mafl', 'aflw_m', 'aflw_r', '300w')
AUGMENTS = ('none', 'tps')


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
        raise ConfigError(f'data={data!r} cannot be used for detection{hint}; choose one of {DATA}')


def _epochs_field(data: str) -> str:
    return 'synthetic' if data.startswith('synthetic') else {'300w': 'w300'}.get(data, data)


def _check_landmarks(view, num_landmarks: int, what: str) -> None:
    item = view.source[0]
    if view.key not in item:
        raise ConfigError(f'{what}: its items have no {view.key!r} (keys: {sorted(item)}); use a '
                                 'dataset that provides them')
    shape = np.shape(item[view.key])
    if shape != (num_landmarks, 2):
        raise ConfigError(f'{what}: {view.key!r} has shape {shape}, expected ({num_landmarks}, 2)')


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
            raise ConfigError(f'only={config.only!r}: {unknown} not among the sets of data={data} '
                                     f'({known}); leave it empty to run them all')
        out = [dataclasses.replace(t, tests=[(k, v) for k, v in t.tests if k in only]) for t in out]
        out = [t for t in out if t.tests]
    if limited:
        t = next((t for t in out if t.num_landmarks == 5), out[0])
        out = [dataclasses.replace(t, tests=t.tests[:1])]
    return out


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
    if not limited and (not isinstance(config.regressor_seeds, int) or config.regressor_seeds < 1):
        problems.append(f'regressor_seeds={config.regressor_seeds!r} must be an integer ≥ 1 (regressors per row '
                        'without stage-2 replicates)')
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
        raise ConfigError('; '.join(problems))


def validate_model(config, encoder: ViT) -> None:
    features.check_config(config.features, encoder)
    common.check_batch_size(config.batch_size)


def _check_train_size(n: int, config, what: str) -> None:
    if n < config.batch_size:
        raise ConfigError(f'{what} has {n} images, fewer than one batch (batch_size={config.batch_size}); '
                                 'lower --config.batch_size or raise the image count')


def _setup(config, workdir: str, limited: bool):
    if not workdir:
        raise ConfigError('pass --workdir (results.json and the regressors go there)')
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
                for name in _result_names(rows, config.regressor_seeds):
                    results.setdefault(name, {})[k] = s['detection'][name][k]
            continue
        _check_train_size(len(task.train), config, f'the {task.name} train split')
        todo.append(task)
    done = progress.Progress('detection', len(todo) * len([n for n in _result_names(rows, config.regressor_seeds)
                                                          if n != MEAN_SHAPE]))
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
            fns = regressor.Regression(config, row=row, encoder=encoder, mesh=mesh, task=task, total_steps=total,
                                       lr=config.lr)
            for name, seed in _regressors(row, rows, config.regressor_seeds, config.seed):
                unit = os.path.join(workdir, 'detection', task.name, name)
                settings = regressor.training_settings(config, row, task, len(task.train), total, config.lr, {
                    'augment': config.augment, 'tps': config.tps.to_dict() if augment else None, 'seed': seed})
                out = regressor.train_and_test(config, unit, fns, train_source=task.train, transform=transform,
                                               random_transform=augment, seed=seed, settings=settings,
                                               figure_faces=config.figures.faces if name == row.name else 0)
                if out is None:
                    logging.warning('detection stopped by a preemption signal; rerun the same command to resume')
                    return {'detection': results}
                per_row[name], figure_points[name] = out
                done.step(f'{task.name}/{name}')
        if any(r.kind == MEAN_SHAPE for r in rows):
            for key, err in mean_shape_errors(task, transform_size=encoder.image_size).items():
                per_row.setdefault(MEAN_SHAPE, {})[key] = err
        for key, view in task.tests:
            figs = []
            if config.figures.faces:
                rel = os.path.join('figures', f'detection_{key}.png')
                if jax.process_index() == 0:
                    save_detection_png(os.path.join(workdir, rel), view, rows_points={
                        r: (figure_points[r][key], per_row[r][key]) for r in figure_points
                        if not report.is_replicate(r)},
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


def _regressors(row, rows, regressor_seeds: int, seed: int) -> list[tuple[str, int]]:
    """(result name, regressor seed) of every regressor `row` trains. A row with stage-2 seed replicates
    (`ROW@seedS` among `rows`, or one itself) has its spread from them and trains one regressor (`seed`); any
    other row trains `regressor_seeds` of them, seeds `seed`, `seed` + 1, ..., the first under its own name and
    the others as its replicates `ROW@regK`, so that every row a verdict compares has a spread that includes
    the regressor's."""
    replicated = any(report.is_replicate(r.name) and report.base_row(r.name) == report.base_row(row.name)
                     for r in rows)
    return [(row.name if i == 0 else f'{row.name}{report.REGRESSOR_MARK}{i}', int(seed) + i)
            for i in range(1 if replicated else int(regressor_seeds))]


def _result_names(rows, regressor_seeds: int) -> list[str]:
    """Every name a detection job reports, in order: the rows' regressors (`_regressors`) and `mean_shape`."""
    return [n for r in rows for n, _ in ([(r.name, 0)] if r.kind == MEAN_SHAPE
                                         else _regressors(r, rows, regressor_seeds, 0))]


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
        raise ConfigError(f'limited.sizes asks for {n} annotated images but the train split has '
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
    done = progress.Progress('limited annotations', len(rows) * len(sizes) * len(seeds))
    section, runs = {}, {}
    for row in rows:
        fns = regressor.Regression(config, row=row, encoder=encoder, mesh=mesh, task=task, total_steps=total,
                                   lr=config.lr)
        for n in sizes:
            errs = []
            for seed in seeds:
                idx = limited_indices(len(base), n, seed)
                # the N annotated images repeated to `epoch` examples (k → k mod N): a few of them fill an epoch
                source = grain.MapDataset.source(LandmarkView(base.source, base.key, indices=base.indices[idx])
                                                 ).repeat()[:epoch]
                unit = os.path.join(workdir, 'limited', key, row.name, f'n{n}_seed{seed}')
                settings = regressor.training_settings(config, row, task, len(source), total, config.lr, {
                    'annotated': [int(i) for i in base.indices[idx]], 'epoch_size': epoch,
                    'augment': config.augment, 'tps': config.tps.to_dict() if augment else None})
                out = regressor.train_and_test(config, unit, fns, train_source=source, transform=transform,
                                               random_transform=augment, seed=seed, settings=settings)
                if out is None:
                    logging.warning('limited annotations stopped by a preemption signal; rerun to resume')
                    return {'limited': section}
                errs.append(out[0][key])
                done.step(f'{row.name} N={n} seed={seed}: {errs[-1]:.2f}')
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
