"""The launch scripts' dry runs: every command they would run, printed, with nothing run (no gcloud, sbatch or
GPU needed)."""
import os
import shlex
import subprocess

import pytest

from conftest import REPO


def dry_run(script, *args, ok=True):
    proc = subprocess.run(['bash', os.path.join(REPO, 'launch', script), '--dry_run', *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode == 0) == ok, proc.stderr
    return proc.stdout.splitlines() if ok else proc.stderr


def _remote(line):
    """The --command= of a `gcloud ... ssh` line, as the worker's shell would split it."""
    (command,) = [w for w in shlex.split(line) if w.startswith('--command=')]
    return command[len('--command='):]


TPU = ['--name=sce-pod', '--zone=us-west4-a', '--type=v4-32', '--version=tpu-ubuntu2204-base']


def test_tpu_pod_all_creates_installs_runs_follows_and_deletes():
    lines = dry_run('tpu_pod.sh', *TPU, '--spot', 'all', 'configs/mae_deit_s.py:data=celeba', 'gs://bkt/runs/s1',
                    '--config.data_dir=gs://bkt/tfds', '--config.manual_dir=/mnt/raw data')
    words = [shlex.split(line) for line in lines]
    assert words[0] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'sce-pod', '--node-id=sce-pod',
                        '--zone=us-west4-a', '--accelerator-type=v4-32', '--runtime-version=tpu-ubuntu2204-base',
                        '--spot']
    assert words[1][:5] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe']  # the wait
    assert 'git ls-files' in words[2][-1] and 'tar' in words[2][-1]                        # this checkout, packed
    assert words[3][:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp'] and '--worker=all' in words[3]
    installs = [_remote(line) for line in lines if '--worker=all' in line and 'ssh' in line]
    assert any('pip install' in c and '.[tpu,gcs]' in c for c in installs)
    (start,) = [c for c in installs if 'sce_mae_jax.main' in c]
    main = shlex.split(start.split('&&', 1)[1].split('>')[0])
    assert main == ['nohup', 'python3', '-m', 'sce_mae_jax.main', '--distributed',
                    '--config=configs/mae_deit_s.py:data=celeba', '--workdir=gs://bkt/runs/s1',
                    '--config.data_dir=gs://bkt/tfds', '--config.manual_dir=/mnt/raw data']
    assert all('--worker=all' in line for line in lines if 'tpu-vm' in line and 'tail' not in line)
    assert 'tail' in _remote(lines[-2]) and '--worker=0' in lines[-2]                       # follow worker 0
    assert words[-1][:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'sce-pod']


def test_tpu_pod_steps_one_at_a_time():
    assert dry_run('tpu_pod.sh', *TPU, '--keep', 'all', 'configs/quickstart.py', 'gs://b/q')[-1].count('delete') == 0
    clone = dry_run('tpu_pod.sh', *TPU, '--repo=https://example.com/sce_mae_jax.git@v1', 'install')
    assert 'git clone https://example.com/sce_mae_jax.git' in _remote(clone[0]) and 'checkout v1' in clone[0]
    assert len(dry_run('tpu_pod.sh', *TPU, 'delete')) == 1 and 'tail' in dry_run('tpu_pod.sh', *TPU, 'logs')[0]


@pytest.mark.parametrize('args, says', [
    (['run', 'configs/quickstart.py', '/tmp/local'], 'must be on GCS'),
    (['--zone=z', 'create'], '--name and --zone are required'),
    (['--name=n', '--zone=z', 'launch'], 'unknown action'),
])
def test_tpu_pod_refuses_mistakes(args, says):
    assert says in dry_run('tpu_pod.sh', *(args if args[0].startswith('--') else ['--name=n', '--zone=z', *args]),
                           ok=False)


def test_gpu_host_checks_the_backend_then_runs_one_process():
    lines = dry_run('gpu_host.sh', '--install', 'configs/mae_deit_s.py', '/data/w', '--config.batch_size=256')
    assert lines == ['python -m pip install -e \'.[cuda]\'', 'nvidia-smi -L', 'python -m sce_mae_jax.hardware gpu',
                     'python -m sce_mae_jax.main --config=configs/mae_deit_s.py --workdir=/data/w '
                     '--config.batch_size=256']
    some = dry_run('gpu_host.sh', '--gpus=0,1', 'configs/quickstart.py', '/w')
    assert some[-1].startswith('env CUDA_VISIBLE_DEVICES=0,1 python -m sce_mae_jax.main')


def test_slurm_script_runs_one_task_per_gpu_with_distributed():
    lines = dry_run('slurm.sh', '--nodes=4', '--gpus_per_node=8', '--partition=a100', '--venv=/opt/venv',
                    'configs/mae_deit_b.py:data=celeba', '/shared/runs/b', '--config.batch_size=1024')
    body = '\n'.join(lines)
    for directive in ('--nodes=4', '--ntasks-per-node=8', '--gpus-per-node=8', '--partition=a100',
                      '--output=/shared/runs/b/slurm/%j.out'):
        assert f'#SBATCH {directive}' in lines, directive
    assert '--gpus-per-task' not in body  # each task must see its node's GPUs to pick SLURM_LOCALID's
    assert f'cd {REPO}' in lines and 'source /opt/venv/bin/activate' in lines
    (srun,) = [line for line in lines if line.startswith('srun ')]
    assert shlex.split(srun) == ['srun', 'python', '-m', 'sce_mae_jax.main', '--distributed',
                                 '--config=configs/mae_deit_b.py:data=celeba', '--workdir=/shared/runs/b',
                                 '--config.batch_size=1024', '||', 'status=$?']
    # preemption (exit 143 after the final checkpoint) requeues the job; other failures end it
    assert '#SBATCH --requeue' in lines and '#SBATCH --open-mode=append' in lines
    after = lines[lines.index(srun) + 1:]
    assert after[0].startswith('if [[ $status -eq 143 ]]; then scontrol requeue "$SLURM_JOB_ID"; fi')
    assert after[1] == 'exit $status'
    assert lines[-1] == 'sbatch /shared/runs/b/slurm/job.sbatch'
    assert not os.path.exists('/shared/runs/b')  # a dry run writes nothing


def test_local_processes_starts_n_processes_at_one_coordinator():
    lines = dry_run('local_processes.sh', '3', '2', '--config=configs/quickstart.py', '--workdir=/tmp/m')
    assert len(lines) == 3
    coordinators = {w for line in lines for w in shlex.split(line) if w.startswith('--coordinator_address=')}
    assert len(coordinators) == 1
    for i, line in enumerate(lines):
        assert f'--process_id={i}' in line and '--num_processes=3' in line
        assert 'XLA_FLAGS=--xla_force_host_platform_device_count=2' in line and line.endswith('--workdir=/tmp/m')


def test_slurm_checks_the_venv(tmp_path):
    args = ['--venv=/nonexistent/venv', 'configs/quickstart.py', str(tmp_path / 'w')]
    proc = subprocess.run(['bash', os.path.join(REPO, 'launch', 'slurm.sh'), '--dry_run', *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and 'warning: --venv=/nonexistent/venv has no bin/activate' in proc.stderr
    # the job itself stops with the path on a node that lacks it, before srun
    check = [line for line in proc.stdout.splitlines() if line.startswith('[[ -f /nonexistent/venv/bin/activate')]
    assert len(check) == 1 and 'exit 1' in check[0]
    real = subprocess.run(['bash', os.path.join(REPO, 'launch', 'slurm.sh'), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert real.returncode == 2 and 'error: --venv=/nonexistent/venv has no bin/activate' in real.stderr
    assert not os.path.exists(tmp_path / 'w')  # refused before writing the sbatch script
    venv = tmp_path / 'venv'
    (venv / 'bin').mkdir(parents=True)
    (venv / 'bin' / 'activate').write_text('')
    ok = subprocess.run(['bash', os.path.join(REPO, 'launch', 'slurm.sh'), '--dry_run', f'--venv={venv}',
                         'configs/quickstart.py', '/shared/w'], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and 'warning' not in ok.stderr and f'source {venv}/bin/activate' in ok.stdout


@pytest.mark.parametrize('script', ['local_processes.sh', 'slurm.sh'])
def test_help_prints_usage(script):
    proc = subprocess.run(['bash', os.path.join(REPO, 'launch', script), '--help'], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and '--dry_run' in proc.stdout and 'CONFIG' in proc.stdout, proc.stderr


def test_local_processes_without_counts_says_what_is_missing():
    proc = subprocess.run(['bash', os.path.join(REPO, 'launch', 'local_processes.sh'), '--dry_run',
                           '--config=configs/quickstart.py'], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and 'N and D' in proc.stderr and 'unbound' not in proc.stderr, proc.stderr
