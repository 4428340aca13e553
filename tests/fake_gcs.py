"""A fake `gs://` for tests: buckets are folders under a local root, reached only through the libraries' own
gs:// code paths (etils.epath's fsspec backend, orbax's GCS branch, tensorstore), with GCS's restrictions
where the jobs could trip on them: no append. Nothing here reaches a network.

    install(root)                       in this process
    python tests/fake_gcs.py ROOT ARGS  `python -m sce_mae_jax.main ARGS` with gs:// under ROOT
"""
import os
import sys

import fsspec
from fsspec.implementations.local import LocalFileSystem

PREFIXES = ('gs://', 'gcs://')


class FakeGCS(LocalFileSystem):
    """gs://BUCKET/KEY ↔ ROOT/BUCKET/KEY. Paths it returns are gcsfs-style 'BUCKET/KEY' (no scheme)."""
    protocol = ('gs', 'gcs')
    root = None

    def __init__(self, *args, **kwargs):
        kwargs.pop('finalize_on_close', None)  # a gcsfs option
        super().__init__(auto_mkdir=True)      # an object store has no directories to create first

    @classmethod
    def _strip_protocol(cls, path):
        path = os.fspath(path) if not isinstance(path, str) else path
        for p in PREFIXES:
            if path.startswith(p):
                return os.path.join(cls.root, path[len(p):].lstrip('/')).rstrip('/') or '/'
        if path.startswith(cls.root):
            return path.rstrip('/')
        return os.path.join(cls.root, path.lstrip('/')).rstrip('/')

    def _unroot(self, path: str) -> str:
        return os.path.relpath(path, self.root) if path.startswith(self.root) else path

    def _open(self, path, mode='rb', **kwargs):
        if 'a' in mode:
            raise OSError(f'fake GCS: objects cannot be appended to ({path})')
        return super()._open(path, mode=mode, **kwargs)

    def glob(self, path, **kwargs):
        out = super().glob(path, **kwargs)
        return [self._unroot(p) for p in out]

    def walk(self, path, *args, **kwargs):
        for root, dirs, files in super().walk(path, *args, **kwargs):
            yield self._unroot(root), dirs, files


def local(path: str, root: str | None = None) -> str:
    """The local file behind a gs:// path."""
    for p in PREFIXES:
        if path.startswith(p):
            return os.path.join(root or FakeGCS.root, path[len(p):])
    raise ValueError(path)


def install(root: str) -> None:
    root = os.path.abspath(root)
    os.makedirs(root, exist_ok=True)
    FakeGCS.root = root
    for name in ('gs', 'gcs'):
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    from etils.epath import backend
    backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
    os.environ['EPATH_USE_TF'] = 'false'  # epath's fsspec backend even where TensorFlow is installed
    # orbax hands gs:// arrays to tensorstore's GCS driver and asks GCS about hierarchical namespaces
    from orbax.checkpoint._src.path import gcs_utils
    gcs_utils.get_kvstore_for_gcs = lambda path: {'driver': 'file', 'path': local(str(path)).rstrip('/')}
    gcs_utils.is_hierarchical_namespace_enabled = lambda path: False


if __name__ == '__main__':
    install(sys.argv.pop(1))
    from absl import app, flags
    from sce_mae_jax import main
    flags.mark_flags_as_required(['config', 'workdir'])
    app.run(main.main, flags_parser=main.parse_flags)
