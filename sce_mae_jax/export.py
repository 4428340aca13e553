r"""A trained model as one self-contained directory, or its MAE as a PyTorch state dict.

    python -m sce_mae_jax.export --workdir=/tmp/sce_mae_quickstart --out=models/quickstart
    python -m sce_mae_jax.export --workdir=/tmp/sce_mae_quickstart --out=models/quickstart_torch --format=torch

`--format=jax` (default) writes what the model needs and nothing of its training (no optimiser state, no data
iterator, no logs), in the layout of a quick-start workdir, so that `Landmarker.load`, `python -m
sce_mae_jax.predict --model=` and the evaluation jobs (`--config.stage1=OUT --config.stage2=OUT`) read it:

    OUT/model.json                      what it is: trained on what, steps, its evaluation numbers (results.json)
    OUT/stage1/config.json, checkpoints/ the stage-1 config and the whole MAE: encoder AND decoder
    OUT/stage2/config.json, backbone/, checkpoints/   the stage-2 config, its frozen encoder, the projector
    OUT/detection/<set>/<row>/          each detection regressor of the rows `mae` and `sce_mae`

`--format=torch` writes OUT/mae.pth, `{'model': state_dict}` of a facebookresearch/mae `MaskedAutoencoderViT`
(encoder and decoder; `convert.mae_to_torch`, the inverse of the importer), and OUT/model.json. It needs the
`torch` extra (`pip install -e ".[torch]"`); `convert.mae_to_torch` alone needs only NumPy.
"""
from __future__ import annotations

import json
import os
import time

from sce_mae_jax import fileio
from sce_mae_jax.errors import ConfigError

FORMATS = ('jax', 'torch')
EXPORTED_ROWS = ('mae', 'sce_mae')  # the rows whose weights an export holds (the controls are not a model)


def _write_params(unit_dir: str, step: int, params) -> None:
    """`params` as the one checkpoint of `unit_dir` (what `checkpoints.load_params` reads), at the trained step."""
    from sce_mae_jax.train import checkpoints
    mngr = checkpoints.checkpoint_manager(unit_dir, max_to_keep=1, save_interval_steps=1, with_data_iter=False)
    checkpoints.save_checkpoint(mngr, step, {'params': params}, force=True)
    mngr.wait_until_finished()
    mngr.close()


def _latest_step(workdir: str) -> int:
    d = os.path.join(fileio.resolve(workdir), 'checkpoints')
    return max(int(n) for n in fileio.listdir(d) if n.isdigit())


def _copy_stage(src: str, dst: str, *, backbone: bool) -> dict:
    """One stage's config.json and parameters (and its frozen backbone/); → a summary for model.json."""
    import orbax.checkpoint as ocp

    from sce_mae_jax.train import checkpoints
    text = fileio.read_text(os.path.join(src, 'config.json'))
    fileio.makedirs(dst)
    fileio.write_text(os.path.join(dst, 'config.json'), text)
    step = _latest_step(src)
    _write_params(dst, step, checkpoints.load_params(src))
    if backbone:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(fileio.resolve(dst), 'backbone'), checkpoints.restore_tree(os.path.join(src, 'backbone')))
        ckptr.wait_until_finished()
    cfg = json.loads(text)
    out = {'from': src, 'job': cfg.get('job'), 'data': cfg.get('data'), 'steps': step,
           'batch_size': cfg.get('batch_size'), 'model': cfg.get('model')}
    if cfg.get('job') == 'carb':
        out.update(init_from=cfg.get('init_from'), projector=cfg.get('projector'),
                   split=(cfg.get('carb') or {}).get('split'))
    return out


def _evaluation(workdir: str) -> dict:
    """The exported rows' numbers from the workdir's results.json (matching, detection, limited annotations)."""
    path = os.path.join(workdir, 'results.json')
    if not fileio.exists(path):
        return {}
    results = json.loads(fileio.read_text(path))
    out = {}
    for section in ('matching', 'detection', 'limited'):
        rows = {r: v for r, v in (results.get(section) or {}).items() if r in EXPORTED_ROWS}
        if rows:
            out[section] = rows
    if 'matching' in out:
        out['matching_units'] = 'mean pixel error in the 70-px frame (same / different identity)'
    if 'detection' in out:
        out['detection_units'] = '% of the inter-ocular distance'
    return out


def export(workdir: str, out: str, fmt: str = 'jax') -> dict:
    """Writes the model of `workdir` (a quick-start workdir, or one stage-1 or stage-2 workdir) into `out`;
    returns model.json's content."""
    from sce_mae_jax.landmarker import regressor_units, stage_dirs
    from sce_mae_jax.models.load import EXPORTED

    if fmt not in FORMATS:
        raise ConfigError(f'format={fmt!r} must be one of {FORMATS}')
    stage1, stage2 = stage_dirs(workdir)
    if fileio.exists(os.path.join(out, EXPORTED)) or (fileio.isdir(out) and fileio.listdir(out)):
        raise ConfigError(f'{out} exists and is not empty; export into a new directory')
    fileio.makedirs(out)
    meta = {'format': f'sce_mae_jax model ({fmt})', 'exported_from': os.path.abspath(workdir),
            'exported_at': time.strftime('%Y-%m-%d %H:%M:%S %Z'), 'trained_on': {}, 'regressors': {},
            'evaluation': _evaluation(workdir)}
    if fmt == 'torch':
        if not stage1:
            raise ConfigError(f'{workdir} has no stage-1 MAE to export as a PyTorch state dict')
        from sce_mae_jax import convert
        from sce_mae_jax.train import checkpoints
        params = checkpoints.load_params(stage1)
        if 'encoder' not in params:
            raise ConfigError(f'{stage1} holds an encoder only (no decoder); the PyTorch export is the whole MAE')
        convert.save_torch_state_dict(convert.mae_to_torch(params), os.path.join(out, 'mae.pth'))
        cfg = json.loads(fileio.read_text(os.path.join(stage1, 'config.json')))
        meta['trained_on']['stage1'] = {'from': stage1, 'data': cfg.get('data'), 'steps': _latest_step(stage1),
                                        'model': cfg.get('model')}
        meta['files'] = {'mae.pth': "{'model': MaskedAutoencoderViT state dict} (facebookresearch/mae)"}
    else:
        for name, src in (('stage1', stage1), ('stage2', stage2)):
            if src:
                meta['trained_on'][name] = _copy_stage(src, os.path.join(out, name), backbone=name == 'stage2')
        from sce_mae_jax.train import checkpoints
        for unit in regressor_units(workdir):
            if unit.row not in EXPORTED_ROWS or (unit.row == 'sce_mae' and not stage2) or \
                    (unit.row == 'mae' and not stage1):
                continue
            dst = os.path.join(out, 'detection', unit.set, unit.row)
            fileio.makedirs(dst)
            settings = unit.settings()
            fileio.write_text(os.path.join(dst, 'regressor.json'), json.dumps(settings, indent=2, sort_keys=True))
            params = checkpoints.load_params(unit.path)
            _write_params(dst, _latest_step(unit.path), params)
            meta['regressors'][unit.name] = {'landmarks': int(params['combine'].shape[0]),
                                             'train_images': settings.get('train_images'),
                                             'steps': settings.get('total_steps'), 'features': settings.get('features')}
    fileio.write_text(os.path.join(out, EXPORTED), json.dumps(meta, indent=2))
    return meta


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog='python -m sce_mae_jax.export', description=__doc__.split('\n\n')[0])
    p.add_argument('--workdir', required=True, help='quick-start workdir (or one stage-1 / stage-2 workdir)')
    p.add_argument('--out', required=True, help='a new directory for the model')
    p.add_argument('--format', default='jax', choices=FORMATS)
    args = p.parse_args(argv)
    from absl import logging
    logging.set_verbosity(logging.ERROR)  # orbax warns on every training checkpoint it reads params from
    try:
        meta = export(args.workdir, args.out, args.format)
    except ConfigError as e:
        raise SystemExit(f'error: {e}')
    print(f'exported {args.workdir} → {args.out} ({", ".join(meta["trained_on"])}; regressors: '
          f'{", ".join(meta["regressors"]) or "none"})')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
