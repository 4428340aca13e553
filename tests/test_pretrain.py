"""Stage-1 training end to end, in subprocesses so each run gets its own simulated device count."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, TINY_PRETRAIN, cpu_env, losses, run_main


@pytest.fixture(scope='module')
def one_and_four_devices(tmp_path_factory):
    """The same 4-step run on 1 and on 4 simulated devices (checkpoints at 2 and 4)."""
    root = tmp_path_factory.mktemp('devices')
    args = [*TINY_PRETRAIN, '--config.total_steps=4', '--config.checkpoint_every=2']
    run_main([*args, f'--workdir={root / "d1"}'], devices=1)
    run_main([*args, f'--workdir={root / "d4"}'], devices=4)
    return args, root


def test_four_devices_match_one(one_and_four_devices):
    _, root = one_and_four_devices
    l1, l4 = losses(root / 'd1'), losses(root / 'd4')
    assert sorted(l1) == [1, 2, 3, 4]
    np.testing.assert_allclose([l4[s] for s in l1], [l1[s] for s in l1], rtol=2e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path, one_and_four_devices):
    args, root = one_and_four_devices
    port = _free_port()
    env = cpu_env(2)
    procs = [subprocess.Popen([sys.executable, '-m', 'sce_mae_jax.main', *args, f'--workdir={tmp_path / "multi"}',
                               f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    single, multi = losses(root / 'd4'), losses(tmp_path / 'multi')  # 4 devices in one process, 2 x 2 in two
    assert sorted(multi) == [1, 2, 3, 4]
    np.testing.assert_allclose([multi[s] for s in single], [single[s] for s in single], rtol=2e-5)
    assert os.path.isdir(tmp_path / 'multi' / 'checkpoints' / '4')


def _run_until(args, workdir, min_step, sig):
    """Starts training, waits until metrics show `min_step`, then sends `sig`."""
    env = cpu_env(1)
    proc = subprocess.Popen([sys.executable, '-m', 'sce_mae_jax.main', *args, f'--workdir={workdir}'], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(workdir / 'metrics.jsonl') and max(losses(workdir), default=0) >= min_step:
            break
        time.sleep(0.05)
    assert proc.poll() is None, 'training ended before it could be interrupted'
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
    """30 uninterrupted steps, checkpoints every 7: what each interrupted run must reproduce, and the run whose
    loss must fall (a learning rate 10x the other tests', so that 30 steps show it)."""
    args = [*TINY_PRETRAIN, '--config.total_steps=30', '--config.checkpoint_every=7', '--config.base_lr=1e-2',
            '--config.figure_every=15']
    workdir = tmp_path_factory.mktemp('straight')
    run_main([*args, f'--workdir={workdir}'])
    return args, workdir


def test_loss_falls(straight_run):
    # 30 steps at base_lr 1e-2: the fall from the first 5 to the last 5 steps over seeds 0-2 was 0.106-0.110
    # (docs/benchmarks.md, the test suite, 2026-12-03)
    _, workdir = straight_run
    loss = losses(workdir)
    assert len(loss) == 30
    first, last = np.mean([loss[s] for s in range(1, 6)]), np.mean([loss[s] for s in range(26, 31)])
    assert last < first - 0.05, (first, last)
    # the workdir layout later stages and users rely on
    assert os.path.exists(workdir / 'config.json')
    assert sorted(os.listdir(workdir / 'figures')) == ['recon_0000015.png', 'recon_0000030.png']
    assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir / 'tb'))
    rec = json.loads(open(workdir / 'metrics.jsonl').readline())
    assert {'step', 'loss', 'lr', 'grad_norm', 'images_per_s', 'images_per_s_per_device', 'eta_hours',
            'input_wait'} <= set(rec)
    assert 0.0 <= rec['input_wait'] <= 1.0


@pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_run_resumes_to_identical_losses(tmp_path, straight_run, sig):
    args, straight_dir = straight_run
    code, err = _run_until(args, tmp_path / 'resumed', 10, sig)
    if sig == signal.SIGTERM:  # preemption: a checkpoint at the step it stopped on, then 128 + 15 for a scheduler
        assert code == 143, err[-2000:]
        assert 'exit status 143 (preempted)' in err.strip().splitlines()[-1] and 'Traceback' not in err
        stopped = max(int(d) for d in os.listdir(tmp_path / 'resumed' / 'checkpoints') if d.isdigit())
        assert stopped == max(losses(tmp_path / 'resumed')) and stopped < 30
    err = run_main([*args, f'--workdir={tmp_path / "resumed"}']).stderr
    # the default log of a resumed run: progress and results, not orbax's restore chatter or the whole config
    assert 'step 30:' in err and 'weight_decay: ' not in err and 'WORKDIR/config.json' in err
    # (a warning stays: after a kill during a save, orbax says it removes the unfinished temporary directory)
    chatter = [line for line in err.splitlines()
               if line.startswith('I') and ('orbax' in line or 'checkpoint_handler' in line)]
    assert chatter == [], err
    straight, resumed = losses(straight_dir), losses(tmp_path / 'resumed')
    assert sorted(resumed) == sorted(straight) == list(range(1, 31))
    for run in (straight_dir, tmp_path / 'resumed'):  # one record per step, in order: none redone, none twice
        with open(run / 'metrics.jsonl') as f:
            assert [json.loads(line)['step'] for line in f] == list(range(1, 31)), run
    np.testing.assert_array_equal([resumed[s] for s in straight], [straight[s] for s in straight])


def test_bad_config_key_is_a_clear_error(tmp_path, tiny_pretrain_args):
    proc = run_main([*tiny_pretrain_args, f'--workdir={tmp_path}', '--config.bogus_field=3'], check=False)
    assert proc.returncode != 0 and 'bogus_field' in proc.stderr
    assert 'Traceback' not in proc.stderr


def test_missing_workdir_parent_is_a_clear_error(tmp_path, tiny_pretrain_args):
    proc = run_main([*tiny_pretrain_args, f'--workdir={tmp_path}/no/such/dir'], check=False)
    assert proc.returncode != 0 and 'does not exist' in proc.stderr and 'mkdir -p' in proc.stderr
    assert 'Traceback' not in proc.stderr


def test_checkpoint_from_other_model_size_is_a_clear_error(tmp_path, one_and_four_devices):
    args, root = one_and_four_devices
    shutil.copytree(root / 'd1', tmp_path / 'run')  # a finished 4-step run, continued with a wider model
    proc = run_main([*args, f'--workdir={tmp_path / "run"}', '--config.total_steps=6', '--config.model.embed_dim=64'],
                    check=False)
    assert proc.returncode != 0 and 'does not fit this config' in proc.stderr, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr

