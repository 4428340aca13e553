"""A trained model on your own images, for notebooks and `python -m sce_mae_jax.predict`.

    from sce_mae_jax import Landmarker
    lm = Landmarker.load('/tmp/sce_mae_quickstart')          # or a directory from `python -m sce_mae_jax.export`
    points = lm.landmarks(images)                            # list of (H, W, 3) uint8 → (N, K, 2) xy in their pixels
    maps = lm.features(images)                               # (N, 96, 96, C): the matching descriptors
    where = lm.match(image_a, image_b, points[0])            # (K, 2) xy in image_b's pixels

A model directory is a quick-start workdir (`stage1/`, `stage2/`, the detection regressors under
`detection/<set>/<row>/`) or an export of one (the same layout, plus `model.json`). Its rows are loaded with
the evaluation's own `evals.rows.load_rows`, features and predictions are the evaluation's functions
(`evals.regressor.predict`, `evals.matching.features_fn_for`, `evals.metrics.match_points`), so a face gets
here what the evaluation would give it. Images reach the model through `data.framing` (the training data's
crop and resize), and points go back to each image's own pixels the same way.

Every call runs in batches through one jitted function over the device mesh (batch split on `data`, the
last batch padded), compiled once per program and batch size and shared by every Landmarker of a process.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import ml_collections
import numpy as np

from sce_mae_jax import fileio
from sce_mae_jax.data import framing
from sce_mae_jax.errors import ConfigError
from sce_mae_jax.evals import features, matching, metrics, regressor as regressor_lib, rows as rows_lib
from sce_mae_jax.models.heads import Regressor
from sce_mae_jax.train import common
from sce_mae_jax.train import checkpoints

# the rows a model directory can feed a regressor with, best first: the paper's model, then its stage 1
PREFERRED_ROWS = ('sce_mae', 'mae')


def stage_dirs(path: str) -> tuple[str, str]:
    """(stage-1 dir or '', stage-2 dir or '') of a quick-start workdir, an export, or one stage's workdir."""
    found = [os.path.join(path, s) if fileio.exists(os.path.join(path, s, 'config.json')) else ''
             for s in ('stage1', 'stage2')]
    if any(found):
        return found[0], found[1]
    if fileio.exists(os.path.join(path, 'config.json')):
        job = json.loads(fileio.read_text(os.path.join(path, 'config.json'))).get('job')
        if job == 'pretrain':
            return path, ''
        if job == 'carb':
            return '', path
    raise ConfigError(f'{path} is not a model directory: expected stage1/ and stage2/ (a quick-start workdir or '
                      'the output of python -m sce_mae_jax.export), or one training workdir')


@dataclasses.dataclass(frozen=True)
class RegressorUnit:
    """One trained detection regressor: `detection/<set>/<row>/` with its regressor.json and checkpoint."""
    set: str
    row: str
    path: str

    @property
    def name(self) -> str:
        return f'{self.set}/{self.row}'

    def settings(self) -> dict:
        return json.loads(fileio.read_text(os.path.join(self.path, 'regressor.json')))


def regressor_units(path: str) -> list[RegressorUnit]:
    """The finished regressors under `path/detection/`, sets in name order."""
    root = os.path.join(path, 'detection')
    if not fileio.isdir(root):
        return []
    out = []
    for s in sorted(fileio.listdir(root)):
        for r in sorted(fileio.listdir(os.path.join(root, s)) if fileio.isdir(os.path.join(root, s)) else []):
            unit = os.path.join(root, s, r)
            if fileio.exists(os.path.join(unit, 'regressor.json')) and checkpoints.has_checkpoint(unit):
                out.append(RegressorUnit(s, r, unit))
    return out


def _choose(units: list[RegressorUnit], rows: dict, wanted: str | None) -> RegressorUnit | None:
    usable = [u for u in units if u.row in rows]
    if wanted:
        hit = [u for u in usable if u.name == wanted]
        if not hit:
            raise ConfigError(f'regressor={wanted!r} is not among this model\'s regressors '
                              f'({", ".join(u.name for u in usable) or "none"})')
        return hit[0]
    for row in PREFERRED_ROWS:  # sets in name order: synthetic_5 (the MAFL points) before synthetic_68
        for u in usable:
            if u.row == row:
                return u
    return None


def _as_images(images) -> list[np.ndarray]:
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    out = []
    for im in images:
        im = np.asarray(im)
        if im.ndim == 2:
            im = np.repeat(im[..., None], 3, -1)
        if im.ndim != 3 or im.shape[-1] not in (3, 4) or im.dtype != np.uint8:
            raise ValueError(f'expected (H, W, 3) uint8 images, got {im.shape} {im.dtype}')
        out.append(im[..., :3])
    return out


# one compilation per program: every Landmarker of a process (and every batch of it) shares them
@functools.lru_cache(maxsize=None)
def _landmark_program(encoder, kind, projector, stride, block, regressor, mesh):
    feats_fn = regressor_lib.features_fn(rows_lib.Row('program', kind, projector=projector), encoder, stride, block)
    fn = functools.partial(regressor_lib.predict, feats_fn=feats_fn, regressor=regressor, size=encoder.image_size)
    repl, data = common.replicated(mesh), common.data_sharded(mesh)
    return jax.jit(fn, in_shardings=(repl, repl, data), out_shardings=repl)


@functools.lru_cache(maxsize=None)
def _feature_program(encoder, kind, projector, stride, block, mesh):
    fc = ml_collections.ConfigDict({'stride': stride, 'block': block})
    fn = matching.features_fn_for(rows_lib.Row('program', kind, projector=projector), encoder, fc,
                                  encoder.image_size)
    repl, data = common.replicated(mesh), common.data_sharded(mesh)
    return jax.jit(fn, in_shardings=(repl, repl, data), out_shardings=repl)


class Landmarker:
    """Landmarks, descriptor maps and correspondences of a trained model on images of any size.

    Images: one (H, W, 3) uint8 array, a list of them (sizes may differ) or an (N, H, W, 3) array.
    `crop` ('center' or 'none') or per-image `boxes` (x0, y0, x1, y1) place each face in the model's frame
    (`data.framing`); every point taken or returned is xy in the image's own pixels, pixel (r, c) centred at
    x = c, y = r.
    """

    def __init__(self, encoder, rows: dict, regressor_unit: RegressorUnit | None = None, *, path: str = '',
                 match_stride: int = 4, batch_size: int = 32, mesh=None):
        self.encoder, self.rows, self.path = encoder, rows, path
        self.mesh = mesh or common.make_mesh()
        n = jax.device_count()
        self.batch_size = -(-batch_size // n) * n
        self.size = encoder.image_size
        # matching reads the paper's model when there is one, like the evaluation's sce_mae row
        self.match_row = next(rows[r] for r in PREFERRED_ROWS if r in rows)
        features.check_config(ml_collections.ConfigDict({'stride': match_stride, 'block': -1}), encoder)
        self.match_stride = match_stride
        self.regressor = self.regressor_row = self.regressor_params = None
        self.regressor_name, self.num_landmarks = '', 0
        if regressor_unit is not None:
            self._load_regressor(regressor_unit)

    @classmethod
    def load(cls, path: str, *, regressor: str | None = None, **kw) -> 'Landmarker':
        """A quick-start workdir or an exported model. `regressor='SET/ROW'` (e.g. 'synthetic_68/sce_mae')
        picks one of its detection regressors; default: the first set's `sce_mae` regressor, else `mae`'s."""
        stage1, stage2 = stage_dirs(path)
        config = ml_collections.ConfigDict({'stage1': stage1, 'stage2': stage2, 'random_init_carb': '',
                                            'extra': '', 'rows': PREFERRED_ROWS[::-1], 'seed': 0})
        encoder, rows, _ = rows_lib.load_rows(config)
        rows = {r.name: r for r in rows}
        return cls(encoder, rows, _choose(regressor_units(path), rows, regressor), path=path, **kw)

    def _load_regressor(self, unit: RegressorUnit) -> None:
        settings, row = unit.settings(), self.rows[unit.row]
        if settings.get('digest') not in (None, row.digest):
            raise ConfigError(f'regressor {unit.path} was trained on other {unit.row} weights than {row.source} '
                              'holds (its digest differs); retrain it, or export the workdir it came from')
        params = checkpoints.load_params(unit.path)
        rc = settings['regressor']
        self.regressor = Regressor(params['combine'].shape[0], rc['heatmaps_per_landmark'], tuple(rc['hidden']),
                                   rc['kernel_size'], rc['temperature'])
        fc = settings['features']
        self._landmark_fn = _landmark_program(self.encoder, row.kind, row.projector, fc['stride'], fc['block'],
                                              self.regressor, self.mesh)
        self.regressor_row, self.regressor_params = row, common.replicate(params, self.mesh)
        self._frozen = common.replicate(regressor_lib.frozen_of(row), self.mesh)
        self.regressor_name, self.num_landmarks = unit.name, int(params['combine'].shape[0])

    # ------------------------------------------------------------------------------------------ framing
    def frames(self, images, crop: str = 'center', boxes=None) -> tuple[np.ndarray, list[framing.Frame]]:
        """(the model's (N, size, size, 3) uint8 inputs, each image's `Frame`)."""
        images = _as_images(images)
        if boxes is not None and len(boxes) != len(images):
            raise ValueError(f'{len(boxes)} boxes for {len(images)} images')
        frames = [framing.frame_for(im.shape[:2], self.size, crop, None if boxes is None else boxes[i])
                  for i, im in enumerate(images)]
        crops = [framing.to_model_image(im, f) for im, f in zip(images, frames)]
        return np.stack(crops) if crops else np.zeros((0, self.size, self.size, 3), np.uint8), frames

    def _run(self, fn, args, crops: np.ndarray) -> np.ndarray:
        """fn(*args, batch) over fixed-size batches split on `data`, the last one padded with copies."""
        n = len(crops)
        b = min(self.batch_size, -(-n // jax.device_count()) * jax.device_count())
        out = []
        for i in range(0, n, b):
            chunk = crops[i:i + b]
            padded = np.concatenate([chunk, np.repeat(chunk[:1], b - len(chunk), 0)]) if len(chunk) < b else chunk
            batch = common.global_batch({'image': padded}, common.data_sharded(self.mesh))['image']
            out.append(np.asarray(fn(*args, batch))[:len(chunk)])
        return np.concatenate(out) if out else np.zeros((0,))

    # ------------------------------------------------------------------------------------------ the API
    def landmarks_in_model_frame(self, crops: np.ndarray) -> np.ndarray:
        """(N, size, size, 3) model inputs → (N, K, 2) xy in their pixels: the evaluation's `predict`."""
        if self.regressor is None:
            raise ConfigError(f'{self.path} holds no detection regressor for its rows '
                              f'({", ".join(self.rows)}); train one with configs/eval_detection.py '
                              '(the quick start does) and export that workdir')
        return self._run(self._landmark_fn, (self.regressor_params, self._frozen), crops)

    def landmarks(self, images, crop: str = 'center', boxes=None) -> np.ndarray:
        """(N, K, 2) landmarks, xy in each image's own pixels."""
        crops, frames = self.frames(images, crop, boxes)
        pts = self.landmarks_in_model_frame(crops)
        return np.stack([f.to_original(p) for f, p in zip(frames, pts)]) if len(frames) else \
            np.zeros((0, self.num_landmarks, 2))

    def features_in_model_frame(self, crops: np.ndarray) -> np.ndarray:
        row = self.match_row
        fn = _feature_program(self.encoder, row.kind, row.projector, self.match_stride, -1, self.mesh)
        return self._run(fn, common.replicate((row.backbone, row.proj_params), self.mesh), crops)

    def features(self, images, crop: str = 'center', boxes=None) -> np.ndarray:
        """(N, size, size, C) descriptor maps of the model inputs (see `frames`), as the matching evaluation
        computes them: cover-and-stride at `match_stride`, bilinear to size x size, then the projector."""
        return self.features_in_model_frame(self.frames(images, crop, boxes)[0])

    def match(self, a, b, points=None, crop: str = 'center', boxes=None) -> np.ndarray:
        """Where `points` ((L, 2) xy in image `a`; default: its landmarks) land in image `b`, by the
        evaluation's rule (`metrics.match_points`): (L, 2) xy in b's pixels."""
        return self.correspondences(a, b, points, crop, boxes)['target_points']

    def correspondences(self, a, b, points=None, crop: str = 'center', boxes=None) -> dict:
        """`match` with what a figure needs: both model inputs, the points in their frames and, per point,
        the cosine similarity of its descriptor to every pixel of b's input ((L, size, size))."""
        crops, frames = self.frames([*_as_images(a), *_as_images(b)], crop, boxes)
        if points is None:
            points = self.landmarks_in_model_frame(crops[:1])[0]
        else:
            points = frames[0].to_model(np.asarray(points, np.float64).reshape(-1, 2))
        outside = (points < -0.5) | (points > self.size - 0.5)
        feats = self.features_in_model_frame(crops)
        pred = np.asarray(metrics.match_points(feats[:1], feats[1:], points[None].astype(np.float32)))[0]
        query = np.asarray(metrics.descriptors_at(feats[:1], points[None]))[0]        # (L, C), unit norm
        tgt = feats[1] / np.maximum(np.linalg.norm(feats[1], axis=-1, keepdims=True), 1e-8)
        return {'source_image': crops[0], 'target_image': crops[1], 'source_points_model': points,
                'target_points_model': pred, 'similarity': np.einsum('lc,hwc->lhw', query, tgt),
                'source_points': frames[0].to_original(points), 'target_points': frames[1].to_original(pred),
                'outside': outside.any(-1), 'frames': frames}

    def describe(self) -> dict:
        return {'model': self.path, 'rows': {k: r.source for k, r in self.rows.items()},
                'regressor': self.regressor_name, 'landmarks': self.num_landmarks, 'input_size': self.size,
                'match_row': self.match_row.name, 'match_stride': self.match_stride}
