"""The whole method in one job (the quick start): stage 1 (MAE) into `workdir/stage1`, stage 2 (CARB) from it
into `workdir/stage2`, the same stage 2 on an untrained backbone into `workdir/stage2_random_init` (the
`random_init_carb` control), then the evaluations in `config.evals` (matching, detection) writing
`workdir/results.json` and `workdir/report.md`. Rerunning resumes whichever part was interrupted; finished
stages are not retrained and finished evaluations are not recomputed."""
from __future__ import annotations

import os

from absl import logging

from sce_mae_jax.models.mae import RANDOM_INIT
from sce_mae_jax.train import carb, common, pretrain

ARCH = ('embed_dim', 'depth', 'num_heads', 'mlp_ratio', 'patch_size', 'image_size')


def _stage2(config, stage1_config, init_from: str):
    stage2 = config.copy_and_resolve_references()
    with stage2.unlocked():
        stage2.init_from = init_from
        for key in ARCH:  # stage 2 reads the backbone architecture stage 1 trained
            stage2.model[key] = stage1_config.model[key]
        for key in carb.MAE_FIELDS:  # the control's untrained MAE for split=recon is stage 1's, untrained
            stage2.carb.untrained_decoder[key] = stage1_config.model[key]
    return stage2


def _stopped(out: dict, what: str) -> bool:
    """A stage stopped early (preemption) must not feed the next one: rerunning resumes it first."""
    if out.get('finished', True):
        return False
    logging.warning('pipeline: %s stopped at step %d; rerun the same command to resume it', what, out['step'])
    return True


def train(config, workdir: str) -> dict:
    common.prepare_workdir(workdir, config)
    dirs = {name: os.path.join(workdir, name) for name in ('stage1', 'stage2', 'stage2_random_init')}
    logging.info('pipeline: stage 1 (MAE) → %s', dirs['stage1'])
    out = pretrain.train(config.stage1, dirs['stage1'])
    if _stopped(out, 'stage 1'):
        return out
    logging.info('pipeline: stage 2 (CARB) → %s', dirs['stage2'])
    out = carb.train(_stage2(config.stage2, config.stage1, config.stage2.init_from or dirs['stage1']),
                     dirs['stage2'])
    evals = config.get('evals', {})
    if not evals or _stopped(out, 'stage 2'):
        return out
    control = config.get('control', True)
    if control:
        logging.info('pipeline: stage 2 on an untrained backbone (random_init_carb) → %s', dirs['stage2_random_init'])
        out = carb.train(_stage2(config.stage2, config.stage1, RANDOM_INIT), dirs['stage2_random_init'])
        if _stopped(out, 'the random_init_carb stage 2'):
            return out
    from sce_mae_jax import jobs
    results = {}
    for name, ev in evals.items():
        ev = ev.copy_and_resolve_references()
        with ev.unlocked():
            ev.stage1, ev.stage2 = ev.stage1 or dirs['stage1'], ev.stage2 or dirs['stage2']
            ev.random_init_carb = ev.random_init_carb or (dirs['stage2_random_init'] if control else '')
            if control:  # the random_init row is the control's backbone (seeded like stage 2)
                ev.seed = config.stage2.seed
        logging.info('pipeline: evaluation %s → %s', name, workdir)
        results = jobs.run(ev, workdir)
    return results
