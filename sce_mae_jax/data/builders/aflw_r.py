"""AFLW_R (AFLW recropped by Zhang et al. 2018; 10,122 train / 2,991 test) and AFLW_RC (method.md §5).

Layout under manual_dir (as in DVE's aflw-recrop release, ``aflw_release-2/``; docs/datasets.md):

  aflw_train_images.txt, aflw_test_images.txt        one image path per line, relative to output/
  aflw_train_keypoints.mat, aflw_test_keypoints.mat  MATLAB file, variable ``gt``: (N, 5, 2) float, stored
                                                     (y, x), 0-based, row i = line i of the image list
  output/...                                         the images (any size; resized to 136x136 without
                                                     keeping the aspect ratio)

AFLW_RC is the builder config ``rc``: identical, except that the test keypoints are read from the
user-supplied ``aflw_test_keypoints_rc.mat`` (same layout as aflw_test_keypoints.mat). If a file
``aflw_test_images_rc.txt`` exists it replaces the test image list, for a corrected set of another size.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import scipy.io
import tensorflow_datasets as tfds

from sce_mae_jax.data import preprocess
from sce_mae_jax.data.builders import base
from sce_mae_jax.data.preprocess import DatasetError

IMAGE_ROOT = 'output'
_LIST_LAYOUT = 'one image path per line, relative to output/'
_MAT_LAYOUT = 'a MATLAB .mat file with variable `gt` of shape (N, 5, 2) holding (y, x) per landmark'


@dataclasses.dataclass
class AflwRConfig(tfds.core.BuilderConfig):
    """Test-split files; ``test_images_override`` is used only if it exists in the manual_dir."""
    test_keypoints: str = 'aflw_test_keypoints.mat'
    test_images_override: str | None = None


def read_split(manual_dir: Path, images_file: str, keypoints_file: str) -> list[base.Example]:
    """Examples with ``(5, 2)`` xy landmarks (swapped from the file's y, x)."""
    names = base.read_lines(base.require(manual_dir, images_file, _LIST_LAYOUT))
    mat_path = base.require(manual_dir, keypoints_file, _MAT_LAYOUT)
    try:
        mat = scipy.io.loadmat(mat_path)
    except Exception as e:  # scipy raises several types for non-.mat input
        raise DatasetError(f'could not read {mat_path}: {e}; expected {_MAT_LAYOUT}; {base.DOCS}') from None
    if 'gt' not in mat:
        found = sorted(k for k in mat if not k.startswith('__'))
        raise DatasetError(f'{mat_path} has no variable `gt` (found {found}); expected {_MAT_LAYOUT}; {base.DOCS}')
    gt = np.asarray(mat['gt'], np.float64)
    if gt.ndim == 2 and len(names) == 1:
        gt = gt[None]
    if gt.shape != (len(names), 5, 2):
        raise DatasetError(f'`gt` in {mat_path} has shape {gt.shape}; expected ({len(names)}, 5, 2) to match '
                           f'the {len(names)} lines of {Path(manual_dir) / images_file}; {base.DOCS}')
    return [base.Example(f'{IMAGE_ROOT}/{name}', yx[:, ::-1].copy()) for name, yx in zip(names, gt)]


class SceAflwR(base.LandmarkBuilder):
    """AFLW_R (config ``default``) and AFLW_RC (config ``rc``), splits ``train`` and ``test``."""

    DESCRIPTION = 'AFLW recropped (Zhang et al. 2018), resized to 136x136 (DVE protocol).'
    HOMEPAGE = 'https://www.robots.ox.ac.uk/~vgg/research/DVE/'
    BUILDER_CONFIGS = [
        AflwRConfig(name='default', description='AFLW_R: the released test keypoints.'),
        AflwRConfig(name='rc', description='AFLW_RC: user-supplied corrected test keypoints.',
                    test_keypoints='aflw_test_keypoints_rc.mat',
                    test_images_override='aflw_test_images_rc.txt'),
    ]

    def read_index(self, manual_dir: Path) -> dict[str, list[base.Example]]:
        config = self.builder_config
        test_images = 'aflw_test_images.txt'
        if config.test_images_override and (Path(manual_dir) / config.test_images_override).exists():
            test_images = config.test_images_override
        return {'train': read_split(manual_dir, 'aflw_train_images.txt', 'aflw_train_keypoints.mat'),
                'test': read_split(manual_dir, test_images, config.test_keypoints)}

    def preprocess(self, image, example):
        return preprocess.aflw_r(image, example.landmarks)
