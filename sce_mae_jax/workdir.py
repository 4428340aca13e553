"""Whether `--workdir` can be used, checked before JAX starts: one line per problem, with the fix.

A bucket (gs://...) has no directories or permissions to check here; its first write names a bad bucket.
"""
from __future__ import annotations

import os

from sce_mae_jax import fileio


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
