"""The workdir of a job: whether `--workdir` can be used (`problem`, checked before JAX starts: one line per
problem, with the fix), its creation with the resolved config (`prepare_workdir`), and the run lock that keeps a
second run off it (`workdir_lock`). JAX and the checkpoint code are imported only where a lock or a write needs
them, so the check stays cheap.

A bucket (gs://...) has no directories or permissions to check here; its first write names a bad bucket.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time

import numpy as np
from absl import logging

from sce_mae_jax import errors, fileio
from sce_mae_jax.errors import ConfigError, RunStopped


def problem(workdir: str) -> str | None:
    """The message for the first problem with `workdir` (None when it can be created and written)."""
    if fileio.is_remote(workdir):
        return None
    path = os.path.abspath(os.path.expanduser(workdir))
    if os.path.lexists(path) and not os.path.isdir(path):
        return (f'--workdir={workdir} is a file, not a directory; choose another --workdir (or move the file '
                'away)')
    if os.path.isdir(path):
        if _writable(path):
            return None
        fix = 'choose another --workdir' if _read_only(path) else f'make it writable (chmod u+w {path}) or ' \
            'choose another --workdir'
        return f'--workdir={workdir} is not writable ({_why(path)}); {fix}'

    parent = os.path.dirname(path)
    ancestor = parent
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        return (f'--workdir={workdir} cannot be created: {ancestor} is a file, not a directory; choose a '
                '--workdir outside it')
    if ancestor != parent:
        return (f'the parent directory of --workdir ({parent}) does not exist; create it first '
                f'(mkdir -p {parent}) or choose another workdir')
    if not _writable(parent):
        fix = 'choose a --workdir on a writable file system' if _read_only(parent) else \
            f'create {path} yourself with write permission, or choose another --workdir'
        return f'--workdir={workdir} cannot be created: its parent {parent} is not writable ({_why(parent)}); {fix}'
    return None


def _writable(path: str) -> bool:
    # access(2) answers EROFS for a read-only mount, and the permission bits for everyone but root
    return os.access(path, os.W_OK | os.X_OK)


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _why(path: str) -> str:
    return 'read-only file system' if _read_only(path) else 'permission denied'


# ---------------------------------------------------------------------------------------------- creation & lock
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
    problem, mine = None, False
    import jax
    if jax.process_index() == 0:
        try:
            with errors.writing('the run lock', path, lambda: _newest_intact(workdir)):
                problem, mine = take(path)
        except errors.StorageError as e:  # reported after the other processes hear of it
            problem = str(e)
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
            try:
                fileio.remove(path)
            except OSError as e:  # the run is over; a lock of a dead process is taken over by the next run
                logging.warning('could not remove the run lock %s: %s', path, e)


def _newest_intact(workdir: str):
    """The newest intact checkpoint, named in a storage error so the user knows what a rerun resumes from."""
    from sce_mae_jax.train import checkpoints
    return checkpoints.newest_intact(os.path.join(fileio.resolve(workdir), 'checkpoints'))


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
    """Creates `workdir`, or stops with one line saying why it cannot be used (`problem`)."""
    if fileio.is_remote(workdir):  # a bucket has no directories to check; the first write names a bad bucket
        try:
            fileio.makedirs(workdir)
        except ImportError as e:
            raise ConfigError(f'--workdir={workdir} needs a file system for its scheme: {e} (for gs://, '
                              'pip install -e ".[gcs]")') from e
        return
    message = problem(workdir)
    if message is not None:
        raise ConfigError(message)
    with errors.writing('the workdir', workdir, lambda: _newest_intact(workdir)):
        fileio.makedirs(workdir)


def prepare_workdir(workdir: str, config) -> None:
    """A training workdir: created, with the resolved config.json (evaluations keep theirs in results.json,
    since several write into one workdir)."""
    import jax
    ensure_workdir(workdir)
    if jax.process_index() == 0:
        path = os.path.join(workdir, 'config.json')
        with errors.writing('config.json', path, lambda: _newest_intact(workdir)):
            fileio.write_text(path, config.to_json_best_effort(indent=2))
