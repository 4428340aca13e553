"""The PNGs of `python -m sce_mae_jax.predict`: landmarks on an image, and a correspondence figure."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from sce_mae_jax.evals.plots import LANDMARK_COLOURS, heat

OTHER_COLOUR = (255, 40, 40)   # sets of more than five points (68 iBUG) in one colour
WINDOW_COLOUR = (0, 220, 255)


def _colour(i: int, n: int):
    return LANDMARK_COLOURS[i] if n <= len(LANDMARK_COLOURS) else OTHER_COLOUR


def _dots(draw: ImageDraw.ImageDraw, points, radius: float, scale: float = 1.0, ring: bool = False) -> None:
    for i, (x, y) in enumerate(np.asarray(points, np.float64)):
        # pixel-centre convention: pixel x = c spans [c·s, (c+1)·s) once scaled by s
        cx, cy = (x + 0.5) * scale, (y + 0.5) * scale
        box = [cx - radius, cy - radius, cx + radius, cy + radius]
        col = _colour(i, len(points))
        if ring:
            draw.ellipse(box, outline=col, width=2)
        else:
            draw.ellipse(box, fill=col, outline=(0, 0, 0))


def overlay(image: np.ndarray, points, window=None) -> Image.Image:
    """The image with its landmarks (dots sized to the image) and, when given, the model's window
    (top, left, height, width) outlined, so a wrong crop shows at a glance."""
    im = Image.fromarray(np.asarray(image, np.uint8))
    d = ImageDraw.Draw(im)
    h, w = image.shape[:2]
    if window is not None:
        top, left, wh, ww = window
        d.rectangle([left, top, left + ww - 1, top + wh - 1], outline=WINDOW_COLOUR, width=max(1, min(h, w) // 150))
    _dots(d, points, radius=max(2.0, min(h, w) / 90))
    return im


def match_figure(result: dict, zoom: int = 3, maps: int = 5) -> Image.Image:
    """Top: the source's model input with its query points (dots) and the target's with where they land
    (dots), enlarged `zoom`x. Bottom: for the first `maps` points, the cosine similarity of the point's
    descriptor to every target pixel (min-max scaled per map) over the target, the predicted point ringed."""
    src, tgt = result['source_image'], result['target_image']
    s = src.shape[0] * zoom
    sims = result['similarity'][:maps]
    cols = max(2, len(sims))
    gap, head = 4, 16
    canvas = Image.new('RGB', (cols * (s + gap), 2 * (s + head + gap)), (255, 255, 255))
    d = ImageDraw.Draw(canvas)

    def tile(image, points, col, row, title, ring=False):
        t = Image.fromarray(np.asarray(image, np.uint8)).resize((s, s), Image.NEAREST)
        _dots(ImageDraw.Draw(t), points, radius=4, scale=zoom, ring=ring)
        x, y = col * (s + gap), row * (s + head + gap)
        canvas.paste(t, (x, y + head))
        d.text((x + 2, y + 2), title, fill=(0, 0, 0))

    tile(src, result['source_points_model'], 0, 0, 'source: query points')
    tile(tgt, result['target_points_model'], 1, 0, 'target: matches')
    for i, m in enumerate(sims):
        m = (m - m.min()) / max(float(m.max() - m.min()), 1e-8)
        shown = np.clip(0.35 * tgt.astype(np.float32) + 0.65 * heat(m), 0, 255)
        one = result['target_points_model'][i:i + 1]
        # the ring keeps the point's own colour: pad the list so _dots picks colour i
        pts = np.concatenate([np.full((i, 2), -1e6), one]) if i < len(LANDMARK_COLOURS) else one
        tile(shown, pts, i, 1, f'similarity of point {i}', ring=True)
    return canvas
