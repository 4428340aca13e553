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
