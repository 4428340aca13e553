"""The start-up backend line and the warning for an accelerator host that runs JAX on the CPU."""
import jax

from sce_mae_jax import hardware


def _probe(files=(), tools=()):
    return hardware.probe_accelerators(exists=lambda p: p in files,
                                       matches=lambda pat: [f for f in files if f.startswith(pat.rstrip('*'))],
                                       which=lambda name: f'/usr/bin/{name}' if name in tools else None)


def test_probe_reads_device_files_and_tools():
    assert _probe() == {}
    assert _probe(files=['/dev/nvidia0']) == {'gpu': '/dev/nvidia0'}
    assert _probe(tools=['nvidia-smi']) == {'gpu': '/usr/bin/nvidia-smi'}
    assert _probe(files=['/dev/accel0', '/dev/accel1']) == {'tpu': '/dev/accel0, /dev/accel1'}
    assert _probe(files=['/dev/vfio/0', '/dev/vfio/vfio']) == {'tpu': '/dev/vfio/0'}  # v5+: numbered groups only


def test_warns_only_for_an_accelerator_host_on_the_cpu_backend():
    gpu = {'gpu': '/dev/nvidia0'}
    assert hardware.cpu_fallback_warning('cpu', {}, None) is None          # a laptop
    assert hardware.cpu_fallback_warning('gpu', gpu, None) is None         # as it should be
    msg = hardware.cpu_fallback_warning('cpu', gpu, None)
    assert 'GPU (GPU: /dev/nvidia0)' in msg and 'CPU backend' in msg and '.[cuda]' in msg
    msg = hardware.cpu_fallback_warning('cpu', {'tpu': '/dev/accel0'}, '')
    assert '.[tpu]' in msg
    msg = hardware.cpu_fallback_warning('cpu', gpu, 'cpu')                 # asked for: say so, not reinstall
    assert 'JAX_PLATFORMS=cpu' in msg and 'pip' not in msg


def test_describe_names_backend_kind_and_counts():
    line = hardware.describe(jax)
    assert line.startswith(f'backend {jax.default_backend()}: {jax.device_count()} × ')
    assert jax.devices()[0].device_kind in line and '1 process' in line


def test_check_says_no_gpu_when_the_host_has_none():
    msg = hardware.check('gpu', 'cpu', {}, None)
    assert 'shows no GPU' in msg and 'pip' not in msg                      # nothing to install would help
    assert '.[cuda]' in hardware.check('gpu', 'cpu', {'gpu': '/dev/nvidia0'}, None)  # a CPU-only JAX on a GPU host
    assert 'shows no TPU' in hardware.check('tpu', 'cpu', {'gpu': '/dev/nvidia0'}, None)
    assert hardware.check('gpu', 'gpu', {'gpu': '/dev/nvidia0'}, None) is None
    assert hardware.check(None, 'cpu', {}, None) is None


def test_cli_help_and_bad_arguments(capsys):
    assert hardware.main(['hardware', '--help']) == 0
    assert 'usage: python -m sce_mae_jax.hardware [gpu|tpu|cpu]' in capsys.readouterr().out
    assert hardware.main(['hardware', 'gpus']) == 2                        # a typo is not a backend name
    assert 'usage:' in capsys.readouterr().err
    assert hardware.main(['hardware', jax.default_backend()]) == 0
    assert hardware.describe(jax) in capsys.readouterr().out
