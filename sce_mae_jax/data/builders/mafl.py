"""MAFL: the CelebA subset with 19,000 training and 1,000 test faces (method.md §5).

Uses the CelebA layout of celeba.py (same manual_dir): images from ``Img/img_align_celeba``, landmarks from
``Anno/list_landmarks_align_celeba.txt``, split lists ``MAFL/training.txt`` and ``MAFL/testing.txt``.
Records keep the lists' order: the matching protocol pairs test images (2b, 2b+1) in that order.
"""

from __future__ import annotations

from pathlib import Path

from sce_mae_jax.data import preprocess
from sce_mae_jax.data.builders import base, celeba


class SceMafl(base.LandmarkBuilder):
    """MAFL, splits ``train`` (MAFL/training.txt) and ``test`` (MAFL/testing.txt)."""

    DESCRIPTION = 'MAFL (CelebA subset) preprocessed to 136 px (DVE protocol).'
    HOMEPAGE = 'https://github.com/zhzhanp/TCDCN-face-alignment/tree/master/MAFL'

    def read_index(self, manual_dir: Path) -> dict[str, list[base.Example]]:
        lists = celeba.read_mafl(manual_dir)
        landmarks = celeba.read_landmarks(manual_dir)
        return {split: celeba.examples_for(names, landmarks, manual_dir, celeba.MAFL_FILES[split])
                for split, names in lists.items()}

    def preprocess(self, image, example):
        return preprocess.celeba_aligned(image, example.landmarks)
