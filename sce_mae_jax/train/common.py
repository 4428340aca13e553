"""What both trainers share: the device mesh, global batches, checkpoints, metric writing, preemption.

The step functions are pure and `jax.jit`-ed over a 1-D mesh of every device of every process: parameters are
replicated (`P()`), the batch is split on the `data` axis, and XLA inserts the gradient all-reduce. This is
the SPMD form of a pmapped step and runs unchanged on 1 CPU, simulated devices, several hosts, GPU and TPU.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from clu import parameter_overview
from jax.sharding import NamedSharding, PartitionSpec as P

from sce_mae_jax import fileio
from sce_mae_jax import errors
from sce_mae_jax.errors import ConfigError, RunStopped  # noqa: F401  (re-exported: jobs raise common.*)


# ---------------------------------------------------------------------------------------------- mesh & batches
def make_mesh() -> jax.sharding.Mesh:
    # Auto axis types: 0.10's default (Explicit) rejects the patchify reshape of a sharded batch.
    return jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh) -> NamedSharding:
    return NamedSharding(mesh, P('data'))


def check_batch_size(global_batch: int) -> None:
    if global_batch % jax.device_count():
        raise ConfigError(f'batch_size={global_batch} is not divisible by the {jax.device_count()} devices; '
                          f'set --config.batch_size to a multiple of {jax.device_count()}')


def global_batch(local: dict, sharding: NamedSharding) -> dict:
    """Per-process NumPy slices → one global array per key, batch split over the `data` axis."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def replicate(tree, mesh):
    return jax.device_put(tree, replicated(mesh))


# ---------------------------------------------------------------------------------------------- checkpoints
def checkpoint_manager(workdir: str, *, max_to_keep: int, save_interval_steps: int,
                       with_data_iter: bool = True) -> ocp.CheckpointManager:
    """Asynchronous orbax manager. Orbax writes each step into a temporary directory and renames it only once
    complete, so a crash never leaves a half-written latest checkpoint."""
    import grain  # local: grain's checkpoint handler registration
    handlers = {'state': ocp.StandardCheckpointHandler()}
    if with_data_iter:
        handlers['data_iter'] = grain.checkpoint.CheckpointHandler()
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                        enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(os.path.join(fileio.resolve(workdir), 'checkpoints'), options=opts,
                                 item_handlers=handlers)


def save_checkpoint(mngr, step: int, state, data_iter=None, force: bool = False) -> bool:
    import grain
    args = {'state': ocp.args.StandardSave(state)}
    if data_iter is not None:
        args['data_iter'] = grain.checkpoint.CheckpointSave(data_iter)
    return mngr.save(step, args=ocp.args.Composite(**args), force=force)


def shape_mismatches(saved_meta, abstract, prefix=''):
    """Lists 'path: checkpoint shape vs config shape' for leaves that differ (bounded)."""
    out = []
    flat_a = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    flat_s = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(saved_meta)[0]}
    for k in sorted(set(flat_a) | set(flat_s)):
        a, s = flat_a.get(k), flat_s.get(k)
        sa = None if a is None else tuple(getattr(a, 'shape', ()))
        ss = None if s is None else tuple(getattr(s, 'shape', ()))
        if sa != ss:
            out.append(f'{prefix}{k}: checkpoint {ss} vs config {sa}')
    return out


def has_checkpoint(workdir: str) -> bool:
    """Whether `workdir` holds a finished checkpoint (orbax's temporary directories don't count)."""
    d = os.path.join(workdir, 'checkpoints')
    return fileio.isdir(d) and any(n.isdigit() for n in fileio.listdir(d))


def restore_checkpoint(mngr, step: int, abstract_state, data_iter=None):
    """Restores `state` (onto the shardings carried by `abstract_state`) and the iterator, in place.

    A checkpoint from another model size stops with a message listing the differing parameters instead of
    orbax's internal shape error.
    """
    import grain
    meta = mngr.item_metadata(step)
    saved = meta['state'] if meta is not None and 'state' in meta else None
    if saved is not None and 'params' in saved:
        # params alone identify the model; optax states' metadata paths differ from their live pytree paths
        bad = shape_mismatches(saved['params'], abstract_state['params'], prefix="['params']")
        if bad:
            raise ConfigError(
                f'checkpoint {mngr.directory}/{step} does not fit this config (a different model size or '
                f'optimiser?): ' + '; '.join(bad[:6]) + (f' ... ({len(bad)} in all)' if len(bad) > 6 else '') +
                '. Use a fresh --workdir, or the config that wrote it.')
    args = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
        args['data_iter'] = grain.checkpoint.CheckpointRestore(data_iter)
    return mngr.restore(step, args=ocp.args.Composite(**args))['state']


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of `tree` carrying the matching leaf of `shardings`: orbax restores onto them."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def local_target(metadata):
    """ShapeDtypeStructs on this process's first device for a checkpoint's metadata tree, so a checkpoint
    written by any number of processes restores in any other run (the shardings it saved name devices this
    process may not have; restoring onto them fails with 'no addressable shards')."""
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=dev), metadata)


def restore_tree(path: str):
    """A tree saved with `ocp.StandardCheckpointer` (e.g. a stage-2 `backbone/`), as NumPy arrays."""
    ckptr = ocp.StandardCheckpointer()
    tree = ckptr.restore(path, local_target(ckptr.metadata(path).item_metadata))
    return jax.tree.map(np.asarray, tree)


def load_params(path: str) -> dict:
    """Parameters from a workdir (its latest checkpoint), a `checkpoints/` dir, or one step directory.

    Used for `init_from`: a stage-1 workdir or the output of `python -m sce_mae_jax.convert`.
    """
    path = fileio.resolve(path)
    if not fileio.exists(path):
        raise ConfigError(f'init_from={path} does not exist; give a stage-1 workdir, its checkpoints/ directory, '
                          'or a converted checkpoint directory (python -m sce_mae_jax.convert)')
    ckpt_dir, step = path, None
    if fileio.isdir(os.path.join(path, 'checkpoints')):
        ckpt_dir = os.path.join(path, 'checkpoints')
    elif os.path.basename(path).isdigit() and fileio.isdir(os.path.join(path, 'state')):
        ckpt_dir, step = os.path.dirname(path), int(os.path.basename(path))
    mngr = ocp.CheckpointManager(ckpt_dir, item_handlers={'state': ocp.StandardCheckpointHandler()})
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise ConfigError(f'no checkpoint found under {ckpt_dir} (expected numbered step directories holding '
                          '`state/`, as written by training or by sce_mae_jax.convert)')
    target = local_target(mngr.item_metadata(step)['state'])
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))['state']
    mngr.close()
    if 'params' not in state:
        raise ConfigError(f'checkpoint {ckpt_dir}/{step} has no `params` entry (keys: {sorted(state)})')
    return jax.tree.map(np.asarray, state['params'])


# ---------------------------------------------------------------------------------------------- metrics
class MetricWriter:
    """Console, `metrics.jsonl` (one object per logged step) and TensorBoard events, from process 0 only.

    TensorBoard files come from tensorboardX, which needs no TensorFlow (clu.metric_writers imports TF).
    In a bucket workdir (gs://) both are written locally and copied up at most every `sync_seconds` and at
    `close` (buckets cannot append): a crash loses at most that much of the log, never a checkpoint.
    """

    def __init__(self, workdir: str, sync_seconds: float = 30.0):
        self.active = jax.process_index() == 0
        self._jsonl = self._tb = self._mirror = None
        self.remote, self.sync_seconds, self._synced = fileio.is_remote(workdir), sync_seconds, time.time()
        if self.active:
            fileio.makedirs(workdir)
            self._jsonl = fileio.AppendLog(os.path.join(workdir, 'metrics.jsonl'))
            from tensorboardX import SummaryWriter
            if self.remote:  # tensorboardX's own gs:// writer needs google-cloud-storage; this needs only epath
                self._mirror = fileio.Mirror(os.path.join(workdir, 'tb'))
                self._tb = SummaryWriter(self._mirror.local)
            else:
                self._tb = SummaryWriter(os.path.join(workdir, 'tb'))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        scalars = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({'step': int(step), **scalars}) + '\n')
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, int(step))
        logging.info('step %d: %s', step, ', '.join(f'{k}={v:.4g}' for k, v in scalars.items()))
        if self.remote and time.time() - self._synced >= self.sync_seconds:
            self.sync()

    def sync(self) -> None:
        """Copies the log and the events written so far into a bucket workdir."""
        self._jsonl.flush()
        self._tb.flush()
        self._mirror.sync()
        self._synced = time.time()

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            self._tb.close()
            if self._mirror is not None:
                self._mirror.close()


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, 'metrics.jsonl')
    if not fileio.exists(path):
        return []
    return [json.loads(line) for line in fileio.read_text(path).splitlines() if line.strip()]


class Throughput:
    """images/s and ETA over the interval since the last call (host time, so it includes input waits)."""

    def __init__(self, global_batch: int, total_steps: int, first_step: int):
        self.batch, self.total = global_batch, total_steps
        self.t, self.step = time.time(), first_step

    def __call__(self, step: int) -> dict:
        now = time.time()
        dt, ds = now - self.t, step - self.step
        self.t, self.step = now, step
        if ds <= 0 or dt <= 0:
            return {}
        ips = ds * self.batch / dt
        return {'images_per_s': ips, 'images_per_s_per_device': ips / jax.device_count(),
                'eta_hours': (self.total - step) * dt / ds / 3600.0}


# ---------------------------------------------------------------------------------------------- run setup
class PreemptionGuard:
    """Turns SIGTERM/SIGINT into a flag the loop polls, so it can write a final checkpoint and exit cleanly.

    With several processes every host must agree to stop on the same step, which orbax's
    `reached_preemption` (backed by the JAX coordination service) provides.
    """

    def __init__(self):
        self.signalled = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. tests driving the loop); rely on orbax alone
                pass

    def _handler(self, signum, frame):
        del frame
        logging.warning('received signal %d: checkpointing and stopping', signum)
        self.signalled = True

    def should_stop(self, mngr, step: int) -> bool:
        if jax.process_count() > 1:
            return bool(mngr.reached_preemption(step))
        return self.signalled or bool(mngr.reached_preemption(step))


def train_loop(config, workdir: str, *, state, state_sharding, step_fn, data_iter, batch_sharding, total_steps: int,
               figure_fn=None) -> dict:
    """The loop both stages share: resume, step, log, figures, checkpoints, preemption, run safety.

    `step_fn(state, batch) -> (state, metrics)` is the jitted step; `figure_fn(step, state, batch)` is called
    on every process every `config.figure_every` steps (it may run collectives; it writes on process 0).
    Metrics of step n are fetched after step n+1 is dispatched, so the host never waits on the device; the
    finiteness of loss and gradient norm is tracked on the device every step and read only where the host
    waits anyway (logged steps, checkpoints), so a non-finite step stops the run before any checkpoint of it.
    """
    with workdir_lock(workdir):
        mngr = checkpoint_manager(workdir, max_to_keep=config.keep_checkpoints,
                                  save_interval_steps=config.checkpoint_every)
        writer = None
        try:
            restored = restore_latest(mngr, abstract_like(state, state_sharding), data_iter, workdir)
            state = state if restored is None else restored
            writer = MetricWriter(workdir)
            # shapes only: statistics would copy every parameter to the host (and span hosts on a pod)
            parameter_overview.log_parameter_overview(state['params'], include_stats=False, jax_logging_process=0,
                                                      msg='trained parameters:')
            out = _loop(config, mngr, writer, state, step_fn, data_iter, batch_sharding, total_steps, figure_fn)
            with _checkpoint_io(mngr, out['step']):
                mngr.wait_until_finished()
            return out
        finally:
            try:  # an earlier save still in flight completes, so a stopped run keeps it
                mngr.wait_until_finished()
            except Exception as e:  # pylint: disable=broad-except  # the error being raised says more
                logging.warning('while stopping: %s', e)
            mngr.close()
            if writer is not None:
                writer.close()


def _loop(config, mngr, writer, state, step_fn, data_iter, batch_sharding, total_steps, figure_fn) -> dict:
    guard = PreemptionGuard()
    step = int(state['step'])
    meter = Throughput(config.batch_size, total_steps, step)
    finite = FiniteWatch()
    pending = None
    logging.info('training steps %d → %d on %d devices (%d processes)', step, total_steps, jax.device_count(),
                 jax.process_count())

    def save(step, force=False):
        finite.check(mngr)  # never a checkpoint of a non-finite state, so rotation never drops a finite one
        with _checkpoint_io(mngr, step):
            save_checkpoint(mngr, step, state, data_iter, force=force)

    while step < total_steps:
        batch = global_batch(next(data_iter), batch_sharding)
        state, metrics = step_fn(state, batch)
        step += 1
        finite.update(step, metrics)
        if pending is not None:
            writer.write(*pending[:2])
            pending[2].check(mngr)
            pending = None
        if step % config.log_every == 0 or step == total_steps:
            pending = (step, {**metrics, **meter(step)}, finite.snapshot())
        if figure_fn is not None and config.figure_every and step % config.figure_every == 0:
            figure_fn(step, state, batch)
        if mngr.should_save(step):
            save(step)
        if guard.should_stop(mngr, step):
            save(step, force=True)
            logging.warning('stopped at step %d after a preemption signal; rerun the same command to resume', step)
            break
    if pending is not None:
        writer.write(*pending[:2])
    if step == total_steps and mngr.latest_step() != step:
        save(step, force=True)
    finite.check(mngr)
    return {'step': step, 'state': state, 'finished': step >= total_steps}


# ---------------------------------------------------------------------------------------------- run safety
WATCHED = ('loss', 'grad_norm')  # the metrics that must stay finite (both trainers report them)


@jax.jit
def _first_nonfinite(first, which, step, metrics):
    """(first step with a non-finite watched metric or -1, which of WATCHED were non-finite at it)."""
    bad = jnp.stack([~jnp.all(jnp.isfinite(metrics[k])) if k in metrics else jnp.bool_(False) for k in WATCHED])
    new = (first < 0) & jnp.any(bad)
    return jnp.where(new, step, first), jnp.where(new, bad, which)


class FiniteWatch:
    """The first step whose loss or gradient norm was NaN/inf, kept on the device; `check` reads it."""

    def __init__(self, first=None, which=None):
        self.first = jnp.int32(-1) if first is None else first
        self.which = jnp.zeros(len(WATCHED), bool) if which is None else which

    def update(self, step: int, metrics) -> None:
        self.first, self.which = _first_nonfinite(self.first, self.which, jnp.int32(step), metrics)

    def snapshot(self) -> 'FiniteWatch':
        return FiniteWatch(self.first, self.which)

    def check(self, mngr) -> None:
        first = int(self.first)
        if first < 0:
            return
        names = ' and '.join(k for k, b in zip(WATCHED, np.asarray(self.which)) if b)
        latest = mngr.latest_step()
        kept = (f'the last checkpoint, step {latest} in {mngr.directory}, is finite and kept' if latest is not None
                else 'no checkpoint was written before it')
        raise RunStopped(f'step {first}: non-finite {names}; stopped without checkpointing it ({kept}). Lower the '
                         'learning rate (or check the data), then rerun to resume from the last checkpoint')



@contextlib.contextmanager
def _checkpoint_io(mngr, step: int):
    """A write error while checkpointing (full disk, quota, permissions) as one clear message. Orbax writes a
    step into a temporary directory and renames it when complete, so earlier checkpoints are untouched."""
    try:
        yield
    except RunStopped:
        raise
    except Exception as e:  # pylint: disable=broad-except  # orbax may wrap the OSError of its writer thread
        os_err = errors.cause_of(e, OSError)
        if os_err is None:
            raise
        full = os_err.errno in (errno.ENOSPC, errno.EDQUOT)
        try:
            earlier = [s for s in mngr.all_steps() if s != step]
        except Exception:  # pylint: disable=broad-except
            earlier = []
        kept = f'earlier checkpoints ({", ".join(map(str, sorted(earlier)))}) are intact' if earlier else (
            'there is no earlier checkpoint')
        what = 'the disk is full' if full else f'{os_err.strerror or os_err}'
        # orbax finishes a save in the background: the failed write may be an earlier step's, reported now
        raise RunStopped(f'checkpointing at step {step} failed writing to {mngr.directory}: {what} ({kept}); '
                         f'{"free space" if full else "fix the workdir"} and rerun to resume') from e


def restore_latest(mngr, abstract_state, data_iter, workdir: str):
    """The newest checkpoint that restores, or None when there is none. A corrupt or half-deleted one is moved
    to `workdir/corrupt_checkpoints/` with a warning and the one before it is tried, so training resumes from
    the last good step (and can later write that step number again)."""
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            logging.info('resuming from %s/%d', mngr.directory, step)
            return restore_checkpoint(mngr, step, abstract_state, data_iter)
        except ConfigError:
            raise  # a checkpoint of another config: moving it aside would lose it
        except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many kinds
            logging.warning('checkpoint %s/%d cannot be restored (%s: %s); moving it to %s and trying the one '
                            'before it', mngr.directory, step, type(e).__name__, str(e).splitlines()[0][:300],
                            os.path.join(workdir, 'corrupt_checkpoints'))
            _move_aside(mngr, step, workdir)
    return None


def _move_aside(mngr, step: int, workdir: str) -> None:
    if jax.process_index() == 0:
        dest = os.path.join(workdir, 'corrupt_checkpoints')
        fileio.makedirs(dest)
        target = os.path.join(dest, f'{step}_{time.strftime("%Y%m%d-%H%M%S")}')
        fileio.rename(os.path.join(str(mngr.directory), str(step)), target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f'corrupt checkpoint {step} moved')
    mngr.reload()


LOCK = 'run.lock'


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Holds `workdir/run.lock` (pid, host, start time) while a job runs, so a second run on the same workdir
    stops at once instead of interleaving checkpoints. A lock left by a dead process of this host is stale
    and taken over; one from another host can only be judged by the user. Re-entrant within a process (the
    pipeline locks its workdir, then each stage its own). Taken by process 0 for all processes."""
    ensure_workdir(workdir)
    path = os.path.join(workdir, LOCK)
    take = _take_remote_lock if fileio.is_remote(path) else _take_lock
    problem, mine = take(path) if jax.process_index() == 0 else (None, False)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        refused = bool(multihost_utils.broadcast_one_to_all(np.int32(problem is not None)))
        if refused and problem is None:
            problem = f'process 0 found {path} held by another run'
    if problem is not None:
        raise RunStopped(problem)
    try:
        yield
    finally:
        if mine:
            fileio.remove(path)


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # someone else's process, or a lock we cannot read: assume it runs
    return True


def _take_lock(path: str) -> tuple[str | None, bool]:
    """(None, whether we created it) when this process may run; (the message, False) when another run holds it."""
    me = {'pid': os.getpid(), 'host': socket.gethostname(), 'started': time.strftime('%Y-%m-%d %H:%M:%S %Z')}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    held = json.load(f)
            except (OSError, ValueError):
                held = {}
            if held.get('pid') == me['pid'] and held.get('host') == me['host']:
                return None, False
            if held.get('host') == me['host'] and not _pid_alive(held.get('pid')):
                logging.warning('taking over the stale lock %s of pid %s (no longer running)', path, held['pid'])
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
                continue
            return _in_use(path, held), False
        with os.fdopen(fd, 'w') as f:
            json.dump(me, f)
        return None, True
    return f'could not take the lock {path} (it keeps reappearing); is another run starting?', False


def _lock_holder(path: str) -> dict:
    try:
        return json.loads(fileio.read_text(path))
    except (OSError, ValueError):
        return {}


def _in_use(path: str, held: dict) -> str:
    who = (f'pid {held.get("pid")} on {held.get("host")} since {held.get("started")}' if held else
           'a run whose lock cannot be read')
    return (f'workdir {os.path.dirname(path)} is in use by {who}; wait for it or stop it, or if no run '
            f'is using this workdir any more, delete {path}')


def _take_remote_lock(path: str) -> tuple[str | None, bool]:
    """`_take_lock` for a bucket, which has no exclusive create: read, write if free, read back. Two runs
    starting within the same second may both pass; a run started later stops as on a local disk."""
    me = {'pid': os.getpid(), 'host': socket.gethostname(), 'started': time.strftime('%Y-%m-%d %H:%M:%S %Z')}
    if fileio.exists(path):
        held = _lock_holder(path)
        if held.get('pid') == me['pid'] and held.get('host') == me['host']:
            return None, False
        if not (held.get('host') == me['host'] and not _pid_alive(held.get('pid'))):
            return _in_use(path, held), False
        logging.warning('taking over the stale lock %s of pid %s (no longer running)', path, held['pid'])
    logging.warning('%s: a bucket has no exclusive create, so this run lock is best effort (two runs started '
                    'at the same moment may both proceed)', path)
    fileio.write_text(path, json.dumps(me))
    held = _lock_holder(path)
    if held != me:
        return _in_use(path, held), False
    return None, True


def ensure_workdir(workdir: str) -> None:
    if fileio.is_remote(workdir):  # a bucket has no directories to check; the first write names a bad bucket
        try:
            fileio.makedirs(workdir)
        except ImportError as e:
            raise ConfigError(f'--workdir={workdir} needs a file system for its scheme: {e} (for gs://, '
                              'pip install -e ".[gcs]")') from e
        return
    parent = os.path.dirname(os.path.abspath(workdir))
    if not os.path.isdir(parent):
        raise ConfigError(f'the parent directory of --workdir ({parent}) does not exist; create it first '
                          f'(mkdir -p {parent}) or choose another workdir')
    fileio.makedirs(workdir)


def prepare_workdir(workdir: str, config) -> None:
    """A training workdir: created, with the resolved config.json (evaluations keep theirs in results.json,
    since several write into one workdir)."""
    ensure_workdir(workdir)
    if jax.process_index() == 0:
        fileio.write_text(os.path.join(workdir, 'config.json'), config.to_json_best_effort(indent=2))


def tree_size(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def dtype_of(name: str):
    return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[name]
