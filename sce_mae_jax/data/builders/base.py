"""Shared pieces of the landmark-dataset TFDS builders.

Every builder reads a user-prepared ``manual_dir`` (layouts in docs/datasets.md), applies the protocol
transform of `preprocess.py` once at preparation time and writes array_record files whose features need no
TensorFlow to encode or decode:

  image      Tensor (136, 136, 3) uint8   already preprocessed, stored as raw bytes (Encoding.BYTES)
  landmarks  Tensor (L, 2) float32        xy in the 136-px frame (pixel (r, c) has centre x=c, y=r)
  index      Tensor () int64              position in the split, = file order of the dataset's lists
  filename   Tensor () str                image path relative to manual_dir, for tracing

Shuffling is disabled so that record ``i`` is the ``i``-th image in the dataset's own list: the matching
protocol pairs MAFL test images in file order.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import tensorflow_datasets as tfds

from sce_mae_jax.data import preprocess, worker_transport
from sce_mae_jax.data.preprocess import DatasetError

DOCS = 'see docs/datasets.md'


def read_images(records, record_keys) -> np.ndarray:
    """The 'image' feature alone of `records` (a prepared split's TFDS data source) at `record_keys`, as one
    uint8 (n, H, W, 3) batch: the same pixels as reading each record through TFDS
    (tests/test_prepare_synthetic.py), at 2.4x the rate, because TFDS decodes every feature of every record
    and that cost more than the read. The records are read one by one: array_record's own batched read
    starts a thread pool per call and was slower than the loop (docs/benchmarks.md, input pipeline)."""
    from tensorflow_datasets.proto import tf_example_pb2
    shape = records.dataset_info.features['image'].shape
    reader = records.data_source
    raw = [reader[int(k)] for k in record_keys]
    out = worker_transport.empty((len(raw), *shape), np.uint8)  # in a grain worker: straight into shared memory
    for i, record in enumerate(raw):
        image = tf_example_pb2.Example.FromString(record).features.feature['image'].bytes_list.value[0]
        out[i] = np.frombuffer(image, np.uint8).reshape(shape)
    return out


@dataclasses.dataclass(frozen=True)
class Example:
    """One raw annotated face before preprocessing.

    Attributes:
        image: image path relative to the manual_dir.
        landmarks: ``(L, 2)`` xy in the raw file's convention (0- or 1-based, see each builder).
        box: optional ``(4,)`` face box (300W ground truth, 1-based ``xmin, ymin, xmax, ymax``).
    """
    image: str
    landmarks: np.ndarray
    box: np.ndarray | None = None


def require(manual_dir: Path, rel: str, layout: str) -> Path:
    """Returns ``manual_dir / rel`` or raises DatasetError naming it and describing its layout."""
    path = Path(manual_dir) / rel
    if not path.exists():
        raise DatasetError(f'expected {rel} under {manual_dir}: {layout}; {DOCS}')
    return path


def read_lines(path: Path) -> list[str]:
    """Non-empty lines, stripped (tolerates CRLF files)."""
    with open(path, encoding='utf-8', errors='replace') as f:
        return [line.strip() for line in f if line.strip()]


def check_images(manual_dir: Path, index: dict[str, list[Example]], what: str) -> None:
    """Raises DatasetError listing (the first few) missing image files, before TFDS starts writing."""
    missing = [ex.image for exs in index.values() for ex in exs
               if not os.path.isfile(os.path.join(manual_dir, ex.image))]
    if missing:
        shown = ', '.join(missing[:5]) + (f' and {len(missing) - 5} more' if len(missing) > 5 else '')
        raise DatasetError(f'{len(missing)} {what} image(s) listed in the annotations are missing under '
                           f'{manual_dir}: {shown}; {DOCS}')
    for split, exs in index.items():
        if not exs:
            raise DatasetError(f'{what}: split {split!r} is empty after reading the annotations in '
                               f'{manual_dir}; {DOCS}')


class LandmarkBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the five builders; subclasses define `read_index` and `preprocess`."""

    VERSION = tfds.core.Version('1.1.0')
    RELEASE_NOTES = {'1.0.0': 'Protocol preprocessing of method.md §4 at 136 px.',
                     '1.1.0': 'Images stored as raw bytes (Encoding.BYTES) instead of one int64 per byte.'}
    MANUAL_DOWNLOAD_INSTRUCTIONS = 'Prepare the files in the layout of docs/datasets.md and pass manual_dir.'
    NUM_LANDMARKS = 5
    IOD_INDICES = (0, 1)  # eye centres for 5-point sets (landmarks: l-eye, r-eye, nose, l-mouth, r-mouth)
    DESCRIPTION = ''
    HOMEPAGE = ''
    # Images are decoded and resized in threads (PIL releases the GIL); chunks bound the memory held.
    _CHUNK = 256
    # TFDS looks for a checksums file next to the builder's code, and its lookup imports the optional
    # `importlib_resources` package for builders defined inside a package. Nothing is downloaded here.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            homepage=self.HOMEPAGE,
            features=tfds.features.FeaturesDict({
                # raw bytes: TFDS's default stores each uint8 as a protobuf int64 varint, which costs most of a
                # core's reading time (docs/benchmarks.md, "Input pipeline per core")
                'image': tfds.features.Tensor(shape=(preprocess.OUT_SIZE, preprocess.OUT_SIZE, 3), dtype=np.uint8,
                                              encoding=tfds.features.Encoding.BYTES),
                'landmarks': tfds.features.Tensor(shape=(self.NUM_LANDMARKS, 2), dtype=np.float32),
                'index': tfds.features.Tensor(shape=(), dtype=np.int64),
                'filename': tfds.features.Tensor(shape=(), dtype=np.str_),
            }),
            disable_shuffling=True,
        )

    @abc.abstractmethod
    def read_index(self, manual_dir: Path) -> dict[str, list[Example]]:
        """Parses the annotation files into ``{split: [Example, ...]}`` in file order (DatasetError if bad)."""

    @abc.abstractmethod
    def preprocess(self, image: np.ndarray, example: Example) -> tuple[np.ndarray, np.ndarray]:
        """Protocol transform: raw ``(H, W, 3)`` uint8 -> (136x136 image, ``(L, 2)`` landmarks)."""

    def validate(self, manual_dir: Path) -> dict[str, list[Example]]:
        """Reads the annotations and checks every listed image exists; raises DatasetError otherwise."""
        manual_dir = Path(manual_dir)
        if not manual_dir.is_dir():
            raise DatasetError(f'manual_dir {manual_dir} is not a directory; {DOCS}')
        index = self.read_index(manual_dir)
        check_images(manual_dir, index, self.name)
        return index

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = Path(dl_manager.manual_dir)
        index = self.read_index(manual_dir)
        return {split: self._generate_examples(manual_dir, examples) for split, examples in index.items()}

    def _load_one(self, manual_dir: Path, example: Example):
        path = manual_dir / example.image
        try:
            image, landmarks = self.preprocess(preprocess.load_rgb(path), example)
        except DatasetError as e:  # the protocol transforms judge pixels and points, not files: name it
            if str(path) in str(e):
                raise
            raise DatasetError(f'{path}: {e}') from None
        if not np.all(np.isfinite(landmarks)):
            raise DatasetError(f'non-finite landmarks for {example.image} under {manual_dir}')
        return image, landmarks

    def _generate_examples(self, manual_dir: Path, examples: list[Example]):
        load: Callable = lambda ex: self._load_one(manual_dir, ex)
        workers = min(8, os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for start in range(0, len(examples), self._CHUNK):
                chunk = examples[start:start + self._CHUNK]
                for offset, (ex, (image, landmarks)) in enumerate(zip(chunk, pool.map(load, chunk))):
                    i = start + offset
                    yield i, {'image': image, 'landmarks': landmarks.astype(np.float32), 'index': i,
                              'filename': ex.image}


def floats(tokens: Iterable[str], path: Path, lineno: int, layout: str) -> np.ndarray:
    """Parses number strings into float64, naming the file, line and expected layout on failure."""
    tokens = list(tokens)
    try:
        return np.array([float(t) for t in tokens], np.float64)
    except ValueError:
        raise DatasetError(f'malformed line {lineno} of {path}: {" ".join(tokens)!r}; expected {layout}; '
                           f'{DOCS}') from None
