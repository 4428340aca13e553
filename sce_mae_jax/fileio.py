"""Every file a job writes or reads in a workdir, local or in a bucket (`--workdir=gs://bucket/run`).

Paths stay strings (`os.path.join` joins `gs://b/run` and `x` as a URI); the file system is reached through
`etils.epath`, the path library orbax already uses, whose `gs://` backend is fsspec's (`gcsfs`, the `gcs`
extra) or TensorFlow's gfile where TensorFlow is installed. Object stores have no append, no atomic
rename-over and no exclusive create, so the few operations that rely on those differ by kind of path:
an atomic write is tmp + `os.replace` on a local disk and one object write on a bucket (object writes are
atomic); appended logs are `AppendLog`s (below); the run lock is exclusive only on a local disk.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile

import numpy as np
from etils import epath


def is_remote(path) -> bool:
    """Whether `path` is a URI (gs://, s3://, ...) rather than a local path."""
    return '://' in str(path)


def resolve(path: str) -> str:
    """A local path made absolute (`~` expanded); a URI unchanged (os.path.abspath would mangle it)."""
    path = str(path)
    return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def _p(path) -> epath.Path:
    return epath.Path(path)


def exists(path) -> bool:
    return _p(path).exists()


def isdir(path) -> bool:
    return _p(path).is_dir()


def makedirs(path) -> None:
    _p(path).mkdir(parents=True, exist_ok=True)


def listdir(path) -> list[str]:
    return [p.name for p in _p(path).iterdir()]


def remove(path) -> None:
    """Deletes a file; a missing one is not an error."""
    try:
        _p(path).unlink()
    except FileNotFoundError:
        pass


def rmtree(path) -> None:
    _p(path).rmtree()


def rename(src, dst) -> None:
    """Moves a file or directory to a new name (on a bucket: copy, then delete)."""
    _p(src).rename(dst)


def read_text(path) -> str:
    return _p(path).read_text()


def read_bytes(path) -> bytes:
    return _p(path).read_bytes()


def write_bytes(path, data: bytes, suffix: str = '.tmp') -> None:
    """Never half written: tmp + rename locally (readers see the old file or the new one); one object write
    on a bucket, which is atomic there."""
    path = str(path)
    if is_remote(path):
        _p(path).write_bytes(data)
        return
    tmp = path + suffix
    with open(tmp, 'wb') as f:
        f.write(data)
    os.replace(tmp, path)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode())


def save_png(path, image) -> None:
    """A PIL image or a uint8 array as PNG, written atomically (`write_bytes`)."""
    from PIL import Image
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    buf = io.BytesIO()
    image.save(buf, format='PNG')
    write_bytes(path, buf.getvalue(), suffix='.tmp.png')


class AppendLog:
    """A text file that grows by lines (metrics.jsonl). Locally each `write` goes to the file in one call,
    unbuffered, so a killed process leaves only whole lines; a write that fails part way (a full disk) is cut
    back off, so the file never ends in half a line. On a bucket, which cannot append, the whole file (what
    was there before plus the new lines) is rewritten by `flush`: every line is in the bucket after `flush`
    or `close`."""

    def __init__(self, path: str):
        self.path = str(path)
        self.remote = is_remote(self.path)
        if self.remote:
            self._text = io.StringIO()
            if exists(self.path):
                self._text.write(read_text(self.path))
            self._fd = None
        else:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, line: str) -> None:
        if self.remote:
            self._text.write(line)
            return
        data, start = line.encode(), os.fstat(self._fd).st_size
        try:
            done = 0
            while done < len(data):
                done += os.write(self._fd, data[done:])
        except BaseException:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass  # the error being raised says more
            raise

    def flush(self) -> None:
        if self.remote:
            _p(self.path).write_text(self._text.getvalue())

    def close(self) -> None:
        if self.remote:
            self.flush()
        elif self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Mirror:
    """A local folder for writers that need a local disk (tensorboardX's event files grow by appends), copied
    to `remote` by `sync`: the files that changed since the last sync are rewritten whole. Only for remote
    targets; `local` is a temporary directory removed by `close`."""

    def __init__(self, remote: str):
        self.remote = str(remote)
        self.local = tempfile.mkdtemp(prefix='sce_mae_jax_')
        self._sizes: dict[str, int] = {}

    def sync(self) -> None:
        for root, _, files in os.walk(self.local):
            for name in files:
                src = os.path.join(root, name)
                rel = os.path.relpath(src, self.local)
                size = os.path.getsize(src)
                if self._sizes.get(rel) == size:
                    continue
                with open(src, 'rb') as f:
                    data = f.read()
                dst = os.path.join(self.remote, rel)
                makedirs(os.path.dirname(dst))
                _p(dst).write_bytes(data)
                self._sizes[rel] = len(data)

    def close(self) -> None:
        try:
            self.sync()
        finally:
            shutil.rmtree(self.local, ignore_errors=True)
