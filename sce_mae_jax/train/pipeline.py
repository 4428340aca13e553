"""The whole method in one job: stage 1 (MAE) into `workdir/stage1`, then stage 2 (CARB) from it into
`workdir/stage2`. Rerunning resumes whichever stage was interrupted; a finished stage 1 is not retrained."""
from __future__ import annotations

import os

from absl import logging

from sce_mae_jax.train import carb, common, pretrain


def train(config, workdir: str) -> dict:
    common.prepare_workdir(workdir, config)
    stage1_dir = os.path.join(workdir, 'stage1')
    logging.info('pipeline: stage 1 (MAE) → %s', stage1_dir)
    pretrain.train(config.stage1, stage1_dir)
    stage2 = config.stage2
    with stage2.unlocked():
        stage2.init_from = stage2.init_from or stage1_dir
        # stage 2 reads the backbone architecture stage 1 trained
        for key in ('embed_dim', 'depth', 'num_heads', 'mlp_ratio', 'patch_size', 'image_size'):
            stage2.model[key] = config.stage1.model[key]
    stage2_dir = os.path.join(workdir, 'stage2')
    logging.info('pipeline: stage 2 (CARB) → %s', stage2_dir)
    return carb.train(stage2, stage2_dir)
