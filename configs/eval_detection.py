r"""Landmark detection (paper Table 2): a regressor on the frozen features of every row, error in % of IOD.

On MAFL with the stage-1 and stage-2 workdirs of DeiT-S (raw files prepared as in docs/datasets.md):
    python -m sce_mae_jax.main --config=configs/eval_detection.py:data=mafl --workdir=workdirs/eval_deit_s \
        --config.stage1=workdirs/mae_deit_s --config.stage2=workdirs/carb_deit_s \
        --config.manual_dir=/data/celeba_raw --config.data_dir=/data/tfds

On the embedded synthetic faces (the default; sets synthetic_5 and synthetic_68):
    python -m sce_mae_jax.main --config=configs/eval_detection.py --workdir=/tmp/eval_syn \
        --config.stage1=/tmp/sce_mae_quickstart/stage1 --config.stage2=/tmp/sce_mae_quickstart/stage2

Arguments after ':': data=synthetic|mafl|aflw_m|aflw_r|300w (aflw_r also tests on AFLW_RC when
aflw_test_keypoints_rc.mat is supplied). Rows: random_init, pixels, mae, sce_mae, random_init_carb (rows
without a workdir are skipped); further stage-2 workdirs with --config.extra=NAME=DIR.
Per set and row a regressor trains (Adam 1e-3, L2 5e-4, cosine; epochs.<set>) in
WORKDIR/detection/<set>/<row>/ and resumes there; results.json / report.md get `detection` (100 × mean error /
IOD, lower is better) and figures/detection_<set>.png shows the detections. Expect sce_mae ≤ mae < random_init
on real data (paper: DeiT-S 2.08 / 5.33 / 5.40 / 4.69 / 3.94 on MAFL / AFLW_M / AFLW_R / AFLW_RC / 300W).
Quick look: --config.total_steps=200 --config.num_test_images=200. A rerun with the same config and
checkpoints returns the stored numbers. --config.regressor_seeds=3 trains every row without stage-2 seed
replicates (`--config.extra=sce_mae@seed1=DIR,...`) with regressor seeds seed, seed+1, seed+2 (rows ROW@reg1,
ROW@reg2 in results.json, folded into mean ± std): the report judges sce_mae against mae only when mae has that
spread, since one regressor's seed moves the error about as much as stage 2 does (docs/results.md).
"""
from sce_mae_jax import config_lib


def get_config(arg=None):
    return config_lib.eval_detection(arg)
