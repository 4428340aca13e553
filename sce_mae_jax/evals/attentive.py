"""Do attentive tokens cover the landmarks? (paper 001 §3.2's premise, supplementary Fig. S1)

    python -m sce_mae_jax.evals.attentive --init_from=<stage-1 workdir> [--eta=0.1 --num_images=128]

For every block, the share of attentive tokens (eq. 1 on that block's CLS attention) whose 8x8 cell holds at
least one ground-truth landmark, next to the share of all tokens that do (the chance level), and how much the
split depends on position rather than content: the share of attentive tokens that sit on the grid cells most
often attentive over the images (1.0: the same cells in every image, whatever the face). Uses the synthetic
faces' 68 points, or a real dataset's landmarks with --data. `--untrained` runs the same model freshly
initialised, the baseline a trained backbone should beat.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from sce_mae_jax import carb


def landmark_tokens(landmarks, grid: int, patch: int) -> jax.Array:
    """(B, L, 2) xy pixels in the model frame → (B, grid·grid) bool: the token cell holds a landmark."""
    cells = jnp.clip(jnp.floor(landmarks / patch).astype(jnp.int32), 0, grid - 1)
    index = cells[..., 1] * grid + cells[..., 0]
    return jnp.any(index[..., None] == jnp.arange(grid * grid), axis=1)


def attentive_coverage(attentive, on_landmark) -> tuple[float, float]:
    """(share of attentive tokens on a landmark, share of all tokens on a landmark)."""
    attentive, on_landmark = np.asarray(attentive), np.asarray(on_landmark)
    return float(on_landmark[attentive].mean()), float(on_landmark.mean())


def position_concentration(attentive) -> float:
    """Share of attentive tokens that fall on the k grid cells most often attentive across the batch, k being
    the number of attentive tokens per image. attentive: (B, N) bool, the same count in every row."""
    attentive = np.asarray(attentive)
    k = int(attentive[0].sum())
    top = np.argsort(-attentive.mean(0), kind='stable')[:k]
    return float(attentive[:, top].sum() / attentive.sum())


def landmark_recall(attentive, on_landmark) -> float:
    """Share of the cells that hold a landmark which are attentive (the paper's premise: 100%)."""
    attentive, on_landmark = np.asarray(attentive), np.asarray(on_landmark)
    return float(attentive[on_landmark].mean())


@functools.lru_cache(maxsize=None)
def _cls_logits(encoder):
    """The CLS-query logits of every block, jitted once per encoder (rows of one size share it)."""
    return jax.jit(lambda p, x: encoder.apply({'params': p}, x, capture=tuple(range(encoder.depth)))['cls_logits'])


def premise(encoder, params, images_uint8, landmarks, eta: float, recall_landmarks=None) -> dict[str, dict]:
    """Per block: `coverage` (attentive tokens on a landmark cell), `chance`, `recall` (landmark cells that are
    attentive) and `concentration` (attentive tokens on the most often attentive cells) of eq. 1's split, for
    uint8 (B, H, W, 3) images with (B, L, 2) landmarks in their frame; recall over `recall_landmarks` (the 5
    MAFL points) when given. What the evaluation report shows for every backbone row; the CLI below prints the
    same for a workdir."""
    from sce_mae_jax.data import pipeline

    images = pipeline.normalize(jnp.asarray(images_uint8))
    on_lm = landmark_tokens(jnp.asarray(landmarks), encoder.grid, encoder.patch_size)
    on_recall = on_lm if recall_landmarks is None else landmark_tokens(jnp.asarray(recall_landmarks), encoder.grid,
                                                                        encoder.patch_size)
    logits = _cls_logits(encoder)(params, images)
    out = {}
    for block in range(encoder.depth):
        attentive = carb.attentive_mask(logits[block], eta)
        coverage, chance = attentive_coverage(attentive, on_lm)
        out[str(block)] = {'coverage': coverage, 'chance': chance, 'recall': landmark_recall(attentive, on_recall),
                           'concentration': position_concentration(attentive)}
    return out


def main(argv):
    del argv
    from absl import flags

    from sce_mae_jax.data import pipeline
    from sce_mae_jax.data.sources import get_source
    from sce_mae_jax.models.mae import encoder_from_model_config
    from sce_mae_jax.train.common import load_params

    f = flags.FLAGS
    with open(os.path.join(f.init_from, 'config.json')) as fh:
        model_config = json.load(fh)['model']
    encoder = encoder_from_model_config(model_config)
    if f.untrained:
        params = encoder.init(jax.random.PRNGKey(f.seed), jnp.zeros((1, encoder.image_size, encoder.image_size, 3)))
        params = params['params']
    else:
        params = load_params(f.init_from)
        params = params.get('encoder', params)
    src = get_source(f.data, f.split, manual_dir=f.manual_dir or None, data_dir=f.data_dir or None)
    crop = pipeline.eval_transform(encoder.image_size)
    items = [src[i] for i in range(f.num_images)]  # each read (or rendered) once
    key = 'landmarks68' if 'landmarks68' in items[0] else 'landmarks'
    examples = [crop({'image': item['image'], 'landmarks': item[key]}) for item in items]
    five = [crop({'image': item['image'], 'landmarks': item['landmarks']})['landmarks'] for item in items]
    images = np.stack([e['image'] for e in examples])
    landmarks = np.stack([e['landmarks'] for e in examples])
    for block, v in premise(encoder, params, images, landmarks, f.eta, np.stack(five)).items():
        print(f'block {block}: {100 * v["coverage"]:.1f}% of attentive tokens hold a landmark (chance '
              f'{100 * v["chance"]:.1f}%); {100 * v["recall"]:.0f}% of landmark cells attentive; '
              f'{100 * v["concentration"]:.0f}% sit on the most often attentive cells')


if __name__ == '__main__':
    from absl import app, flags

    flags.DEFINE_string('init_from', None, 'Stage-1 workdir (its config.json gives the model).')
    flags.DEFINE_float('eta', 0.1, 'Attentive rate.')
    flags.DEFINE_integer('num_images', 128, 'Images to average over.')
    flags.DEFINE_bool('untrained', False, 'Use a fresh initialisation of the workdir\'s model instead.')
    flags.DEFINE_integer('seed', 0, 'Initialisation seed for --untrained.')
    flags.DEFINE_string('data', 'synthetic', 'Dataset with landmarks.')
    flags.DEFINE_string('split', 'test', 'Split.')
    flags.DEFINE_string('manual_dir', '', 'Raw files of a real dataset.')
    flags.DEFINE_string('data_dir', '', 'Prepared TFDS datasets.')
    flags.mark_flags_as_required(['init_from'])
    app.run(main)
