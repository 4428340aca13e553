r"""Limited annotations (paper Table 3): the detection regressor trained on N = 1, 5, 10, 20, 50, 100 AFLW_M
images (one random draw per seed, 3 seeds), repeated to fill an epoch with one random TPS warp per example.

On AFLW_M (the default; raw files prepared as in docs/datasets.md):
    python -m sce_mae_jax.main --config=configs/eval_limited.py --workdir=workdirs/eval_deit_s \
        --config.stage1=workdirs/mae_deit_s --config.stage2=workdirs/carb_deit_s \
        --config.manual_dir=/data/aflw_raw --config.data_dir=/data/tfds

Without data, on the synthetic faces' 5 points:
    python -m sce_mae_jax.main --config=configs/eval_limited.py:data=synthetic --workdir=/tmp/eval_syn \
        --config.stage1=/tmp/sce_mae_quickstart/stage1 --config.stage2=/tmp/sce_mae_quickstart/stage2 \
        --config.limited.epoch_size=1000 --config.limited.epochs=10

lr 0.01, L2 5e-4, cosine, 50 epochs of `limited.epoch_size` examples (0 = the train split's size); TPS sd 5e-4,
translation 0.02, scale 0.02, rotation 2°. Each run lives in WORKDIR/limited/<set>/<row>/n<N>_seed<S>/ and
resumes there; results.json / report.md get `limited` {row: {N: [mean, std over seeds]}}. Expect the error
to fall with N (paper, AFLW_M 256-d: 17.08±1.35 at N = 1 to 7.58±0.09 at N = 100). This is
rows × 6 sizes × 3 seeds trainings: on a CPU use small limited.epoch_size / epochs.
"""
from sce_mae_jax import config_lib


def get_config(arg=None):
    return config_lib.eval_limited(arg)
