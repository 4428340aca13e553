"""The figures' shared landmark colours, legends and labels (figures.py, evals/plots.py, data/preview.py)."""
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sce_mae_jax import figures
from sce_mae_jax.data import preview
from sce_mae_jax.evals import plots


@pytest.fixture
def texts(monkeypatch):
    """Every string the figures draw."""
    drawn = []
    original = ImageDraw.ImageDraw.text

    def text(self, xy, s, *args, **kwargs):
        drawn.append(s)
        return original(self, xy, s, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, 'text', text)
    return drawn


def _has(img, colour):
    return (np.asarray(Image.open(img).convert('RGB')) == colour).all(-1).any()


def _pairs(n=2):
    rng = np.random.default_rng(0)
    lm = rng.uniform(20, 76, (n, 5, 2)).astype(np.float32)
    return {'src_images': rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8),
            'tgt_images': rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8),
            'src_landmarks': lm, 'tgt_landmarks': lm, 'kind': np.array([0, 1], np.int8)[:n]}


def test_one_colour_per_landmark_everywhere():
    assert plots.LANDMARK_COLOURS is figures.LANDMARK_COLOURS is preview.LANDMARK_COLOURS
    assert len(set(figures.LANDMARK_COLOURS)) == len(figures.LANDMARK_NAMES) == 5


def test_matches_label_their_error_and_carry_the_legend(tmp_path, texts):
    p = _pairs()
    pred = p['tgt_landmarks'] + np.array([3.0, 4.0], np.float32)  # 5 px at 96 px on every landmark
    plots.matches_png(str(tmp_path / 'm.png'), p, np.arange(2), {'mae': pred})
    assert texts.count(f'error {5 * 69 / 95:.1f} px (70-px frame)') == 2, texts
    assert all(n in texts for n in figures.LANDMARK_NAMES)
    assert all(_has(tmp_path / 'm.png', c) for c in figures.LANDMARK_COLOURS)


def test_tsne_has_a_legend(tmp_path, texts):
    labels = np.tile(np.arange(5), 4)
    emb = {'mae': np.random.default_rng(0).normal(size=(20, 2))}
    plots.tsne_png(str(tmp_path / 't.png'), emb, labels, {'mae': [0.5, 0.1]})
    assert [t for t in texts if t in figures.LANDMARK_NAMES] == list(figures.LANDMARK_NAMES)
    assert any(re.fullmatch(r'mae: silhouette 0\.50±0\.10', t) for t in texts)
    img = np.asarray(Image.open(tmp_path / 't.png').convert('RGB'))
    legend = img[-figures.LEGEND_HEIGHT:]
    assert all((legend == c).all(-1).any() for c in figures.LANDMARK_COLOURS)


def test_report_shows_loss_curves_and_links_the_training_figures(tmp_path):
    import json
    import types

    from sce_mae_jax.evals import report
    stage1, stage2, ev = tmp_path / 's1', tmp_path / 's2', tmp_path / 'ev'
    for d, prefix in ((stage1, 'recon'), (stage2, 'clusters')):
        (d / 'figures').mkdir(parents=True)
        recs = [{'step': s, 'loss': 1.0 / s} for s in range(1, 21)] + [{'step': 20, 'loss': 0.04}]  # resumed
        (d / 'metrics.jsonl').write_text('\n'.join(json.dumps(r) for r in recs) + '\n')
        for step in (10, 20):
            Image.new('RGB', (4, 4)).save(d / 'figures' / f'{prefix}_{step:07d}.png')
    rows = [types.SimpleNamespace(name='random_init', kind='backbone', source='seed 0'),
            types.SimpleNamespace(name='mae', kind='backbone', source=str(stage1)),
            types.SimpleNamespace(name='sce_mae', kind='projected', source=str(stage2))]
    figs = plots.training_figures(str(ev), rows)
    paths = [p for _, p in figs]
    assert paths == ['figures/loss_mae.png', '../s1/figures/recon_0000020.png',
                     'figures/loss_sce_mae.png', '../s2/figures/clusters_0000020.png'], figs
    assert (ev / 'figures' / 'loss_mae.png').stat().st_size > 500
    steps, losses = figures.read_losses(str(stage1 / 'metrics.jsonl'))
    assert list(steps) == list(range(1, 21)) and losses[-1] == 0.04
    text = report.render({'meta': {'matching': {'figures': figs}}})
    for title, path in figs:
        assert f'![{title}]({path})' in text
