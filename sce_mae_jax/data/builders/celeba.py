"""CelebA (aligned) pretraining set: CelebA partition 0 minus every MAFL image (method.md §5).

Used for stage-1 and stage-2 training. Layout under manual_dir (docs/datasets.md):

  Img/img_align_celeba/000001.jpg ...        aligned 178x218 images
  Anno/list_landmarks_align_celeba.txt       line 1: image count; line 2: the 10 column names;
                                             then ``name lefteye_x lefteye_y righteye_x ... rightmouth_y``
  Eval/list_eval_partition.txt               ``name partition`` (0 train, 1 val, 2 test)
  MAFL/training.txt, MAFL/testing.txt        one image name per line (first token; extra columns ignored)

The CelebA/MAFL readers live here because MAFL (mafl.py) reuses them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sce_mae_jax.data import preprocess
from sce_mae_jax.data.builders import base
from sce_mae_jax.data.preprocess import DatasetError

IMAGE_DIR = 'Img/img_align_celeba'
LANDMARKS_FILE = 'Anno/list_landmarks_align_celeba.txt'
PARTITION_FILE = 'Eval/list_eval_partition.txt'
MAFL_FILES = {'train': 'MAFL/training.txt', 'test': 'MAFL/testing.txt'}

_LANDMARKS_LAYOUT = ('line 1 the number of images, line 2 the 10 column names, then one line per image: '
                     'name and 10 numbers (x, y of left eye, right eye, nose, left mouth, right mouth)')
_PARTITION_LAYOUT = 'one line per image: name and partition (0 train, 1 val, 2 test)'
_MAFL_LAYOUT = 'one image filename per line'


def read_landmarks(manual_dir: Path) -> dict[str, np.ndarray]:
    """``{image name: (5, 2) xy}`` in file order, from the aligned-landmarks file (0-based, as DVE uses it)."""
    path = base.require(manual_dir, LANDMARKS_FILE, _LANDMARKS_LAYOUT)
    lines = base.read_lines(path)
    if len(lines) < 2 or not lines[0].isdigit():
        raise DatasetError(f'malformed {path}: expected {_LANDMARKS_LAYOUT}; {base.DOCS}')
    out = {}
    for lineno, line in enumerate(lines[2:], 3):
        tokens = line.split()
        if len(tokens) != 11:
            raise DatasetError(f'malformed line {lineno} of {path}: {line!r}; expected {_LANDMARKS_LAYOUT}; '
                               f'{base.DOCS}')
        out[tokens[0]] = base.floats(tokens[1:], path, lineno, _LANDMARKS_LAYOUT).reshape(5, 2)
    if len(out) != int(lines[0]):
        raise DatasetError(f'{path} announces {lines[0]} images on line 1 but lists {len(out)} '
                           f'(truncated file?); {base.DOCS}')
    return out


def read_partition(manual_dir: Path) -> dict[str, int]:
    """``{image name: partition}`` from Eval/list_eval_partition.txt."""
    path = base.require(manual_dir, PARTITION_FILE, _PARTITION_LAYOUT)
    out = {}
    for lineno, line in enumerate(base.read_lines(path), 1):
        tokens = line.split()
        if len(tokens) != 2 or not tokens[1].isdigit():
            raise DatasetError(f'malformed line {lineno} of {path}: {line!r}; expected {_PARTITION_LAYOUT}; '
                               f'{base.DOCS}')
        out[tokens[0]] = int(tokens[1])
    return out


def read_mafl(manual_dir: Path) -> dict[str, list[str]]:
    """``{'train': names, 'test': names}`` in file order from MAFL/training.txt and MAFL/testing.txt."""
    return {split: [line.split()[0] for line in base.read_lines(base.require(manual_dir, rel, _MAFL_LAYOUT))]
            for split, rel in MAFL_FILES.items()}


def examples_for(names: list[str], landmarks: dict[str, np.ndarray], manual_dir: Path,
                 listed_in: str) -> list[base.Example]:
    """Examples for the given names; every name must have a row in the landmarks file."""
    unknown = [n for n in names if n not in landmarks]
    if unknown:
        raise DatasetError(f'{len(unknown)} image(s) listed in {Path(manual_dir) / listed_in} have no row in '
                           f'{Path(manual_dir) / LANDMARKS_FILE}, e.g. {unknown[:3]}; {base.DOCS}')
    return [base.Example(f'{IMAGE_DIR}/{n}', landmarks[n]) for n in names]


class SceCeleba(base.LandmarkBuilder):
    """CelebA aligned, split ``pretrain`` = partition 0 minus MAFL train/test images, in file order."""

    DESCRIPTION = 'CelebA aligned faces for SCE-MAE pretraining, preprocessed to 136 px (DVE protocol).'
    HOMEPAGE = 'http://mmlab.ie.cuhk.edu.hk/projects/CelebA.html'

    def read_index(self, manual_dir: Path) -> dict[str, list[base.Example]]:
        landmarks = read_landmarks(manual_dir)
        partition = read_partition(manual_dir)
        mafl = set().union(*read_mafl(manual_dir).values())
        names = [n for n in landmarks if partition.get(n) == 0 and n not in mafl]
        return {'pretrain': examples_for(names, landmarks, manual_dir, LANDMARKS_FILE)}

    def preprocess(self, image, example):
        return preprocess.celeba_aligned(image, example.landmarks)
