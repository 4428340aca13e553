"""What every trainer shares: the device mesh, global batches, metric writing, and the training loop with its
finiteness and preemption checks. Checkpoint I/O is train/checkpoints.py, the workdir (creation, run lock)
sce_mae_jax/workdir.py.

The step functions are pure and `jax.jit`-ed over a 1-D mesh of every device of every process: parameters are
replicated (`P()`), the batch is split on the `data` axis, and XLA inserts the gradient all-reduce. This is
the SPMD form of a pmapped step and runs unchanged on 1 CPU, simulated devices, several hosts, GPU and TPU.
"""
from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import parameter_overview
from jax.sharding import NamedSharding, PartitionSpec as P

from sce_mae_jax import errors, fileio
from sce_mae_jax import workdir as workdir_lib
from sce_mae_jax.errors import ConfigError, RunStopped
from sce_mae_jax.train import checkpoints


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


# ---------------------------------------------------------------------------------------------- metrics
class MetricWriter:
    """Console, `metrics.jsonl` (one object per logged step) and TensorBoard events, from process 0 only.

    `metrics.jsonl` holds one record per logged step, in order, always parseable: each line is written whole
    (`fileio.AppendLog`), and on opening a resumed run the records after the restored step `resume_step` (and
    any line a crash cut short) are dropped, so steps redone after a kill are not logged twice.
    TensorBoard events are written on this thread with tensorboardX's record writer (which needs no
    TensorFlow): its SummaryWriter writes from a thread of its own, where a full disk kills the thread and
    then blocks the loop on a full queue. In a bucket workdir (gs://) both are written locally and copied up
    at most every `sync_seconds` and at `close` (buckets cannot append): a crash loses at most that much of
    the log, never a checkpoint. A refused write (full disk, read-only, permissions) stops the run with one
    line naming the file and `newest()`, the newest intact checkpoint.
    """

    def __init__(self, workdir: str, sync_seconds: float = 30.0, resume_step: int | None = None,
                 newest=lambda: 'no checkpoint was affected'):
        self.active = jax.process_index() == 0
        self._jsonl = self._tb = self._mirror = None
        self.remote, self.sync_seconds, self._synced = fileio.is_remote(workdir), sync_seconds, time.time()
        self.path, self.tb_dir = os.path.join(workdir, 'metrics.jsonl'), os.path.join(workdir, 'tb')
        self.newest = newest
        if self.active:
            with errors.writing('metrics.jsonl', self.path, newest):
                fileio.makedirs(workdir)
                trim_metrics(self.path, resume_step)
                self._jsonl = fileio.AppendLog(self.path)
            with errors.writing('TensorBoard events', self.tb_dir, newest):
                if self.remote:  # tensorboardX's own gs:// writer needs google-cloud-storage; this needs only epath
                    self._mirror = fileio.Mirror(self.tb_dir)
                    local = self._mirror.local
                else:
                    local = self.tb_dir
                    fileio.makedirs(local)
                from tensorboardX.event_file_writer import EventsWriter
                self._tb = EventsWriter(os.path.join(local, 'events'))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar
        scalars = {k: float(v) for k, v in metrics.items()}
        with errors.writing('metrics.jsonl', self.path, self.newest):
            self._jsonl.write(json.dumps({'step': int(step), **scalars}) + '\n')
        with errors.writing('TensorBoard events', self.tb_dir, self.newest):
            for k, v in scalars.items():
                self._tb.write_event(Event(wall_time=time.time(), step=int(step), summary=scalar(k, v)))
        logging.info('step %d: %s', step, ', '.join(f'{k}={v:.4g}' for k, v in scalars.items()))
        if self.remote and time.time() - self._synced >= self.sync_seconds:
            self.sync()

    def sync(self) -> None:
        """Copies the log and the events written so far into a bucket workdir."""
        with errors.writing('metrics.jsonl', self.path, self.newest):
            self._jsonl.flush()
        with errors.writing('TensorBoard events', self.tb_dir, self.newest):
            self._tb.flush()
            self._mirror.sync()
        self._synced = time.time()

    def close(self) -> None:
        if self.active:
            with errors.writing('metrics.jsonl', self.path, self.newest):
                self._jsonl.close()
            with errors.writing('TensorBoard events', self.tb_dir, self.newest):
                self._tb.close()
                if self._mirror is not None:
                    self._mirror.close()


def trim_metrics(path: str, resume_step: int | None) -> None:
    """Keeps the whole, parseable records of `path` up to `resume_step` (all whole ones when None)."""
    if not fileio.exists(path):
        return
    text = fileio.read_text(path)
    kept, dropped = [], 0
    for line in text.split('\n')[:-1]:  # the piece after the last newline is a cut-short line (or empty)
        try:
            rec = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if resume_step is not None and isinstance(rec, dict) and rec.get('step', 0) > resume_step:
            dropped += 1
            continue
        kept.append(line + '\n')
    new = ''.join(kept)
    if new != text:
        logging.info('%s: dropped %d records after step %s and %d bytes of a cut-short line', path, dropped,
                     resume_step, len(text.rsplit('\n', 1)[-1]))
        fileio.write_text(path, new)


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, 'metrics.jsonl')
    if not fileio.exists(path):
        return []
    return [json.loads(line) for line in fileio.read_text(path).splitlines() if line.strip()]


class Throughput:
    """images/s, ETA and the share of the time spent waiting for input, over the interval since the last call.

    Host time: the step is dispatched asynchronously, so the host runs ahead until the device queue is full and
    then waits inside the step; time spent in `next(data_iter)` (`waited`) is time the input pipeline, not the
    device, held the run up. An interval after the first (which holds the pipeline's start-up) that waited for
    more than `WAIT_WARNING` of its time logs one warning per run, naming the knobs."""
    WAIT_WARNING = 0.1

    def __init__(self, global_batch: int, total_steps: int, first_step: int, workers=None):
        self.batch, self.total, self.workers = global_batch, total_steps, workers
        self.t, self.step = time.time(), first_step
        self.waited, self.intervals, self.warned = 0.0, 0, False

    def __call__(self, step: int) -> dict:
        now = time.time()
        dt, ds, waited = now - self.t, step - self.step, self.waited
        self.t, self.step, self.waited = now, step, 0.0
        if ds <= 0 or dt <= 0:
            return {}
        self.intervals += 1
        wait = min(1.0, waited / dt)
        if wait > self.WAIT_WARNING and self.intervals > 1 and not self.warned:
            self.warned = True
            knob = f'--config.input.workers (now {self.workers})' if self.workers is not None else \
                'the input workers'
            logging.warning('the run waited for input %.0f%% of the time up to step %d: the input pipeline is the '
                            'bottleneck; raise %s, or read prepared shards (python -m sce_mae_jax.data.prepare) '
                            'instead of decoding raw files', 100 * wait, step, knob)
        ips = ds * self.batch / dt
        return {'images_per_s': ips, 'images_per_s_per_device': ips / jax.device_count(),
                'eta_hours': (self.total - step) * dt / ds / 3600.0, 'input_wait': wait}


# ---------------------------------------------------------------------------------------------- run setup
class PreemptionGuard:
    """Turns SIGTERM/SIGINT into a flag the loop polls, so it can write a final checkpoint and exit cleanly.

    With several processes every host must agree to stop on the same step, which orbax's
    `reached_preemption` (backed by the JAX coordination service) provides.
    """

    def __init__(self):
        self.signalled = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. tests driving the loop); rely on orbax alone
                pass

    def _handler(self, signum, frame):
        del frame
        logging.warning('received signal %d: checkpointing and stopping', signum)
        self.signalled = signum

    def should_stop(self, mngr, step: int) -> bool:
        if jax.process_count() > 1:
            return bool(mngr.reached_preemption(step))
        return self.signalled is not None or bool(mngr.reached_preemption(step))


_stopped_by = []  # the signal that stopped a training loop of this process (orbax's preemption: SIGTERM)


def preempted_by() -> int | None:
    """The signal that stopped a loop of this process early, after its final checkpoint; main exits with
    128 + it, so a scheduler tells "preempted, requeue" from "finished" (0) and "failed" (1)."""
    return _stopped_by[-1] if _stopped_by else None


def train_loop(config, workdir: str, *, state, state_sharding, step_fn, data_iter, batch_sharding, total_steps: int,
               figure_fn=None, monitor_fn=None) -> dict:
    """The loop both stages share: resume, step, log, figures, checkpoints, preemption, run safety.

    `step_fn(state, batch) -> (state, metrics)` is the jitted step; `figure_fn(step, state, batch)` is called
    on every process every `config.figure_every` steps (it may run collectives; it writes on process 0).
    `monitor_fn(state) -> {name: float}` (train/monitor.py) runs on every process every `config.monitor.every`
    steps and at the last one (of a run at least that long); its values join that step's record (a record is
    written there if the step would not have been logged).
    Metrics of step n are fetched after step n+1 is dispatched, so the host never waits on the device; the
    finiteness of loss and gradient norm is tracked on the device every step and read only where the host
    waits anyway (logged steps, checkpoints), so a non-finite step stops the run before any checkpoint of it.
    """
    with workdir_lib.workdir_lock(workdir):
        mngr = checkpoints.checkpoint_manager(workdir, max_to_keep=config.keep_checkpoints,
                                  save_interval_steps=config.checkpoint_every)
        newest = lambda: checkpoints.newest_intact(mngr.directory)  # noqa: E731
        writer = None
        try:
            restored = checkpoints.restore_latest(mngr, checkpoints.abstract_like(state, state_sharding), data_iter,
                                                  workdir)
            state = state if restored is None else restored.state
            writer = MetricWriter(workdir, resume_step=0 if restored is None else restored.step, newest=newest)
            # shapes only: statistics would copy every parameter to the host (and span hosts on a pod)
            parameter_overview.log_parameter_overview(state['params'], include_stats=False, jax_logging_process=0,
                                                      msg='trained parameters:')
            out = _loop(config, mngr, writer, state, step_fn, data_iter, batch_sharding, total_steps, figure_fn,
                        FiniteWatch(origin=restored and (restored.step, restored.checksummed)), workdir, monitor_fn)
            with checkpoints.checkpoint_io(mngr, out['step']):
                mngr.wait_until_finished()
        except BaseException:
            _shut(mngr, writer, failing=True)
            raise
        _shut(mngr, writer, failing=False)
        return out


def _shut(mngr, writer, failing: bool) -> None:
    """Lets an earlier save still in flight complete (so a stopped run keeps it), then closes the manager and
    the logs. While an error is being raised, a second one here is logged in one line, not raised over it."""
    steps = [lambda: mngr.wait_until_finished(), mngr.close] + ([writer.close] if writer is not None else [])
    for step in steps:
        try:
            step()
        except Exception as e:  # pylint: disable=broad-except
            if not failing:
                raise
            logging.warning('while stopping: %s', (str(e).splitlines() or [type(e).__name__])[0][:300])


def _loop(config, mngr, writer, state, step_fn, data_iter, batch_sharding, total_steps, figure_fn, finite,
          workdir, monitor_fn=None) -> dict:
    guard = PreemptionGuard()
    step = int(state['step'])
    meter = Throughput(config.batch_size, total_steps, step, config.get('input', {}).get('workers'))
    pending = None
    # a checkpoint takes about the raw bytes of the state (random floats barely compress) plus metadata
    needed = checkpoints.state_bytes(state) * 5 // 4 + 2**18
    logging.info('training steps %d → %d on %d devices (%d processes)', step, total_steps, jax.device_count(),
                 jax.process_count())

    def save(step, force=False):
        nonlocal pending
        finite.check(mngr)  # never a checkpoint of a non-finite state, so rotation never drops a finite one
        if pending is not None and pending[0] == step:  # a checkpoint never runs ahead of the log
            writer.write(*pending[:2])
            pending = None
        with checkpoints.checkpoint_io(mngr, step):
            # orbax would wait for the save in flight anyway; waiting here lets its failure surface now and
            # lets the preflight see the disk as it is
            mngr.wait_until_finished()
        checkpoints.preflight(mngr, step, needed)
        with checkpoints.checkpoint_io(mngr, step):
            checkpoints.save_checkpoint(mngr, step, state, data_iter, force=force)

    while step < total_steps:
        t0 = time.perf_counter()
        local = next(data_iter)
        meter.waited += time.perf_counter() - t0
        batch = global_batch(local, batch_sharding)
        state, metrics = step_fn(state, batch)
        step += 1
        finite.update(step, metrics)
        if pending is not None:
            writer.write(*pending[:2])
            pending[2].check(mngr)
            pending = None
        watch = monitor_fn is not None and (step % config.monitor.every == 0 or
                                            step == total_steps >= config.monitor.every)
        if step % config.log_every == 0 or step == total_steps or watch:
            pending = (step, {**metrics, **meter(step)}, finite.snapshot())
        if watch:
            pending[1].update(monitor_fn(state))
        if figure_fn is not None and config.figure_every and step % config.figure_every == 0:
            with errors.writing(f'the step-{step} figure', os.path.join(workdir, 'figures'), writer.newest):
                figure_fn(step, state, batch)
        if mngr.should_save(step):
            save(step)
        if guard.should_stop(mngr, step):
            if mngr.latest_step() != step:  # a signal during a checkpoint step: that checkpoint is the final one
                save(step, force=True)
            _stopped_by.append(guard.signalled or signal.SIGTERM)
            logging.warning('stopped at step %d after a preemption signal; rerun the same command to resume', step)
            break
    if pending is not None:
        writer.write(*pending[:2])
        pending = None
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
    """The first step whose loss or gradient norm was NaN/inf, kept on the device; `check` reads it.

    `origin` is (step, checksummed) of the checkpoint the run resumed from (None: a fresh start). It tells
    the two causes apart: a restored state that was bad (non-finite at its very first step, from a
    checkpoint saved without checksums, whose altered values could still be finite), or a run that diverged
    (from a fresh start or a checkpoint verified against its checksums).
    """

    def __init__(self, first=None, which=None, origin=None):
        self.first = jnp.int32(-1) if first is None else first
        self.which = jnp.zeros(len(WATCHED), bool) if which is None else which
        self.origin = origin or None

    def update(self, step: int, metrics) -> None:
        self.first, self.which = _first_nonfinite(self.first, self.which, jnp.int32(step), metrics)

    def snapshot(self) -> 'FiniteWatch':
        return FiniteWatch(self.first, self.which, self.origin)

    def check(self, mngr) -> None:
        first = int(self.first)
        if first < 0:
            return
        names = ' and '.join(k for k, b in zip(WATCHED, np.asarray(self.which)) if b)
        if self.origin is not None:
            start, checksummed = self.origin
            if not checksummed and first == start + 1:
                bad = os.path.join(str(mngr.directory), str(start))
                corrupt = os.path.join(os.path.dirname(str(mngr.directory)), checkpoints.CORRUPT)
                raise RunStopped(
                    f'step {first}: non-finite {names} at the first step after restoring checkpoint {start}: the '
                    'restored state is bad (it was saved without checksums, so only its finiteness could be '
                    f'verified); move {bad} to {corrupt}/ '
                    'and rerun to resume from the checkpoint before it')
            since = f'the verified checkpoint at step {start}' if checksummed else f'the checkpoint at step {start}'
        else:
            start, since = 0, 'the initial state'
        latest = mngr.latest_step()
        kept = (f'the last checkpoint, step {latest} in {mngr.directory}, is verified and kept' if latest is not None
                else 'no checkpoint was written before it')
        raise RunStopped(f'step {first}: non-finite {names}: training diverged after {first - start - 1} finite '
                         f'steps from {since}; stopped without checkpointing it ({kept}). Lower the learning rate '
                         '(or check the data), then rerun to resume from the last checkpoint')


def tree_size(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
