"""PNG figures written during training: MAE reconstructions and the CARB token split (supplementary Fig. S1)."""
from __future__ import annotations

import numpy as np
from PIL import Image

from sce_mae_jax import fileio
from sce_mae_jax.data import pipeline

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
