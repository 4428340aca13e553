r"""Landmark matching (paper Table 1): mean pixel error in the 70-px frame, same and different identity.

    python -m sce_mae_jax.main --config=configs/eval_matching.py --workdir=workdirs/eval_deit_s \
        --config.stage1=workdirs/mae_deit_s --config.stage2=workdirs/carb_deit_s \
        [--config.random_init_carb=workdirs/carb_deit_s_random] [--config.extra=no_lcr=workdirs/carb_no_lcr]

MAFL test pairs (the paper's protocol: the 1,000 test images two at a time, 500 + 500 pairs): add `:data=mafl`
and --config.manual_dir / --config.data_dir (docs/datasets.md). Pairs made elsewhere: --config.pairs_file=X.npz
(layout in sce_mae_jax/data/pairs.py). Rows: random_init, pixels, mae (stage 1 only), sce_mae (stage 1 + CARB
projector), random_init_carb, and every extra NAME=DIR. Features: cover-and-stride at --config.features.stride
(4: 24x24, then bilinear to 96x96), final tokens (--config.features.block=B for block B). Writes results.json,
report.md and figures/{matches,similarity,tsne}.png into the workdir; a rerun with the same config and
checkpoints returns the stored numbers. Expect trained rows well below random_init on different identity.
"""
from sce_mae_jax import config_lib


def get_config(arg=None):
    return config_lib.eval_matching(arg)
