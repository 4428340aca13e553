"""Figures of the matching evaluation: matches on pairs (paper Fig. 4), per-landmark similarity maps (Fig. S3),
and a t-SNE of the five landmarks' descriptors with its silhouette coefficient (Fig. 5).

The descriptors are computed by the rows' jitted feature functions on a few pairs given to every device
(replicated); only process 0 draws. t-SNE and the silhouette come from scikit-learn.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image, ImageDraw

from sce_mae_jax import fileio
from sce_mae_jax.carb import l2_normalize
from sce_mae_jax.evals.metrics import descriptors_at, match_points, pixel_errors, silhouette
from sce_mae_jax.figures import (LANDMARK_COLOURS, LANDMARK_NAMES, LEGEND_HEIGHT, draw_landmark_legend,
                                 legend_width)

ZOOM = 2


def _replicated(x, mesh):
    """A host array every process holds in full → a replicated global array."""
    from sce_mae_jax.train.common import replicated
    return jax.make_array_from_process_local_data(replicated(mesh), np.asarray(x))


def heat(v: np.ndarray) -> np.ndarray:
    """[0, 1] → RGB, dark blue → cyan → yellow → red."""
    stops = np.array([[0, 0, 90], [0, 180, 255], [255, 240, 0], [220, 0, 0]], np.float32)
    x = np.clip(v, 0, 1) * (len(stops) - 1)
    i = np.minimum(x.astype(int), len(stops) - 2)
    f = (x - i)[..., None]
    return stops[i] * (1 - f) + stops[i + 1] * f


def _tile(image: np.ndarray) -> Image.Image:
    h, w = image.shape[:2]
    return Image.fromarray(np.asarray(image, np.uint8)).resize((w * ZOOM, h * ZOOM), Image.NEAREST)


def _xy(p):
    return p[0] * ZOOM + ZOOM / 2, p[1] * ZOOM + ZOOM / 2


def _save(img: Image.Image, path: str) -> None:
    fileio.save_png(path, img)


def _grid(cells: list[list[Image.Image]], header: list[str], left: list[str]) -> Image.Image:
    tw, th = cells[0][0].size
    lw, hh = 100, 14
    out = Image.new('RGB', (lw + len(header) * (tw + 2), hh + len(cells) * (th + 2)), (255, 255, 255))
    d = ImageDraw.Draw(out)
    for j, h in enumerate(header):
        d.text((lw + j * (tw + 2) + 2, 1), h, fill=(0, 0, 0))
    for i, row in enumerate(cells):
        d.text((2, hh + i * (th + 2) + th // 2 - 5), left[i], fill=(0, 0, 0))
        for j, c in enumerate(row):
            out.paste(c, (lw + j * (tw + 2), hh + i * (th + 2)))
    return out


def _with_legend(img: Image.Image, note: str = '') -> Image.Image:
    """`img` above a strip holding the landmark colour legend and `note`."""
    out = Image.new('RGB', (img.width, img.height + LEGEND_HEIGHT + 4), (255, 255, 255))
    out.paste(img, (0, 0))
    d = ImageDraw.Draw(out)
    draw_landmark_legend(d, 4, img.height + 2)
    if note:
        d.text((8 + legend_width(d), img.height + 3), note, fill=(0, 0, 0))
    return out


def _draw_points(tile: Image.Image, pts, *, filled: bool, radius: int = 3) -> None:
    d = ImageDraw.Draw(tile)
    for p, col in zip(np.asarray(pts), LANDMARK_COLOURS):
        x, y = _xy(p)
        box = [x - radius, y - radius, x + radius, y + radius]
        d.ellipse(box, fill=col if filled else None, outline=(0, 0, 0) if filled else col, width=1 if filled else 2)


def matches_png(path: str, pairs: dict, index: np.ndarray, preds: dict[str, np.ndarray]) -> None:
    """One line per pair: the source with its landmarks, then per row the target with the ground truth
    (rings), the predictions (dots), a line from each prediction to its truth, and the pair's mean error in the
    70-px frame (the reported metric's unit)."""
    cells, left = [], []
    for k, p in enumerate(index):
        src = _tile(pairs['src_images'][p])
        _draw_points(src, pairs['src_landmarks'][p], filled=True)
        line = [src]
        gt = pairs['tgt_landmarks'][p]
        for name, pred in preds.items():
            t = _tile(pairs['tgt_images'][p])
            d = ImageDraw.Draw(t)
            for a, b, col in zip(pred[k], gt, LANDMARK_COLOURS):
                d.line([_xy(a), _xy(b)], fill=col, width=1)
            _draw_points(t, gt, filled=False)
            _draw_points(t, pred[k], filled=True, radius=2)
            err = float(np.asarray(pixel_errors(pred[k], gt)).mean())
            label = f'error {err:.1f} px (70-px frame)'
            d.rectangle([0, 0, int(d.textlength(label)) + 5, 13], fill=(0, 0, 0))
            d.text((3, 1), label, fill=(255, 255, 255))
            line.append(t)
        cells.append(line)
        left.append(('same' if pairs['kind'][p] == 0 else 'diff') + f' #{p}')
    _save(_with_legend(_grid(cells, ['source', *preds], left),
                       'rings: truth, dots: predictions, error: mean over the 5 landmarks'), path)


def similarity_png(path: str, pairs: dict, p: int, sims: dict[str, np.ndarray]) -> None:
    """One line per row: the source with its landmarks, then for each landmark the cosine similarity of its
    query descriptor to every target pixel (min-max scaled per map), the true target landmark ringed."""
    cells = []
    for name, s in sims.items():
        src = _tile(pairs['src_images'][p])
        _draw_points(src, pairs['src_landmarks'][p], filled=True)
        line = [src]
        for l in range(s.shape[0]):
            m = s[l]
            m = (m - m.min()) / max(m.max() - m.min(), 1e-8)
            img = 0.35 * pairs['tgt_images'][p].astype(np.float32) + 0.65 * heat(m)
            t = _tile(np.clip(img, 0, 255))
            d = ImageDraw.Draw(t)
            x, y = _xy(pairs['tgt_landmarks'][p][l])
            d.ellipse([x - 4, y - 4, x + 4, y + 4], outline=(255, 255, 255), width=2)
            line.append(t)
        cells.append(line)
    header = ['source', 'left eye', 'right eye', 'nose', 'mouth L', 'mouth R']
    _save(_with_legend(_grid(cells, header[:1 + next(iter(sims.values())).shape[0]], list(sims)),
                       'white ring: the true target landmark; colour: similarity, blue low, red high'), path)


def tsne_png(path: str, embeddings: dict[str, np.ndarray], labels: np.ndarray, scores: dict) -> None:
    """One panel per row: the first t-SNE run's 2-D embedding, coloured by landmark, the legend below."""
    size, pad = 220, 4
    out = Image.new('RGB', (max(len(embeddings) * (size + pad), 560), size + 16 + LEGEND_HEIGHT + 4),
                    (255, 255, 255))
    d = ImageDraw.Draw(out)
    draw_landmark_legend(d, 4, size + 18, names=LANDMARK_NAMES[:int(labels.max()) + 1])
    for j, (name, e) in enumerate(embeddings.items()):
        x0 = j * (size + pad)
        lo, hi = e.min(0), e.max(0)
        q = (e - lo) / np.maximum(hi - lo, 1e-8) * (size - 10) + 5
        d.rectangle([x0, 16, x0 + size - 1, 16 + size - 1], outline=(180, 180, 180))
        for (x, y), lab in zip(q, labels):
            d.ellipse([x0 + x - 1.5, 16 + y - 1.5, x0 + x + 1.5, 16 + y + 1.5], fill=LANDMARK_COLOURS[lab])
        m, s = scores[name]
        d.text((x0 + 2, 2), f'{name}: silhouette {m:.2f}±{s:.2f}', fill=(0, 0, 0))
    _save(out, path)


def _figure_outputs(bb, pp, src_im, tgt_im, src_pts, tsne_im, tsne_pts, *, fn):
    """Everything the figures read, in one program per row kind: predictions on the shown pairs, the last
    pair's per-landmark similarity maps (L, H, W), and L2-normalised descriptors at the landmarks of the
    t-SNE images (n, L, C)."""
    src, tgt = fn(bb, pp, src_im), fn(bb, pp, tgt_im)
    pred = match_points(src, tgt, src_pts)
    q = descriptors_at(src[-1:], src_pts[-1:])[0]
    sim = jnp.einsum('lc,hwc->lhw', q, l2_normalize(tgt[-1]))
    return pred, sim, descriptors_at(fn(bb, pp, tsne_im), tsne_pts)


def training_figures(workdir: str, rows) -> list[tuple[str, str]]:
    """For each row trained in a workdir (stage 1 for `mae`, stage 2 for the projector rows): its loss curve from
    metrics.jsonl, drawn into `workdir/figures/loss_ROW.png`, its monitor's matching curve (monitor_ROW.png)
    when training logged one, and the last reconstruction (stage 1) or cluster
    (stage 2) figure that training wrote, linked where it is. → [(title, path relative to workdir)]."""
    from sce_mae_jax import figures

    out = []
    if jax.process_index() != 0:
        return out
    for row in rows:
        if row.kind not in ('backbone', 'projected') or not row.source:
            continue
        metrics = os.path.join(row.source, 'metrics.jsonl')
        if not fileio.exists(metrics):
            continue
        stage = 'stage 1 (MAE)' if row.kind == 'backbone' else 'stage 2 (CARB)'
        steps, losses = figures.read_losses(metrics)
        if len(steps):
            fileio.makedirs(os.path.join(workdir, 'figures'))
            name = f'figures/loss_{row.name}.png'
            figures.save_loss_curve_png(os.path.join(workdir, name), f'{row.name}: {stage} training loss', steps,
                                        losses)
            out.append((f'Training loss of `{row.name}`, {stage}, from {metrics}', name))
        steps, diff = figures.read_losses(metrics, 'match_diff')  # the training monitor (train/monitor.py)
        if len(steps):
            name = f'figures/monitor_{row.name}.png'
            figures.save_loss_curve_png(os.path.join(workdir, name), f'{row.name}: {stage}, monitor', steps, diff,
                                        label='diff px')
            out.append((f'Different-identity matching error (70-px frame, the training monitor\'s pairs) of '
                        f'`{row.name}` during {stage} training, from {metrics}', name))
        prefix = 'recon_' if row.kind == 'backbone' else 'clusters_'
        fig_dir = os.path.join(row.source, 'figures')
        shown = sorted(f for f in (fileio.listdir(fig_dir) if fileio.isdir(fig_dir) else [])
                       if f.startswith(prefix) and f.endswith('.png'))
        if shown:
            what = ('MAE reconstructions (original / masked / reconstructed)' if row.kind == 'backbone' else
                    'CARB token split (inattentive clusters tinted, attentive tokens clear)')
            target = os.path.join(row.source, 'figures', shown[-1])
            link = target if '://' in target else os.path.relpath(target, workdir)
            out.append((f'{what} of `{row.name}` at its last figure step ({shown[-1]})', link))
    return out


def matching_figures(workdir: str, pairs: dict, rows, fns: dict, fc, mesh) -> tuple[list, dict]:
    """Writes figures/{matches,similarity,tsne}.png; returns ([(title, relative path)], {row: [mean, std]})."""
    k = min(int(fc.pairs), len(pairs['kind']))
    index = np.arange(k)
    diff = [i for i in range(len(pairs['kind'])) if pairs['kind'][i] == 1]
    sim_pair = diff[0] if diff else 0
    preds, sims, embeds, scores = {}, {}, {}, {}
    n_tsne = min(int(fc.tsne_images), len(pairs['kind']))
    labels = None
    sel = np.concatenate([index, [sim_pair]])
    inputs = [_replicated(pairs[key][sel], mesh) for key in ('src_images', 'tgt_images', 'src_landmarks')]
    inputs += [_replicated(pairs[key][:max(n_tsne, 1)], mesh) for key in ('tgt_images', 'tgt_landmarks')]
    programs = {}
    for row in rows:
        key, fn, backbone, proj = fns[row.name]
        if key not in programs:
            programs[key] = jax.jit(functools.partial(_figure_outputs, fn=fn))
        pred, sim, desc = programs[key](backbone, proj, *inputs)
        preds[row.name], sims[row.name] = np.asarray(pred)[:k], np.asarray(sim)
        if n_tsne and fc.tsne_runs:
            scores[row.name], embeds[row.name], labels = silhouette(np.asarray(desc), int(fc.tsne_runs),
                                                                       int(fc.tsne_iters))
            logging.info('matching %s: t-SNE silhouette %.3f ± %.3f', row.name, *scores[row.name])
    figs = []
    if jax.process_index() == 0:
        d = os.path.join(workdir, 'figures')
        fileio.makedirs(d)
        matches_png(os.path.join(d, 'matches.png'), pairs, index, preds)
        figs.append(('Matches: source landmarks (left); per row, predictions (dots) against the truth (rings)',
                     'figures/matches.png'))
        similarity_png(os.path.join(d, 'similarity.png'), pairs, sim_pair, sims)
        figs.append((f'Similarity of each source landmark to the target pixels, pair #{sim_pair}',
                     'figures/similarity.png'))
        if embeds:
            tsne_png(os.path.join(d, 'tsne.png'), embeds, labels, scores)
            figs.append((f't-SNE of the five landmark descriptors over {n_tsne} target faces', 'figures/tsne.png'))
    return figs, scores
