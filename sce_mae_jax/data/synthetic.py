"""Procedural synthetic faces: the embedded default dataset (``data=synthetic``).

Why this exists: the real sets (CelebA, MAFL, AFLW, 300W) cannot be shipped, yet the whole pipeline -- MAE
pretraining, stage-2 contrastive training, matching and detection evaluation -- must run end-to-end out of the
box and in tests.  The generator therefore produces images in exactly the protocol's 136-px frame (the pipeline
later takes the centre 96x96 crop, as for CelebA), with exact 68-point and 5-point ground truth.

Design choices (and why):
  * Identity and image randomness are separated: every identity id seeds its own shape / appearance draw, every
    image seeds pose, expression, lighting and background.  Matching across identities then requires features
    that are invariant to appearance, which is the point of the benchmark.
  * Geometry comes from a 3-D 68-point template in iBUG 300-W order, rotated (yaw/pitch/roll) and projected,
    so landmarks are exact by construction rather than estimated from a rendering.
  * Rendering uses Pillow's C polygon/ellipse fills at 2x resolution, box-reduced to 136 px (anti-aliasing),
    then NumPy for smooth shading, colour cast and sensor noise.  This keeps a single core well above the
    required 300 images/s while avoiding any per-pixel Python loops.
  * Every item is a pure function of (seed, split, index): random access, picklable, no state, so grain can
    shard and resume it.

Coordinates: landmarks are (x, y) in pixels of the 136-px image; pixel (row r, col c) has its centre at
(x=c, y=r).  The 5 MAFL points follow CelebA: 0 = eye on the image's left (mean of iBUG 36-41), 1 = the other
eye (mean of 42-47), 2 = nose tip (30), 3 = mouth corner on the image's left (48), 4 = the other corner (54).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 136
CROP_SIZE = 96
_SS = 2  # supersampling factor of the Pillow canvas
_HI = IMAGE_SIZE * _SS

SPLITS = ("pretrain", "train", "test", "match")
DEFAULT_SIZES = {"pretrain": 50_000, "train": 5_000, "test": 1_000, "match": 1_000}
# Identity ranges are disjoint per split by construction: id = base + offset with offsets < 10**8.
_SPLIT_ID = {"pretrain": 0, "train": 1, "test": 2, "match": 3}
_ID_BASE = {name: k * 100_000_000 for name, k in _SPLIT_ID.items()}
# Several images per identity in the labelled / unlabelled splits (pose and expression vary, the person not);
# one identity per image in 'match' so that images 2b and 2b+1 always differ.
_IMAGES_PER_ID = {"pretrain": 5, "train": 5, "test": 5, "match": 1}

# Where CelebA-aligned faces sit in the 136-px frame (estimated from typical CelebA-aligned landmark positions
# pushed through the protocol's crop + resize): inter-ocular distance ~30 px, eye line at y ~ 62, centred.
_EYE_MID = np.array([67.5, 62.0])
_PX_PER_UNIT = 36.0  # template inter-ocular distance is 0.84 units -> ~30 px
_CROP_LO = (IMAGE_SIZE - CROP_SIZE) / 2  # the protocol's centre crop starts here (20 px)
_WILD_MARGIN = 3.0   # px between the crop border and the nearest landmark of a 'wild' face

# Pose and placement distributions: (sd, clip) of yaw / pitch / roll in degrees and of the log scale, and the
# mean log scale.
# 'aligned' (synthetic, synthetic_plain): CelebA-like, the eye midpoint at _EYE_MID ± 2.5 px, so "the same place
# in the frame" already matches faces well. 'wild' (synthetic_wild): the content benchmark, where a position
# prior fails; faces anywhere in the crop, scale x0.5-1.2 (shrunk further if the 68 points would leave the crop),
# roll up to 45 degrees, yaw up to 40 (towards AFLW's poses).
PLACEMENTS = {
    "aligned": {"yaw": (14, 35), "pitch": (6, 15), "roll": (6, 15), "log_scale": (0.08, 10.0),
                "mean_log_scale": 0.0},
    "wild": {"yaw": (18, 40), "pitch": (10, 25), "roll": (20, 45), "log_scale": (0.2, 0.45),
             "mean_log_scale": -0.25},
}


# ----------------------------------------------------------------------------------------------------------
# 3-D template (units: roughly half a face width; x to the image's right, y down, z towards the camera).
# ----------------------------------------------------------------------------------------------------------

def _mirror(p: np.ndarray) -> np.ndarray:
    q = np.array(p, dtype=np.float64, copy=True)
    q[..., 0] *= -1.0
    return q


def _template(sp: dict[str, float]) -> np.ndarray:
    """Builds the 68 iBUG points for identity shape parameters ``sp`` (neutral expression). -> (68, 3)."""
    P = np.zeros((68, 3))
    # Jaw 0..16: from the image-left ear level, around the chin, to the image-right ear level.
    t = np.linspace(0.0, math.pi, 17)
    c, s = np.cos(t), np.sin(t)
    P[0:17, 0] = -sp["jaw_w"] * np.sign(c) * np.abs(c) ** sp["jaw_sq"]
    P[0:17, 1] = -0.2 + (sp["chin_y"] + 0.2) * s ** 1.3
    P[0:17, 2] = -0.55 + 0.6 * s
    # Brows 17..21 (image-left, outer -> inner), 22..26 mirrored (inner -> outer).
    u = np.linspace(0.0, 1.0, 5)
    bx = -(sp["brow_in"] + (sp["brow_out"] - sp["brow_in"]) * (1.0 - u))
    by = sp["brow_y"] - sp["brow_arch"] * np.sin(math.pi * (0.15 + 0.85 * u))
    left_brow = np.stack([bx, by, 0.2 + 0.1 * u], -1)
    P[17:22] = left_brow
    P[22:27] = _mirror(left_brow[::-1])
    # Nose bridge 27..30 (30 = tip), nostril base 31..35.
    ty = sp["nose_y"]
    P[27:31] = [[0, -0.3, 0.3], [0, -0.3 + (ty + 0.3) / 3, 0.4], [0, -0.3 + 2 * (ty + 0.3) / 3, 0.5],
                [0, ty, 0.62]]
    nw = sp["nose_w"]
    P[31:36, 0] = [-nw, -0.5 * nw, 0.0, 0.5 * nw, nw]
    P[31:36, 1] = ty + np.array([0.08, 0.10, 0.12, 0.10, 0.08])
    P[31:36, 2] = [0.35, 0.42, 0.46, 0.42, 0.35]
    # Eyes: 36..41 image-left (outer corner, upper lid x2, inner corner, lower lid x2); 42..47 mirrored.
    cx, cy, ew = -sp["eye_x"], sp["eye_y"], sp["eye_w"]
    eu, el = sp["eye_h"], 0.72 * sp["eye_h"]
    left_eye = np.array([[cx - ew, cy + 0.005, 0.10], [cx - 0.4 * ew, cy - eu, 0.2], [cx + 0.35 * ew, cy - eu, 0.2],
                         [cx + ew, cy + 0.01, 0.16], [cx + 0.35 * ew, cy + el, 0.18], [cx - 0.4 * ew, cy + el, 0.18]])
    P[36:42] = left_eye
    P[42:48] = _mirror(left_eye[[3, 2, 1, 0, 5, 4]])
    # Mouth: outer 48..59 (48 image-left corner, upper lip to 54, lower lip back), inner 60..67.
    mw, my, lu, ll = sp["mouth_w"], sp["mouth_y"], sp["lip_up"], sp["lip_low"]
    P[48:55, 0] = mw * np.array([-1.0, -0.6, -0.25, 0.0, 0.25, 0.6, 1.0])
    P[48:55, 1] = my - lu * np.array([0.0, 0.7, 1.0, 0.75, 1.0, 0.7, 0.0])
    P[55:60, 0] = mw * np.array([0.6, 0.25, 0.0, -0.25, -0.6])
    P[55:60, 1] = my + ll * np.array([0.7, 0.95, 1.0, 0.95, 0.7])
    P[60:65, 0] = mw * np.array([-0.85, -0.35, 0.0, 0.35, 0.85])
    P[60:65, 1] = my + np.array([0.0, -0.012, -0.008, -0.012, 0.0])
    P[65:68, 0] = mw * np.array([0.35, 0.0, -0.35])
    P[65:68, 1] = my + np.array([0.012, 0.01, 0.012])
    P[48:68, 2] = 0.42 - 0.14 * (P[48:68, 0] / mw) ** 2
    return P


def _forehead(sp: dict[str, float], n: int = 11) -> np.ndarray:
    """Scalp outline from the image-right ear level over the top to the image-left one. -> (n, 3)."""
    u = np.linspace(0.0, math.pi, n + 2)[1:-1]
    return np.stack([sp["jaw_w"] * np.cos(u), -0.2 - sp["head_h"] * np.sin(u), -0.55 + 0.5 * np.sin(u)], -1)


def mafl_from_68(p68: np.ndarray) -> np.ndarray:
    """(…, 68, 2) iBUG points -> (…, 5, 2) MAFL points (eye centres, nose tip, mouth corners)."""
    return np.stack([p68[..., 36:42, :].mean(-2), p68[..., 42:48, :].mean(-2), p68[..., 30, :],
                     p68[..., 48, :], p68[..., 54, :]], axis=-2)


# ----------------------------------------------------------------------------------------------------------
# Identity and image parameters.
# ----------------------------------------------------------------------------------------------------------

_SKIN_LIGHT = np.array([240.0, 205.0, 180.0])
_SKIN_DARK = np.array([85.0, 55.0, 38.0])
_HAIR = np.array([[25, 20, 18], [60, 40, 28], [105, 70, 40], [150, 110, 65], [205, 175, 115],
                  [135, 55, 30], [150, 150, 150], [220, 220, 215]], dtype=np.float64)
_IRIS = np.array([[70, 45, 25], [40, 25, 15], [70, 110, 150], [80, 110, 70], [110, 90, 60]], dtype=np.float64)


def _col(c) -> tuple[int, int, int]:
    return tuple(min(255, max(0, int(v))) for v in c)


@functools.lru_cache(maxsize=2048)
def _identity_params(seed: int, identity: int) -> dict[str, Any]:
    """Shape and appearance of one person; cached because several images share it (treat as read-only)."""
    r = np.random.default_rng([seed, 7, identity])
    n = r.normal
    sp = {
        "jaw_w": 0.95 * math.exp(n(0, 0.06)), "jaw_sq": float(r.uniform(0.55, 1.0)),
        "chin_y": 1.05 + n(0, 0.07), "head_h": 1.0 + n(0, 0.06),
        "brow_in": 0.17 + n(0, 0.02), "brow_out": 0.78 + n(0, 0.04), "brow_y": -0.45 + n(0, 0.03),
        "brow_arch": max(0.0, 0.07 + n(0, 0.03)),
        "nose_y": 0.24 + n(0, 0.04), "nose_w": 0.17 * math.exp(n(0, 0.12)),
        "eye_x": 0.42 + n(0, 0.025), "eye_y": -0.25 + n(0, 0.015), "eye_w": 0.16 * math.exp(n(0, 0.08)),
        "eye_h": 0.065 * math.exp(n(0, 0.15)),
        "mouth_w": 0.3 * math.exp(n(0, 0.08)), "mouth_y": 0.62 + n(0, 0.03),
        "lip_up": 0.09 * math.exp(n(0, 0.2)), "lip_low": 0.11 * math.exp(n(0, 0.2)),
    }
    shape = _template(sp) + r.normal(0, 0.012, (68, 3))
    tone = float(r.beta(1.6, 1.6))
    skin = _SKIN_LIGHT * (1 - tone) + _SKIN_DARK * tone + r.normal(0, 9, 3)
    hair = _HAIR[r.integers(len(_HAIR))] * math.exp(n(0, 0.15)) + r.normal(0, 8, 3)
    lip = skin * np.array([0.92, 0.68, 0.68]) + r.normal(0, 8, 3)
    if r.random() < 0.25:  # lipstick
        lip = np.array([175.0, 40.0, 60.0]) + r.normal(0, 25, 3)
    style = r.choice(["bald", "short", "medium", "long", "bangs"], p=[0.08, 0.32, 0.2, 0.25, 0.15])
    return {
        "shape": shape, "sp": sp, "forehead": _forehead(sp),
        "skin": skin, "hair": hair, "brow": hair * 0.6 + skin * 0.1, "lip": lip,
        "iris": _IRIS[r.integers(len(_IRIS))] * math.exp(n(0, 0.15)),
        "sclera": np.array([235.0, 230.0, 222.0]) * math.exp(n(0, 0.05)),
        "style": str(style), "hairline": float(r.uniform(0.25, 0.45)), "fringe": float(r.uniform(0.5, 0.68)),
        "hair_len": float(r.uniform(1.0, 2.2)), "hair_w": float(r.uniform(1.05, 1.35)),
        "brow_t": float(r.uniform(0.035, 0.08)),
        "glasses": r.random() < 0.25, "sunglasses": r.random() < 0.05,
        "frame": _col(np.array([[20, 20, 20], [90, 60, 30], [170, 170, 175], [120, 20, 20]])[r.integers(4)]
                      + r.normal(0, 10, 3)),
        "lens_h": float(r.uniform(0.12, 0.2)), "lens_w": float(r.uniform(0.2, 0.28)),
        "beard": r.random() < 0.12, "moustache": r.random() < 0.15,
        "cloth": _col(r.uniform(0, 255, 3)), "earring": r.random() < 0.1,
    }


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cy, sy, cp, sp_, cr, sr = (math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch),
                               math.cos(roll), math.sin(roll))
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp_], [0, sp_, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return rz @ rx @ ry


# Fixed noise bank: sensor noise is sampled as random windows of it (cheaper than drawing fresh normals).
_NOISE_BANK = np.random.default_rng(1234).normal(0.0, 1.0, (IMAGE_SIZE * 2, IMAGE_SIZE * 2, 3)).astype(np.float32)
_GRID_Y, _GRID_X = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Rendering.
# ----------------------------------------------------------------------------------------------------------

def _hi(p: np.ndarray) -> list[float]:
    """136-px (x, y) -> flat Pillow coordinates on the supersampled canvas (pixel centres at integers there)."""
    return (np.asarray(p) * _SS + (_SS - 1) / 2.0).ravel().tolist()


def _ellipse(d: ImageDraw.ImageDraw, c, rx: float, ry: float, **kw) -> None:
    x, y = c[0] * _SS + (_SS - 1) / 2.0, c[1] * _SS + (_SS - 1) / 2.0
    d.ellipse([x - rx * _SS, y - ry * _SS, x + rx * _SS, y + ry * _SS], **kw)


def _thick_polyline(p: np.ndarray, t0: np.ndarray, t1: np.ndarray) -> np.ndarray:
    """Closed polygon around polyline p (n, 2) with per-vertex half-thickness above (t0) and below (t1)."""
    d = np.gradient(p, axis=0)
    nrm = np.stack([d[:, 1], -d[:, 0]], -1)
    nrm /= np.linalg.norm(nrm, axis=-1, keepdims=True) + 1e-9
    return np.concatenate([p + nrm * t0[:, None], (p - nrm * t1[:, None])[::-1]])


def _background(r: np.random.Generator, clutter: bool = True) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    # Colours are pulled towards grey by a random amount: photo backgrounds are rarely fully saturated.
    sat = r.uniform(0.2, 1.0)

    def colour(c: np.ndarray) -> np.ndarray:
        g = c.mean(-1, keepdims=True)
        return g + sat * (c - g)

    k = int(r.integers(2, 5))
    base = r.uniform(0, 255, 3)
    field = np.clip(colour(base + r.normal(0, 60, (k, k, 3))), 0, 255).astype(np.uint8)
    # Bilinear to a quarter of the canvas then nearest: same smooth field at a fifth of the cost.
    img = Image.fromarray(field).resize((_HI // 4, _HI // 4), Image.BILINEAR).resize((_HI, _HI), Image.NEAREST)
    d = ImageDraw.Draw(img)
    for _ in range(int(r.integers(5, 14)) if clutter else 0):
        kind = r.integers(4)
        col = _col(colour(r.uniform(0, 255, 3)))
        c = r.uniform(-10, _HI + 10, 2)
        w, h = r.uniform(8, 110, 2)
        if kind == 0:
            d.rectangle([c[0] - w, c[1] - h, c[0] + w, c[1] + h], fill=col)
        elif kind == 1:
            d.ellipse([c[0] - w, c[1] - h, c[0] + w, c[1] + h], fill=col)
        elif kind == 2:
            pts = c + r.normal(0, 50, (int(r.integers(3, 6)), 2))
            d.polygon([tuple(q) for q in pts], fill=col)
        else:
            e = c + r.normal(0, 120, 2)
            d.line([tuple(c), tuple(e)], fill=col, width=int(r.integers(2, 12)))
    return img, d


def _render(ident: dict[str, Any], r: np.random.Generator, clutter: bool = True,
            placement: str = "aligned") -> tuple[np.ndarray, np.ndarray]:
    """Draws one image. -> (uint8 (136, 136, 3), float32 (68, 2) landmarks)."""
    sp = ident["sp"]
    P = ident["shape"].copy()
    # Expression: mouth opening, smile, brow raise, eye closure (per image, so identity != expression).
    open_ = max(0.0, r.normal(0.0, 0.08)) if r.random() < 0.5 else 0.0
    smile = r.uniform(-0.2, 1.0) * 0.06
    P[[55, 56, 57, 58, 59, 65, 66, 67], 1] += open_
    P[6:11, 1] += open_ * np.array([0.4, 0.8, 1.0, 0.8, 0.4])
    for i, sx in ((48, -1), (60, -1), (54, 1), (64, 1)):
        P[i, 0] += sx * smile * 0.6
        P[i, 1] -= smile
    P[[49, 53, 59, 55], 1] -= smile * 0.5
    P[17:27, 1] -= max(0.0, r.normal(0.0, 0.04))
    closure = float(np.clip(r.normal(0.0, 0.25), 0.0, 0.85)) if r.random() < 0.3 else 0.0
    for up, lo in ((37, 41), (38, 40), (43, 47), (44, 46)):
        P[up, 1] += closure * (P[lo, 1] - P[up, 1])
    gaze = r.normal(0, 0.25, 2)

    # Pose: rotate about the head centre, weak perspective; 'aligned' places the eye midpoint as CelebA's
    # alignment does, 'wild' anywhere the face still fits the crop (PLACEMENTS).
    pose = PLACEMENTS[placement]
    yaw = math.radians(float(np.clip(r.normal(0, pose["yaw"][0]), -pose["yaw"][1], pose["yaw"][1])))
    pitch = math.radians(float(np.clip(r.normal(0, pose["pitch"][0]), -pose["pitch"][1], pose["pitch"][1])))
    roll = math.radians(float(np.clip(r.normal(0, pose["roll"][0]), -pose["roll"][1], pose["roll"][1])))
    R = _rotation(yaw, pitch, roll)
    scale = _PX_PER_UNIT * math.exp(pose["mean_log_scale"] + float(np.clip(
        r.normal(0, pose["log_scale"][0]), -pose["log_scale"][1], pose["log_scale"][1])))
    pivot = np.array([0.0, 0.0, -0.6])
    extra = {
        "fore": ident["forehead"],
        "ears": np.array([[-0.98 * sp["jaw_w"], -0.05, -0.6], [0.98 * sp["jaw_w"], -0.05, -0.6]]),
        "neck": np.array([[-0.5, 0.6, -0.6], [0.5, 0.6, -0.6], [0.55, 2.6, -0.6], [-0.55, 2.6, -0.6]]),
        "body": np.array([[-0.6, 1.55, -0.7], [0.6, 1.55, -0.7], [2.6, 2.3, -0.7], [2.8, 4.0, -0.7],
                          [-2.8, 4.0, -0.7], [-2.6, 2.3, -0.7]]),
        "centre": np.array([[0.0, -0.1, -0.6]]),
    }
    allp = np.concatenate([P] + list(extra.values()))
    q = (allp - pivot) @ R.T
    persp = 1.0 / (1.0 - q[:, 2] / 9.0)  # mild perspective (camera ~9 units away)
    xy = q[:, :2] * persp[:, None]
    eye_mid = 0.5 * (xy[36:42].mean(0) + xy[42:48].mean(0))
    if placement == "aligned":
        shift = _EYE_MID + r.normal(0, [2.5, 2.5]) - eye_mid * scale
    else:
        # The 68 points must stay inside the centre crop, or the protocol's crop would cut landmarks off: the
        # face shrinks to fit, then its eye midpoint moves uniformly over the range the crop leaves it.
        lo_c, hi_c = _CROP_LO + _WILD_MARGIN, _CROP_LO + CROP_SIZE - _WILD_MARGIN
        extent = xy[:68].max(0) - xy[:68].min(0)
        scale = min(scale, (hi_c - lo_c) / float(extent.max()))
        lo = lo_c - (xy[:68].min(0) - eye_mid) * scale    # eye-midpoint positions that keep every point inside
        hi = hi_c - (xy[:68].max(0) - eye_mid) * scale
        shift = lo + r.uniform(0.0, 1.0, 2) * np.maximum(hi - lo, 0.0) - eye_mid * scale
    xy = xy * scale + shift
    lm = xy[:68]
    offs = np.cumsum([68] + [len(v) for v in extra.values()])
    fore, ears, neck, body, centre = (xy[a:b] for a, b in zip(offs[:-1], offs[1:]))
    centre = centre[0]
    fw = math.cos(yaw)  # foreshortening of horizontal widths

    img, d = _background(r, clutter)
    skin = ident["skin"] * math.exp(r.normal(0, 0.05))
    skin_c = _col(skin)
    hair_c = _col(ident["hair"])
    style = ident["style"]
    up = R @ np.array([0.0, -1.0, 0.0])
    up2 = up[:2] / (np.linalg.norm(up[:2]) + 1e-9)
    side = np.array([-up2[1], up2[0]])

    # Hair behind the head (long / medium styles reach the shoulders).
    if style in ("medium", "long", "bangs"):
        hl = ident["hair_len"] * (0.6 if style == "medium" else 1.0)
        hw = ident["hair_w"] * sp["jaw_w"] * scale
        top = centre + up2 * scale * (sp["head_h"] + 0.3)
        pts = [top + side * hw * 0.9 * fw, centre + side * hw * fw - up2 * scale * 0.2,
               centre + side * hw * 1.05 - up2 * scale * hl, centre - side * hw * 1.05 - up2 * scale * hl,
               centre - side * hw * fw - up2 * scale * 0.2, top - side * hw * 0.9 * fw]
        d.polygon(_hi(np.array(pts)), fill=hair_c)
        _ellipse(d, top - up2 * scale * 0.55, hw * 0.95 * max(fw, 0.8), scale * 0.75, fill=hair_c)
    d.polygon(_hi(body), fill=ident["cloth"])
    d.polygon(_hi(neck), fill=_col(skin * 0.8))
    # Ears: drawn before the face so the face occludes the far one when turned.
    for e in ears:
        _ellipse(d, e, 0.15 * scale, 0.3 * scale, fill=_col(skin * 0.92))
        if ident["earring"]:
            _ellipse(d, e + up2 * -0.32 * scale, 2.0, 2.0, fill=(230, 200, 60))
    # Scalp hair (short styles) sits behind the face outline too.
    if style != "bald":
        top = centre + up2 * scale * (sp["head_h"] * 0.55)
        _ellipse(d, top, sp["jaw_w"] * scale * 1.08 * max(fw, 0.75), sp["head_h"] * scale * 0.75, fill=hair_c)
    face = np.concatenate([lm[0:17], fore])
    d.polygon(_hi(face), fill=skin_c)

    # Nose: shadowed side line and nostrils.
    shade_side = 31 if yaw > 0 else 35
    d.line(_hi(np.stack([lm[28], lm[29], lm[shade_side]])), fill=_col(skin * 0.8), width=2)
    d.line(_hi(lm[31:36]), fill=_col(skin * 0.72), width=2)
    for a, b in ((31, 32), (34, 35)):
        _ellipse(d, 0.5 * (lm[a] + lm[b]) - up2 * 0.01 * scale, 0.035 * scale * fw, 0.022 * scale,
                 fill=_col(skin * 0.35))
    _ellipse(d, lm[30] - up2 * 0.02 * scale, 0.06 * scale, 0.04 * scale, fill=_col(skin * 1.1 + 8))

    if ident["beard"]:
        d.polygon(_hi(np.concatenate([lm[3:14], lm[[54, 55, 56, 57, 58, 59, 48]]])), fill=_col(ident["hair"] * 0.9))
    if ident["moustache"]:
        d.polygon(_hi(np.stack([lm[48], lm[31] + up2 * -0.02 * scale, lm[33] - up2 * 0.02 * scale,
                                lm[35] + up2 * -0.02 * scale, lm[54], lm[52], lm[51], lm[50]])),
                  fill=_col(ident["hair"] * 0.9))

    # Eyes: sclera, iris (clamped to the lid opening), pupil, lid lines.
    for sl, sign in ((slice(36, 42), -1), (slice(42, 48), 1)):
        e = lm[sl]
        ec = e.mean(0)
        opening = float(np.linalg.norm(0.5 * (e[1] + e[2]) - 0.5 * (e[4] + e[5])))
        width = float(np.linalg.norm(e[3] - e[0]))
        d.polygon(_hi(e), fill=_col(ident["sclera"]))
        ir = 0.27 * width
        c = ec + gaze * np.array([0.25 * width, 0.1 * opening])
        iry = min(ir, 0.55 * opening)
        _ellipse(d, c, ir, iry, fill=_col(ident["iris"]))
        _ellipse(d, c, ir * 0.45, min(ir * 0.45, 0.4 * opening), fill=(12, 10, 10))
        d.line(_hi(e[[0, 1, 2, 3]]), fill=(25, 18, 15), width=3)
        d.line(_hi(e[[3, 4, 5, 0]]), fill=_col(skin * 0.6), width=1)
    # Brows.
    bt = ident["brow_t"] * scale
    for sl in (slice(17, 22), slice(22, 27)):
        b = lm[sl]
        taper = np.linspace(0.6, 1.0, 5) if sl.start == 17 else np.linspace(1.0, 0.6, 5)
        d.polygon(_hi(_thick_polyline(b, bt * taper, bt * taper * 0.7)), fill=_col(ident["brow"]))
    # Mouth: lips, interior, teeth when open.
    d.polygon(_hi(lm[48:60]), fill=_col(ident["lip"]))
    inner = lm[60:68]
    if open_ > 0.015:
        d.polygon(_hi(inner), fill=(45, 15, 20))
        teeth = inner[[0, 1, 2, 3, 4]].copy()
        teeth_low = teeth - up2 * min(open_ * 0.45, 0.05) * scale
        d.polygon(_hi(np.concatenate([teeth, teeth_low[::-1]])), fill=(225, 220, 205))
    else:
        d.line(_hi(inner[[0, 1, 2, 3, 4]]), fill=_col(ident["lip"] * 0.5), width=2)

    # Front hair: fringe covering the upper forehead.
    if style != "bald":
        fr = fore.copy()
        lvl = ident["fringe"] if style == "bangs" else ident["hairline"]
        w = np.abs(np.linspace(-1, 1, len(fr)))
        drop = (1.0 - w ** 4) * lvl * scale
        inner_edge = fr - up2[None] * drop[:, None]
        d.polygon(_hi(np.concatenate([fr, inner_edge[::-1]])), fill=hair_c)

    if ident["glasses"]:
        lw, lh = ident["lens_w"] * scale * fw, ident["lens_h"] * scale
        cs = [lm[36:42].mean(0), lm[42:48].mean(0)]
        for c in cs:
            if ident["sunglasses"]:
                _ellipse(d, c, lw, lh, fill=(20, 20, 25))
            _ellipse(d, c, lw, lh, outline=ident["frame"], width=3)
        d.line(_hi(np.stack([cs[0] + side * lw, cs[1] - side * lw])), fill=ident["frame"], width=3)
        for c, e, s in ((cs[0], ears[0], -1), (cs[1], ears[1], 1)):
            d.line(_hi(np.stack([c + s * side * lw, e])), fill=ident["frame"], width=3)

    # Downsample (box filter = anti-aliasing), then shading, colour cast and noise in float.
    arr = np.asarray(img.reduce(_SS), dtype=np.float32)
    light = r.normal(0, 1, 2)
    light /= np.linalg.norm(light) + 1e-9
    strength = r.uniform(0.1, 0.45)
    rad = 1.3 * scale
    dx, dy = (_GRID_X - centre[0]) / rad, (_GRID_Y - centre[1]) / rad
    falloff = np.exp(-(dx * dx + dy * dy))
    shade = 1.0 + strength * (dx * light[0] + dy * light[1]) * falloff
    g = r.normal(0, 0.15, 2)
    shade *= (1.0 + g[0] * (_GRID_X / IMAGE_SIZE - 0.5) + g[1] * (_GRID_Y / IMAGE_SIZE - 0.5))
    gain = (math.exp(r.normal(0, 0.15)) * np.exp(r.normal(0, 0.04, 3))).astype(np.float32)
    o = r.integers(0, IMAGE_SIZE, 2)
    noise = _NOISE_BANK[o[0]:o[0] + IMAGE_SIZE, o[1]:o[1] + IMAGE_SIZE] * float(r.uniform(1.0, 6.0))
    out = arr * (shade[..., None] * gain) + noise
    return np.clip(out, 0, 255).astype(np.uint8), lm.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Data source.
# ----------------------------------------------------------------------------------------------------------

class SyntheticFaces:
    """Random-access source of synthetic faces (grain ``RandomAccessDataSource`` protocol).

    Items: dict with 'image' uint8 (136, 136, 3), 'landmarks' float32 (5, 2) MAFL order, 'landmarks68'
    float32 (68, 2) iBUG order (both xy in 136-px pixels), 'identity' int32, 'index' int64.
    """

    def __init__(self, split: str, seed: int = 0, num_examples: int | None = None, clutter: bool = True,
                 placement: str = "aligned"):
        """clutter=False (dataset name ``synthetic_plain``): the smooth background field only, without the
        random shapes drawn over it; faces, poses and landmarks are the same as with clutter.
        placement='wild' (dataset name ``synthetic_wild``): the same identities at poses and places of
        `PLACEMENTS['wild']`, the content benchmark."""
        if split not in SPLITS:
            raise ValueError(f"unknown synthetic split {split!r}; expected one of {SPLITS}")
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {placement!r}; expected one of {tuple(PLACEMENTS)}")
        self.placement = placement
        self.split = split
        self.seed = int(seed)
        self.num_examples = int(DEFAULT_SIZES[split] if num_examples is None else num_examples)
        self.clutter = bool(clutter)
        if not 0 <= self.num_examples <= _IMAGES_PER_ID[split] * 100_000_000:
            raise ValueError(f"num_examples out of range: {self.num_examples}")

    def __len__(self) -> int:
        return self.num_examples

    def __repr__(self) -> str:
        plain = "" if self.clutter else ", clutter=False"
        wild = "" if self.placement == "aligned" else f", placement={self.placement!r}"
        return (f"SyntheticFaces(split={self.split!r}, seed={self.seed}, num_examples={self.num_examples}"
                f"{plain}{wild})")

    def identity_of(self, index: int) -> int:
        return _ID_BASE[self.split] + index // _IMAGES_PER_ID[self.split]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if index < 0:
            index += self.num_examples
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self!r}")
        identity = self.identity_of(index)
        ident = _identity_params(self.seed, identity)
        r = np.random.default_rng([self.seed, 11, _SPLIT_ID[self.split], index])
        image, lm68 = _render(ident, r, self.clutter, self.placement)
        return {
            "image": image,
            "landmarks": mafl_from_68(lm68).astype(np.float32),
            "landmarks68": lm68,
            "identity": np.int32(identity),
            "index": np.int64(index),
        }


def benchmark(n: int = 300, split: str = "train") -> float:
    """Single-threaded images per second at 136 px."""
    import time

    src = SyntheticFaces(split, num_examples=max(n, 1))
    src[0]
    t = time.perf_counter()
    for i in range(n):
        src[i]
    return n / (time.perf_counter() - t)


if __name__ == "__main__":
    print(f"{benchmark():.0f} images/s (single thread, 136 px)")
