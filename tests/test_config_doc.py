"""docs/configs.md is generated from the configs (sce_mae_jax/config_doc.py) and must match them."""
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
