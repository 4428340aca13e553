"""Checkpoints: orbax managers, saving with a checksum of every array, verified restores, corrupt checkpoints
moved aside, and refused writes (full disk, read-only, permissions) as one line.

A checkpoint is trusted only after it is verified: every array restored must match the checksum written into
the checkpoint's own metadata at save time (orbax writes that metadata inside the step's temporary directory,
so it is committed atomically with the arrays) and must be finite. Bytes changed on disk after the save
(a bad disk, a stray write) otherwise restore without an error and show up only as a NaN some steps later.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from sce_mae_jax import errors, fileio
from sce_mae_jax.errors import ConfigError, RunStopped

CHECKSUMS = 'checksums'  # key of the step metadata's custom_metadata holding {array path: checksum}
CORRUPT = 'corrupt_checkpoints'


# ---------------------------------------------------------------------------------------------- managers
def checkpoint_manager(workdir: str, *, max_to_keep: int, save_interval_steps: int,
                       with_data_iter: bool = True) -> ocp.CheckpointManager:
    """Asynchronous orbax manager. Orbax writes each step into a temporary directory and renames it only once
    complete, so a crash never leaves a half-written latest checkpoint. `checkpoints/` is checked writable
    first: orbax's background writer would otherwise fail on it and leave the run waiting for minutes."""
    import grain  # local: grain's checkpoint handler registration
    directory = os.path.join(fileio.resolve(workdir), 'checkpoints')
    problem = None
    if jax.process_index() == 0:
        try:
            check_writable(directory, newest=lambda: newest_intact(directory))
        except errors.StorageError as e:
            problem = e
    _raise_on_all(problem, f'process 0 cannot write {directory} (its log says why)')
    handlers = {'state': ocp.StandardCheckpointHandler()}
    if with_data_iter:
        handlers['data_iter'] = grain.checkpoint.CheckpointHandler()
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                        enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(directory, options=opts, item_handlers=handlers)


def check_writable(directory: str, newest=lambda: 'no checkpoint was affected') -> None:
    """Creates `directory` and a file in it (then removes it), or stops with one line saying why not."""
    if fileio.is_remote(directory):  # a bucket's permissions show at its first write, which orbax reports at once
        return
    probe = os.path.join(directory, f'.write_test.{os.getpid()}')
    with errors.writing('checkpoints', directory, newest):
        fileio.makedirs(directory)
        with open(probe, 'w') as f:
            f.write('ok')
        os.remove(probe)


def steps_on_disk(directory: str) -> list[int]:
    """Finished steps in a `checkpoints/` directory (orbax's temporary directories don't count)."""
    try:
        return sorted(int(n) for n in fileio.listdir(directory) if n.isdigit())
    except OSError:
        return []


def newest_intact(directory, exclude=()) -> str:
    """Names the newest finished checkpoint on disk, for an error message."""
    steps = [s for s in steps_on_disk(str(directory)) if s not in exclude]
    return (f'the newest intact checkpoint is step {steps[-1]} ({os.path.join(str(directory), str(steps[-1]))})'
            if steps else 'there is no checkpoint yet')


def has_checkpoint(workdir: str) -> bool:
    """Whether `workdir` holds a finished checkpoint (orbax's temporary directories don't count)."""
    d = os.path.join(workdir, 'checkpoints')
    return fileio.isdir(d) and any(n.isdigit() for n in fileio.listdir(d))


# ---------------------------------------------------------------------------------------------- checksums
def _words(x) -> jax.Array:
    """The bits of `x` as a flat uint32 vector (one word per element of up to 4 bytes)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = jnp.ravel(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jnp.ravel(jax.lax.bitcast_convert_type(x, unsigned)).astype(jnp.uint32)


def _digest(words, xp=jnp):
    """A position-dependent 32-bit checksum of a flat uint32 vector: each word, salted with its index, goes
    through murmur3's finaliser and the results are summed mod 2^32 (integer sums do not depend on the reduction
    order, so any sharding gives the same value). `xp` is jax.numpy on the devices, numpy on the host."""
    h = words ^ (xp.arange(words.size, dtype=xp.uint32) * xp.uint32(0x9E3779B9))
    h = (h ^ (h >> 16)) * xp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * xp.uint32(0xC2B2AE35)
    return xp.sum(h ^ (h >> 16), dtype=xp.uint32)


@jax.jit
def _digests_and_finite(leaves):
    finite = [jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
              for x in leaves]
    return jnp.stack([_digest(_words(x)) for x in leaves]), jnp.stack(finite)


# A state up to this size is checksummed on the host: tracing and compiling the checksum program cost every
# process that saves or restores one ~1 s (the whole test suite: ~50 s of XLA compilation), while reading a few
# MB and hashing them with numpy takes milliseconds. Larger states (any DeiT MAE's) stay on the devices.
HOST_FINGERPRINT_BYTES = 32 << 20


def _host_words(x: np.ndarray) -> np.ndarray:
    """`_words` on the host, for dtypes of up to 4 bytes."""
    x = np.ravel(x)
    if x.dtype == np.bool_:
        x = x.astype(np.uint8)
    return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).astype(np.uint32)


def _on_host(leaves) -> list[np.ndarray] | None:
    """The leaves as numpy arrays when all of them are small, held whole by this process and of dtypes of up to
    4 bytes; else None."""
    if sum(getattr(x, 'nbytes', 8) for x in leaves) > HOST_FINGERPRINT_BYTES:
        return None
    out = []
    for x in leaves:
        if isinstance(x, jax.Array):
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                x = jax.random.key_data(x)
            if x.is_fully_replicated:
                x = x.addressable_data(0)
            elif not x.is_fully_addressable:
                return None
        x = np.asarray(x)
        if x.dtype.itemsize > 4:
            return None
        out.append(x)
    return out


def fingerprint(tree) -> tuple[dict[str, str], list[str]]:
    """({array path: checksum as hex}, [paths of arrays holding NaN/inf]) of a pytree of jax.Arrays, computed
    on the devices (only a few bytes per array come back to the host), or on the host for a small state."""
    flat = [(jax.tree_util.keystr(k), v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]]
    if not flat:
        return {}, []
    host = _on_host([v for _, v in flat])
    if host is not None:
        sums = [int(_digest(_host_words(x), np)) for x in host]
        finite = [not np.issubdtype(x.dtype, np.inexact) or bool(np.all(np.isfinite(x))) for x in host]
    else:
        sums, finite = _digests_and_finite([v for _, v in flat])
        sums, finite = (np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array) else np.asarray(a)
                        for a in (sums, finite))
    return ({k: f'{int(s):08x}' for (k, _), s in zip(flat, sums)},
            [k for (k, _), ok in zip(flat, finite) if not ok])


def verify(tree, saved: dict[str, str] | None) -> str | None:
    """What is wrong with a restored tree (non-finite arrays, checksums that differ from the saved ones), or
    None. Without saved checksums (a checkpoint from before they were written) only finiteness is checked."""
    sums, nonfinite = fingerprint(tree)
    problems = []
    if saved:
        changed = [k for k, v in sums.items() if k in saved and saved[k] != v]
        if changed:
            problems.append(f'checksum mismatch in {_few(changed)} (its data changed on disk after it was saved)')
    if nonfinite:
        problems.append(f'non-finite values in {_few(nonfinite)}')
    return '; '.join(problems) or None


def _few(paths: list[str]) -> str:
    return ', '.join(paths[:4]) + (f' and {len(paths) - 4} more arrays' if len(paths) > 4 else '')


# ---------------------------------------------------------------------------------------------- save
def save_checkpoint(mngr, step: int, state, data_iter=None, force: bool = False) -> bool:
    """Saves `state` (and the iterator) with the checksum of every array in the step's metadata."""
    import grain
    sums, nonfinite = fingerprint(state)
    if nonfinite:  # a checkpoint that can never be trusted must not rotate out one that can
        raise RunStopped(f'step {step}: non-finite values in {_few(nonfinite)}: training diverged; stopped '
                         f'without checkpointing it ({newest_intact(mngr.directory)}, kept). Lower the '
                         'learning rate (or check the data), then rerun to resume from it')
    args = {'state': ocp.args.StandardSave(state)}
    if data_iter is not None:
        args['data_iter'] = grain.checkpoint.CheckpointSave(data_iter)
    return mngr.save(step, args=ocp.args.Composite(**args), force=force, custom_metadata={CHECKSUMS: sums})


def state_bytes(tree) -> int:
    return int(sum(getattr(x, 'nbytes', 8) for x in jax.tree.leaves(tree)))


def preflight(mngr, step: int, needed: int) -> None:
    """Stops before a save that cannot succeed: `checkpoints/` not writable, or less than `needed` bytes free.
    Orbax's writer threads would fail with pages of tracebacks, and an unwritable directory leaves its save
    waiting minutes for a signal that never comes. Process 0 decides for all (a collective at saves only)."""
    directory = str(mngr.directory)
    problem = None
    if jax.process_index() == 0:
        try:
            check_writable(directory, lambda: newest_intact(directory))
            free = None if fileio.is_remote(directory) else shutil.disk_usage(directory).free
        except errors.StorageError as e:
            problem, free = e, None
        if free is not None and free < needed:
            problem = errors.StorageError(
                f'writing checkpoint {step} ({directory}) would fail: the disk is full ({free / 2**20:.1f} MiB '
                f'free, a checkpoint needs about {needed / 2**20:.1f} MiB); {newest_intact(directory)}; free '
                'space and rerun to resume')
    _raise_on_all(problem, f'process 0 cannot write checkpoint {step} to {directory} (its log says why)')


def _raise_on_all(problem: Exception | None, elsewhere: str) -> None:
    """Raises process 0's `problem` on every process, so none is left waiting for the others in orbax."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        if bool(multihost_utils.broadcast_one_to_all(np.int32(problem is not None))) and problem is None:
            problem = errors.StorageError(f'{elsewhere}; rerun to resume once it can')
    if problem is not None:
        raise problem


@contextlib.contextmanager
def checkpoint_io(mngr, step: int):
    """A write error while checkpointing (full disk, quota, permissions) as one clear message. Orbax writes a
    step into a temporary directory and renames it when complete, so earlier checkpoints are untouched."""
    try:
        yield
    except RunStopped:
        raise
    except Exception as e:  # pylint: disable=broad-except  # orbax may wrap the OSError of its writer thread
        found = errors.storage_cause(e)
        os_err = errors.cause_of(e, OSError)
        if found is None and os_err is None:
            raise
        code, path = found if found is not None else (os_err.errno, os_err.filename)
        reason, fix = errors.STORAGE.get(code, (os_err.strerror if os_err is not None else str(code),
                                                'fix the workdir'))
        m = re.search(r'/(\d+)\.orbax-checkpoint-tmp', str(path or ''))
        step = int(m.group(1)) if m else step  # the step whose background write failed, reported now
        # the loop waits for a save in flight before starting the next, so the disk tells what is intact
        earlier = [s for s in steps_on_disk(str(mngr.directory)) if s != step]
        kept = f'earlier checkpoints ({", ".join(map(str, earlier))}) are intact' if earlier else (
            'there is no earlier checkpoint')
        where = f'{mngr.directory}' + (f' ({path})' if path else '')
        raise errors.StorageError(f'checkpointing at step {step} failed writing to {where}: {reason} ({kept}); '
                                  f'{fix} and rerun to resume') from e


# ---------------------------------------------------------------------------------------------- restore
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


def saved_checksums(mngr, step: int) -> dict[str, str] | None:
    """The checksums written with `step`, or None for a checkpoint saved without them."""
    custom = mngr.metadata(step).custom_metadata or {}
    return custom.get(CHECKSUMS)


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


class CorruptCheckpoint(Exception):
    """A checkpoint that restored but failed verification."""


class Restored(NamedTuple):
    state: object
    step: int
    checksummed: bool  # False: saved without checksums, so only its finiteness could be verified


def restore_latest(mngr, abstract_state, data_iter, workdir: str) -> Restored | None:
    """The newest checkpoint that restores and verifies, or None when there is none. A corrupt, half-deleted
    or altered one is moved to `workdir/corrupt_checkpoints/` with one warning saying what failed, and the
    one before it is tried, so training resumes from the last good step (and can later write that step
    number again)."""
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            logging.info('resuming from %s/%d', mngr.directory, step)
            saved = saved_checksums(mngr, step)
            state = restore_checkpoint(mngr, step, abstract_state, data_iter)
            problem = verify(state, saved)
            if problem is not None:
                raise CorruptCheckpoint(problem)
            if saved is None:
                logging.warning('checkpoint %s/%d has no checksums (written by an older version): only its '
                                'finiteness was verified', mngr.directory, step)
            return Restored(state, step, saved is not None)
        except ConfigError:
            raise  # a checkpoint of another config: moving it aside would lose it
        except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many kinds
            what = (f'failed verification: {e}' if isinstance(e, CorruptCheckpoint) else
                    f'cannot be restored ({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ""})')
            logging.warning('checkpoint %s/%d %s; moving it to %s and trying the one before it', mngr.directory,
                            step, what, os.path.join(workdir, CORRUPT))
            _move_aside(mngr, step, workdir)
    return None


def _move_aside(mngr, step: int, workdir: str) -> None:
    if jax.process_index() == 0:
        dest = os.path.join(workdir, CORRUPT)
        fileio.makedirs(dest)
        target = os.path.join(dest, f'{step}_{time.strftime("%Y%m%d-%H%M%S")}')
        fileio.rename(os.path.join(str(mngr.directory), str(step)), target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f'corrupt checkpoint {step} moved')
    mngr.reload()


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

    Used for `init_from`: a stage-1 workdir or the output of `python -m sce_mae_jax.convert`. The checkpoint
    is verified like a resumed one; a bad one stops the run (it belongs to another run, so it is not moved).
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
    problem = verify(state, saved_checksums(mngr, step))
    mngr.close()
    if problem is not None:
        raise ConfigError(f'init_from checkpoint {ckpt_dir}/{step} failed verification: {problem}; give an '
                          'earlier step directory of it (init_from=.../checkpoints/STEP) or retrain it')
    if 'params' not in state:
        raise ConfigError(f'checkpoint {ckpt_dir}/{step} has no `params` entry (keys: {sorted(state)})')
    return jax.tree.map(np.asarray, state['params'])
