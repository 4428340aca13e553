r"""Stage 1: MAE pretraining of DeiT-B (patch 8, 96x96) on CelebA, the paper's recipe.

On CelebA, the paper's setting (raw files prepared as in docs/datasets.md):
    python -m sce_mae_jax.main --config=configs/mae_deit_b.py:data=celeba --workdir=workdirs/mae_deit_b \
        --config.manual_dir=/data/celeba_raw --config.data_dir=/data/tfds

On the embedded synthetic faces (the default, nothing to download):
    python -m sce_mae_jax.main --config=configs/mae_deit_b.py --workdir=workdirs/mae_deit_b_syn

400 epochs at batch 512, lr 1.5e-4·batch/256, AdamW(0.9, 0.95), wd 0.05, 40 warm-up epochs then cosine,
mask ratio 0.75, decoder 512-d / 8 blocks / 16 heads, norm_pix_loss. Expect the loss to fall from ~1.0.
"""
from sce_mae_jax import config_lib


def get_config(arg=None):
    return config_lib.mae('b', arg)
