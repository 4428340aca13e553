"""PNG figures written during training (MAE reconstructions, the CARB token split of supplementary Fig. S1, loss
curves), and the landmark colours every figure shares: the preview, matches, similarity and t-SNE figures."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from sce_mae_jax import fileio
from sce_mae_jax.data import pipeline

# The 5 MAFL landmarks in their order in every dataset and pair file, and one colour each: a landmark has the same
# colour in every figure, so a left/right swap shows as a colour in the wrong place.
LANDMARK_NAMES = ('left eye', 'right eye', 'nose', 'left mouth corner', 'right mouth corner')
LANDMARK_COLOURS = ((255, 40, 40), (40, 120, 255), (40, 230, 40), (255, 220, 0), (230, 40, 230))
LEGEND_HEIGHT = 14


def draw_landmark_legend(draw: ImageDraw.ImageDraw, x: int, y: int, text=(0, 0, 0), names=LANDMARK_NAMES) -> None:
    """One row of colour swatches with the landmark names, starting at (x, y), LEGEND_HEIGHT px tall."""
    for name, colour in zip(names, LANDMARK_COLOURS):
        draw.ellipse([x, y + 3, x + 7, y + 10], fill=colour, outline=(0, 0, 0))
        draw.text((x + 10, y + 1), name, fill=text)
        x += 10 + int(draw.textlength(name)) + 10


def legend_width(draw: ImageDraw.ImageDraw, names=LANDMARK_NAMES) -> int:
    return sum(20 + int(draw.textlength(n)) for n in names)


# Distinct colours for up to 8 clusters (more wrap around).
CLUSTER_COLOURS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                            [145, 30, 180], [70, 240, 240], [240, 50, 230]], np.float32)


def _save(path: str, grid: np.ndarray) -> None:
    fileio.save_png(path, grid)


def save_reconstruction_png(path: str, rows) -> None:
    """Grid of normalised images: one row per image; columns original / masked / reconstructed."""
    rows = [pipeline.denormalize(np.asarray(r)) for r in rows]
    n = rows[0].shape[0]
    _save(path, np.concatenate([np.concatenate([r[i] for r in rows], axis=1) for i in range(n)], axis=0))


def save_cluster_png(path: str, images_uint8, cluster_id, patch: int, scale: int = 2) -> None:
    """Top row the images, bottom row the same with each inattentive token tinted by its cluster and the
    attentive tokens (cluster_id −1) left clear, as in the paper's Fig. S1.

    images_uint8: (B, H, W, 3); cluster_id: (B, N) int, N = (H/patch)·(W/patch) row-major.
    """
    imgs = np.asarray(images_uint8, np.float32)
    cid = np.asarray(cluster_id)
    b, h, w, _ = imgs.shape
    g = w // patch
    tokens = cid.reshape(b, h // patch, g).repeat(patch, 1).repeat(patch, 2)  # (B, H, W)
    colour = CLUSTER_COLOURS[np.maximum(tokens, 0) % len(CLUSTER_COLOURS)]
    alpha = np.where(tokens[..., None] >= 0, 0.55, 0.0)
    tinted = imgs * (1 - alpha) + colour * alpha
    # thin dark grid lines between tokens make the 8-px cells readable
    tinted[:, ::patch] *= 0.7
    tinted[:, :, ::patch] *= 0.7
    top = np.concatenate(list(imgs), axis=1)
    bottom = np.concatenate(list(tinted), axis=1)
    grid = np.clip(np.concatenate([top, bottom], axis=0), 0, 255).astype(np.uint8)
    _save(path, np.asarray(Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                                        Image.NEAREST)))


def read_losses(metrics_jsonl: str, key: str = 'loss') -> tuple[np.ndarray, np.ndarray]:
    """(steps, values of `key`) of a training workdir's metrics.jsonl, the steps that logged it; a resumed
    run's re-logged steps keep the last."""
    import json
    by_step = {}
    for line in fileio.read_text(metrics_jsonl).splitlines():
        rec = json.loads(line) if line.strip() else {}
        if key in rec and 'step' in rec:
            by_step[int(rec['step'])] = float(rec[key])
    steps = np.array(sorted(by_step))
    return steps, np.array([by_step[s] for s in steps], np.float64)


def save_loss_curve_png(path: str, title: str, steps, losses, size=(360, 200), label: str = 'loss') -> None:
    """The training loss (or another logged value, named `label`) against the step, with the axes' ranges
    written on them (PIL only: no plotting library is a dependency)."""
    w, h = size
    left, right, top, bottom = 52, 10, 20, 28
    img = Image.new('RGB', (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((left, 4), title, fill=(0, 0, 0))
    x0, y0, x1, y1 = left, top, w - right, h - bottom
    d.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
    steps, losses = np.asarray(steps, np.float64), np.asarray(losses, np.float64)
    finite = np.isfinite(losses)
    if finite.any():
        lo, hi = losses[finite].min(), losses[finite].max()
        s_lo, s_hi = steps.min(), steps.max()
        xs = x0 + (steps - s_lo) / max(s_hi - s_lo, 1) * (x1 - x0)
        ys = y1 - (losses - lo) / max(hi - lo, 1e-12) * (y1 - y0)
        pts = [(float(x), float(y)) for x, y, ok in zip(xs, ys, finite) if ok]
        if len(pts) > 1:
            d.line(pts, fill=(0, 90, 200), width=2)
        else:
            d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=(0, 90, 200))
        d.text((2, y0 - 4), f'{hi:.3g}', fill=(0, 0, 0))
        d.text((2, y1 - 8), f'{lo:.3g}', fill=(0, 0, 0))
        d.text((2, (y0 + y1) // 2 - 5), label, fill=(0, 0, 0))
        d.text((x0, y1 + 3), f'{int(s_lo)}', fill=(0, 0, 0))
        d.text((x1 - int(d.textlength(f'{int(s_hi)}')), y1 + 3), f'{int(s_hi)}', fill=(0, 0, 0))
        d.text(((x0 + x1) // 2 - 12, y1 + 14), 'step', fill=(0, 0, 0))
    _save(path, np.asarray(img))
