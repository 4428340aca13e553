"""The quick-start `pipeline` job: stage 1 then stage 2 from it, with the backbone architecture carried over."""
import json
import os

from conftest import losses, run_main


def test_quickstart_pipeline_runs_both_stages(tmp_path):
    run_main(['--config=configs/quickstart.py', f'--workdir={tmp_path}', '--config.stage1.total_steps=4',
              '--config.stage1.batch_size=8', '--config.stage1.model.depth=3', '--config.stage2.total_steps=3',
              '--config.stage2.batch_size=8', '--config.stage1.figure_every=0', '--config.stage2.figure_every=3'])
    assert sorted(losses(tmp_path / 'stage1')) == [4]
    assert sorted(losses(tmp_path / 'stage2')) == [3]
    stage2 = json.load(open(tmp_path / 'stage2' / 'config.json'))
    assert stage2['model']['depth'] == 3 and stage2['init_from'] == str(tmp_path / 'stage1')
    assert os.path.exists(tmp_path / 'stage2' / 'figures' / 'clusters_0000003.png')
