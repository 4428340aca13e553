"""AFLW_M: AFLW with the MTFL 5-point test set (10,122 train / 2,995 test, method.md §5).

Layout under manual_dir (as in DVE's aflw-mtfl release; docs/datasets.md):

  aflw_cropped/facedata_cropped.csv   comma-separated, one header row; the columns named ``image_file``
                                      (original AFLW image name), ``set`` and ``crop_file`` (path of the
                                      150x150 crop relative to aflw_cropped/, e.g. ``cropped/50749.jpg``),
                                      and, by position, columns 5..14 (1-based) = x1, y1, ..., x5, y5 in
                                      1-based pixels of the crop. Rows with set == 1 are the training faces;
                                      the other rows (set != 1: faces of images in the MTFL test list) are
                                      not used, the test split comes from MTFL.
  aflw_cropped/cropped/*.jpg
  MTFL/testing.txt                    whitespace-separated: image path relative to MTFL/ (``\\`` or ``/``,
                                      e.g. ``AFLW/1001-image20063.jpg``), x1..x5, y1..y5 (1-based), then
                                      attribute columns (gender, smile, glasses, pose) that are ignored.
  MTFL/AFLW/*.jpg                     150x150 test crops
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from sce_mae_jax.data import preprocess
from sce_mae_jax.data.builders import base
from sce_mae_jax.data.preprocess import DatasetError

TRAIN_CSV = 'aflw_cropped/facedata_cropped.csv'
TRAIN_ROOT = 'aflw_cropped'
TEST_LIST = 'MTFL/testing.txt'
TEST_ROOT = 'MTFL'
TRAIN_SET = 1  # value of the csv's `set` column marking training faces

_CSV_LAYOUT = ('a comma-separated file with a header row naming image_file, set and crop_file, and '
               'columns 5-14 holding x1,y1,...,x5,y5 (1-based)')
_TEST_LAYOUT = ('one line per face: image path relative to MTFL/, x1..x5, y1..y5 (1-based), '
                'optional attribute columns')
_LANDMARK_COLUMNS = slice(4, 14)


def read_train(manual_dir: Path) -> list[tuple[base.Example, str]]:
    """``[(example, original AFLW image name)]`` for rows with set == 1, in file order."""
    path = base.require(manual_dir, TRAIN_CSV, _CSV_LAYOUT)
    with open(path, newline='', encoding='utf-8', errors='replace') as f:
        rows = [row for row in csv.reader(f) if row]
    if not rows:
        raise DatasetError(f'{path} is empty; expected {_CSV_LAYOUT}; {base.DOCS}')
    header = [h.strip() for h in rows[0]]
    missing = {'image_file', 'set', 'crop_file'} - set(header)
    if missing or len(header) < 14:
        raise DatasetError(f'malformed header of {path}: {header}; expected {_CSV_LAYOUT}; {base.DOCS}')
    col = {name: header.index(name) for name in ('image_file', 'set', 'crop_file')}
    out = []
    for lineno, row in enumerate(rows[1:], 2):
        if len(row) < 14:
            raise DatasetError(f'malformed line {lineno} of {path}: {row}; expected {_CSV_LAYOUT}; {base.DOCS}')
        try:
            in_train = int(float(row[col['set']])) == TRAIN_SET
        except ValueError:
            raise DatasetError(f'malformed set value on line {lineno} of {path}: {row[col["set"]]!r}') from None
        if in_train:
            xy = base.floats(row[_LANDMARK_COLUMNS], path, lineno, _CSV_LAYOUT).reshape(5, 2)
            crop_file = row[col['crop_file']].strip().replace('\\', '/')
            out.append((base.Example(f'{TRAIN_ROOT}/{crop_file}', xy), row[col['image_file']].strip()))
    return out


def read_test(manual_dir: Path) -> list[base.Example]:
    """MTFL test faces in file order; landmarks ``(5, 2)`` xy, 1-based."""
    path = base.require(manual_dir, TEST_LIST, _TEST_LAYOUT)
    out = []
    for lineno, line in enumerate(base.read_lines(path), 1):
        tokens = line.split()
        if len(tokens) < 11:
            raise DatasetError(f'malformed line {lineno} of {path}: {line!r}; expected {_TEST_LAYOUT}; '
                               f'{base.DOCS}')
        values = base.floats(tokens[1:11], path, lineno, _TEST_LAYOUT)
        # MTFL stores all x then all y.
        xy = np.stack([values[:5], values[5:]], axis=1)
        out.append(base.Example(f'{TEST_ROOT}/{tokens[0].replace(chr(92), "/")}', xy))
    return out


class SceAflwM(base.LandmarkBuilder):
    """AFLW_M, splits ``train`` (facedata_cropped.csv, set == 1) and ``test`` (MTFL/testing.txt)."""

    DESCRIPTION = 'AFLW 5-point (MTFL test split), 150x150 crops preprocessed to 136 px (DVE protocol).'
    HOMEPAGE = 'http://mmlab.ie.cuhk.edu.hk/projects/TCDCN.html'

    def read_index(self, manual_dir: Path) -> dict[str, list[base.Example]]:
        train = read_train(manual_dir)
        test = read_test(manual_dir)
        # MTFL test names are "<dir>/<n>-<original AFLW name>": a training face from one of those originals
        # would leak the test set.
        test_originals = {Path(ex.image).name.split('-')[-1] for ex in test}
        leaked = sorted({orig for _, orig in train if orig in test_originals})
        if leaked:
            raise DatasetError(f'{len(leaked)} image(s) with set == 1 in {Path(manual_dir) / TRAIN_CSV} are '
                               f'also MTFL test images, e.g. {leaked[:3]}: wrong `set` column?; {base.DOCS}')
        return {'train': [ex for ex, _ in train], 'test': test}

    def preprocess(self, image, example):
        return preprocess.aflw_m(image, example.landmarks)
