"""`--workdir=gs://bucket/run`: every file the jobs write goes through etils.epath (sce_mae_jax/fileio.py).
Checked on a local path and on a fake gs:// (tests/fake_gcs.py: local folders behind the libraries' own gs://
code, no append), end to end: stage 1 (and its resume), stage 2, matching and detection's regressor.json."""
import json
import os
import socket
import subprocess
import sys

import fsspec
import numpy as np
import pytest
from etils.epath import backend as epath_backend

import fake_gcs
from conftest import REPO, TINY_MODEL, cpu_env

from sce_mae_jax import fileio
from sce_mae_jax.train import common
from sce_mae_jax.errors import RunStopped
from sce_mae_jax import workdir as workdir_lib


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    """The fake gs:// in this process, undone afterwards → its local root."""
    from orbax.checkpoint._src.path import gcs_utils
    root = str(tmp_path / 'gcs')
    os.makedirs(root)
    monkeypatch.setattr(fake_gcs.FakeGCS, 'root', root)
    registry = sys.modules['fsspec.registry']._registry  # pylint: disable=protected-access
    for name in ('gs', 'gcs'):
        monkeypatch.setitem(registry, name, fake_gcs.FakeGCS)
    monkeypatch.setenv('EPATH_USE_TF', 'false')
    monkeypatch.setattr(gcs_utils, 'is_hierarchical_namespace_enabled', lambda path: False)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
    yield root
    epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


@pytest.fixture(params=['local', 'gs'])
def workdir(request, tmp_path):
    """The same checks on a local workdir and a bucket one → (workdir, its local folder)."""
    if request.param == 'local':
        return str(tmp_path / 'wd'), str(tmp_path / 'wd')
    root = request.getfixturevalue('gcs')
    return 'gs://bucket/wd', os.path.join(root, 'bucket', 'wd')


def test_resolve_leaves_uris_alone():
    assert fileio.resolve('gs://b/run') == 'gs://b/run'
    assert fileio.resolve('~/x') == os.path.join(os.path.expanduser('~'), 'x')
    assert fileio.is_remote('gs://b/run') and not fileio.is_remote('/tmp/x')


def test_fake_gcs_refuses_appends(gcs):
    with pytest.raises(OSError, match='appended'):
        fsspec.filesystem('gs').open('gs://bucket/x', 'a')


def test_files_metrics_and_lock(workdir, monkeypatch):
    wd, local = workdir
    workdir_lib.ensure_workdir(wd)
    fileio.write_text(os.path.join(wd, 'a.json'), '{"x": 1}')
    assert json.load(open(os.path.join(local, 'a.json'))) == {'x': 1}
    assert not os.path.exists(os.path.join(local, 'a.json.tmp'))
    fileio.save_png(os.path.join(wd, 'f.png'), np.zeros((4, 4, 3), np.uint8))
    assert open(os.path.join(local, 'f.png'), 'rb').read(4) == b'\x89PNG'
    # metrics.jsonl grows across runs (a resume), although a bucket cannot append
    for steps in ((1, 2), (3,)):
        writer = common.MetricWriter(wd, sync_seconds=0)
        for s in steps:
            writer.write(s, {'loss': float(s)})
        writer.close()
    assert [r['step'] for r in common.read_metrics(wd)] == [1, 2, 3]
    assert [n for n in os.listdir(os.path.join(local, 'tb')) if n.startswith('events.out.tfevents')]
    # the lock: held → a second run refused; released at the end; re-entrant within a process
    lock = os.path.join(local, workdir_lib.LOCK)
    with workdir_lib.workdir_lock(wd):
        assert json.load(open(lock))['pid'] == os.getpid()
        with workdir_lib.workdir_lock(wd):
            pass
        assert os.path.exists(lock)
    assert not os.path.exists(lock)
    with open(lock, 'w') as f:
        json.dump({'pid': 1, 'host': socket.gethostname(), 'started': 'then'}, f)  # pid 1 is alive
    with pytest.raises(RunStopped, match='in use by pid 1'):
        with workdir_lib.workdir_lock(wd):
            pass
    assert fileio.isdir(wd) and sorted(fileio.listdir(wd)) == sorted(os.listdir(local))


def test_detection_regressor_settings(workdir):
    from sce_mae_jax.evals import regressor
    wd, local = workdir
    unit = os.path.join(wd, 'detection', 'set', 'row')
    regressor._check_settings(unit, {'lr': 1.0, 'hidden': (2,)})  # pylint: disable=protected-access
    assert json.load(open(os.path.join(local, 'detection', 'set', 'row', 'regressor.json'))) == {
        'lr': 1.0, 'hidden': [2]}


def _main(root, cwd, args):
    """`python -m sce_mae_jax.main ARGS` with gs:// under `root`, from an empty `cwd`: a URI handed to os.*
    would show up there as a folder `gs:`."""
    env = cpu_env(1, PYTHONUNBUFFERED='1', PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'tests', 'fake_gcs.py'), root, *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert os.listdir(cwd) == []
    return proc


def test_stage1_stage2_and_matching_in_a_bucket(tmp_path):
    root, cwd = str(tmp_path / 'gcs'), tmp_path / 'cwd'
    cwd.mkdir()
    run = os.path.join(root, 'bucket', 'run')
    cfg = lambda name: f'--config={os.path.join(REPO, "configs", name)}'
    stage1 = [cfg('mae_deit_t.py'), *TINY_MODEL, '--config.batch_size=8', '--config.log_every=1',
              '--config.figure_every=3', '--workdir=gs://bucket/run/s1']
    proc = _main(root, cwd, [*stage1, '--config.total_steps=3'])
    assert 'best effort' in proc.stderr
    _main(root, cwd, [*stage1, '--config.total_steps=4'])  # resumes from step 3 in the bucket
    s1 = os.path.join(run, 's1')
    assert [r['step'] for r in map(json.loads, open(os.path.join(s1, 'metrics.jsonl')))] == [1, 2, 3, 4]
    assert {'3', '4'} <= set(os.listdir(os.path.join(s1, 'checkpoints')))
    assert os.path.exists(os.path.join(s1, 'figures', 'recon_0000003.png'))
    assert len(os.listdir(os.path.join(s1, 'tb'))) == 2 and json.load(open(os.path.join(s1, 'config.json')))
    assert not os.path.exists(os.path.join(s1, workdir_lib.LOCK))

    _main(root, cwd, [cfg('carb_deit_t.py'), *TINY_MODEL[:3], '--config.carb.layer=0', '--config.batch_size=8',
                      '--config.total_steps=3', '--config.figure_every=3', '--config.carb.split=cls_debiased',
                      '--config.carb.prior_images=8', '--config.init_from=gs://bucket/run/s1',
                      '--workdir=gs://bucket/run/s2'])
    s2 = os.path.join(run, 's2')
    for rel in ('backbone', 'split/split.json', 'split/aux', 'figures/clusters_0000003.png', 'config.json'):
        assert os.path.exists(os.path.join(s2, rel)), rel
    assert [r['step'] for r in map(json.loads, open(os.path.join(s2, 'metrics.jsonl')))][-1] == 3

    _main(root, cwd, [cfg('eval_matching.py'), '--config.stage1=gs://bucket/run/s1',
                      '--config.stage2=gs://bucket/run/s2', '--config.rows=("pixels","mae","sce_mae")',
                      '--config.num_images=8', '--config.batch_size=8', f'--config.pairs_cache={tmp_path / "pairs"}',
                      '--config.figures.tsne_runs=0', '--config.figures.pairs=2', '--config.premise.images=8',
                      '--workdir=gs://bucket/run/ev'])
    ev = os.path.join(run, 'ev')
    results = json.load(open(os.path.join(ev, 'results.json')))
    assert sorted(results['matching']) == ['mae', 'pixels', 'sce_mae']
    assert '| `sce_mae` |' in open(os.path.join(ev, 'report.md')).read()
    assert os.path.exists(os.path.join(ev, 'figures', 'matches.png'))
