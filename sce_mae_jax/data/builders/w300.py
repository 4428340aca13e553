"""300W, 68 landmarks, 3,148 train / 689 test (the "3000 fps" split; method.md §5).

Layout under manual_dir (as in DVE's 300w release, i.e. the iBUG 300-W files; docs/datasets.md):

  Bounding Boxes/bounding_boxes_<set>.mat   MATLAB file, variable ``bounding_boxes``: a 1xN cell array of
                                            structs with fields ``imgName`` (e.g. ``image_0001.png``) and
                                            ``bb_ground_truth`` ([xmin ymin xmax ymax], 1-based)
  afw/, helen/trainset/, lfpw/trainset/     train images and their .pts files (same name, .pts extension)
  helen/testset/, lfpw/testset/, ibug/      test images and .pts files
  <image>.pts                               ``version: 1`` / ``n_points: 68`` / ``{`` / 68 lines ``x y``
                                            (1-based) / ``}``

Train = afw, helen trainset, lfpw trainset; test = helen testset, lfpw testset, ibug (only the ibug entries
whose name starts with ``image``, the only ones shipped as images). Order: sets in that order, faces in
.mat order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from sce_mae_jax.data import preprocess
from sce_mae_jax.data.builders import base
from sce_mae_jax.data.preprocess import DatasetError

NUM_POINTS = 68
SETS = {
    'train': [('afw', 'afw'), ('helen_trainset', 'helen/trainset'), ('lfpw_trainset', 'lfpw/trainset')],
    'test': [('helen_testset', 'helen/testset'), ('lfpw_testset', 'lfpw/testset'), ('ibug', 'ibug')],
}
BOX_FILE = 'Bounding Boxes/bounding_boxes_{}.mat'
_BOX_LAYOUT = ('a MATLAB .mat file with variable `bounding_boxes`, a 1xN cell array of structs with fields '
               'imgName and bb_ground_truth ([xmin ymin xmax ymax], 1-based)')
_PTS_LAYOUT = f'"version: 1", "n_points: {NUM_POINTS}", "{{", {NUM_POINTS} lines "x y", "}}"'


def read_boxes(manual_dir: Path, set_name: str) -> list[tuple[str, np.ndarray]]:
    """``[(imgName, (4,) box)]`` in .mat order."""
    rel = BOX_FILE.format(set_name)
    path = base.require(manual_dir, rel, _BOX_LAYOUT)
    try:
        entries = scipy.io.loadmat(path, simplify_cells=True).get('bounding_boxes')
    except Exception as e:  # scipy raises several types for non-.mat input
        raise DatasetError(f'could not read {path}: {e}; expected {_BOX_LAYOUT}; {base.DOCS}') from None
    if isinstance(entries, dict):  # a single face is squeezed to one struct
        entries = [entries]
    if entries is None or not all(isinstance(e, dict) and {'imgName', 'bb_ground_truth'} <= set(e)
                                  for e in entries):
        raise DatasetError(f'malformed {path}: expected {_BOX_LAYOUT}; {base.DOCS}')
    out = []
    for e in entries:
        box = np.asarray(e['bb_ground_truth'], np.float64).reshape(-1)
        if box.shape != (4,):
            raise DatasetError(f'bb_ground_truth of {e["imgName"]} in {path} has {box.size} values; expected 4')
        out.append((str(e['imgName']), box))
    return out


def read_pts(path: Path) -> np.ndarray:
    """``(68, 2)`` xy (1-based) from an iBUG .pts file."""
    if not path.is_file():
        raise DatasetError(f'expected landmark file {path}: {_PTS_LAYOUT}; {base.DOCS}')
    text = path.read_text(errors='replace')
    try:
        header, body = text.split('{', 1)
        body = body.split('}', 1)[0]
        declared = int(header.split('n_points:')[1].split()[0])
        xy = np.array([float(v) for v in body.split()], np.float64).reshape(-1, 2)
    except (ValueError, IndexError):
        raise DatasetError(f'malformed {path}: expected {_PTS_LAYOUT}; {base.DOCS}') from None
    if declared != NUM_POINTS or len(xy) != NUM_POINTS:
        raise DatasetError(f'{path} has {len(xy)} points (n_points: {declared}); expected {NUM_POINTS}')
    return xy


class SceW300(base.LandmarkBuilder):
    """300W, splits ``train`` and ``test``, 68 landmarks; inter-ocular = outer eye corners 36, 45."""

    NUM_LANDMARKS = NUM_POINTS
    IOD_INDICES = (36, 45)
    DESCRIPTION = '300W (68 points) cropped around the ground-truth box and resized to 136 px (DVE protocol).'
    HOMEPAGE = 'https://ibug.doc.ic.ac.uk/resources/300-W/'

    def read_index(self, manual_dir: Path) -> dict[str, list[base.Example]]:
        index = {}
        for split, sets in SETS.items():
            examples = []
            for set_name, folder in sets:
                for name, box in read_boxes(manual_dir, set_name):
                    if set_name == 'ibug' and not name.startswith('image'):
                        continue
                    image = f'{folder}/{name}'
                    pts = Path(manual_dir) / Path(image).with_suffix('.pts')
                    examples.append(base.Example(image, read_pts(pts), box))
            index[split] = examples
        return index

    def preprocess(self, image, example):
        return preprocess.w300(image, example.landmarks, example.box)
