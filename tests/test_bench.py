"""bench.py and flops.py: the analytic FLOP count against a hand count, the peak table, and a bench run with no
warm-up steps."""
import jax
import ml_collections
import pytest

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
