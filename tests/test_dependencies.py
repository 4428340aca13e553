"""Every declared dependency is imported by the code, and every third-party import is declared."""
import ast
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

tomllib = pytest.importorskip('tomllib')

IMPORT_NAME = {'orbax-checkpoint': 'orbax', 'tensorflow-datasets': 'tensorflow_datasets', 'ml-collections':
               'ml_collections', 'absl-py': 'absl', 'pillow': 'PIL', 'scikit-learn': 'sklearn',
               'array-record': 'array_record'}
FIRST_PARTY = {'sce_mae_jax'}
# pinned, not imported: a dependency of JAX whose newest release starts 100x slower (pyproject.toml says why)
PINNED_ONLY = {'ml-dtypes'}


def _declared():
    with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
        project = tomllib.load(f)['project']
    name = lambda req: re.match(r'[A-Za-z0-9_.-]+', req).group(0)  # noqa: E731
    core = {name(r) for r in project['dependencies']}
    extras = {k: {name(r) for r in v} for k, v in project['optional-dependencies'].items()}
    return core, extras


def _imported():
    found = set()
    for root, _, files in os.walk(os.path.join(REPO, 'sce_mae_jax')):
        for f in files:
            if f.endswith('.py'):
                tree = ast.parse(open(os.path.join(root, f)).read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        found |= {a.name.split('.')[0] for a in node.names}
                    elif isinstance(node, ast.ImportFrom) and node.level == 0:
                        found.add(node.module.split('.')[0])
    return found - FIRST_PARTY - set(sys.stdlib_module_names)


def test_every_declared_dependency_is_imported():
    core, extras = _declared()
    imported = _imported()
    unused = sorted(d for d in (core | extras['torch']) - PINNED_ONLY if IMPORT_NAME.get(d, d) not in imported)
    assert not unused, f'declared but never imported: {unused}'


def test_every_import_is_declared():
    core, extras = _declared()
    declared = {IMPORT_NAME.get(d, d) for d in core | extras['torch']}
    missing = sorted(_imported() - declared)
    assert not missing, f'imported but not declared in pyproject.toml: {missing}'


def test_accelerator_extras_pin_the_same_jax():
    with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
        project = tomllib.load(f)['project']
    jax_pin = next(r for r in project['dependencies'] if r.startswith('jax=='))
    version = jax_pin.split('==')[1]
    extras = project['optional-dependencies']
    assert extras['cuda'] == [f'jax[cuda12]=={version}'] and extras['cuda13'] == [f'jax[cuda13]=={version}']
    assert extras['tpu'] == [f'jax[tpu]=={version}']


def test_clu_parameter_overview_needs_no_tensorflow():
    code = 'import sys, clu.parameter_overview; sys.exit("tensorflow" in sys.modules)'
    assert subprocess.run([sys.executable, '-c', code], env=dict(os.environ, JAX_PLATFORMS='cpu'),
                          timeout=120).returncode == 0
