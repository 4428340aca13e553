r"""Stage 2: CARB + LCR loss on a frozen DeiT-T from stage 1; trains a 64-d projector (η = 0.1, K_c = 4).

    python -m sce_mae_jax.main --config=configs/carb_deit_t.py --config.init_from=workdirs/mae_deit_t \
        --workdir=workdirs/carb_deit_t

Real data (the paper trains stage 2 on CelebA): add `:data=celeba` and --config.manual_dir / --config.data_dir.
Arguments after ':' (comma-separated): data=NAME, dim=64|128|256, ablation=NAME with NAME one of
none, no_clustering, no_lcr, no_locality, no_att_att, no_att_inatt, no_inatt_inatt, lead (docs/ablations.md),
and split=NAME, the attentive-split criterion: cls (eq. 1, the paper's, default), cls_debiased, density,
contrast or recon. Check eq. 1's premise on your backbone first
(python -m sce_mae_jax.evals.attentive --init_from=<stage-1 workdir> --splits=all); where eq. 1's attentive
tokens hold landmarks no more often than chance, use split=recon (docs/ablations.md, docs/results.md).
Expect the LCR loss to fall over the first few hundred steps and figures/clusters_*.png to show the
inattentive clusters on cheeks, forehead and background (untinted cells are attentive).
"""
from sce_mae_jax import config_lib


def get_config(arg=None):
    return config_lib.carb('t', arg, dim=64, eta=0.1)
