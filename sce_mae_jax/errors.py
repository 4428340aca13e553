"""The error a user can fix: its own module so config files and the command line raise it without importing
JAX or orbax."""
from __future__ import annotations

import contextlib
import errno
import re
from typing import Callable


class ConfigError(ValueError):
    """A user-facing problem with the config, workdir or a checkpoint; the message says how to fix it."""


class RunStopped(ConfigError):
    """A run stopped to keep its workdir safe (non-finite loss, full disk, workdir in use by another run); the
    message says what was kept and how to go on."""


class StorageError(RunStopped):
    """A write failed because the disk is full, read-only or not ours; the message names the path, what was
    being written and the newest intact checkpoint."""


def cause_of(exc: BaseException | None, kind: type) -> BaseException | None:
    """The first exception of type `kind` in `exc`'s chain of causes and contexts (libraries such as orbax and
    grain wrap the error the user can act on), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


# errno → (what it means, what to do)
STORAGE = {
    errno.ENOSPC: ('the disk is full', 'free space'),
    errno.EDQUOT: ('the disk quota is exceeded', 'free space'),
    errno.EROFS: ('the file system is read-only', 'use a writable workdir (or remount it read-write)'),
    errno.EACCES: ('permission denied', 'fix the permissions (chmod/chown) or use another workdir'),
    errno.EPERM: ('operation not permitted', 'fix the permissions (chmod/chown) or use another workdir'),
}
# tensorstore (orbax's array writer) reports a failed write as a ValueError whose text carries the errno and
# the file; no OSError is left in its chain
_TS_ERRNO = re.compile(r"os_error_code='(\d+)'")
_TS_PATH = re.compile(r'(?:Failed writing|Error writing local file|Failed to open|Error opening)[^"]*"([^"]+)"')
_TS_TEXT = {'No space left on device': errno.ENOSPC, 'Disk quota exceeded': errno.EDQUOT,
            'Read-only file system': errno.EROFS, 'Permission denied': errno.EACCES}


def storage_cause(exc: BaseException | None) -> tuple[int, str | None] | None:
    """(errno, path or None) when `exc` or an exception in its chain is a write refused by the storage (full,
    read-only, permission denied); None otherwise."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in STORAGE:
            return exc.errno, exc.filename
        text = str(exc)
        m = _TS_ERRNO.search(text)
        code = int(m.group(1)) if m else next((c for t, c in _TS_TEXT.items() if t in text), None)
        if code in STORAGE and not isinstance(exc, OSError):
            paths = _TS_PATH.findall(text)
            return code, (paths[-1] if paths else None)
        exc = exc.__cause__ or exc.__context__
    return None


def storage_message(code: int, path, what: str, newest: str) -> str:
    """One line: what failed where, why, which checkpoint is intact, what to do."""
    reason, fix = STORAGE[code]
    where = f' ({path})' if path else ''
    return f'writing {what}{where} failed: {reason}; {newest}; {fix} and rerun to resume'


@contextlib.contextmanager
def writing(what: str, path=None, newest: Callable[[], str] = lambda: 'no checkpoint was affected'):
    """Turns a refused write inside the block into one StorageError line (`newest()` names the newest intact
    checkpoint); other errors pass unchanged."""
    try:
        yield
    except RunStopped:
        raise
    except Exception as e:  # pylint: disable=broad-except  # libraries wrap the OSError
        found = storage_cause(e)
        if found is None:
            raise
        code, where = found
        raise StorageError(storage_message(code, where or path, what, newest())) from e
