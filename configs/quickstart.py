r"""Quick start: the whole method on the embedded synthetic faces, small enough for a laptop CPU (~5 min).

    python -m sce_mae_jax.main --config=configs/quickstart.py --workdir=/tmp/sce_mae_quickstart

Stage 1 pretrains a tiny MAE (4 blocks of 96-d) for 300 steps into WORKDIR/stage1, then stage 2 trains a
64-d projector with CARB + LCR on it for 150 steps into WORKDIR/stage2. Expect both losses in the stages'
metrics.jsonl to fall, MAE reconstructions in stage1/figures/ and the attentive/cluster split in
stage2/figures/. Change a stage with e.g. --config.stage1.total_steps=1000.
"""
import ml_collections

from sce_mae_jax import config_lib


def get_config(arg=None):
    s1 = config_lib.mae('t', arg)
    s1.model.update(embed_dim=96, depth=4, num_heads=3, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4)
    s1.batch_size = 32
    s1.total_steps = 300
    s1.epochs = 100
    s1.warmup_epochs = 4      # with total_steps, warm-up keeps its fraction of `epochs`
    s1.base_lr = 1e-3
    s1.log_every = 20
    s1.checkpoint_every = 100
    s1.figure_every = 100

    s2 = config_lib.carb('t', arg, dim=64, eta=0.1)
    s2.model.update(embed_dim=96, depth=4, num_heads=3)
    s2.batch_size = 16
    s2.total_steps = 150
    s2.log_every = 10
    s2.checkpoint_every = 50
    s2.figure_every = 50

    c = ml_collections.ConfigDict()
    c.job = 'pipeline'
    c.stage1 = s1
    c.stage2 = s2
    return c
