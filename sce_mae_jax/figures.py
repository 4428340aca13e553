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
