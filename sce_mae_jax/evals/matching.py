"""Landmark matching (SCE-MAE's Table 1): the matching job and the descriptor maps it compares.

`run` is the job (configs/eval_matching.py): every row of evals/rows.py on the stored pairs of data/pairs.py,
each row's descriptor map (`features_fn_for`: backbone, upsampling to 96x96, projection, or a baseline) matched
by CL's nearest-neighbour rule and scored by `metrics.pixel_errors` (70-px frame), the sums reduced inside one
jitted function over the mesh (`matching_sums`, which the training monitor runs too); then figures and report.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sce_mae_jax import progress
from sce_mae_jax.evals import features
from sce_mae_jax.carb import l2_normalize
from sce_mae_jax.evals.metrics import geometry_predictions, match_points, pixel_errors
from sce_mae_jax import workdir as workdir_lib


def raw_pixel_features(images: jax.Array, patch: int = 7) -> jax.Array:
    """Baseline descriptors from raw pixels: (B, H, W, 3) uint8 or float -> (B, H, W, 3·patch²) float32.

    Each location gets the patch × patch neighbourhood (zero padded) of the image after per-image,
    per-channel standardisation, so global brightness / colour casts do not dominate; anything beyond that
    (identity, pose) is what a learned feature must overcome, which is why this number is reported.
    """
    x = jnp.asarray(images, jnp.float32)
    mean = x.mean(axis=(1, 2), keepdims=True)
    std = x.std(axis=(1, 2), keepdims=True)
    x = (x - mean) / jnp.maximum(std, 1e-3)
    r = patch // 2
    b, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
    shifts = [xp[:, dy:dy + h, dx:dx + w, :] for dy in range(patch) for dx in range(patch)]
    return jnp.concatenate(shifts, axis=-1)


# ---------------------------------------------------------------------------------------------- the job
# python -m sce_mae_jax.main --config=configs/eval_matching.py --config.stage1=DIR --config.stage2=DIR --workdir=W

PAIR_KEYS = ("src_images", "tgt_images", "src_landmarks", "tgt_landmarks", "kind")


def program_key(row) -> tuple:
    """Rows with equal keys run the same program (only parameters differ), so they share compilations."""
    return (row.kind, repr(row.projector))


def features_fn_for(row, encoder, fc, size: int):
    """The row's descriptor map, uint8 (B, H, W, 3) → (B, size, size, C): a pure function of
    (backbone, projector params, images)."""
    if row.kind == "pixels":
        return lambda backbone, proj, images: raw_pixel_features(images)
    if row.kind == "positions":
        return lambda backbone, proj, images: features.position_features(encoder, images.shape[0], size)
    # a projector was trained on the final tokens, so its rows read those whatever `features.block` says
    block = -1 if row.kind == "projected" else fc.block
    return functools.partial(features.dense_features, encoder=encoder, projector=row.projector, stride=fc.stride,
                             block=block, size=size)


def matching_sums(backbone, proj, batch, *, features_fn) -> dict[str, jax.Array]:
    """Sums of per-pair mean errors (70-px frame) and pair counts, by kind, over a global batch of pairs, and
    the per-location sums of the unit descriptors of every image (for `positional_share`); padding (`_mask`
    False) counts for nothing. Summing over the `data`-sharded batch is the cross-device reduction: no
    per-pair value leaves the devices."""
    src = features_fn(backbone, proj, batch["src_images"])
    tgt = features_fn(backbone, proj, batch["tgt_images"])
    err = pixel_errors(match_points(src, tgt, batch["src_landmarks"]), batch["tgt_landmarks"]).mean(-1)
    out = {}
    for name, k in (("same", 0), ("diff", 1)):
        w = (batch["_mask"] & (batch["kind"] == k)).astype(jnp.float32)
        out[f"{name}_sum"], out[f"{name}_n"] = jnp.sum(err * w), jnp.sum(w)
    real = batch["_mask"].astype(jnp.float32)
    out["unit_sum"] = sum(jnp.einsum("b,bhwc->hwc", real, l2_normalize(jnp.asarray(f, jnp.float32)))
                          for f in (src, tgt))
    out["images"] = 2 * jnp.sum(real)
    return out


def positional_share(unit_sum, images) -> float:
    """The share of the unit descriptors' variance that the place in the frame alone explains: the variance of
    the per-location mean descriptor over the total variance (1 − |global mean|²). 1 for a pure position code
    (the `positions` row), near 0 for descriptors that say nothing about where they are. Within-image
    repellence (CL's loss, LCR) can be satisfied by encoding position, which a ViT's tokens carry from their
    position embeddings: on a content benchmark, a stage 2 that raises this share is matching by place
    (docs/results.md)."""
    loc_mean = np.asarray(unit_sum, np.float64) / float(images)
    mean = loc_mean.mean((0, 1))
    total = 1.0 - float(mean @ mean)
    between = float((loc_mean ** 2).sum(-1).mean()) - float(mean @ mean)
    return between / total if total > 0 else 1.0


def summarize(totals: dict) -> dict[str, float]:
    """`matching_sums` added over all batches → {"same", "diff": mean errors (70-px frame), "positional":
    `positional_share`}, a kind without pairs left out."""
    out = {k: float(totals[f"{k}_sum"]) / float(totals[f"{k}_n"]) for k in ("same", "diff") if totals[f"{k}_n"]}
    out["positional"] = positional_share(totals["unit_sum"], totals["images"])
    return out


def geometry_table(pairs: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """{reference: {"same", "diff"}}: the errors (70-px frame) of `metrics.geometry_predictions` on the pairs,
    what a matcher that sees only where the faces are would score; report.md prints them under the rows."""
    kind = np.asarray(pairs["kind"])
    out = {}
    for name, pred in geometry_predictions(pairs["src_landmarks"], pairs["tgt_landmarks"]).items():
        err = np.asarray(pixel_errors(pred, pairs["tgt_landmarks"])).mean(-1)
        out[name] = {k: float(err[kind == i].mean()) for k, i in (("same", 0), ("diff", 1)) if np.any(kind == i)}
    return out


def load_or_make_pairs(config) -> tuple[dict[str, np.ndarray], str]:
    """(pairs, where they came from): the imported file, or the cached pairs of (data, split, N, seed)."""
    from sce_mae_jax.data import pairs as pairs_lib
    from sce_mae_jax.data.sources import get_source
    from sce_mae_jax.errors import ConfigError

    if config.pairs_file:
        if not os.path.exists(config.pairs_file):
            raise ConfigError(f"pairs_file={config.pairs_file} does not exist; give an .npz in the layout "
                              f"{pairs_lib.LAYOUT}")
        try:
            return pairs_lib.load_pairs(config.pairs_file), config.pairs_file
        except ValueError as e:
            raise ConfigError(f"{e}; convert it with sce_mae_jax.data.pairs.import_pairs") from None
    cache_dir = config.pairs_cache or os.path.join(os.path.expanduser("~"), ".cache", "sce_mae_jax", "pairs")
    path = os.path.join(cache_dir, f"{config.data}_{config.split}_{config.num_images}_seed{config.pairs_seed}"
                                   f"_data{config.data_seed}.npz")
    try:
        if os.path.exists(path):  # stored once: no dataset read
            return pairs_lib.get_or_make_pairs(None, path, num_images=config.num_images), path
        logging.info("matching: generating %d pairs from %s/%s into %s (once)", config.num_images, config.data,
                     config.split, path)
        source = get_source(config.data, config.split, manual_dir=config.manual_dir or None,
                            data_dir=config.data_dir or None, seed=config.data_seed)
        if getattr(source, "num_landmarks", 5) != 5:
            raise ConfigError(f"data={config.data} has {source.num_landmarks} landmarks; matching uses the "
                              "5-point sets (MAFL, or the synthetic faces)")
        return pairs_lib.get_or_make_pairs(source, path, num_images=config.num_images,
                                           seed=config.pairs_seed), path
    except ValueError as e:
        raise ConfigError(str(e)) from None


def run(config, workdir: str) -> dict:
    """The matching job: every row's same / different-identity error on the stored pairs, figures, report."""
    from sce_mae_jax.data import pipeline
    from sce_mae_jax.evals import attentive, plots, report, rows as rows_lib
    from sce_mae_jax.train import common

    encoder, rows, skipped = rows_lib.load_rows(config)
    rows = [r for r in rows if r.kind != "mean_shape"]  # a detection row: it has no descriptors to match
    features.check_config(config.features, encoder)
    fp = report.fingerprint(config, rows)
    done = report.stored(workdir, "matching", fp)
    if done is not None:
        logging.info("matching: results for this config and these checkpoints are in %s/results.json; not "
                     "recomputing (delete it to rerun)", workdir)
        return done
    pairs, pairs_from = load_or_make_pairs(config)
    pairs = {k: pairs[k] for k in PAIR_KEYS}
    workdir_lib.ensure_workdir(workdir)
    mesh = common.make_mesh()
    common.check_batch_size(config.batch_size)
    repl, data_sh = common.replicated(mesh), common.data_sharded(mesh)
    size = encoder.image_size
    n_pairs = len(pairs["kind"])
    table, fns, steps = {}, {}, {}
    for row in rows:
        key = program_key(row)
        if key not in steps:
            fn = features_fn_for(row, encoder, config.features, size)
            steps[key] = fn, jax.jit(functools.partial(matching_sums, features_fn=fn),
                                     in_shardings=(repl, repl, data_sh), out_shardings=repl)
        fn, step = steps[key]
        backbone, proj = common.replicate((row.backbone, row.proj_params), mesh)
        it, num_batches = pipeline.eval_iterator(pipeline.ArraySource(**pairs), global_batch=config.batch_size)
        totals = None
        done = progress.Progress(f"matching {row.name}: batch", num_batches, every=num_batches // 4,
                                 per_unit=config.batch_size, unit="pairs", sync=lambda: jax.block_until_ready(totals))
        for local in it:
            sums = step(backbone, proj, common.global_batch(local, data_sh))
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
            done.step()
        table[row.name] = summarize(totals)
        fns[row.name] = (key, fn, backbone, proj)
        logging.info("matching %s: same %.2f, diff %.2f (70-px frame), positional share %.3f", row.name,
                     table[row.name].get("same", -1), table[row.name].get("diff", -1), table[row.name]["positional"])
    shown = [r for r in rows if not report.is_replicate(r.name)]  # seed replicates: numbers only, no figures
    figs, silhouette = plots.matching_figures(workdir, pairs, shown, fns, config.figures, mesh) if \
        config.figures.pairs > 0 else ([], {})
    figs += plots.training_figures(workdir, rows)
    n = min(int(config.premise.images), n_pairs)
    premise = {r.name: attentive.premise(encoder, r.backbone, pairs["tgt_images"][:n], pairs["tgt_landmarks"][:n],
                                         config.premise.eta) for r in rows if r.kind == "backbone" and n}
    meta = {"fingerprint": fp, "rows": {r.name: r.source for r in rows}, "skipped_rows": skipped,
            "pairs": n_pairs, "pairs_from": pairs_from, "data": config.data, "stride": config.features.stride,
            "block": config.features.block, "figures": figs, "config": json.loads(config.to_json_best_effort())}
    return report.update(workdir, {"matching": table, "geometry": geometry_table(pairs), "silhouette": silhouette,
                                   "premise": premise}, "matching", meta)
