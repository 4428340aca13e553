"""Run safety of the shared train loop (train/common.py): non-finite steps, corrupt checkpoints, a second run on
one workdir, a full disk. A toy regression keeps each run to a second; the loop is the trainers' own."""
import builtins
import errno
import logging
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, losses, run_main
from sce_mae_jax import workdir as workdir_lib
from sce_mae_jax.data import pipeline
from sce_mae_jax.errors import RunStopped
from sce_mae_jax.train import checkpoints, common


class _Source:
    def __init__(self, delay=0.0):
        self.delay = delay  # seconds per example: an input pipeline slower than the step

    def __len__(self):
        return 64

    def __getitem__(self, i):
        time.sleep(self.delay)
        x = np.random.default_rng(int(i)).normal(size=4).astype(np.float32)
        return {'x': x, 'y': np.float32(x.sum())}


def _run(workdir, *, total_steps=8, nan_from=None, checkpoint_every=2, keep=2, figure_fn=None, delay=0.0):
    """Trains w in y ≈ x·w with SGD; from step `nan_from` on the loss is NaN (as after a blow-up)."""
    config = ml_collections.ConfigDict(dict(batch_size=8, log_every=1, figure_every=int(figure_fn is not None),
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

    it = pipeline.train_iterator(_Source(delay), global_batch=8, seed=0, transform=lambda e: e, random=False,
                                 num_threads=1)
    return common.train_loop(config, str(workdir), state=state, state_sharding=state_sh,
                             step_fn=jax.jit(step, donate_argnums=0), data_iter=it, batch_sharding=data_sh,
                             total_steps=total_steps, figure_fn=figure_fn)


def _steps(workdir):
    return sorted(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit())


def _finite_params(workdir, step):
    mngr = ocp.CheckpointManager(workdir / 'checkpoints', item_handlers={'state': ocp.StandardCheckpointHandler()})
    target = checkpoints.local_target(mngr.item_metadata(step)['state'])
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))['state']
    mngr.close()
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


# ---------------------------------------------------------------------------------------------- non-finite
def test_nonfinite_loss_stops_naming_the_step_and_keeps_finite_checkpoints(tmp_path):
    _run(tmp_path, total_steps=4)                       # checkpoints 2, 4
    with pytest.raises(RunStopped, match=r'step 7: non-finite loss and grad_norm: training diverged after 2 '
                                                r'finite steps from the verified checkpoint at step 4.*step 6 .* kept'):
        _run(tmp_path, total_steps=12, nan_from=7)      # 6 is saved, 7 turns NaN, 8 would be saved
    assert _steps(tmp_path) == [4, 6]                    # keep=2: nothing rotated out by a NaN step
    assert all(_finite_params(tmp_path, s) for s in _steps(tmp_path))
    assert not os.path.exists(tmp_path / workdir_lib.LOCK)


def test_nonfinite_between_checkpoints_is_caught_at_the_next_log(tmp_path):
    with pytest.raises(RunStopped, match='step 3: non-finite'):
        _run(tmp_path, total_steps=8, nan_from=3, checkpoint_every=100)
    assert _steps(tmp_path) == [1]  # orbax saves a run's first step; nothing after the NaN


# ---------------------------------------------------------------------------------------------- corrupt checkpoints
@pytest.mark.parametrize('damage', ['delete_state', 'truncate_files', 'overwrite_bytes'])
def test_corrupt_latest_checkpoint_is_skipped_and_the_previous_restored(tmp_path, damage):
    _run(tmp_path / 'straight', total_steps=8)
    _run(tmp_path / 'run', total_steps=6)               # checkpoints 4, 6
    latest = tmp_path / 'run' / 'checkpoints' / '6'
    if damage == 'delete_state':                        # half-deleted
        shutil.rmtree(latest / 'state')
    elif damage == 'truncate_files':                    # every file of it cut to nothing
        for root, _, files in os.walk(latest):
            for f in files:
                open(os.path.join(root, f), 'w').close()
    else:                                               # the middle of every array data file overwritten
        for f in _data_files(latest):
            _overwrite_middle(f, b'\xff' * 4096)
    out = _run(tmp_path / 'run', total_steps=8)         # resumes from 4, rewrites 6, goes on to 8
    assert out['step'] == 8 and _steps(tmp_path / 'run') == [6, 8]
    assert os.listdir(tmp_path / 'run' / 'corrupt_checkpoints')[0].startswith('6_')
    straight, resumed = losses(tmp_path / 'straight'), losses(tmp_path / 'run')
    np.testing.assert_allclose([resumed[s] for s in range(1, 9)], [straight[s] for s in range(1, 9)], rtol=1e-6)
    assert _records(tmp_path / 'run') == list(range(1, 9))  # steps 5, 6 redone, logged once


def _data_files(step_dir):
    return [os.path.join(r, f) for r, _, fs in os.walk(step_dir / 'state') for f in fs if os.sep + 'd' in r]


def _overwrite_middle(path, data):
    """Overwrites bytes in the middle of `path`, its size unchanged (a bad disk, a stray write)."""
    size = os.path.getsize(path)
    data = data[:size // 2]
    with open(path, 'r+b') as f:
        f.seek((size - len(data)) // 2)
        f.write(data)


def _records(workdir):
    """The steps of metrics.jsonl in file order (every line must parse)."""
    with open(workdir / 'metrics.jsonl') as f:
        text = f.read()
    assert text.endswith('\n')
    return [json.loads(line)['step'] for line in text.splitlines()]


def test_checksums_are_the_same_on_the_host_and_on_the_devices(monkeypatch):
    """Small states are checksummed with numpy, large ones by a jitted program: one checkpoint format."""
    k = jax.random.key(3)
    tree = {'f32': jax.random.normal(k, (7, 5)), 'i32': jnp.arange(10, dtype=jnp.int32), 'empty': jnp.zeros((0, 3)),
            'bool': jnp.array(True), 'bf16': jax.random.normal(k, (33,)).astype(jnp.bfloat16),
            'keys': jax.random.split(k, 2), 'raw_key': jax.random.PRNGKey(1), 'u8': jnp.full((5,), 7, jnp.uint8),
            'nan': jnp.array([1.0, jnp.nan]), 'inf16': jnp.array([jnp.inf], jnp.float16), 'scalar': jnp.float32(2.5)}
    host = checkpoints.fingerprint(tree)
    monkeypatch.setattr(checkpoints, 'HOST_FINGERPRINT_BYTES', -1)
    assert checkpoints.fingerprint(tree) == host
    assert sorted(host[1]) == ["['inf16']", "['nan']"]
    tree['f32'] = tree['f32'].at[3, 2].add(1e-6)  # one changed value changes its array's checksum only
    changed = checkpoints.fingerprint(tree)[0]
    monkeypatch.undo()
    assert checkpoints.fingerprint(tree)[0] == changed
    assert [k for k in host[0] if host[0][k] != changed[k]] == ["['f32']"]


@pytest.mark.parametrize('finite', [False, True], ids=['nan_bytes', 'finite_bytes'])
def test_altered_checkpoint_is_caught_by_verification_and_the_previous_restored(tmp_path, caplog, finite):
    """Bytes changed inside a data file restore without an error; only the checksums and the finiteness check
    tell."""
    mngr = checkpoints.checkpoint_manager(str(tmp_path), max_to_keep=3, save_interval_steps=1, with_data_iter=False)
    rng = np.random.default_rng(0)
    # finite floats of random bits do not compress: zstd stores them as they are, so the overwrite below
    # lands in the values (compressed data, as in the run, turns into garbage values or a read error)
    noise = lambda: rng.integers(0, 2**32, (64, 256), np.uint32) & np.uint32(0xBFFFFFFF)  # noqa: E731
    states = {s: {'step': jnp.int32(s), 'params': {'w': jnp.asarray(noise().view(np.float32))}} for s in (1, 2)}
    for s, state in states.items():
        checkpoints.save_checkpoint(mngr, s, state)
    mngr.wait_until_finished()
    mngr.close()
    (big,) = sorted(_data_files(tmp_path / 'checkpoints' / '2'), key=os.path.getsize)[-1:]
    with open(big, 'r+b') as f:                         # 4 KB of the array's bytes, size unchanged
        at = f.read().find(np.asarray(states[2]['params']['w']).tobytes()[16384:16448])
        assert at > 0
        f.seek(at)
        f.write(np.full(1024, 0.5, np.float32).tobytes() if finite else b'\xff' * 4096)
    mngr = checkpoints.checkpoint_manager(str(tmp_path), max_to_keep=3, save_interval_steps=1, with_data_iter=False)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), states[2])
    with caplog.at_level(logging.WARNING):
        restored = checkpoints.restore_latest(mngr, abstract, None, str(tmp_path))
    mngr.close()
    assert restored.step == 1 and restored.checksummed
    np.testing.assert_array_equal(restored.state['params']['w'], states[1]['params']['w'])  # nothing lost
    (warning,) = [r.getMessage() for r in caplog.records if 'failed verification' in r.getMessage()]
    assert 'checkpoints/2 failed verification: checksum mismatch in [\'params\'][\'w\']' in warning
    assert ('non-finite values in' in warning) != finite  # 0xff bytes are NaNs; the checksum alone sees 0.5s
    assert os.listdir(tmp_path / 'corrupt_checkpoints')[0].startswith('2_')


def test_nan_after_an_unverifiable_restore_says_the_restored_state_is_bad(tmp_path):
    _run(tmp_path, total_steps=4)                       # checkpoints 2, 4, with checksums
    meta_path = tmp_path / 'checkpoints' / '4' / '_CHECKPOINT_METADATA'
    meta = json.loads(meta_path.read_text())
    meta['custom_metadata'] = {}                        # as written before checksums existed
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(RunStopped, match=r'step 5: non-finite loss and grad_norm at the first step after '
                                                r'restoring checkpoint 4: the restored state is bad .*move .*/4 to '
                                                r'.*corrupt_checkpoints/'):
        _run(tmp_path, total_steps=8, nan_from=5)
    assert _steps(tmp_path) == [2, 4]


# ---------------------------------------------------------------------------------------------- metrics.jsonl
def test_kill_between_checkpoint_and_log_leaves_one_record_per_step(tmp_path):
    """kill -9 after checkpoint 4 and the log of steps 5, 6 (checkpoint 6 never committed), mid-line."""
    _run(tmp_path / 'straight', total_steps=8)
    _run(tmp_path / 'run', total_steps=6)               # checkpoints 4, 6
    shutil.rmtree(tmp_path / 'run' / 'checkpoints' / '6')
    with open(tmp_path / 'run' / 'metrics.jsonl', 'a') as f:
        f.write('{"step": 7, "loss": 0.12')           # the line the kill cut short
    _run(tmp_path / 'run', total_steps=8)
    assert _records(tmp_path / 'run') == list(range(1, 9))
    straight, resumed = losses(tmp_path / 'straight'), losses(tmp_path / 'run')
    np.testing.assert_allclose([resumed[s] for s in range(1, 9)], [straight[s] for s in range(1, 9)], rtol=1e-6)


def test_metric_writer_keeps_whole_records_up_to_the_resumed_step(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    path.write_text(''.join(json.dumps({'step': s, 'loss': 1.0}) + '\n' for s in range(1, 9)) + '{"step": 9, "lo')
    common.MetricWriter(str(tmp_path), resume_step=5).close()
    assert _records(tmp_path) == [1, 2, 3, 4, 5]


def test_a_write_cut_short_by_a_full_disk_is_taken_back(tmp_path, monkeypatch):
    from sce_mae_jax import fileio
    log = fileio.AppendLog(str(tmp_path / 'metrics.jsonl'))
    log.write('{"step": 1}\n')
    real_write = os.write

    def write(fd, data):                                # half the line lands, then the disk is full
        real_write(fd, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(os, 'write', write)
    with pytest.raises(OSError):
        log.write('{"step": 2, "loss": 0.5}\n')
    monkeypatch.setattr(os, 'write', real_write)
    log.close()
    assert (tmp_path / 'metrics.jsonl').read_text() == '{"step": 1}\n'


# ---------------------------------------------------------------------------------------------- one run per workdir
def _write_lock(workdir, pid, host=None):
    os.makedirs(workdir, exist_ok=True)
    with open(workdir / workdir_lib.LOCK, 'w') as f:
        json.dump({'pid': pid, 'host': host or socket.gethostname(), 'started': 'earlier'}, f)


def test_second_run_on_a_workdir_stops_with_who_holds_it(tmp_path):
    other = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        _write_lock(tmp_path, other.pid)
        with pytest.raises(RunStopped, match=rf'in use by pid {other.pid} on {socket.gethostname()}.*delete'):
            _run(tmp_path, total_steps=2)
        assert not os.path.exists(tmp_path / 'checkpoints')
    finally:
        other.kill()
        other.wait()
    _write_lock(tmp_path, other.pid, host='another-host')  # alive or not: only its user can tell
    with pytest.raises(RunStopped, match='another-host'):
        _run(tmp_path, total_steps=2)


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    _write_lock(tmp_path, dead.pid)
    assert _run(tmp_path, total_steps=2)['step'] == 2
    assert not os.path.exists(tmp_path / workdir_lib.LOCK)  # released at the end


def test_lock_is_reentrant_and_held_during_the_run(tmp_path):
    with workdir_lib.workdir_lock(str(tmp_path)):
        held = json.load(open(tmp_path / workdir_lib.LOCK))
        assert held['pid'] == os.getpid() and held['host'] == socket.gethostname()
        _run(tmp_path, total_steps=2)                   # the pipeline's nesting: the inner lock is ours
        assert os.path.exists(tmp_path / workdir_lib.LOCK)
    assert not os.path.exists(tmp_path / workdir_lib.LOCK)


# ---------------------------------------------------------------------------------------------- full disk
def test_full_disk_during_a_save_is_a_clear_error_and_earlier_checkpoints_survive(tmp_path, monkeypatch):
    _run(tmp_path / 'straight', total_steps=8)
    real_save = ocp.CheckpointManager.save

    def save(self, step, *a, **k):
        if step == 6:
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_save(self, step, *a, **k)

    monkeypatch.setattr(ocp.CheckpointManager, 'save', save)
    with pytest.raises(RunStopped, match=r'checkpointing at step 6 failed .*disk is full \(earlier '
                                                r'checkpoints \(1, 2, 4\) are intact\); free space and rerun'):
        _run(tmp_path / 'run', total_steps=8, keep=3)
    monkeypatch.setattr(ocp.CheckpointManager, 'save', real_save)
    assert _steps(tmp_path / 'run') == [1, 2, 4] and all(_finite_params(tmp_path / 'run', s) for s in (1, 2, 4))
    assert _run(tmp_path / 'run', total_steps=8, keep=3)['step'] == 8  # space freed: resumes from 4
    straight, resumed = losses(tmp_path / 'straight'), losses(tmp_path / 'run')
    np.testing.assert_allclose([resumed[s] for s in range(1, 9)], [straight[s] for s in range(1, 9)], rtol=1e-6)


# ---------------------------------------------------------------------------------------------- storage faults
@pytest.fixture(scope='module')
def straight(tmp_path_factory):
    """Per-step losses of an uninterrupted 8-step run."""
    workdir = tmp_path_factory.mktemp('straight')
    _run(workdir, total_steps=8, keep=3)
    return losses(workdir)


def _fail_at(monkeypatch, obj, name, exc, when):
    """Makes `obj.name` raise `exc` on the call for which `when(*args)` is true (the rest pass through)."""
    real = getattr(obj, name)

    def fake(*args, **kwargs):
        if when(*args):
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, fake)


def _full_at_step_6(monkeypatch, tmp_path):
    usage = shutil.disk_usage(tmp_path)
    calls = []

    def disk_usage(path):
        calls.append(path)                              # preflights of steps 1, 2, 4, then 6
        return usage._replace(free=1000 if len(calls) == 4 else usage.free)

    monkeypatch.setattr(shutil, 'disk_usage', disk_usage)


@pytest.mark.parametrize('fault', ['metrics_enospc', 'tensorboard_eacces', 'figure_erofs', 'orbax_async_enospc',
                                   'preflight_full', 'checkpoints_turn_unwritable'])
def test_storage_fault_is_one_line_naming_path_and_checkpoint_and_loses_nothing(tmp_path, monkeypatch, fault,
                                                                                 straight):
    from tensorboardX.event_file_writer import EventsWriter
    figure_fn = None
    ckpts = tmp_path / 'checkpoints'
    if fault == 'metrics_enospc':                       # half of step 5's line lands, then the disk is full
        real_write = os.write

        def write(fd, data):
            if b'"step": 5,' in data:
                real_write(fd, data[:len(data) // 2])
                raise OSError(errno.ENOSPC, 'No space left on device')
            return real_write(fd, data)

        monkeypatch.setattr(os, 'write', write)
        says = r'writing metrics.jsonl \(.*metrics.jsonl\) failed: the disk is full; the newest intact checkpoint is'
    elif fault == 'tensorboard_eacces':
        _fail_at(monkeypatch, EventsWriter, 'write_event', PermissionError(errno.EACCES, 'Permission denied'),
                 lambda self, event: event.step == 5)
        says = r'writing TensorBoard events \(.*/tb\) failed: permission denied; the newest intact checkpoint is step'
    elif fault == 'figure_erofs':
        def figure_fn(step, state, batch):
            if step == 5:
                raise OSError(errno.EROFS, 'Read-only file system', str(tmp_path / 'figures' / 'x.png'))
        says = r'writing the step-5 figure \(.*figures/x.png\) failed: the file system is read-only; the newest'
    elif fault == 'orbax_async_enospc':                 # tensorstore's error: a ValueError, no OSError in it
        msg = (f'RESOURCE_EXHAUSTED: Error writing local file "{ckpts}/6.orbax-checkpoint-tmp/state/d/x": Failed '
               "to write 400 bytes to file 8: No space left on device [os_error_code='28']")
        _fail_at(monkeypatch, ocp.CheckpointManager, 'save', ValueError(msg), lambda self, step: step == 6)
        says = (r'checkpointing at step 6 failed writing to .*checkpoints \(.*6.orbax-checkpoint-tmp/state/d/x\): '
                r'the disk is full \(earlier checkpoints \(1, 2, 4\) are intact\); free space and rerun')
    elif fault == 'preflight_full':
        _full_at_step_6(monkeypatch, tmp_path)
        says = (r'writing checkpoint 6 \(.*checkpoints\) would fail: the disk is full .*the newest intact checkpoint '
                r'is step 4 \(.*checkpoints/4\); free space and rerun to resume')
    else:                                               # e.g. chmod -w checkpoints/ during the run
        calls = []
        _fail_at(monkeypatch, builtins, 'open', PermissionError(errno.EACCES, 'Permission denied', str(ckpts)),
                 lambda path, *a: '.write_test' in str(path) and len(calls.append(0) or calls) == 5)
        says = (r'writing checkpoints \(.*checkpoints\) failed: permission denied; the newest intact checkpoint is '
                r'step 4 .*fix the permissions')
    with pytest.raises(RunStopped, match=says) as stopped:
        _run(tmp_path, total_steps=8, keep=3, figure_fn=figure_fn)
    assert '\n' not in str(stopped.value)
    monkeypatch.undo()
    assert _run(tmp_path, total_steps=8, keep=3)['step'] == 8  # the fault gone, the run resumes
    assert _records(tmp_path) == list(range(1, 9))
    resumed = losses(tmp_path)
    np.testing.assert_allclose([resumed[s] for s in range(1, 9)], [straight[s] for s in range(1, 9)], rtol=1e-6)


def test_unwritable_checkpoints_dir_stops_at_once(tmp_path, monkeypatch):
    """Orbax's save would wait 5 minutes for a directory it cannot create."""
    _fail_at(monkeypatch, builtins, 'open', PermissionError(errno.EACCES, 'Permission denied'),
             lambda path, *a: '.write_test' in str(path))
    t0 = time.time()
    with pytest.raises(RunStopped, match=r'writing checkpoints \(.*checkpoints\) failed: permission denied; '
                                                r'there is no checkpoint yet; fix the permissions'):
        _run(tmp_path, total_steps=2)
    assert time.time() - t0 < 60
    assert not os.path.exists(tmp_path / workdir_lib.LOCK)


def test_read_only_lock_is_one_line(tmp_path, monkeypatch):
    _fail_at(monkeypatch, os, 'open', OSError(errno.EROFS, 'Read-only file system'),
             lambda path, *a: str(path).endswith(workdir_lib.LOCK))
    with pytest.raises(RunStopped, match=r'writing the run lock \(.*run.lock\) failed: the file system is '
                                                r'read-only; there is no checkpoint yet; use a writable workdir'):
        _run(tmp_path, total_steps=2)


def test_storage_cause_reads_tensorstore_errors():
    from sce_mae_jax import errors
    e = ValueError('PERMISSION_DENIED: Error opening "zarr" driver: Error writing local file "/w/c/2.orbax-'
                   'checkpoint-tmp/state/_sharding": Failed to open: Permission denied')
    assert errors.storage_cause(e) == (errno.EACCES, '/w/c/2.orbax-checkpoint-tmp/state/_sharding')
    wrapped = RuntimeError('save failed')
    wrapped.__cause__ = OSError(errno.EROFS, 'Read-only file system', '/w/m')
    assert errors.storage_cause(wrapped) == (errno.EROFS, '/w/m')
    assert errors.storage_cause(ValueError('shape mismatch')) is None


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
    with pytest.raises(RunStopped, match=r'checkpointing at step 8 failed .*disk is full'):
        _run(tmp_path, total_steps=10, keep=3)
    monkeypatch.setattr(os, 'rename', real_rename)
    assert _steps(tmp_path)[-2:] == [2, 4] and all(_finite_params(tmp_path, s) for s in _steps(tmp_path))
    assert _run(tmp_path, total_steps=10, keep=3)['step'] == 10


_FULL_DISK_MAIN = """
import shutil, sys
from absl import app, flags
from sce_mae_jax import main
real = shutil.disk_usage
calls = []
def disk_usage(path):  # the disk fills after the first checkpoint
    calls.append(path)
    return real(path)._replace(free=0) if len(calls) > 1 else real(path)
shutil.disk_usage = disk_usage
flags.mark_flags_as_required(['config', 'workdir'])
app.run(main.main, flags_parser=main.parse_flags)
"""


def test_main_full_disk_exits_with_one_line_and_no_traceback(tmp_path, tiny_pretrain_args):
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
    proc = subprocess.run([sys.executable, '-c', _FULL_DISK_MAIN, *tiny_pretrain_args, f'--workdir={tmp_path}',
                           '--config.total_steps=4', '--config.checkpoint_every=2'], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert re.fullmatch(
        rf'error: writing checkpoint 2 \({tmp_path}/checkpoints\) would fail: the disk is full \(0.0 MiB free, a '
        rf'checkpoint needs about \d+\.\d MiB\); the newest intact checkpoint is step 1 '
        rf'\({tmp_path}/checkpoints/1\); free space and rerun to resume', proc.stderr.strip().splitlines()[-1])
    assert _steps(tmp_path) == [1] and _records(tmp_path) == [1, 2] and not os.path.exists(tmp_path / workdir_lib.LOCK)


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


def test_input_wait_is_logged_and_a_slow_pipeline_warned_about_once(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        _run(tmp_path, total_steps=12, checkpoint_every=100, delay=0.03)  # 240 ms of input for a ~1 ms step
    waits = [json.loads(line)['input_wait'] for line in open(tmp_path / 'metrics.jsonl')]
    # the first steps read what the pipeline prefetched while step 1 compiled; then every step waits
    assert len(waits) == 12 and all(0.0 <= w <= 1.0 for w in waits) and min(waits[-4:]) > 0.5
    (warning,) = [r.getMessage() for r in caplog.records if 'waited for input' in r.getMessage()]
    assert re.search(r'waited for input \d+% of the time up to step \d+: the input pipeline is the bottleneck',
                     warning)


def test_preemption_on_a_checkpoint_step_stops_cleanly_with_that_checkpoint(tmp_path, monkeypatch):
    """A signal that lands on a step that was just checkpointed: that checkpoint is the final one (a second
    save of the same step used to fail with orbax's StepAlreadyExistsError), and the rerun resumes from it."""
    monkeypatch.setattr(common, '_stopped_by', [])
    with monkeypatch.context() as m:
        m.setattr(common.PreemptionGuard, 'should_stop', lambda self, mngr, step: step == 4)
        assert _run(tmp_path, total_steps=8, checkpoint_every=2)['step'] == 4
    assert common.preempted_by() is not None and _steps(tmp_path)[-1] == 4
    assert _run(tmp_path, total_steps=8, checkpoint_every=2)['step'] == 8
