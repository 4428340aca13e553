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
# The suite compiles many tiny programs and runs each for a few steps, where XLA's backend optimisations cost
# more than they save (a tiny stage-1 run from a cold cache: 35 → 20 CPU-s, the same losses). Turning off the CPU
# backend's MLIR fusion emitters as well compiles faster but runs slower: the whole suite gained nothing. Every
# comparison in the suite is between runs under these same flags.
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0'
os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

flags.FLAGS(sys.argv[:1], known_only=True)
flags.FLAGS.mark_as_parsed()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker more than the cores. Much of a worker's time is spent waiting on a subprocess,
    a second process or the disk; on the 2-core CI machine 2 workers took 580 s, 3 took 478 s and 4 took 488 s
    (docs/benchmarks.md)."""
    return len(os.sched_getaffinity(0)) + 1 if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1) + 1


# The files that take longest (test seconds of `pytest -n auto --durations=0` on the 2-core VM, 2026-12-07),
# longest first; the rest follow in pytest's order. Workers take whole files (`--dist=loadfile`) as they run
# dry, so starting with the long ones leaves the short ones to even out the end. xdist's own order (most
# tests first, `--no-loadscope-reorder` turns it off) started the quick-start and bucket files, two tests and
# ~60-80 s each, last: 479 s against 444 s when the run of that day is replayed through the scheduler.
LONGEST_FIRST = ('test_eval_matching.py', 'test_train_carb.py', 'test_pretrain.py', 'test_detection.py',
                 'test_bench.py', 'test_cloud_workdir.py', 'test_device_augment.py', 'test_quickstart.py',
                 'test_run_safety.py', 'test_carb.py', 'test_predict.py', 'test_models.py', 'test_fused.py',
                 'test_monitor.py', 'test_worker_transport.py')


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(rank)))


# A model small enough for CI's 2 cores; same code paths as DeiT-S.
TINY_MODEL = ['--config.model.embed_dim=48', '--config.model.depth=2', '--config.model.num_heads=2',
              '--config.model.decoder_embed_dim=32', '--config.model.decoder_depth=1',
              '--config.model.decoder_num_heads=2']


def cpu_env(devices=1, **extra):
    """The environment of a subprocess that runs JAX on `devices` simulated CPU devices."""
    return dict(os.environ, JAX_PLATFORMS='cpu',
                XLA_FLAGS=f'{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}', **extra)


def run_main(args, *, devices=1, check=True, timeout=300, env_extra=None):
    """Runs `python -m sce_mae_jax.main ARGS` in a fresh process with `devices` simulated CPU devices."""
    env = cpu_env(devices, PYTHONUNBUFFERED='1', **(env_extra or {}))
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


TINY_PRETRAIN = ['--config=configs/mae_deit_t.py', *TINY_MODEL, '--config.batch_size=8', '--config.log_every=1',
                 '--config.figure_every=0', '--config.base_lr=1e-3', '--config.epochs=100', '--config.warmup_epochs=4']


@pytest.fixture
def tiny_pretrain_args():
    return list(TINY_PRETRAIN)


TINY_FIELDS = {a.split('=')[0][len('--config.'):]: int(a.split('=')[1]) for a in TINY_MODEL}


def train_here(job, workdir, fields):
    """What `main --config=configs/mae_deit_t.py` (job 'pretrain') or `configs/carb_deit_t.py` ('carb') with
    `--config.NAME=VALUE` for each of `fields` trains, run in this process: for fixtures that need a trained
    workdir, not the command line (which other tests check in subprocesses). The worker's JAX start and its
    compilations are shared, which a subprocess would pay again."""
    from sce_mae_jax import config_lib
    from sce_mae_jax.train import carb, pretrain
    config = config_lib.mae('t', None) if job == 'pretrain' else config_lib.carb('t', None, dim=64, eta=0.1)
    for name, value in fields.items():
        *groups, leaf = name.split('.')
        node = config
        for g in groups:
            node = node[g]
        if leaf not in node:
            raise KeyError(name)
        node[leaf] = value
    return (pretrain if job == 'pretrain' else carb).train(config, str(workdir))
