"""Which function runs each `config.job`: imported lazily, so a job pays only for its own imports."""
from __future__ import annotations

import importlib

# job → 'module:function', called as function(config, workdir)
JOBS = {
    'pretrain': 'sce_mae_jax.train.pretrain:train',
    'carb': 'sce_mae_jax.train.carb:train',
    'pipeline': 'sce_mae_jax.quickstart:train',
    'eval_matching': 'sce_mae_jax.evals.matching:run',
    'eval_detection': 'sce_mae_jax.evals.detection:run',
    'eval_limited': 'sce_mae_jax.evals.detection:run_limited',
}


def run(config, workdir: str):
    module, function = JOBS[config.job].split(':')
    return getattr(importlib.import_module(module), function)(config, workdir)
