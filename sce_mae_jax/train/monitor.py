"""The training monitor: landmark matching on a small fixed pair set every `monitor.every` steps.

A falling loss says the objective is met, not that the features find landmarks (stage 2 with CL's softmax
projector lowered its loss while making the matching error 2-3x worse, docs/results.md). So both trainers
evaluate the features being trained the way the matching job does (`evals/matching.matching_sums`: the same
rule, the 70-px frame), on the first `monitor.pairs` pairs of the training data's matching set, at the plain
stride (one pass per image), and log `match_same` / `match_diff` beside the loss in metrics.jsonl and TensorBoard. The
pairs are made in memory once per process (nothing is cached on disk) and read once through the evaluation's
sharded pipeline; the evaluation is one jitted program over the mesh, built once per run.
"""
import functools
import time

import jax
from absl import logging

from sce_mae_jax.data import pipeline
from sce_mae_jax.errors import ConfigError
from sce_mae_jax.evals import features, matching
from sce_mae_jax.train import common


def pairs_for(config) -> dict | None:
    """The monitor's pairs: the first of the matching job's pairs for the training data (MAFL's for CelebA).
    None (with one warning) when that set is not prepared: training does not depend on it."""
    # the matching job's own sets (config_lib.eval_matching): a synthetic variant's `match` split, MAFL's test
    data, split = (config.data, 'match') if config.data.startswith('synthetic') else ('mafl', 'test')
    try:
        return _pairs(data, split, int(config.monitor.pairs), config.manual_dir or None, config.data_dir or None,
                      config.data_seed)
    except (ConfigError, ValueError, OSError) as e:
        logging.warning('monitor: no %s pairs to match (%s); training goes on without the monitor '
                        '(--config.monitor.every=0 turns it off)', data, str(e).splitlines()[0][:300])
        return None


@functools.lru_cache(maxsize=2)  # the quick start trains several runs on the same data in one process
def _pairs(data, split, num_images, manual_dir, data_dir, seed) -> dict:
    from sce_mae_jax.data.pairs import make_matching_pairs
    from sce_mae_jax.data.sources import get_source
    source = get_source(data, split, manual_dir=manual_dir, data_dir=data_dir, seed=seed)
    pairs = make_matching_pairs(source, num_images=num_images, seed=0)
    return {k: pairs[k] for k in matching.PAIR_KEYS}


def build(config, encoder, mesh, total_steps: int, projector=None):
    """→ `monitor(backbone, proj_params) -> {'match_same', 'match_diff', 'monitor_s'}` (host floats; every
    process calls it), or None when `monitor.every` is 0, longer than the run (`total_steps`: nothing would be
    evaluated, so no pairs are made) or there are no pairs. `projector` None: the encoder's own tokens (stage
    1); else its descriptors (stage 2), as the evaluation's `sce_mae` row reads them."""
    if not config.monitor.every or total_steps < config.monitor.every:
        return None
    pairs = pairs_for(config)
    if pairs is None:
        return None
    n = jax.device_count()
    batch = -(-int(config.monitor.batch_size) // n) * n   # a multiple of the devices, so the batch splits
    repl, data_sh = common.replicated(mesh), common.data_sharded(mesh)
    fn = functools.partial(features.dense_features, encoder=encoder, projector=projector,
                           stride=encoder.patch_size, block=-1, size=encoder.image_size)
    step = jax.jit(functools.partial(matching.matching_sums, features_fn=fn), in_shardings=(repl, repl, data_sh),
                   out_shardings=repl)
    # read through the evaluation's pipeline once: the pairs never change, so the sharded batches stay on the
    # devices (a few MB) and each evaluation is only the jitted program
    it, _ = pipeline.eval_iterator(pipeline.ArraySource(**pairs), global_batch=batch)
    batches = [common.global_batch(local, data_sh) for local in it]

    def monitor(backbone, proj=None) -> dict[str, float]:
        jax.block_until_ready((backbone, proj))  # so monitor_s is the evaluation's, not the step in flight
        t0 = time.time()
        totals = None
        for b in batches:
            sums = step(backbone, proj, b)
            totals = sums if totals is None else jax.tree.map(jax.numpy.add, totals, sums)
        out = {f'match_{k}': v for k, v in matching.summarize(totals).items()}
        return {**out, 'monitor_s': time.time() - t0}

    logging.info('monitor: matching on %d pairs every %d steps (match_same / match_diff, 70-px frame; '
                 'match_positional: the descriptors\' positional share)',
                 len(pairs['kind']), config.monitor.every)
    return monitor
