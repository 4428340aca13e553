"""docs/configs.md is generated from the configs (sce_mae_jax/config_doc.py) and must match them; the job
commands the docs give must be command lines that main.py accepts."""
import glob
import os
import re

import ml_collections
import pytest

from conftest import REPO
from sce_mae_jax import cli, config_doc

CONFIGS = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))


def test_configs_md_is_up_to_date():
    with open(os.path.join(REPO, 'docs', 'configs.md')) as f:
        stored = f.read()
    assert stored == config_doc.render(), ('docs/configs.md is out of date with configs/: regenerate it with '
                                           '`python -m sce_mae_jax.config_doc > docs/configs.md`')


def _rows(section: str) -> dict[str, tuple[str, str]]:
    out = {}
    for line in section.splitlines():
        m = re.match(r'\| `([^`]+)` \| (.*?) \| (.*) \|$', line)
        if m and m.group(1) != 'field':
            out[m.group(1)] = (m.group(2), m.group(3))
    return out


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_every_field_is_listed_with_its_default(path):
    rows = _rows(config_doc.config_section(path))
    config = cli.load_config(['main', f'--config={path}'])

    def leaves(c, prefix=''):
        for k, v in c.items():
            if isinstance(v, ml_collections.ConfigDict):
                yield from leaves(v, f'{prefix}{k}.')
            else:
                yield f'{prefix}{k}', v

    for field, value in leaves(config):
        assert field in rows, field
        if value is not None:
            assert rows[field][0] == f'`{repr(value)}`'.replace('|', '\\|'), field


def test_comments_come_from_the_code_that_set_the_field():
    rows = _rows(config_doc.config_section(os.path.join(REPO, 'configs', 'quickstart.py')))
    # the config file's own comment on its override
    assert rows['stage1.warmup_epochs'][1].startswith('with total_steps, warm-up keeps its fraction')
    assert rows['evals.detection.features.stride'][1].startswith('one pass per image')
    # config_lib's, through the function that built each part (mae, carb, eval_fields, _regressor_fields)
    assert rows['stage1.weight_decay'][1].startswith('AdamW, on parameters')
    assert rows['stage1.base_lr'][1].startswith('× 32/256: peak lr')  # quickstart's, not config_lib's
    assert rows['stage2.carb.eta'][1] == 'attentive rate η (eq. 1)'
    assert rows['evals.matching.stage1'][1].startswith('stage-1 workdir')
    assert rows['evals.detection.total_steps'][1] == 'when set, every regressor trains this many steps'
    assert rows['stage1.total_steps'][1] == 'when set, overrides epochs'
    # a group's comment (the lines above `c.regressor = dict(...)`) on the group's row
    assert rows['evals.detection.regressor'][1].startswith('Conv block (our choice')
    # a keyword's comment inside dict(...), including the comment lines above it
    assert rows['stage2.carb.untrained_decoder'][1].startswith('split=recon with init_from=random_init')
    assert rows['stage1.model.fused_ops'][1].startswith('custom-VJP LayerNorm')


def _documented_commands():
    """Every `python -m sce_mae_jax.main ...` command of the docs (continuation lines joined)."""
    out = []
    for path in [os.path.join(REPO, 'README.md'), *sorted(glob.glob(os.path.join(REPO, 'docs', '*.md')))]:
        with open(path) as f:
            text = re.sub(r'\\\n\s*', ' ', f.read())
        for m in re.finditer(r'python -m sce_mae_jax\.main (.*)', text):
            line = m.group(1).split('`')[0].split('#')[0].replace('[', ' ').replace(']', ' ')
            out.append((os.path.basename(path), line.split()))
    return out


REPRODUCING = [c for c in _documented_commands() if c[0] == 'reproducing.md']


def test_reproducing_md_has_its_commands():
    assert len(REPRODUCING) >= 10  # the stages and evaluations of Tables 1-3


@pytest.mark.parametrize('where, args', REPRODUCING, ids=[f'{a[0]}-{i}' for i, (_, a) in enumerate(REPRODUCING)])
def test_reproducing_commands_are_valid_command_lines(where, args):
    """Config file, variant after ':' and every --config.x field exist (cli.problem: what main.py checks
    before JAX starts), with placeholders such as DIR taken literally."""
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        assert cli.problem(['main', *args]) is None, (where, args, cli.problem(['main', *args]))
    finally:
        os.chdir(cwd)


def test_readme_job_table_names_every_config():
    readme = open(os.path.join(REPO, 'README.md')).read()
    table = readme.split('## Jobs', 1)[1].split('```', 1)[0]
    named = set()
    for m in re.finditer(r'`configs/([\w{},]+)\.py`', table):
        stem = m.group(1)
        braces = re.search(r'\{([\w,]+)\}', stem)
        named |= ({stem.replace(braces.group(0), v) for v in braces.group(1).split(',')} if braces else {stem})
    configs = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, 'configs', '*.py'))}
    assert configs - named == set(), configs - named
