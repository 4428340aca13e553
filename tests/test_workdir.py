"""`--workdir` checks (sce_mae_jax/workdir.py), made before JAX starts: one line each, with the right fix."""
import os
import subprocess
import sys


from conftest import REPO
from sce_mae_jax import workdir


def test_usable_workdirs_pass(tmp_path):
    assert workdir.problem(str(tmp_path)) is None                  # exists
    assert workdir.problem(str(tmp_path / 'new')) is None          # created under a writable parent
    assert workdir.problem('gs://bucket/run') is None              # a bucket is checked by its first write


def test_workdir_that_is_a_file(tmp_path):
    (tmp_path / 'f').write_text('x')
    assert 'is a file, not a directory; choose another --workdir' in workdir.problem(str(tmp_path / 'f'))


def test_parent_that_is_a_file(tmp_path):
    (tmp_path / 'f').write_text('x')
    msg = workdir.problem(str(tmp_path / 'f' / 'a' / 'run'))
    assert f'{tmp_path / "f"} is a file, not a directory' in msg and 'mkdir' not in msg


def test_missing_parent(tmp_path):
    msg = workdir.problem(str(tmp_path / 'no' / 'run'))
    assert 'does not exist' in msg and f'mkdir -p {tmp_path / "no"}' in msg


def test_unwritable_workdir_and_parent(tmp_path, monkeypatch):
    (tmp_path / 'run').mkdir()
    monkeypatch.setattr(os, 'access', lambda path, mode: False)   # as for a user without write permission
    assert f'--workdir={tmp_path / "run"} is not writable (permission denied); make it writable (chmod u+w' in \
        workdir.problem(str(tmp_path / 'run'))
    msg = workdir.problem(str(tmp_path / 'new'))
    assert f'its parent {tmp_path} is not writable' in msg and f'create {tmp_path / "new"} yourself' in msg


def test_main_refuses_a_file_workdir_before_jax_starts(tmp_path):
    (tmp_path / 'f').write_text('x')
    proc = subprocess.run([sys.executable, '-m', 'sce_mae_jax.main', '--config=configs/quickstart.py',
                           f'--workdir={tmp_path / "f"}'], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f'error: --workdir={tmp_path / "f"} is a file, not a directory; '
                                                'choose another --workdir (or move the file away)'], proc.stderr
    assert (tmp_path / 'f').read_text() == 'x'


def test_read_only_file_system(tmp_path, monkeypatch):
    (tmp_path / 'run').mkdir()
    monkeypatch.setattr(os, 'access', lambda path, mode: False)
    monkeypatch.setattr(os, 'statvfs', lambda path: type('Vfs', (), {'f_flag': os.ST_RDONLY})())
    assert workdir.problem(str(tmp_path / 'run')).endswith('is not writable (read-only file system); choose '
                                                           'another --workdir')
    assert workdir.problem(str(tmp_path / 'new')).endswith(f'its parent {tmp_path} is not writable (read-only file '
                                                           'system); choose a --workdir on a writable file system')
