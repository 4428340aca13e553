"""What the run is on: the JAX backend and devices, and a warning when an accelerator host fell back to the CPU.

A CPU-only JAX (plain `pip install -e .`) on a GPU or TPU host still runs, a hundred times slower, with
nothing in its output saying so; the start-up log names the backend, and `cpu_fallback_warning` says how to
fix it. The host is probed from device files and tools, not through JAX, which sees only its own backends.
"""
from __future__ import annotations

import glob
import os
import shutil

from absl import logging

# The extras of pyproject.toml that install JAX for each accelerator.
INSTALL = {'gpu': 'pip install -e ".[cuda]" (".[cuda13]" for a CUDA 13 driver)', 'tpu': 'pip install -e ".[tpu]"'}


def probe_accelerators(*, exists=os.path.exists, matches=glob.glob, which=shutil.which) -> dict[str, str]:
    """{'gpu' or 'tpu': the evidence} for the accelerators this host shows (NVIDIA device files or
    nvidia-smi; TPU /dev/accel* up to v4, /dev/vfio/N from v5)."""
    found = {}
    nvidia = [p for p in ('/dev/nvidia0',) if exists(p)] + [p for p in (which('nvidia-smi'),) if p]
    if nvidia:
        found['gpu'] = ', '.join(nvidia)
    tpu = sorted(matches('/dev/accel*')) + sorted(p for p in matches('/dev/vfio/*') if os.path.basename(p).isdigit())
    if tpu:
        found['tpu'] = ', '.join(tpu[:4]) + (' ...' if len(tpu) > 4 else '')
    return found


def cpu_fallback_warning(backend: str, accelerators: dict[str, str], jax_platforms: str | None) -> str | None:
    """The warning for a host with an accelerator whose JAX runs on the CPU backend, else None."""
    if backend != 'cpu' or not accelerators:
        return None
    kind = 'tpu' if 'tpu' in accelerators else 'gpu'
    evidence = '; '.join(f'{k.upper()}: {v}' for k, v in accelerators.items())
    cause = (f'JAX_PLATFORMS={jax_platforms} asks for it' if jax_platforms and 'cpu' in jax_platforms.split(',')
             else f'this JAX has no {kind.upper()} support: {INSTALL[kind]}')
    return f'this host has a {kind.upper()} ({evidence}) but JAX runs on the CPU backend; {cause}'


def describe(jax) -> str:
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return (f'backend {jax.default_backend()}: {len(devices)} × {", ".join(kinds)} ({jax.local_device_count()} '
            f'local), {jax.process_count()} process{"es" if jax.process_count() > 1 else ""}')


def log_backend(jax) -> None:
    logging.info('%s', describe(jax))
    warning = cpu_fallback_warning(jax.default_backend(), probe_accelerators(), os.environ.get('JAX_PLATFORMS'))
    if warning:
        logging.warning('%s', warning)


if __name__ == '__main__':  # `python -m sce_mae_jax.hardware [gpu|tpu]`: what JAX sees; non-zero if not that
    import sys

    import jax
    print(describe(jax))
    want = sys.argv[1] if len(sys.argv) > 1 else None
    if want and jax.default_backend() != want:
        warning = cpu_fallback_warning(jax.default_backend(), probe_accelerators(), os.environ.get('JAX_PLATFORMS'))
        sys.exit(f'error: expected the {want} backend, JAX has {jax.default_backend()}: '
                 f'{warning or INSTALL.get(want, "")}')
