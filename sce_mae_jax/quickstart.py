"""The whole method in one job (the quick start, `job='pipeline'`): stage 1 (MAE) into `workdir/stage1`, stage 2
(CARB) from it into `workdir/stage2` (and, for `stage2_seeds` and `variants`, further stage-2 runs beside it),
the same stage 2 on an untrained backbone into `workdir/stage2_random_init` (the `random_init_carb` control),
then the evaluation jobs in `config.evals` (matching, detection, limited annotations), called directly, writing
`workdir/results.json` and `workdir/report.md`. Rerunning resumes whichever part was interrupted; finished
stages are not retrained and finished evaluations are not recomputed."""
from __future__ import annotations

import os

from absl import logging

from sce_mae_jax.models.mae import RANDOM_INIT
from sce_mae_jax import config_lib
from sce_mae_jax.evals import detection, matching, report
from sce_mae_jax.train import carb, pretrain, split_inputs
from sce_mae_jax.errors import ConfigError
from sce_mae_jax import workdir as workdir_lib

ARCH = ('embed_dim', 'depth', 'num_heads', 'mlp_ratio', 'patch_size', 'image_size', 'position')


def _stage2(config, stage1_config, init_from: str):
    stage2 = config.copy_and_resolve_references()
    with stage2.unlocked():
        stage2.init_from = init_from
        for key in ARCH:  # stage 2 reads the backbone architecture stage 1 trained
            stage2.model[key] = stage1_config.model[key]
        for key in split_inputs.MAE_FIELDS:  # the control's untrained MAE for split=recon is stage 1's, untrained
            stage2.carb.untrained_decoder[key] = stage1_config.model[key]
    return stage2


def _stopped(out: dict, what: str) -> bool:
    """A stage stopped early (preemption) must not feed the next one: rerunning resumes it first."""
    if out.get('finished', True):
        return False
    logging.warning('pipeline: %s stopped at step %d; rerun the same command to resume it', what, out['step'])
    return True


def parse_overrides(spec: str) -> dict[str, object]:
    """'ablation=cl;projector.activation=linear' → {'carb.clustering': False, ..., 'projector.activation':
    'linear'}: an `ablation=NAME` of config_lib.ABLATIONS and/or `group.field=value` settings, ';'-separated
    (values are Python literals; anything else is a string)."""
    import ast
    out = {}
    for item in filter(None, (x.strip() for x in spec.split(';'))):
        key, sep, value = item.partition('=')
        if not sep:
            raise ConfigError(f'stage-2 variant {spec!r}: {item!r} is not KEY=VALUE')
        if key == 'ablation':
            if value not in config_lib.ABLATIONS:
                raise ConfigError(f'stage-2 variant {spec!r}: unknown ablation {value!r}; choose one of '
                                         f'{", ".join(sorted(config_lib.ABLATIONS))}')
            out.update(config_lib.ABLATIONS[value])
            continue
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def stage2_runs(config) -> list[tuple[str, str, dict]]:
    """(row name, workdir name, field overrides) of every stage-2 run on stage 1: the default recipe (`sce_mae`)
    and each of `config.variants` (NAME: overrides), each with every seed of `config.stage2_seeds`. The first
    seed's run is the row itself (`stage2`, `stage2_NAME`); the others are its replicates `ROW@seedS` in
    `stage2[_NAME]_seedS`, which the report folds into mean ± std."""
    seeds = tuple(config.get('stage2_seeds', (config.stage2.seed,)))
    runs = []
    for name, spec in [('sce_mae', ''), *sorted(config.get('variants', {}).items())]:
        base = 'stage2' if name == 'sce_mae' else f'stage2_{name}'
        overrides = parse_overrides(spec)
        for i, seed in enumerate(seeds):
            row, folder = (name, base) if i == 0 else (f'{name}{report.SEED_MARK}{seed}', f'{base}_seed{seed}')
            runs.append((row, folder, {**overrides, 'seed': seed}))
    return runs


def _with(config, overrides: dict):
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for key, value in overrides.items():
            *groups, field = key.split('.')
            target = config
            for g in groups:
                target = target[g]
            if field not in target:
                raise ConfigError(f'stage-2 variant sets {key}, which stage 2 does not have')
            target[field] = tuple(value) if isinstance(value, list) else value
    return config


def train(config, workdir: str) -> dict:
    workdir_lib.prepare_workdir(workdir, config)
    dirs = {name: os.path.join(workdir, name) for name in ('stage1', 'stage2_random_init')}
    logging.info('pipeline: stage 1 (MAE) → %s', dirs['stage1'])
    out = pretrain.train(config.stage1, dirs['stage1'])
    if _stopped(out, 'stage 1'):
        return out
    rows = {}
    for row, folder, overrides in stage2_runs(config):
        rows[row] = os.path.join(workdir, folder)
        logging.info('pipeline: stage 2 (CARB) %s → %s', row, rows[row])
        out = carb.train(_stage2(_with(config.stage2, overrides), config.stage1,
                                 config.stage2.init_from or dirs['stage1']), rows[row])
        if _stopped(out, f'stage 2 ({row})'):
            return out
    evals = config.get('evals', {})
    if not evals:
        return out
    control = config.get('control', True)
    if control:
        logging.info('pipeline: stage 2 on an untrained backbone (random_init_carb) → %s', dirs['stage2_random_init'])
        out = carb.train(_stage2(config.stage2, config.stage1, RANDOM_INIT), dirs['stage2_random_init'])
        if _stopped(out, 'the random_init_carb stage 2'):
            return out
    jobs = {'eval_matching': matching.run, 'eval_detection': detection.run, 'eval_limited': detection.run_limited}
    extra = ','.join(f'{row}={path}' for row, path in rows.items() if row != 'sce_mae')
    results = {}
    for name, ev in evals.items():
        ev = ev.copy_and_resolve_references()
        with ev.unlocked():
            ev.stage1, ev.stage2 = ev.stage1 or dirs['stage1'], ev.stage2 or rows['sce_mae']
            ev.random_init_carb = ev.random_init_carb or (dirs['stage2_random_init'] if control else '')
            if extra and 'sce_mae' in ev.rows:  # the replicates and variants of the sce_mae row
                ev.extra = ','.join(filter(None, [ev.extra, extra]))
            if control:  # the random_init row is the control's backbone (seeded like stage 2)
                ev.seed = config.stage2.seed
        logging.info('pipeline: evaluation %s → %s', name, workdir)
        results = jobs[ev.job](ev, workdir)
    return results
