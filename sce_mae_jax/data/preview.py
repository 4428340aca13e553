"""Writes a PNG grid of dataset samples with their landmarks drawn, to check data and annotations by eye.

    python -m sce_mae_jax.data.preview --data=synthetic --split=train --out=/tmp/grid.png [--n=16]

Each tile shows the full 136-px protocol frame (2x enlarged), the 96-px model crop as a grey rectangle, the 68
iBUG points (when the source has them) as small white dots and the 5 MAFL points in the colours every figure
uses for them (figures.LANDMARK_COLOURS, named in the legend below the grid), so that a
left/right swap or an off-by-one coordinate convention is visible at a glance.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from sce_mae_jax.figures import LANDMARK_COLOURS, LEGEND_HEIGHT, draw_landmark_legend

_ZOOM = 2


def get_preview_source(data: str, split: str, *, seed: int = 0, manual_dir: str | None = None,
                       data_dir: str | None = None) -> Any:
    if data == "synthetic":
        from sce_mae_jax.data.synthetic import SyntheticFaces

        return SyntheticFaces(split, seed=seed)
    # Imported lazily: the real-data sources live in another module and need files this one does not.
    from sce_mae_jax.data import sources

    return sources.get_source(data, split, manual_dir=manual_dir, data_dir=data_dir)


def draw_tile(item: dict[str, np.ndarray]) -> Image.Image:
    """One sample -> RGB tile ((H*2, W*2)) with crop box and landmarks."""
    img = np.asarray(item["image"])
    h, w = img.shape[:2]
    tile = Image.fromarray(img.astype(np.uint8)).resize((w * _ZOOM, h * _ZOOM), Image.NEAREST)
    d = ImageDraw.Draw(tile)
    crop = 96
    if h > crop and w > crop:
        y0, x0 = (h - crop) // 2, (w - crop) // 2
        d.rectangle([x0 * _ZOOM, y0 * _ZOOM, (x0 + crop) * _ZOOM - 1, (y0 + crop) * _ZOOM - 1],
                    outline=(160, 160, 160))

    def centre(p):  # pixel centre (x=c) -> zoomed canvas coordinate of that pixel's centre
        return p[0] * _ZOOM + (_ZOOM - 1) / 2.0, p[1] * _ZOOM + (_ZOOM - 1) / 2.0

    if "landmarks68" in item:
        for p in np.asarray(item["landmarks68"]):
            x, y = centre(p)
            d.ellipse([x - 1, y - 1, x + 1, y + 1], fill=(255, 255, 255))
    for p, col in zip(np.asarray(item["landmarks"]), LANDMARK_COLOURS):
        x, y = centre(p)
        d.ellipse([x - 3, y - 3, x + 3, y + 3], outline=(0, 0, 0), fill=col)
    return tile


def make_grid(source: Any, indices: Sequence[int], cols: int | None = None) -> Image.Image:
    tiles = [draw_tile(source[int(i)]) for i in indices]
    cols = cols or int(math.ceil(math.sqrt(len(tiles))))
    rows = int(math.ceil(len(tiles) / cols))
    tw, th = tiles[0].size
    height = rows * th + (rows - 1) * 2
    grid = Image.new("RGB", (max(cols * tw + (cols - 1) * 2, 420), height + LEGEND_HEIGHT + 4), (0, 0, 0))
    for k, t in enumerate(tiles):
        grid.paste(t, ((k % cols) * (tw + 2), (k // cols) * (th + 2)))
    draw_landmark_legend(ImageDraw.Draw(grid), 4, height + 2, text=(255, 255, 255))
    return grid


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sce_mae_jax.data.preview", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="synthetic", help="dataset: synthetic, synthetic_plain or a prepared real "
                    "one (celeba, mafl, aflw_m, aflw_r, aflw_rc, 300w; docs/datasets.md) (default: %(default)s)")
    ap.add_argument("--split", default="train", help="split to draw from (default: %(default)s)")
    ap.add_argument("--out", default="grid.png", help="PNG to write; a relative path is taken from the current "
                    "directory (default: %(default)s)")
    ap.add_argument("--n", type=int, default=16, help="samples to draw (default: %(default)s)")
    ap.add_argument("--start", type=int, default=0, help="index of the first sample (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="synthetic faces: the generator seed, as "
                    "--config.data_seed (default: %(default)s)")
    ap.add_argument("--manual_dir", default=None, help="real data: folder with the raw files (docs/datasets.md)")
    ap.add_argument("--data_dir", default=None, help="real data: where it is prepared (TFDS data_dir)")
    return ap


def main(argv: Sequence[str] | None = None) -> str:
    a = parser().parse_args(argv)
    out = os.path.abspath(a.out)  # the caller's directory, said in full: the grid is easy to find and remove
    src = get_preview_source(a.data, a.split, seed=a.seed, manual_dir=a.manual_dir, data_dir=a.data_dir)
    n = min(a.n, len(src) - a.start)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    make_grid(src, range(a.start, a.start + n)).save(out)
    print(f"wrote {n} samples of {a.data}/{a.split} to {out}")
    return out


if __name__ == "__main__":
    main()
