"""The synthetic faces rendered once into array_record files, so that training reads them instead of rendering.

    python -m sce_mae_jax.data.prepare --dataset=synthetic --data_dir=/data/tfds
    python -m sce_mae_jax.main --config=configs/mae_deit_s.py --config.data_dir=/data/tfds --workdir=...

Why: rendering costs ~3 ms of one core per face, reading a stored one far less (docs/benchmarks.md, "input
pipeline per core"); a GPU step of thousands of images/s would otherwise need tens of cores just to render.
Every face is a pure function of (seed, split, index), so the records hold exactly what `SyntheticFaces`
renders, and `sources.get_source('synthetic', ..., data_dir=...)` returns them wherever they are prepared.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from sce_mae_jax.data import synthetic
from sce_mae_jax.data.builders import base

NAME = 'sce_synthetic'


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
    seed: int = 0
    clutter: bool = True
    placement: str = 'aligned'


def config_name(seed: int, clutter: bool, placement: str = 'aligned') -> str:
    wild = '' if placement == 'aligned' else f'_{placement}'
    return f'{"clutter" if clutter else "plain"}{wild}_seed{seed}'


class SceSynthetic(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """All four splits of `SyntheticFaces(split, seed, clutter=...)`; `num_examples` (set before preparing)
    caps every split (quick runs and tests), else each split has its `synthetic.DEFAULT_SIZES`."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'SyntheticFaces rendered at 136 px.'}
    code_path = None  # no checksums file to look up: nothing is downloaded (as builders/base.py)
    num_examples: int | None = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description='Procedural faces of sce_mae_jax.data.synthetic, rendered once.',
            features=tfds.features.FeaturesDict({
                # raw bytes: the default encoding stores each uint8 as a protobuf int64 varint, which
                # takes several times longer to decode (docs/benchmarks.md)
                'image': tfds.features.Tensor(shape=(synthetic.IMAGE_SIZE, synthetic.IMAGE_SIZE, 3),
                                              dtype=np.uint8, encoding=tfds.features.Encoding.BYTES),
                'landmarks': tfds.features.Tensor(shape=(5, 2), dtype=np.float32),
                'landmarks68': tfds.features.Tensor(shape=(68, 2), dtype=np.float32),
                'identity': tfds.features.Tensor(shape=(), dtype=np.int32),
                'index': tfds.features.Tensor(shape=(), dtype=np.int64),
            }),
            disable_shuffling=True,  # record i is face i, as the generator's index
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in synthetic.SPLITS}

    def _generate_examples(self, split: str):
        n = synthetic.DEFAULT_SIZES[split]
        n = n if self.num_examples is None else min(n, self.num_examples)
        faces = synthetic.SyntheticFaces(split, seed=self.builder_config.seed, num_examples=n,
                                         clutter=self.builder_config.clutter,
                                         placement=self.builder_config.placement)
        for i in range(n):
            item = faces[i]
            yield i, {**item, 'landmarks68': np.asarray(item['landmarks68'], np.float32)}


def builder(seed: int, clutter: bool, data_dir: str | None, placement: str = 'aligned') -> SceSynthetic:
    config = SyntheticConfig(name=config_name(seed, clutter, placement), seed=seed, clutter=clutter,
                             placement=placement)
    return SceSynthetic(config=config, data_dir=data_dir, file_format='array_record')


class PreparedFaces(synthetic.SyntheticFaces):
    """A prepared split read back: the same items and attributes as `SyntheticFaces`, from the records."""

    def __init__(self, prepared: SceSynthetic, split: str):
        cfg = prepared.builder_config
        self._records = prepared.as_data_source(split=split)
        super().__init__(split, seed=cfg.seed, num_examples=len(self._records), clutter=cfg.clutter,
                         placement=cfg.placement)

    def __repr__(self) -> str:
        return 'Prepared' + super().__repr__()

    def read_images(self, indices) -> np.ndarray:
        """uint8 (n, 136, 136, 3): the images alone of these faces (`base.read_images`)."""
        return base.read_images(self._records, indices)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not -self.num_examples <= index < self.num_examples:
            raise IndexError(f'index {index} out of range for {self!r}')
        r = self._records[index % self.num_examples]
        return {'image': np.asarray(r['image'], np.uint8), 'landmarks': np.asarray(r['landmarks'], np.float32),
                'landmarks68': np.asarray(r['landmarks68'], np.float32), 'identity': np.int32(r['identity']),
                'index': np.int64(r['index'])}
