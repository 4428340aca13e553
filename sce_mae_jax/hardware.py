"""What the run is on: the JAX backend and devices, and a warning when an accelerator host fell back to the CPU.

A CPU-only JAX (plain `pip install -e .`) on a GPU or TPU host still runs, a hundred times slower, with
nothing in its output saying so; the start-up log names the backend, and `cpu_fallback_warning` says how to
fix it. The host is probed from device files and tools, not through JAX, which sees only its own backends.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

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


USAGE = """usage: python -m sce_mae_jax.hardware [gpu|tpu|cpu]

Prints the JAX backend, device kind and count. With a backend name, exits non-zero (saying why and what to
install) unless JAX runs on that backend."""


def check(want: str | None, backend: str, accelerators: dict[str, str], jax_platforms: str | None) -> str | None:
    """The error for `python -m sce_mae_jax.hardware WANT` when JAX runs on `backend`, else None."""
    if not want or backend == want:
        return None
    problem = f'error: expected the {want} backend, JAX has {backend}: '
    if want in ('gpu', 'tpu') and want not in accelerators:
        # nothing to install: the host shows no such device (no device file, no vendor tool)
        return problem + f'this host shows no {want.upper()} (' + (
            'no /dev/nvidia0, no nvidia-smi)' if want == 'gpu' else 'no /dev/accel*, no /dev/vfio/N)')
    return problem + (cpu_fallback_warning(backend, accelerators, jax_platforms) or INSTALL.get(want, ''))


def main(argv: list[str]) -> int:
    args = argv[1:]
    asked = any(a in ('-h', '-help', '--help', '--helpshort', '--helpfull') for a in args)
    if asked or len(args) > 1 or (args and args[0] not in ('gpu', 'tpu', 'cpu')):
        print(USAGE, file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    import jax
    print(describe(jax))
    message = check(args[0] if args else None, jax.default_backend(), probe_accelerators(),
                    os.environ.get('JAX_PLATFORMS'))
    if message:
        print(message, file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
