"""Run safety of the shared train loop (train/common.py): non-finite steps, corrupt checkpoints, a second run on
one workdir, a full disk. A toy regression keeps each run to a second; the loop is the trainers' own."""
import errno
import logging
import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from conftest import losses, run_main
from sce_mae_jax.data import pipeline
from sce_mae_jax.train import common


class _Source:
    def __len__(self):
        return 64

    def __getitem__(self, i):
        x = np.random.default_rng(int(i)).normal(size=4).astype(np.float32)
        return {'x': x, 'y': np.float32(x.sum())}


def _run(workdir, *, total_steps=8, nan_from=None, checkpoint_every=2, keep=2):
    """Trains w in y ≈ x·w with SGD; from step `nan_from` on the loss is NaN (as after a blow-up)."""
    config = ml_collections.ConfigDict(dict(batch_size=8, log_every=1, figure_every=0,
                                            checkpoint_every=checkpoint_every, keep_checkpoints=keep))
    mesh = common.make_mesh()
    repl, data_sh = common.replicated(mesh), common.data_sharded(mesh)
    tx = optax.sgd(0.05)
    params = {'w': jnp.zeros(4)}
    state = common.replicate({'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)},
                             mesh)
    state_sh = jax.tree.map(lambda _: repl, state)

    def step(state, batch):
        def loss_fn(p):
            loss = jnp.mean((batch['x'] @ p['w'] - batch['y']) ** 2)
            if nan_from is None:
                return loss
            return loss * jnp.where(state['step'] + 1 >= nan_from, jnp.nan, 1.0)  # NaN gradients too
        loss, grads = jax.value_and_grad(loss_fn)(state['params'])
        updates, opt_state = tx.update(grads, state['opt_state'])
        return ({'step': state['step'] + 1, 'params': optax.apply_updates(state['params'], updates),
                 'opt_state': opt_state}, {'loss': loss, 'grad_norm': optax.tree.norm(grads)})

    it = pipeline.train_iterator(_Source(), global_batch=8, seed=0, transform=lambda e: e, random=False,
                                 num_threads=1)
    return common.train_loop(config, str(workdir), state=state, state_sharding=state_sh,
                             step_fn=jax.jit(step, donate_argnums=0), data_iter=it, batch_sharding=data_sh,
                             total_steps=total_steps)


def _steps(workdir):
    return sorted(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit())


def _finite_params(workdir, step):
    mngr = ocp.CheckpointManager(workdir / 'checkpoints', item_handlers={'state': ocp.StandardCheckpointHandler()})
    target = common.local_target(mngr.item_metadata(step)['state'])
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))['state']
    mngr.close()
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


# ---------------------------------------------------------------------------------------------- non-finite
def test_nonfinite_loss_stops_naming_the_step_and_keeps_finite_checkpoints(tmp_path):
    _run(tmp_path, total_steps=4)                       # checkpoints 2, 4
    with pytest.raises(common.RunStopped, match=r'step 7: non-finite loss and grad_norm.*step 6 .* kept'):
        _run(tmp_path, total_steps=12, nan_from=7)      # 6 is saved, 7 turns NaN, 8 would be saved
    assert _steps(tmp_path) == [4, 6]                    # keep=2: nothing rotated out by a NaN step
    assert all(_finite_params(tmp_path, s) for s in _steps(tmp_path))
    assert not os.path.exists(tmp_path / common.LOCK)


def test_nonfinite_between_checkpoints_is_caught_at_the_next_log(tmp_path):
    with pytest.raises(common.RunStopped, match='step 3: non-finite'):
        _run(tmp_path, total_steps=8, nan_from=3, checkpoint_every=100)
    assert _steps(tmp_path) == [1]  # orbax saves a run's first step; nothing after the NaN


# ---------------------------------------------------------------------------------------------- corrupt checkpoints
@pytest.mark.parametrize('damage', ['delete_state', 'truncate_files'])
def test_corrupt_latest_checkpoint_is_skipped_and_the_previous_restored(tmp_path, damage):
    _run(tmp_path / 'straight', total_steps=8)
    _run(tmp_path / 'run', total_steps=6)               # checkpoints 4, 6
    latest = tmp_path / 'run' / 'checkpoints' / '6'
    if damage == 'delete_state':                        # half-deleted
        shutil.rmtree(latest / 'state')
    else:                                               # every file of it cut to nothing
        for root, _, files in os.walk(latest):
            for f in files:
                open(os.path.join(root, f), 'w').close()
    out = _run(tmp_path / 'run', total_steps=8)         # resumes from 4, rewrites 6, goes on to 8
    assert out['step'] == 8 and _steps(tmp_path / 'run') == [6, 8]
    assert os.listdir(tmp_path / 'run' / 'corrupt_checkpoints')[0].startswith('6_')
    straight, resumed = losses(tmp_path / 'straight'), losses(tmp_path / 'run')
    np.testing.assert_allclose([resumed[s] for s in range(1, 9)], [straight[s] for s in range(1, 9)], rtol=1e-6)


# ---------------------------------------------------------------------------------------------- one run per workdir
def _write_lock(workdir, pid, host=None):
    os.makedirs(workdir, exist_ok=True)
    with open(workdir / common.LOCK, 'w') as f:
        json.dump({'pid': pid, 'host': host or socket.gethostname(), 'started': 'earlier'}, f)


def test_second_run_on_a_workdir_stops_with_who_holds_it(tmp_path):
    other = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        _write_lock(tmp_path, other.pid)
        with pytest.raises(common.RunStopped, match=rf'in use by pid {other.pid} on {socket.gethostname()}.*delete'):
            _run(tmp_path, total_steps=2)
        assert not os.path.exists(tmp_path / 'checkpoints')
    finally:
        other.kill()
        other.wait()
    _write_lock(tmp_path, other.pid, host='another-host')  # alive or not: only its user can tell
    with pytest.raises(common.RunStopped, match='another-host'):
        _run(tmp_path, total_steps=2)


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    _write_lock(tmp_path, dead.pid)
    assert _run(tmp_path, total_steps=2)['step'] == 2
    assert not os.path.exists(tmp_path / common.LOCK)  # released at the end


def test_lock_is_reentrant_and_held_during_the_run(tmp_path):
    with common.workdir_lock(str(tmp_path)):
        held = json.load(open(tmp_path / common.LOCK))
        assert held['pid'] == os.getpid() and held['host'] == socket.gethostname()
        _run(tmp_path, total_steps=2)                   # the pipeline's nesting: the inner lock is ours
        assert os.path.exists(tmp_path / common.LOCK)
    assert not os.path.exists(tmp_path / common.LOCK)


# ---------------------------------------------------------------------------------------------- full disk
def test_full_disk_during_a_save_is_a_clear_error_and_earlier_checkpoints_survive(tmp_path, monkeypatch):
    _run(tmp_path / 'straight', total_steps=8)
    real_save = ocp.CheckpointManager.save

    def save(self, step, *a, **k):
        if step == 6:
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_save(self, step, *a, **k)

    monkeypatch.setattr(ocp.CheckpointManager, 'save', save)
    with pytest.raises(common.RunStopped, match=r'checkpointing at step 6 failed .*disk is full \(earlier '
                                                r'checkpoints \(1, 2, 4\) are intact\); free space and rerun'):
        _run(tmp_path / 'run', total_steps=8, keep=3)
    monkeypatch.setattr(ocp.CheckpointManager, 'save', real_save)
    assert _steps(tmp_path / 'run') == [1, 2, 4] and all(_finite_params(tmp_path / 'run', s) for s in (1, 2, 4))
    assert _run(tmp_path / 'run', total_steps=8, keep=3)['step'] == 8  # space freed: resumes from 4
    straight, resumed = losses(tmp_path / 'straight'), losses(tmp_path / 'run')
    np.testing.assert_allclose([resumed[s] for s in range(1, 9)], [straight[s] for s in range(1, 9)], rtol=1e-6)


# ---------------------------------------------------------------------------------------------- from the command line
def test_diverging_pretraining_exits_with_one_line(tmp_path, tiny_pretrain_args):
    proc = run_main([*tiny_pretrain_args, f'--workdir={tmp_path}', '--config.total_steps=6',
                     '--config.checkpoint_every=2', '--config.base_lr=1e12'], check=False)
    assert proc.returncode != 0 and 'non-finite' in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith('error: step ')
    assert 'Traceback' not in proc.stderr


def test_full_disk_in_the_background_commit_is_a_clear_error(tmp_path, monkeypatch):
    """Orbax renames a finished step into place on its own thread; the failure surfaces at the next save."""
    real_rename = os.rename

    def rename(src, dst, *a, **k):
        if os.path.basename(str(dst)) == '6' and threading.current_thread() is not threading.main_thread():
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, 'rename', rename)
    with pytest.raises(common.RunStopped, match=r'checkpointing at step 8 failed .*disk is full'):
        _run(tmp_path, total_steps=10, keep=3)
    monkeypatch.setattr(os, 'rename', real_rename)
    assert _steps(tmp_path)[-2:] == [2, 4] and all(_finite_params(tmp_path, s) for s in _steps(tmp_path))
    assert _run(tmp_path, total_steps=10, keep=3)['step'] == 10


def test_main_refuses_a_workdir_in_use(tmp_path, tiny_pretrain_args):
    other = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        _write_lock(tmp_path, other.pid)
        proc = run_main([*tiny_pretrain_args, f'--workdir={tmp_path}', '--config.total_steps=2'], check=False)
    finally:
        other.kill()
        other.wait()
    assert proc.returncode != 0 and f'in use by pid {other.pid}' in proc.stderr.strip().splitlines()[-1]
    assert 'Traceback' not in proc.stderr and not os.path.exists(tmp_path / 'config.json')


def test_start_logs_the_parameter_table(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        _run(tmp_path, total_steps=1)
    assert 'trained parameters:' in caplog.text and '| w    | (4,)' in caplog.text and 'Total: 4' in caplog.text
