"""The rows every evaluation reports, and where each one's backbone and projector come from.

    random_init       an untrained encoder of the same size (seed `config.seed`)
    positions         a descriptor that knows only where it is: the encoder's fixed sin-cos position table, the
                      same for every image. On aligned faces (CelebA, synthetic) this is the floor a learned
                      feature must clear to show it matches content rather than position.
    mean_shape        detection only: every face gets the training set's mean landmarks, no image read
    pixels            raw-pixel descriptors, no network (matching: 7x7 neighbourhoods; see matching.py)
    mae               the stage-1 encoder alone (the paper's "Baseline")
    sce_mae           the stage-2 workdir: its frozen backbone + the CARB projector
    random_init_carb  the same stage 2 trained on an untrained backbone: does stage 1 matter at all?
    NAME              any further stage-2 workdir listed in `config.extra` ('NAME=DIR,NAME2=DIR2')

Every stage-2 row must sit on the stage-1 backbone of the `mae` row (checked value by value), or the comparison
`mae` vs `sce_mae` would compare two different backbones.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any

import jax
import numpy as np
from absl import logging

from sce_mae_jax.config_lib import ROWS
from sce_mae_jax.errors import ConfigError
from sce_mae_jax.models import load
from sce_mae_jax.models.heads import Projector
from sce_mae_jax.models.mae import RANDOM_INIT
from sce_mae_jax.models.vit import ViT


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    # 'positions', 'mean_shape', 'pixels', 'backbone' (stage-1 features) or 'projected' (+ projector)
    kind: str
    backbone: Any = None          # encoder params
    projector: Projector | None = None
    proj_params: Any = None
    source: str = ''              # the workdir (or description) it was read from, for the report's meta

    @property
    def digest(self) -> str:
        """The row's identity by content (its parameters' bytes): results and regressors stored for one
        checkpoint are never reused for a retrained one that happens to share its path and step."""
        h = hashlib.sha256(f'{self.name}:{self.kind}:{self.projector!r}'.encode())
        for leaf in jax.tree.leaves((self.backbone, self.proj_params)):
            h.update(np.ascontiguousarray(leaf).tobytes())
        return h.hexdigest()[:16]


def _same_tree(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def parse_extra(extra: str) -> list[tuple[str, str]]:
    out = []
    for item in filter(None, (extra or '').split(',')):
        name, sep, path = item.partition('=')
        if not sep or not name or not path:
            raise ConfigError(f'extra={extra!r}: expected NAME=STAGE2_WORKDIR[,NAME=DIR...]')
        if name in ROWS:
            raise ConfigError(f'extra row name {name!r} is taken by a standard row ({", ".join(ROWS)}); rename it')
        base, at, mark = name.partition('@')
        if at and not (base and re.fullmatch(r'seed\d+', mark)):
            raise ConfigError(f'extra row name {name!r}: "@" only marks a stage-2 seed replicate, ROW@seedS '
                              '(folded into ROW by the report); rename it')
        out.append((name, path))
    return out


def load_rows(config) -> tuple[ViT, list[Row], list[str]]:
    """(encoder, rows in report order, skipped rows with why) for an evaluation config with fields `stage1`,
    `stage2`, `random_init_carb`, `extra`, `rows` and `seed`. A row whose workdir is not given is skipped."""
    if not config.stage1 and not config.stage2:
        raise ConfigError('an evaluation needs a model: pass --config.stage1=<stage-1 workdir> and/or '
                          '--config.stage2=<stage-2 workdir>')
    unknown = [r for r in config.rows if r not in ROWS]
    if unknown:
        raise ConfigError(f'rows={tuple(config.rows)}: unknown row(s) {unknown}; choose from {ROWS} (further '
                          'stage-2 workdirs go in --config.extra=NAME=DIR)')
    stage1, stage2_dir = load.exported_stage(config.stage1, 'stage1'), load.exported_stage(config.stage2, 'stage2')
    encoder = load.encoder_of(stage1 or stage2_dir, 'stage1' if stage1 else 'stage2')
    mae_params = load.encoder_params(stage1, encoder) if stage1 else None
    extra = parse_extra(config.extra)
    if len({n for n, _ in extra}) != len(extra):
        raise ConfigError(f'extra={config.extra!r} names a row twice')
    stage2 = [(n, d) for n, d in (('sce_mae', stage2_dir), ('random_init_carb', config.random_init_carb))
              if n in config.rows] + extra
    rows, skipped = [], []
    for name in [r for r in ROWS if r in config.rows] + [n for n, _ in extra]:
        if name == 'random_init':
            rows.append(Row(name, 'backbone', load.encoder_params(RANDOM_INIT, encoder, config.seed),
                            source=f'seed {config.seed}'))
        elif name == 'positions':
            rows.append(Row(name, 'positions', source='sin-cos position table'))
        elif name == 'mean_shape':
            rows.append(Row(name, 'mean_shape', source="the training set's mean landmarks (detection only)"))
        elif name == 'pixels':
            rows.append(Row(name, 'pixels', source='raw pixels'))
        elif name == 'mae':
            if mae_params is None:
                skipped.append('mae (no --config.stage1)')
                continue
            rows.append(Row(name, 'backbone', mae_params, source=stage1))
        else:
            workdir = dict(stage2)[name]
            if not workdir:
                skipped.append(f'{name} (no --config.{name if name == "random_init_carb" else "stage2"})')
                continue
            cfg, backbone, projector, proj_params = load.stage2(workdir, name, encoder)
            if name == 'random_init_carb':
                if cfg.get('init_from') != RANDOM_INIT:
                    raise ConfigError(f'random_init_carb={workdir} was trained on init_from={cfg.get("init_from")!r}, '
                                      f'not an untrained backbone; train it with --config.init_from={RANDOM_INIT}')
                # the control must sit on the very backbone of the random_init row it is compared with
                if not _same_tree(backbone, load.encoder_params(RANDOM_INIT, encoder, config.seed)):
                    raise ConfigError(f'random_init_carb={workdir} froze the untrained backbone of seed '
                                      f'{cfg.get("seed")}, the random_init row uses seed {config.seed}; pass '
                                      f'--config.seed={cfg.get("seed")}')
            elif mae_params is not None and not _same_tree(backbone, mae_params):
                raise ConfigError(f'{name}={workdir} was trained on another backbone than stage1={stage1} '
                                  f'(its init_from: {cfg.get("init_from")!r}); pass the stage-1 workdir it was '
                                  'trained on, or a stage-2 workdir trained on this one')
            rows.append(Row(name, 'projected', backbone, projector, proj_params, source=workdir))
    for s in skipped:
        logging.warning('evaluation: row %s skipped', s)
    if not rows:
        raise ConfigError(f'no row to evaluate (skipped: {", ".join(skipped)}); give the workdirs the rows need')
    return encoder, rows, skipped
