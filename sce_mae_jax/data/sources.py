"""Random-access sources (grain ``RandomAccessDataSource`` protocol) for every dataset by name.

    src = get_source('mafl', 'test', manual_dir='/data/celeba', data_dir='/data/tfds')
    item = src[0]   # {'image': uint8 (136, 136, 3), 'landmarks': float32 (L, 2) xy, 'index': int64}

Landmarks are xy in the 136-px frame where pixel (r, c) has its centre at x = c, y = r (preprocess.py).
Each source exposes ``num_landmarks`` (5, or 68 for 300W) and ``iod_indices`` (the landmark pair whose
distance normalises the detection error: eye centres (0, 1), or outer eye corners (36, 45) for 300W).

Real datasets are TFDS builders (builders/) written as array_record into ``data_dir``; the first call
prepares them from ``manual_dir`` (layouts in docs/datasets.md), later calls only read. A missing or
malformed file raises `DatasetError` naming the path and its expected layout before TFDS writes anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, SupportsIndex

import numpy as np
from absl import logging

from sce_mae_jax.data.preprocess import DatasetError
from sce_mae_jax import errors
from sce_mae_jax.errors import ConfigError

__all__ = ['ConfigError', 'DatasetError', 'DATASETS', 'NAMES', 'LandmarkSource', 'check', 'get_builder',
           'get_source', 'prepare', 'splits_of']

# name -> (builder module, builder class, builder config or None, splits)
DATASETS = {
    'celeba': ('celeba', 'SceCeleba', None, ('pretrain',)),
    'mafl': ('mafl', 'SceMafl', None, ('train', 'test')),
    'aflw_m': ('aflw_m', 'SceAflwM', None, ('train', 'test')),
    'aflw_r': ('aflw_r', 'SceAflwR', 'default', ('train', 'test')),
    'aflw_rc': ('aflw_r', 'SceAflwR', 'rc', ('train', 'test')),
    '300w': ('w300', 'SceW300', None, ('train', 'test')),
}
SYNTHETIC = 'synthetic'
SYNTHETIC_PLAIN = 'synthetic_plain'  # the same faces on smooth backgrounds, without the clutter shapes
SYNTHETIC_WILD = 'synthetic_wild'    # the content benchmark: the faces anywhere in the crop, at wide poses
# name -> SyntheticFaces(clutter, placement) of the generated datasets
SYNTHETIC_VARIANTS = {SYNTHETIC: (True, 'aligned'), SYNTHETIC_PLAIN: (False, 'aligned'),
                      SYNTHETIC_WILD: (True, 'wild')}
NAMES = (*SYNTHETIC_VARIANTS, *DATASETS)


def _check_name(name: str) -> tuple:
    if name not in DATASETS:
        raise ConfigError(f'unknown dataset {name!r}; choose one of {", ".join(NAMES)}')
    return DATASETS[name]


def splits_of(name: str) -> tuple[str, ...]:
    """The splits dataset `name` has; ConfigError naming the datasets if it is none of them."""
    if name in SYNTHETIC_VARIANTS:
        from sce_mae_jax.data.synthetic import SPLITS
        return SPLITS
    return _check_name(name)[3]


def check(name: str, split: str | None = None) -> None:
    """Raises ConfigError (a ValueError) naming the valid choices for an unknown dataset or split. Cheap: the
    command line checks every config's data and split with it before any job starts."""
    splits = splits_of(name)
    if split is not None and split not in splits:
        raise ConfigError(f'dataset {name!r} has splits {", ".join(splits)}, not {split!r}')


def is_prepared(builder) -> bool:
    """TFDS's check, asked only where the version folder exists: for a folder never written TFDS warns that it
    lacks a dataset_info.json, which reads as a broken dataset when it is merely not prepared yet."""
    return builder.data_path.exists() and builder.is_prepared()


def _older_versions(builder) -> list[str]:
    """Version folders of `builder`'s dataset in its data_dir other than the one this code reads: a dataset
    prepared by an earlier release, whose record encoding this version must not guess at."""
    parent = builder.data_path.parent
    if not parent.exists():
        return []
    return sorted(p.name for p in parent.iterdir() if p.name != str(builder.version) and p.is_dir()
                  and p.name[:1].isdigit())


def get_builder(name: str, data_dir: str | os.PathLike | None = None):
    """The TFDS builder of a real dataset (nothing is read or written)."""
    import importlib  # builders import tensorflow_datasets: keep `synthetic` free of it

    module, cls, config, _ = _check_name(name)
    builder_cls = getattr(importlib.import_module(f'sce_mae_jax.data.builders.{module}'), cls)
    kwargs = {'config': config} if config else {}
    return builder_cls(data_dir=None if data_dir is None else os.fspath(data_dir),
                       file_format='array_record', **kwargs)



def prepare(name: str, *, manual_dir: str | os.PathLike | None = None,
            data_dir: str | os.PathLike | None = None):
    """Prepares ``name`` into ``data_dir`` unless already there; returns the builder.

    Raises:
        DatasetError: not prepared and no manual_dir, or a file of manual_dir missing/malformed.
    """
    builder = get_builder(name, data_dir)
    if is_prepared(builder):
        return builder
    older = _older_versions(builder)
    if older and manual_dir is None:
        raise DatasetError(f'dataset {name!r} in {builder.data_path.parent} was prepared by an older version of '
                           f'this project ({", ".join(older)}; this one reads {builder.version}, whose records '
                           f'store images as raw bytes): prepare it again with `python -m sce_mae_jax.data.prepare '
                           f'--dataset={name} --manual_dir=<its raw files> --data_dir={builder.data_dir}` '
                           '(docs/datasets.md), or pass manual_dir and it is prepared on first use')
    if manual_dir is None:
        raise DatasetError(f'dataset {name!r} is not prepared in {builder.data_dir}: pass manual_dir (the '
                           f'folder holding its raw files) or run `python -m sce_mae_jax.data.prepare '
                           f'--dataset={name} --manual_dir=... --data_dir=...`; see docs/datasets.md')
    manual_dir = Path(manual_dir).expanduser().resolve()
    # Validate first so that a user sees our message, not a traceback from inside TFDS's writer.
    builder.validate(manual_dir)
    import tensorflow_datasets as tfds
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
    except Exception as e:
        found = errors.cause_of(e, DatasetError)
        if found is None:
            raise
        raise found from None
    store_uncompressed(builder)
    return builder


class LandmarkSource:
    """A prepared split as a grain random-access source of ``{'image', 'landmarks', 'index'}`` dicts.

    Attributes:
        name, split: what it holds.
        num_landmarks: L.
        iod_indices: landmark indices of the inter-ocular distance.
    """

    def __init__(self, data_source, *, name: str, split: str, num_landmarks: int,
                 iod_indices: tuple[int, int]):
        self._source = data_source
        self.name = name
        self.split = split
        self.num_landmarks = num_landmarks
        self.iod_indices = tuple(iod_indices)

    def __len__(self) -> int:
        return len(self._source)

    @staticmethod
    def _item(record: dict[str, Any]) -> dict[str, np.ndarray]:
        return {'image': np.asarray(record['image'], np.uint8),
                'landmarks': np.asarray(record['landmarks'], np.float32),
                'index': np.int64(record['index'])}

    def __getitem__(self, record_key: SupportsIndex) -> dict[str, np.ndarray]:
        i = record_key.__index__()
        if not -len(self) <= i < len(self):
            raise IndexError(f'index {i} out of range for {self!r}')
        return self._item(self._source[i % len(self)])

    def __getitems__(self, record_keys):
        return [self[k] for k in record_keys]

    def read_images(self, record_keys) -> np.ndarray:
        """uint8 (n, 136, 136, 3): the images alone of these records (`builders.base.read_images`)."""
        from sce_mae_jax.data.builders import base
        return base.read_images(self._source, record_keys)

    def filename(self, record_key: SupportsIndex) -> str:
        """Image path (relative to the manual_dir) of a record, for tracing results back to files."""
        value = self._source[record_key.__index__()]['filename']
        return value.decode() if isinstance(value, bytes) else str(value)

    def __repr__(self) -> str:
        return (f'LandmarkSource({self.name!r}, {self.split!r}, len={len(self)}, '
                f'num_landmarks={self.num_landmarks}, iod_indices={self.iod_indices})')


def _synthetic_source(split: str, *, seed: int, clutter: bool, placement: str, data_dir):
    """The faces from `python -m sce_mae_jax.data.prepare --dataset=synthetic` when they are prepared in
    `data_dir` (the same items, read instead of rendered), else rendered on the fly. Without a data_dir nothing
    but the generator is imported (TFDS is slow to import)."""
    from sce_mae_jax.data import synthetic  # written separately; imported only when asked for
    if data_dir is not None:
        from sce_mae_jax.data.builders import synthetic as stored
        prepared = stored.builder(seed, clutter, os.fspath(data_dir), placement)
        if is_prepared(prepared):
            faces = stored.PreparedFaces(prepared, split)
            if len(faces) != synthetic.DEFAULT_SIZES[split]:  # prepared with --num_examples: epochs change
                logging.warning('reading %d prepared synthetic %s faces from %s (the generator has %d)',
                                len(faces), split, prepared.data_dir, synthetic.DEFAULT_SIZES[split])
            return faces
    return synthetic.SyntheticFaces(split, seed=seed, clutter=clutter, placement=placement)


# TFDS writes array_record shards zstd-compressed ('group_size:1' with the library's default zstd:3); faces
# stored as raw pixels shrink by ~15% that way, and every random read pays a decompression: 0.099 against
# 0.026 ms per 136-px record (docs/benchmarks.md, input pipeline). Prepared shards are rewritten uncompressed.
# Readers detect the compression per chunk, so shards written either way read the same records.
UNCOMPRESSED = 'group_size:1,uncompressed'


def store_uncompressed(builder) -> None:
    """Rewrites each array_record shard of a prepared `builder` without compression, one shard at a time
    through a temporary file and an atomic rename: an interrupted rewrite leaves every shard whole."""
    from array_record.python import array_record_module as ar
    for path in sorted(builder.data_path.glob('*.array_record-*')):
        if '.tmp' in path.name:
            continue
        reader = ar.ArrayRecordReader(os.fspath(path))
        if 'uncompressed' in reader.writer_options_string():
            reader.close()
            continue
        tmp = path.with_name(path.name + '.tmp')
        writer = ar.ArrayRecordWriter(os.fspath(tmp), UNCOMPRESSED)
        for i in range(0, reader.num_records(), 256):
            for record in reader.read(list(range(i, min(i + 256, reader.num_records())))):
                writer.write(record)
        writer.close()
        reader.close()
        os.replace(tmp, path)


def prepare_synthetic(name: str, *, data_dir=None, seed: int = 0, num_examples: int | None = None):
    """Renders a generated dataset (SYNTHETIC_VARIANTS: all splits, each capped at `num_examples`) into
    `data_dir` unless there already; returns the builder. A different cap than the prepared one is an error, not
    a silent reuse."""
    from sce_mae_jax.data.builders import synthetic as stored
    clutter, placement = SYNTHETIC_VARIANTS[name]
    builder = stored.builder(seed, clutter, None if data_dir is None else os.fspath(data_dir), placement)
    if is_prepared(builder):
        from sce_mae_jax.data import synthetic
        want = {s: n if num_examples is None else min(n, num_examples) for s, n in synthetic.DEFAULT_SIZES.items()}
        have = {s: info.num_examples for s, info in builder.info.splits.items()}
        if have != want:
            raise DatasetError(f'{name} seed {seed} is already prepared in {builder.data_dir} with {have} '
                               f'examples, not {want}: delete that folder to prepare it again')
        return builder
    builder.num_examples = num_examples
    builder.download_and_prepare()
    store_uncompressed(builder)
    return builder


def get_source(name: str, split: str, *, manual_dir: str | os.PathLike | None = None,
               data_dir: str | os.PathLike | None = None, seed: int = 0):
    """A random-access source for ``name``/``split``.

    Args:
        name: ``synthetic``, ``synthetic_plain`` (no background clutter), ``synthetic_wild`` (faces anywhere
            in the crop, wide poses: the content benchmark), ``celeba`` (split ``pretrain``),
            ``mafl``, ``aflw_m``, ``aflw_r``, ``aflw_rc`` or ``300w`` (splits ``train``, ``test``).
        split: see above.
        manual_dir: raw files, needed only the first time (preparation).
        data_dir: where the prepared array_record files live (TFDS default ``~/tensorflow_datasets``).
        seed: only for ``synthetic``; with a data_dir where `prepare_synthetic` has written that seed, the
            faces are read from there instead of rendered.
    Returns:
        An object with ``__len__``, ``__getitem__`` -> ``{'image': uint8 (136, 136, 3), 'landmarks': float32
        (L, 2), 'index': int64}``, ``num_landmarks`` and ``iod_indices``.
    """
    check(name, split)
    if name in SYNTHETIC_VARIANTS:
        clutter, placement = SYNTHETIC_VARIANTS[name]
        source = _synthetic_source(split, seed=seed, clutter=clutter, placement=placement, data_dir=data_dir)
        # Same attributes as the real sets; its 'landmarks' are the 5 MAFL-order points.
        for attr, default in (('num_landmarks', 5), ('iod_indices', (0, 1))):
            if not hasattr(source, attr):
                setattr(source, attr, default)
        return source
    builder = prepare(name, manual_dir=manual_dir, data_dir=data_dir)
    return LandmarkSource(builder.as_data_source(split=split), name=name, split=split,
                          num_landmarks=builder.NUM_LANDMARKS, iod_indices=builder.IOD_INDICES)
