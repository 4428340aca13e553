"""Evaluation-protocol preprocessing (method.md §4) as pure NumPy/PIL functions.

Every protocol maps a raw image and its landmarks to a ``(136, 136, 3)`` uint8 image and ``(L, 2)`` float32
landmarks ``(x, y)`` in the 136-px frame, moved by exactly the same geometric transform as the pixels.

Coordinate convention (used everywhere in this package)
------------------------------------------------------
Pixel ``(row r, column c)`` has its *centre* at ``x = c, y = r``; the pixel covers ``[c - 0.5, c + 0.5]``.
Annotations stored 1-based ("Matlab indexing": AFLW_M/MTFL, 300W ``.pts`` and boxes) are converted by
subtracting 1, as the protocol says. CelebA and AFLW_R annotations are used as they are (0-based), as in DVE.

Resizing decision
-----------------
PIL's resize maps pixel centres, so resizing a width ``w`` to ``w'`` moves ``x -> (x + 0.5) * w'/w - 0.5``.
We apply that exact map to landmarks. DVE/CL instead use ``x -> x * w'/w``; the two differ by
``0.5 * (1 - w'/w)`` px, i.e. by 0.12 px for CelebA (178 -> 136) and 0.05 px for AFLW_M (150 -> 136): a
constant offset far below the reported errors, but ours puts the landmark on the pixel that shows it, which
the matching protocol (query at the landmark's rounded pixel) and the dot tests in tests/test_datasets.py
rely on.

For 300W the protocol is two resizes (face box -> 52 px, then the 100-px crop -> 136). We keep both steps,
each with its exact map. The crop window follows DVE's: 100x100 pixels centred on the ground-truth box centre,
shifted 2 px up (so the face sits 2 px low in the crop). Out-of-image pixels are zero (black). DVE computes
that centre with Matlab-style integer arithmetic and subtracts the Matlab 1 after scaling; we use the exact
box centre and subtract 1 before scaling, so our window may sit up to ~1 px from DVE's and our landmarks
are ~0.5 px (at 136) from where DVE's formula would put them - on the pixels that actually show them.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

OUT_SIZE = 136  # Protocol resolution of every prepared image.

# CelebA aligned images are 178 wide x 218 high; the protocol keeps rows 30..208 ("move the head up").
CELEBA_SIZE_HW = (218, 178)
CELEBA_TOP = 30
CELEBA_CROP = 178

# 300W: the ground-truth box is scaled to this width, then a window of W300_CROP px is cut around it.
W300_BOX_WIDTH = 52
W300_CROP = 100
W300_SHIFT_UP = 2


class DatasetError(ValueError):
    """A dataset file is missing or malformed; the message names the path and the expected layout."""


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file as ``(H, W, 3)`` uint8 RGB; raises DatasetError naming the path if unreadable."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f'expected image file {path}: not found; see docs/datasets.md')
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert('RGB'))
    except (OSError, ValueError) as e:  # PIL raises UnidentifiedImageError (an OSError) for non-images.
        raise DatasetError(f'could not decode image {path}: {e}') from None


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL bilinear resize (antialiased when shrinking) of ``(H, W, 3)`` uint8 to ``(height, width, 3)``."""
    return np.asarray(
            Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def resize_points(points: np.ndarray, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> np.ndarray:
    """Moves ``(L, 2)`` xy points with a resize from ``src_hw`` to ``dst_hw`` (pixel-centre map, see above)."""
    scale = np.array([dst_hw[1] / src_hw[1], dst_hw[0] / src_hw[0]], np.float64)
    return (np.asarray(points, np.float64) + 0.5) * scale - 0.5


def crop(image: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    """Integer crop ``image[top:top+height, left:left+width]`` with zeros where it leaves the image."""
    h, w = image.shape[:2]
    out = np.zeros((height, width) + image.shape[2:], image.dtype)
    r0, r1 = max(top, 0), min(top + height, h)
    c0, c1 = max(left, 0), min(left + width, w)
    if r0 < r1 and c0 < c1:
        out[r0 - top:r1 - top, c0 - left:c1 - left] = image[r0:r1, c0:c1]
    return out


def crop_points(points: np.ndarray, top: int, left: int) -> np.ndarray:
    """Moves ``(L, 2)`` xy points with a crop whose first pixel is ``(top, left)``."""
    return np.asarray(points, np.float64) - np.array([left, top], np.float64)


def _to_out(image: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Resizes to the protocol's square 136 px (aspect ratio not preserved) and moves the points."""
    hw = image.shape[:2]
    return (resize(image, OUT_SIZE, OUT_SIZE),
                    resize_points(points, hw, (OUT_SIZE, OUT_SIZE)).astype(np.float32))


def celeba_aligned(image: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CelebA/MAFL: aligned 178x218 image, rows 30..208 kept (178x178), resized to 136.

    Args:
        image: ``(218, 178, 3)`` uint8.
        landmarks: ``(5, 2)`` xy, 0-based, as in ``list_landmarks_align_celeba.txt``.
    Returns:
        ``(136, 136, 3)`` uint8 image and ``(5, 2)`` float32 landmarks.
    """
    if image.shape[:2] != CELEBA_SIZE_HW:
        raise DatasetError(f'aligned CelebA images are 178x218 (WxH); got {image.shape[1]}x{image.shape[0]}')
    img = crop(image, CELEBA_TOP, 0, CELEBA_CROP, CELEBA_CROP)
    return _to_out(img, crop_points(landmarks, CELEBA_TOP, 0))


def aflw_m(image: np.ndarray, landmarks_1based: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AFLW_M (MTFL protocol): 150x150 face crops, 1-based landmarks -> 0-based, resized to 136.

    The resize uses the image's real size (150x150 for the released crops).

    Args:
        image: ``(H, W, 3)`` uint8.
        landmarks_1based: ``(5, 2)`` xy in Matlab (1-based) pixel coordinates.
    """
    return _to_out(image, np.asarray(landmarks_1based, np.float64) - 1.0)


def aflw_r(image: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AFLW_R: non-aspect-preserving resize of the whole image to 136x136.

    Args:
        image: ``(H, W, 3)`` uint8.
        landmarks: ``(5, 2)`` xy, 0-based (already swapped from the ``.mat`` file's y, x order).
    """
    return _to_out(image, landmarks)


def w300_window(box_1based: np.ndarray, image_hw: tuple[int, int]):
    """The 300W protocol's geometry for one face.

    Args:
        box_1based: ``(4,)`` ground-truth box ``(xmin, ymin, xmax, ymax)``, 1-based inclusive pixels.
        image_hw: raw image size.
    Returns:
        ``(scaled_hw, top, left)``: size of the image rescaled so the box is 52 px wide, and the first pixel of
        the 100x100 window in that rescaled image.
    """
    xmin, ymin, xmax, ymax = (float(v) for v in np.asarray(box_1based).reshape(-1)[:4])
    box_w = xmax - xmin + 1.0  # inclusive pixel count, as in the protocol
    if not box_w > 0 or not ymax >= ymin:
        raise DatasetError(f'malformed 300W box {box_1based!r}: expected xmin, ymin, xmax, ymax with max >= min')
    fac = W300_BOX_WIDTH / box_w
    h, w = image_hw
    scaled_hw = (max(1, round(h * fac)), max(1, round(w * fac)))
    centre = resize_points(np.array([[(xmin + xmax) / 2 - 1.0, (ymin + ymax) / 2 - 1.0]]), image_hw, scaled_hw)[0]
    half = (W300_CROP - 1) / 2  # a 100-px window has its middle between pixels 49 and 50
    left = int(round(centre[0] - half))
    top = int(round(centre[1] - half)) - W300_SHIFT_UP
    return scaled_hw, top, left


def w300(image: np.ndarray, landmarks_1based: np.ndarray,
                  box_1based: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """300W: scale so the ground-truth box is 52 px wide, cut 100x100 around its centre, resize to 136.

    Args:
        image: ``(H, W, 3)`` uint8.
        landmarks_1based: ``(68, 2)`` xy from the ``.pts`` file (1-based).
        box_1based: ``(4,)`` ``bb_ground_truth`` ``(xmin, ymin, xmax, ymax)`` (1-based).
    """
    hw = image.shape[:2]
    scaled_hw, top, left = w300_window(box_1based, hw)
    pts = resize_points(np.asarray(landmarks_1based, np.float64) - 1.0, hw, scaled_hw)
    img = crop(resize(image, *scaled_hw), top, left, W300_CROP, W300_CROP)
    return _to_out(img, crop_points(pts, top, left))
