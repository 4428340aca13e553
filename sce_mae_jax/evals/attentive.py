"""Do attentive tokens cover the landmarks? (paper 001 §3.2's premise, supplementary Fig. S1)

    python -m sce_mae_jax.evals.attentive --init_from=<stage-1 workdir> [--eta=0.1 --num_images=128]
    python -m sce_mae_jax.evals.attentive --init_from=<stage-1 workdir> --splits=all [--block=2]

For every block, the share of attentive tokens (eq. 1 on that block's CLS attention) whose 8x8 cell holds at
least one ground-truth landmark, next to the share of all tokens that do (the chance level), the share of the 5
MAFL landmarks' cells that are attentive (recall), and how much the split depends on position rather than
content: the share of attentive tokens that sit on the grid cells most often attentive over the images (1.0:
the same cells in every image, whatever the face). Coverage and chance count the synthetic faces' 68 points (a
real dataset's own landmarks with --data), so the chance printed here is that of any of 68 points, well above
the chance in report.md's premise table, which counts the 5 MAFL points. `--untrained` runs the same model
freshly initialised, the baseline a trained backbone should beat. `--splits` compares the split criteria of
`carb.split` (SPLITS) at one block, each computed as stage 2 computes it.
"""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from sce_mae_jax import carb, fileio
from sce_mae_jax.splits import SPLITS, split_scores
from sce_mae_jax.evals.metrics import landmark_tokens, split_stats


@functools.lru_cache(maxsize=None)
def _cls_logits(encoder):
    """The CLS-query logits of every block, jitted once per encoder (rows of one size share it)."""
    return jax.jit(lambda p, x: encoder.apply({'params': p}, x, capture=tuple(range(encoder.depth)))['cls_logits'])


def summary(v: dict[str, float], *, covered: int, recalled: int) -> str:
    """One split's statistics as the CLI prints them. Coverage and chance count `covered` points (the 68 iBUG
    points where the data has them) and recall `recalled` (the 5 MAFL points), so the chance printed here is
    higher than report.md's, which counts the 5 points for both."""
    return (f'{100 * v["coverage"]:.1f}% of attentive tokens hold one of the {covered} landmarks (chance '
            f'{100 * v["chance"]:.1f}%: the share of all tokens that hold one); {100 * v["recall"]:.0f}% of the '
            f'{recalled} landmarks\' cells attentive; {100 * v["concentration"]:.0f}% sit on the most often '
            'attentive cells')


def _landmark_cells(encoder, landmarks, recall_landmarks):
    on_lm = landmark_tokens(jnp.asarray(landmarks), encoder.grid, encoder.patch_size)
    on_recall = on_lm if recall_landmarks is None else landmark_tokens(jnp.asarray(recall_landmarks), encoder.grid,
                                                                        encoder.patch_size)
    return on_lm, on_recall


def premise(encoder, params, images_uint8, landmarks, eta: float, recall_landmarks=None) -> dict[str, dict]:
    """Per block, `split_stats` of eq. 1's split, for uint8 (B, H, W, 3) images with (B, L, 2) landmarks in
    their frame; recall over `recall_landmarks` (the 5 MAFL points) when given. What the evaluation report shows
    for every backbone row; the CLI below prints the same for a workdir."""
    from sce_mae_jax.data import pipeline

    on_lm, on_recall = _landmark_cells(encoder, landmarks, recall_landmarks)
    logits = _cls_logits(encoder)(params, pipeline.normalize(jnp.asarray(images_uint8)))
    return {str(block): split_stats(carb.attentive_mask(logits[block], eta), on_lm, on_recall)
            for block in range(encoder.depth)}


def split_premise(encoder, params, images_uint8, landmarks, eta: float, recall_landmarks=None, *, split: str,
                  block: int, split_aux=None, mae=None, density_k: int = 5, batch_size: int = 64) -> dict:
    """`split_stats` of criterion `split` (SPLITS) at `block`, computed as stage 2 computes it
    (`splits.split_scores`; `split_aux`/`mae` from `train.split_inputs.prepare_split`'s counterparts)."""
    from sce_mae_jax.data import pipeline

    @jax.jit
    def attentive_of(p, aux, im):
        out = encoder.apply({'params': p}, im, capture=(block,))
        scores = split_scores(split, logits=out['cls_logits'][block], tokens=out['layers'][block], encoder=encoder,
                              density_k=density_k, images=im, backbone=p, aux=aux, mae=mae)
        return carb.top_scores_mask(scores, eta)

    images = pipeline.normalize(jnp.asarray(images_uint8))
    attentive = np.concatenate([np.asarray(attentive_of(params, split_aux or {}, images[i:i + batch_size]))
                                for i in range(0, len(images), batch_size)])
    return split_stats(attentive, *_landmark_cells(encoder, landmarks, recall_landmarks))


def split_inputs(split: str, *, init_from: str, encoder, params, block: int, data: str, prior_images: int,
                 source_kwargs: dict):
    """(split_aux, mae) for the diagnostic, made as stage 2 makes them (`train.split_inputs.prepare_split`): the
    cls_debiased prior from the first `prior_images` pretrain images of `data`, recon's decoder from
    `init_from`."""
    import ml_collections

    from sce_mae_jax.data.sources import get_source
    from sce_mae_jax.models.mae import MAE
    from sce_mae_jax.train import split_inputs
    from sce_mae_jax.train import common

    if split == 'cls_debiased':
        mesh = common.make_mesh()
        src = get_source(data if data.startswith('synthetic') else 'celeba', 'pretrain', **source_kwargs)
        prior = split_inputs.estimate_cls_prior(common.replicate(params, mesh), src, encoder=encoder, layer=block,
                                              num_images=prior_images, batch_size=32, mesh=mesh)
        return {'prior': prior}, None
    if split == 'recon':
        decoder, fields = split_inputs.stage1_decoder(ml_collections.ConfigDict({'init_from': init_from}))
        mae = MAE(encoder.embed_dim, encoder.depth, encoder.num_heads, encoder.mlp_ratio, encoder.patch_size,
                  encoder.image_size, **fields)
        return {'decoder': decoder}, mae
    return {}, None


def main(argv):
    del argv
    from absl import flags

    from sce_mae_jax import cli
    from sce_mae_jax.data import pipeline
    from sce_mae_jax.data.sources import get_source
    from sce_mae_jax.models import load
    from sce_mae_jax.models.mae import RANDOM_INIT

    cli.quiet_library_logs()  # a restore would bury the table in orbax's INFO lines
    f = flags.FLAGS
    encoder = load.encoder_of(f.init_from, '--init_from')
    params = load.encoder_params(RANDOM_INIT if f.untrained else f.init_from, encoder, f.seed)
    source_kwargs = dict(manual_dir=f.manual_dir or None, data_dir=f.data_dir or None)
    src = get_source(f.data, f.split, **source_kwargs)
    crop = pipeline.eval_transform(encoder.image_size)
    items = [src[i] for i in range(f.num_images)]  # each read (or rendered) once
    key = 'landmarks68' if 'landmarks68' in items[0] else 'landmarks'
    examples = [crop({'image': item['image'], 'landmarks': item[key]}) for item in items]
    five = [crop({'image': item['image'], 'landmarks': item['landmarks']})['landmarks'] for item in items]
    images = np.stack([e['image'] for e in examples])
    landmarks = np.stack([e['landmarks'] for e in examples])
    line = functools.partial(summary, covered=landmarks.shape[1], recalled=np.stack(five).shape[1])
    if not f.splits:
        for block, v in premise(encoder, params, images, landmarks, f.eta, np.stack(five)).items():
            print(f'block {block}: {line(v)}')
        return
    splits = SPLITS if f.splits == 'all' else tuple(f.splits.split(','))
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise SystemExit(f'--splits: unknown {unknown}; known: {", ".join(SPLITS)} or all')
    results = {}
    for split in splits:
        if split == 'recon' and f.untrained:
            print('recon: skipped (--untrained has no stage-1 decoder)')
            continue
        aux, mae = split_inputs(split, init_from=f.init_from, encoder=encoder, params=params, block=f.block,
                                data=f.data, prior_images=f.prior_images, source_kwargs=source_kwargs)
        results[split] = split_premise(encoder, params, images, landmarks, f.eta, np.stack(five), split=split,
                                       block=f.block, split_aux=aux, mae=mae)
        print(f'{split} (block {f.block}): {line(results[split])}')
    if f.output:
        fileio.write_text(f.output, json.dumps({'block': f.block, 'eta': f.eta, 'num_images': f.num_images,
                                                'splits': results}, indent=2))


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
    flags.DEFINE_string('splits', '', 'Split criteria to compare at --block (comma-separated, or all); empty: '
                        'eq. 1 at every block.')
    flags.DEFINE_integer('block', 2, 'Block of the --splits comparison (stage 2 clusters after block 2).')
    flags.DEFINE_integer('prior_images', 512, 'Pretrain images of the cls_debiased prior.')
    flags.DEFINE_string('output', '', 'Write the --splits comparison to this JSON file.')
    flags.mark_flags_as_required(['init_from'])
    app.run(main)
