"""Command-line mistakes end in one line naming the problem and the valid choices, and a non-zero exit."""
import os
import subprocess
import sys

import pytest

from conftest import REPO
from sce_mae_jax import cli


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # configs/ paths are relative, as a user types them


def problem(*args):
    msg = cli.problem(['main', *args, '--workdir=/tmp/unused'])
    assert msg is None or '\n' not in msg, msg
    return msg


@pytest.mark.parametrize('args, expected', [
    (['--config=configs/nope.py'], ['configs/nope.py does not exist', 'configs/mae_deit_s.py',
                                    'configs/quickstart.py']),
    (['--workdir=/tmp/x'], ['--config is required', 'configs/quickstart.py']),
    (['--config=configs/mae_deit_s.py:foo=1'], ["unknown config argument 'foo'", 'data=']),
    (['--config=configs/carb_deit_s.py:dim=abc'], ["dim='abc'", 'int']),
    (['--config=configs/mae_deit_s.py:data=mafl2'], ["unknown dataset 'mafl2'", 'mafl, aflw_m']),
    (['--config=configs/mae_deit_s.py', '--config.data=celba'], ['config.data', "'celba'", 'celeba']),
    (['--config=configs/mae_deit_s.py', '--config.split=val'], ['config.split', 'pretrain, train, test, match']),
    (['--config=configs/mae_deit_s.py:data=celeba', '--config.split=train'], ["'celeba' has splits pretrain"]),
    (['--config=configs/carb_deit_s.py:ablation=no_lrc'], ["unknown ablation 'no_lrc'", 'no_lcr', 'lead']),
    (['--config=configs/mae_deit_s.py', '--config.job=train'], ["config.job='train'", 'pretrain', 'eval_matching']),
    (['--config=configs/mae_deit_s.py', '--config.model.embd_dim=8'],
     ["no field 'embd_dim'", 'did you mean embed_dim']),
    (['--config=configs/mae_deit_s.py', '--config.bogus=1'], ["no field 'bogus'", 'batch_size']),
    (['--config=configs/mae_deit_s.py', '--config.seed.x=1'], ['config.seed is a value']),
    (['--config=configs/mae_deit_s.py', '--config.batch_size=many'], ['--config.batch_size=many', 'int']),
    (['--config=configs/quickstart.py', '--config.stage2.data=zz'], ['config.stage2.data', "'zz'"]),
    (['--config=configs/synthetic_benchmark.py:backbone=deit_b'], ["backbone='deit_b'", 'bench', 'deit_s']),
])
def test_mistake_is_one_line_with_the_choices(args, expected):
    msg = problem(*args)
    assert msg is not None
    for part in expected:
        assert part in msg, (part, msg)


@pytest.mark.parametrize('args', [
    ['--config=configs/mae_deit_s.py', '--config.batch_size=8'],
    ['--config', 'configs/carb_deit_s.py:ablation=no_lcr,dim=64'],
    ['--config=configs/eval_detection.py:data=mafl'],
    ['--config=configs/quickstart.py', '--config.stage1.total_steps=3'],
    ['--config=configs/synthetic_benchmark.py:backbone=deit_s', '--config.stage1.model.dtype=bfloat16'],
])
def test_valid_command_lines_pass(args):
    assert problem(*args) is None


@pytest.mark.parametrize('config, says', [('configs/nope.py', 'does not exist'),
                                          ('configs/mae_deit_s.py:data=mafl2', "unknown dataset 'mafl2'")])
def test_main_exits_nonzero_with_one_line(tmp_path, config, says):
    proc = subprocess.run([sys.executable, '-m', 'sce_mae_jax.main', f'--config={config}', f'--workdir={tmp_path}'],
                          cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and says in proc.stderr, proc.stderr
    assert not os.listdir(tmp_path)  # nothing was started


def test_library_chatter_is_shown_only_at_verbosity_1():
    import logging as std_logging

    from absl import logging

    def record(path, level, msg):
        return std_logging.LogRecord('absl', level, path, 1, msg, None, None)

    orbax = '/site-packages/orbax/checkpoint/_src/handlers/composite_checkpoint_handler.py'
    records = {'orbax info': record(orbax, std_logging.INFO, 'saving step 1'),
               'data_iter warning': record(orbax, std_logging.WARNING, 'Item "data_iter" was found in the checkpoint'),
               'orbax warning': record(orbax, std_logging.WARNING, 'something went wrong'),
               'ours': record('/repo/sce_mae_jax/train/common.py', std_logging.INFO, 'step 2: loss=1.0')}
    quiet = cli._QuietLibraries()
    before = logging.get_verbosity()
    try:
        logging.set_verbosity(0)
        assert {k for k, r in records.items() if quiet.filter(r)} == {'orbax warning', 'ours'}
        logging.set_verbosity(1)
        assert all(quiet.filter(r) for r in records.values())
    finally:
        logging.set_verbosity(before)
    cli.quiet_library_logs()
    cli.quiet_library_logs()
    assert sum(isinstance(f, cli._QuietLibraries) for f in logging.get_absl_handler().filters) == 1
