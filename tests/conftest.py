"""Shared test setup: absl flags parsed (grain workers read them), tiny configs, subprocess runners."""
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from absl import flags

# One persistent XLA compilation cache for the whole run, subprocesses included (they inherit the environment):
# most of the suite's time is compiling the same tiny programs again in new processes and new closures. Set
# before JAX is imported; a cache the caller chose (JAX_COMPILATION_CACHE_DIR) is kept.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='sce_mae_jax_xla_cache_')
    atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')

flags.FLAGS(sys.argv[:1], known_only=True)
flags.FLAGS.mark_as_parsed()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A model small enough for CI's 2 cores; same code paths as DeiT-S.
TINY_MODEL = ['--config.model.embed_dim=48', '--config.model.depth=2', '--config.model.num_heads=2',
              '--config.model.decoder_embed_dim=32', '--config.model.decoder_depth=1',
              '--config.model.decoder_num_heads=2']


def run_main(args, *, devices=1, check=True, timeout=300, env_extra=None):
    """Runs `python -m sce_mae_jax.main ARGS` in a fresh process with `devices` simulated CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
               PYTHONUNBUFFERED='1', **(env_extra or {}))
    proc = subprocess.run([sys.executable, '-m', 'sce_mae_jax.main', *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'main failed ({proc.returncode}):\n{proc.stderr[-4000:]}')
    return proc


def losses(workdir):
    """step → loss from metrics.jsonl; a resumed run's re-logged steps overwrite the earlier ones."""
    out = {}
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        for line in f:
            rec = json.loads(line)
            out[rec['step']] = rec['loss']
    return out


@pytest.fixture
def tiny_pretrain_args():
    return ['--config=configs/mae_deit_t.py', *TINY_MODEL, '--config.batch_size=8', '--config.log_every=1',
            '--config.figure_every=0', '--config.base_lr=1e-3', '--config.epochs=100', '--config.warmup_epochs=4']
