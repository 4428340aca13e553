r"""Quick start: a tiny MAE on the embedded synthetic faces, a few hundred steps on a laptop CPU.

    python -m sce_mae_jax.main --config=configs/quickstart.py --workdir=/tmp/sce_mae_quickstart

Expect the loss in metrics.jsonl to fall from about 1.0 within the 300 steps, and reconstructions in figures/.
"""
from sce_mae_jax import config_lib


def get_config(arg=None):
    c = config_lib.mae('t', arg)
    c.model.update(embed_dim=96, depth=4, num_heads=3, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4)
    c.batch_size = 32
    c.total_steps = 300
    c.warmup_epochs = 4      # with total_steps, warm-up keeps its fraction of `epochs`
    c.epochs = 100
    c.base_lr = 1e-3
    c.log_every = 20
    c.checkpoint_every = 100
    c.figure_every = 100
    return c
