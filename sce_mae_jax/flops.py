"""Analytic model FLOPs of the train steps, and the peak FLOP/s of the accelerators we report MFU against.

Model FLOPs utilisation (MFU) = analytic model FLOPs per step / step time / device peak. The count is the
model's, not the compiler's: XLA's `cost_analysis()` leaves out the matmuls it hands to cuBLAS on GPU (it reported
1.88 GFLOP/image on an H100 against 28.6 on CPU, issue 10), and it counts recomputation (our attention's
backward recomputes q·kᵀ), which MFU by definition does not.

Conventions: a (m×k)·(k×n) matmul is 2·m·k·n FLOPs; the backward pass of a matmul is twice its forward (the
gradients of both operands), except where an operand needs no gradient; element-wise work (LayerNorm, softmax,
GELU, the loss, the optimiser) is left out, as in the usual 6·N·tokens rule.
"""
from __future__ import annotations

import dataclasses


def _block_forward(tokens: int, dim: int, mlp_ratio: float) -> float:
    """One pre-norm transformer block on `tokens` tokens of width `dim`, per image."""
    projections = 2 * tokens * dim * dim * (3 + 1 + 2 * mlp_ratio)  # qkv, attention out, fc1, fc2
    attention = 2 * 2 * tokens * tokens * dim                      # q·kᵀ and p·v over all heads
    return projections + attention


def mae_forward_flops(m) -> dict[str, float]:
    """Per-image forward FLOPs of the stage-1 MAE (models/mae.py) by part, from `config.model`."""
    grid = m['image_size'] // m['patch_size']
    n = grid * grid
    patch_dim = m['patch_size'] ** 2 * 3
    visible = 1 + int(n * (1 - m['mask_ratio']))  # CLS + kept patches: random_masking_ids' `keep`
    mlp = m.get('mlp_ratio', 4.0)
    d, dd = m['embed_dim'], m['decoder_embed_dim']
    return {
        # every patch is embedded before masking drops 3/4 of them (the reference does the same)
        'patch_embed': 2 * n * patch_dim * d,
        'encoder': m['depth'] * _block_forward(visible, d, mlp),
        'decoder_embed': 2 * visible * d * dd,
        'decoder': m['decoder_depth'] * _block_forward(n + 1, dd, mlp),
        'decoder_pred': 2 * (n + 1) * dd * patch_dim,  # on the CLS row too, sliced off after
    }


def mae_step_flops(m) -> float:
    """Per-image forward + backward FLOPs of the stage-1 train step. The patch embedding's input is the image,
    which needs no gradient, so its backward is one matmul (the kernel's gradient), not two."""
    f = mae_forward_flops(m)
    return 3 * sum(f.values()) - f['patch_embed']


def vit_forward_flops(m) -> float:
    """Per-image forward FLOPs of the bare encoder on all patches (stage 2's frozen backbone, evaluation)."""
    grid = m['image_size'] // m['patch_size']
    n = grid * grid
    return (2 * n * m['patch_size'] ** 2 * 3 * m['embed_dim']
            + m['depth'] * _block_forward(n + 1, m['embed_dim'], m.get('mlp_ratio', 4.0)))


def carb_step_flops(config) -> float:
    """Per-image FLOPs of the stage-2 train step (train/carb.py): the frozen backbone's forward (no backward: it
    is outside the gradient; mode A's key mask hides tokens but the blocks still compute all of them), the
    clustering's pairwise distances at the clustering layer, and the projector's forward and its kernels'
    gradients (its input is a stop_gradient, so no input gradient). The LCR loss itself (|T|² = 19² pairs) is
    under 0.1% and left out."""
    m = config.model
    grid = m['image_size'] // m['patch_size']
    n = grid * grid
    backbone = vit_forward_flops(m)
    clustering = 2 * n * n * m['embed_dim'] if config.carb.clustering else 0.0
    p = config.projector
    widths = [m['embed_dim'], *p.get('hidden', ()), p['out_dim']]
    k2 = p.get('kernel_size', 1) ** 2
    projector = sum(2 * n * k2 * a * b for a, b in zip(widths[:-1], widths[1:]))
    # backward: kernel gradients of every layer, input gradients of all but the first
    first = 2 * n * k2 * widths[0] * widths[1]
    return backbone + clustering + 3 * projector - first


def step_flops(config) -> float:
    """Per-image model FLOPs of the config's train step."""
    if config.job == 'pretrain':
        return mae_step_flops(config.model)
    if config.job == 'carb':
        return carb_step_flops(config)
    raise ValueError(f'no FLOP count for job {config.job!r}')


# ---------------------------------------------------------------------------------------------- device peaks
@dataclasses.dataclass(frozen=True)
class Peak:
    bfloat16: float  # dense TFLOP/s per device (chip), bf16 inputs, f32 accumulation
    float32: float   # dense TFLOP/s per device for float32 inputs at JAX's default matmul precision
    source: str


# Dense (no 2:4 sparsity) datasheet peaks. "float32" is what a float32 matmul gets at JAX's *default*
# precision, which lets XLA use TF32 tensor cores on NVIDIA Ampere and later and one bf16 pass on TPU
# (https://docs.jax.dev/en/latest/201/precision.html); a run with --jax_default_matmul_precision=highest gets
# far less (GPU: the CUDA-core FP32 peak, 67 on H100 SXM; TPU: several bf16 passes), so its MFU reads low.
# Keys are matched as substrings of `jax.Device.device_kind`, longest first.
PEAKS = {
    # NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): SXM BF16 1,979 / TF32 989 TFLOP/s "with
    # sparsity", half that dense; PCIe 1,513 / 756 with sparsity.
    'H100 PCIe': Peak(756.0, 378.0, 'NVIDIA H100 datasheet, PCIe, dense'),
    'H100 NVL': Peak(835.5, 417.5, 'NVIDIA H100 datasheet, NVL, dense'),  # 1,671 / 835 with sparsity
    'H100': Peak(989.4, 494.7, 'NVIDIA H100 datasheet, SXM, dense'),
    # NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): same tensor cores as H100 SXM, more HBM.
    'H200': Peak(989.4, 494.7, 'NVIDIA H200 datasheet (SXM), dense'),
    'GH200': Peak(989.4, 494.7, 'NVIDIA GH200 datasheet (its H100/H200 GPU), dense'),
    # NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100): BF16 312, TF32 156 TFLOP/s dense.
    'A100': Peak(312.0, 156.0, 'NVIDIA A100 datasheet, dense'),
    # Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e): peak bf16 per chip.
    'TPU v4': Peak(275.0, 275.0, 'cloud.google.com/tpu/docs/v4'),
    'TPU v5 lite': Peak(197.0, 197.0, 'cloud.google.com/tpu/docs/v5e'),
    'TPU v5e': Peak(197.0, 197.0, 'cloud.google.com/tpu/docs/v5e'),
    'TPU v5p': Peak(459.0, 459.0, 'cloud.google.com/tpu/docs/v5p'),
    'TPU v5': Peak(459.0, 459.0, 'cloud.google.com/tpu/docs/v5p'),  # v5p reports itself as 'TPU v5'
    'TPU v6 lite': Peak(918.0, 918.0, 'cloud.google.com/tpu/docs/v6e'),
    'TPU v6e': Peak(918.0, 918.0, 'cloud.google.com/tpu/docs/v6e'),
}


def peak_tflops(device_kind: str, dtype: str) -> tuple[float, str] | None:
    """(TFLOP/s, source) of one device of this kind at this compute dtype, or None when the kind is not in
    `PEAKS` (CPUs, other accelerators): there MFU is not reported rather than guessed."""
    for key in sorted(PEAKS, key=len, reverse=True):
        if key.lower() in device_kind.lower():
            peak = PEAKS[key]
            return getattr(peak, dtype), peak.source
    return None
