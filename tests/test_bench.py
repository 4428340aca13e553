"""bench.py and flops.py: the analytic FLOP count against a hand count, the peak table, a bench run with no
warm-up steps, and every bench command the README, docs and bench.py document, at toy size."""
import glob
import os
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from conftest import REPO
from sce_mae_jax import bench, config_lib, flops

TINY = dict(embed_dim=8, depth=1, num_heads=2, mlp_ratio=2.0, patch_size=8, image_size=16, decoder_embed_dim=4,
            decoder_depth=1, decoder_num_heads=2, mask_ratio=0.5, norm_pix_loss=True, dtype='float32')


def _mm(m, k, n):
    return 2 * m * k * n


def test_mae_step_flops_hand_count():
    # 16 px / patch 8: N = 4 patches of 192 values; mask 0.5 keeps 2, so the encoder sees 3 tokens (CLS first)
    # and the decoder 5.
    enc = (_mm(3, 8, 24) + _mm(3, 3, 8) + _mm(3, 3, 8) + _mm(3, 8, 8)  # qkv, q·kᵀ, p·v, proj (heads summed)
           + _mm(3, 8, 16) + _mm(3, 16, 8))                          # fc1, fc2
    dec = (_mm(5, 4, 12) + _mm(5, 5, 4) + _mm(5, 5, 4) + _mm(5, 4, 4) + _mm(5, 4, 8) + _mm(5, 8, 4))
    patch_embed, decoder_embed, pred = _mm(4, 192, 8), _mm(3, 8, 4), _mm(5, 4, 192)
    forward = patch_embed + enc + decoder_embed + dec + pred
    assert sum(flops.mae_forward_flops(TINY).values()) == forward
    # backward = 2x forward, less the patch embedding's input gradient (the image needs none)
    assert flops.mae_step_flops(TINY) == 3 * forward - patch_embed


def test_mae_deit_s_count_is_the_documented_one():
    # docs/benchmarks.md: 27.9 GFLOP per image for DeiT-S/8 at 96 px with the 512-d, 8-block decoder.
    assert flops.mae_step_flops(config_lib.mae('s', None).model) / 1e9 == pytest.approx(27.89, abs=0.01)


def test_carb_step_flops_hand_count():
    c = ml_collections.ConfigDict({'job': 'carb', 'model': {k: TINY[k] for k in
                                                             ('embed_dim', 'depth', 'num_heads', 'mlp_ratio',
                                                              'patch_size', 'image_size')},
                                   'projector': {'out_dim': 6, 'hidden': (5,), 'kernel_size': 1},
                                   'carb': {'clustering': True}})
    backbone = (_mm(4, 192, 8) + _mm(5, 8, 24) + 2 * _mm(5, 5, 8) + _mm(5, 8, 8) + _mm(5, 8, 16) + _mm(5, 16, 8))
    clustering = _mm(4, 8, 4)  # pairwise distances of the 4 patch tokens
    proj_fwd = _mm(4, 8, 5) + _mm(4, 5, 6)
    proj_bwd = _mm(4, 8, 5) + 2 * _mm(4, 5, 6)  # no gradient into the frozen features
    assert flops.step_flops(c) == backbone + clustering + proj_fwd + proj_bwd
    c.carb.clustering = False
    assert flops.step_flops(c) == backbone + proj_fwd + proj_bwd


@pytest.mark.parametrize('kind,dtype,peak', [
    ('NVIDIA H100 80GB HBM3', 'bfloat16', 989.4), ('NVIDIA H100 PCIe', 'bfloat16', 756.0),
    ('NVIDIA H200', 'float32', 494.7), ('NVIDIA A100-SXM4-80GB', 'bfloat16', 312.0),
    ('TPU v4', 'bfloat16', 275.0), ('TPU v5 lite', 'bfloat16', 197.0), ('TPU v5', 'bfloat16', 459.0),
    ('TPU v5p', 'float32', 459.0), ('TPU v6 lite', 'bfloat16', 918.0)])
def test_peak_table(kind, dtype, peak):
    assert flops.peak_tflops(kind, dtype)[0] == peak


def test_unknown_device_has_no_peak():
    assert flops.peak_tflops('cpu', 'float32') is None
    assert flops.peak_tflops('Tesla T4', 'bfloat16') is None


def test_bench_step_with_no_warmup(capsys):
    config = config_lib.mae('t', None)
    config.model = dict(TINY, mask_ratio=0.75)
    config.batch_size = jax.device_count()
    out = bench.bench_step(config, steps=1, warmup=0)
    text = capsys.readouterr().out
    assert out['images_per_s'] > 0
    for expected in ('dtype=float32', f'batch={config.batch_size}', 'step=', 'images/s=', 'MFU', 'memory: ',
                     'imgs_per_s='):
        assert expected in text, (expected, text)
    if jax.devices()[0].platform == 'cpu':
        assert 'MFU n/a' in text and 'host peak RSS' in text
    # an explicit peak gives an MFU wherever the device kind is unknown
    assert 'MFU 50.0% of 2 TFLOP/s' in bench.mfu_line(1e12, 1.0 * jax.device_count(), 'float32', 2.0)


# ------------------------------------------------------------------------------------ the documented commands
def documented_commands() -> list[str]:
    """Every `python -m sce_mae_jax.bench ARGS` in README.md, docs/*.md and bench.py's docstring, continuation lines
    joined; `<any training config>` stands for each training config."""
    texts = [bench.__doc__] + [open(p).read() for p in [os.path.join(REPO, 'README.md'),
                                                         *sorted(glob.glob(os.path.join(REPO, 'docs', '*.md')))]]
    found = []
    for text in texts:
        text = re.sub(r'\\\n\s*', ' ', text).replace('<any training config>', 'ANY_TRAINING_CONFIG')
        for m in re.finditer(r'python -m sce_mae_jax\.bench((?: +--?[^\s`]+)+)', text):
            args = m.group(1).split()
            if 'ANY_TRAINING_CONFIG' in m.group(1):
                found += [' '.join(args).replace('ANY_TRAINING_CONFIG', c) for c in TRAINING_CONFIGS]
            else:
                found.append(' '.join(args))
    return sorted(set(found))


def toy_variants() -> list[str]:
    """The documented commands less the flags TOY replaces, once each: commands that differ only in batch size or
    step counts are the same run at toy size."""
    replaced = re.compile(r'--(config\.batch_size|config\.model\.(embed_dim|depth|num_heads)|steps|warmup)=\S+')
    return sorted({' '.join(a for a in c.split() if not replaced.fullmatch(a)) for c in documented_commands()}
                  - {'--help'})


TRAINING_CONFIGS = [f'configs/{job}_deit_{size}.py' for job in ('mae', 'carb') for size in 'tsb']
# Appended to each command (absl keeps a repeated flag's last value): a 3-block 16-d ViT on 32-px images
# (16 tokens, clustering after block 2 as in the recipe), batch 2, one step, 4 images, no worker processes.
TOY = ['--config.model.embed_dim=16', '--config.model.depth=3', '--config.model.num_heads=2',
       '--config.model.image_size=32', '--config.batch_size=2', '--steps=1', '--warmup=0', '--input_images=4',
       '--input_workers=0', '--strides=8,4']
TOY_MAE = ['--config.model.depth=1', '--config.model.decoder_embed_dim=8', '--config.model.decoder_depth=1',
           '--config.model.decoder_num_heads=2']  # stage 1 has no clustering block to reach


def test_the_documented_commands_were_found():
    commands = documented_commands()
    modes = {re.search(r'--mode=(\w+)', c).group(1) if '--mode=' in c else 'step' for c in commands}
    assert modes == {'step', 'data', 'input', 'loss', 'matmul', 'features'}, commands
    assert '--help' in commands and '--config=configs/carb_deit_t.py --steps=20' in commands


@pytest.fixture(scope='module')
def celeba_dir(tmp_path_factory):
    """The real-data record format (`--input_data_dir=DIR` of `:data=celeba`): test_datasets' fake CelebA."""
    from test_datasets import make_celeba

    from sce_mae_jax.data import sources
    raw, out = tmp_path_factory.mktemp('celeba_raw'), tmp_path_factory.mktemp('tfds')
    make_celeba(raw)
    sources.prepare('celeba', manual_dir=raw, data_dir=out)
    return str(out)


@pytest.mark.parametrize('command', toy_variants())
def test_documented_command_runs_at_toy_size(command, celeba_dir, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    args = command.replace('=DIR', f'={celeba_dir}').split()
    toy = TOY + (TOY_MAE if 'mae_deit' in command else [])
    out = bench.run(['bench', *args, *toy])
    text = capsys.readouterr().out
    assert f'jax {jax.__version__}' in text, text  # every mode names the machine it measured
    if '--mode=' not in command:
        assert out['images_per_s'] > 0 and np.isfinite(out['loss']) and 'batch=2 ' in text, text


def test_bench_help_runs():
    proc = subprocess.run([sys.executable, '-m', 'sce_mae_jax.bench', '--help'], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS='cpu'))
    # absl's --help exits with status 1 after printing the flags
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr
    assert '--mode' in proc.stdout and 'With --mode=input or --mode=data' in proc.stdout, proc.stdout


def test_data_and_input_modes_follow_the_flags(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    bench.run(['bench', '--config=configs/mae_deit_s.py', '--config.batch_size=6', '--mode=data',
               '--input_workers=0'])
    assert 'batch 6, 0 worker processes' in capsys.readouterr().out
    out = bench.run(['bench', '--config=configs/mae_deit_s.py', '--config.batch_size=2', '--mode=input',
                     '--input_images=5', '--input_workers=0'])
    text = capsys.readouterr().out
    assert ', 5 prepared synthetic/pretrain records' in text, text
    assert 'np.stack of 5' in ' '.join(out['rates'])
