"""Your own images in the model's frame, and the model's points back in your image's pixels.

The training data put every face in a 136-px protocol frame (`preprocess.OUT_SIZE`) whose centre `size` px
(96) the model sees (`pipeline.eval_transform`). An image of any size gets the same geometry through a
*window* of it, resized to 136 (PIL bilinear, as `preprocess.resize`), then centre-cropped to `size`:

    crop='center'  the largest centred square of the image (a face frame like CelebA's or the synthetic faces')
    crop='none'    the whole image, resized to `size` with no crop (an image that already is the model's view)
    box            a face box (x0, y0, x1, y1) of a detector: the 300W protocol's window, a square
                   W300_CROP/W300_BOX_WIDTH times the box width around its centre, moved up as 300W moves it

Windows are whole pixels (zeros where they leave the image), so the map back is exact: a model pixel x is
x + (136 − size)/2 in the 136 frame, and the 136 frame's pixel centres map to the window's by
`preprocess.resize_points` (pixel (r, c) centred at x = c, y = r, the package's convention).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from sce_mae_jax.data import preprocess

CROPS = ('center', 'none')


@dataclasses.dataclass(frozen=True)
class Frame:
    """Where the model's `size` x `size` input sits in an image: window (top, left, height, width) in the
    image's pixels, resized to `frame` px of which the centre `size` are kept (`frame == size`: no crop)."""
    top: int
    left: int
    height: int
    width: int
    frame: int
    size: int

    @property
    def margin(self) -> float:
        return (self.frame - self.size) / 2

    def to_original(self, points) -> np.ndarray:
        """(..., 2) xy pixels of the model input → the image's pixels."""
        p = np.asarray(points, np.float64) + self.margin
        p = preprocess.resize_points(p.reshape(-1, 2), (self.frame, self.frame), (self.height, self.width))
        return (p + [self.left, self.top]).reshape(np.shape(points))

    def to_model(self, points) -> np.ndarray:
        """(..., 2) xy pixels of the image → the model input's pixels (inverse of `to_original`)."""
        p = np.asarray(points, np.float64).reshape(-1, 2) - [self.left, self.top]
        p = preprocess.resize_points(p, (self.height, self.width), (self.frame, self.frame)) - self.margin
        return p.reshape(np.shape(points))


def frame_for(image_hw: tuple[int, int], size: int, crop: str = 'center', box=None) -> Frame:
    """The window of an image of `image_hw` that the model sees; `box` (x0, y0, x1, y1) wins over `crop`."""
    h, w = image_hw
    out = preprocess.OUT_SIZE
    if box is not None:
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f'box {tuple(box)}: expected x0, y0, x1, y1 with x1 > x0 and y1 > y0')
        scale = (x1 - x0) / preprocess.W300_BOX_WIDTH  # image px per px of the 300W scaled image
        side = max(1, int(round(preprocess.W300_CROP * scale)))
        cx, cy = (x0 + x1) / 2 - 0.5, (y0 + y1) / 2 - 0.5  # corners → the centre in pixel-centre coordinates
        top = int(round(cy - (side - 1) / 2 - preprocess.W300_SHIFT_UP * scale))
        return Frame(top, int(round(cx - (side - 1) / 2)), side, side, out, size)
    if crop == 'center':
        side = min(h, w)
        return Frame((h - side) // 2, (w - side) // 2, side, side, out, size)
    if crop == 'none':
        return Frame(0, 0, h, w, size, size)
    raise ValueError(f'crop={crop!r} must be one of {CROPS}')


def to_model_image(image: np.ndarray, frame: Frame) -> np.ndarray:
    """(H, W, 3) uint8 → the model's (size, size, 3) uint8 input."""
    window = preprocess.crop(np.asarray(image, np.uint8), frame.top, frame.left, frame.height, frame.width)
    if (frame.height, frame.width) != (frame.frame, frame.frame):
        window = preprocess.resize(window, frame.frame, frame.frame)
    m = int(frame.margin)
    return np.ascontiguousarray(window[m:m + frame.size, m:m + frame.size])
