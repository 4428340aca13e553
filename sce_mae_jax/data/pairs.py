"""Matching pairs for the landmark-matching benchmark (method.md §4, paper Table 1).

The protocol's numbers are only comparable if every model sees the *same* pairs, so pairs are generated once,
deterministically from (source, seed), and stored; pairs produced by other code bases can be imported into the
same layout.

Construction (CL/DVE): images of the source in index order, two at a time, A = 2b and B = 2b+1 (different
identities).  Per b, three independent random TPS warps w1, w2, w3 (seeded by (seed, b)):
  same-identity target = w1(A),   source = w2(w1(A))  ("A warped twice"),   different-identity target = w3(B).
Pair 2b is (source, same target), pair 2b+1 is (source, different target).  Warps are applied at 136 px with
landmarks moved to the nearest output pixel (the source's through the exact composite w1∘w2 map, so its
rounding error does not compound), then everything is centre-cropped to 96 px.

Stored layout (``.npz``), P pairs:
  src_images, tgt_images      uint8   (P, 96, 96, 3)
  src_landmarks, tgt_landmarks float32 (P, 5, 2)   xy in 96-px pixels, pixel (r, c) centred at (x=c, y=r)
  kind                        int8    (P,)         0 = same identity, 1 = different identity
Optional: src_index, tgt_index int64 (P,) (source indices of the underlying images).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Mapping

import numpy as np

from sce_mae_jax.data import tps

FULL = 136
CROP = 96
_OFF = (FULL - CROP) // 2

LAYOUT = (
    "src_images uint8 (P,96,96,3), tgt_images uint8 (P,96,96,3), src_landmarks float32 (P,5,2) xy, "
    "tgt_landmarks float32 (P,5,2) xy, kind int8 (P,) with 0=same identity, 1=different identity"
)
_SPEC = {
    "src_images": (np.uint8, (CROP, CROP, 3)),
    "tgt_images": (np.uint8, (CROP, CROP, 3)),
    "src_landmarks": (np.float32, (None, 2)),
    "tgt_landmarks": (np.float32, (None, 2)),
    "kind": (np.int8, ()),
}


def _crop(img: np.ndarray, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return img[_OFF:_OFF + CROP, _OFF:_OFF + CROP], (pts - _OFF).astype(np.float32)


def make_matching_pairs(source: Any, num_images: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """Builds num_images/2 same-identity + num_images/2 different-identity pairs from source[0:num_images]."""
    if num_images % 2 or num_images < 2:
        raise ValueError(f"num_images must be a positive even number, got {num_images}")
    if len(source) < num_images:
        raise ValueError(f"source has {len(source)} images, {num_images} requested")
    n = num_images  # one same + one different pair per image couple -> n pairs
    out = {
        "src_images": np.zeros((n, CROP, CROP, 3), np.uint8),
        "tgt_images": np.zeros((n, CROP, CROP, 3), np.uint8),
        "src_landmarks": None, "tgt_landmarks": None,
        "kind": np.tile(np.array([0, 1], np.int8), n // 2),
        "src_index": np.repeat(np.arange(0, n, 2, dtype=np.int64), 2),
        "tgt_index": np.arange(n, dtype=np.int64),
    }
    src_lm, tgt_lm = [], []
    for b in range(n // 2):
        a_item, b_item = source[2 * b], source[2 * b + 1]
        rng = np.random.default_rng([seed, b])
        w1, w2, w3 = (tps.random_tps(rng) for _ in range(3))
        a_img = np.asarray(a_item["image"])
        if a_img.shape != (FULL, FULL, 3):
            raise ValueError(f"source images must be uint8 ({FULL},{FULL},3), got {a_img.shape}")
        a_pts = np.asarray(a_item["landmarks"])
        same_img, same_pts = tps.warp_example(a_img, a_pts, w1)
        src_img = tps.warp_image(same_img, w2)
        # Source points through the exact composite map (one nearest-pixel rounding, not two compounding).
        src_pts = tps.warp_points_composite(a_pts, w1, w2, (FULL, FULL))
        diff_img, diff_pts = tps.warp_example(np.asarray(b_item["image"]), np.asarray(b_item["landmarks"]), w3)
        src_img, src_pts = _crop(src_img, src_pts)
        for k, (t_img, t_pts) in enumerate(((same_img, same_pts), (diff_img, diff_pts))):
            t_img, t_pts = _crop(t_img, t_pts)
            out["src_images"][2 * b + k] = src_img
            out["tgt_images"][2 * b + k] = t_img
            src_lm.append(src_pts)
            tgt_lm.append(t_pts)
    out["src_landmarks"] = np.stack(src_lm).astype(np.float32)
    out["tgt_landmarks"] = np.stack(tgt_lm).astype(np.float32)
    return out


def validate_pairs(pairs: Mapping[str, np.ndarray], where: str = "pairs") -> dict[str, np.ndarray]:
    """Checks keys, dtypes and shapes; returns a plain dict. Raises ValueError naming the problem."""
    missing = [k for k in _SPEC if k not in pairs]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; expected layout: {LAYOUT}")
    out = {k: np.asarray(pairs[k]) for k in pairs}
    p = len(out["kind"])
    for k, (dtype, tail) in _SPEC.items():
        a = out[k]
        ok = a.dtype == dtype and a.ndim == 1 + len(tail) and a.shape[0] == p and all(
            t is None or t == s for t, s in zip(tail, a.shape[1:]))
        if not ok:
            raise ValueError(f"{where}: key {k!r} has dtype {a.dtype} shape {a.shape}, expected {np.dtype(dtype)} "
                             f"(P={p},{','.join('L' if t is None else str(t) for t in tail)}); "
                             f"expected layout: {LAYOUT}")
    if out["src_landmarks"].shape != out["tgt_landmarks"].shape:
        raise ValueError(f"{where}: src_landmarks {out['src_landmarks'].shape} and tgt_landmarks "
                         f"{out['tgt_landmarks'].shape} differ; expected layout: {LAYOUT}")
    if not np.isin(out["kind"], (0, 1)).all():
        raise ValueError(f"{where}: 'kind' must contain only 0 (same) and 1 (different)")
    return out


def save_pairs(path: str | os.PathLike, pairs: Mapping[str, np.ndarray]) -> None:
    """Validates and writes ``pairs`` atomically (temp file + os.replace), so a crash never leaves a torn file."""
    pairs = validate_pairs(pairs)
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".pairs-", suffix=".npz.tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **pairs)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_pairs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a pairs ``.npz`` written by ``save_pairs`` (or any file in that layout) and validates it."""
    try:
        with np.load(os.fspath(path), allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:  # not a zip / truncated / pickled content
        raise ValueError(f"{path}: not a readable pairs .npz ({e}); expected layout: {LAYOUT}") from e
    return validate_pairs(data, where=os.fspath(path))


def get_or_make_pairs(source: Any, cache_path: str | os.PathLike, num_images: int = 1000,
                      seed: int = 0) -> dict[str, np.ndarray]:
    """Loads the stored pairs if ``cache_path`` exists, else generates them once and stores them."""
    if os.path.exists(cache_path):
        pairs = load_pairs(cache_path)
        if len(pairs["kind"]) != num_images:
            raise ValueError(f"{cache_path} holds {len(pairs['kind'])} pairs, {num_images} requested; "
                             "delete it or point cache_path elsewhere")
        return pairs
    pairs = make_matching_pairs(source, num_images=num_images, seed=seed)
    save_pairs(cache_path, pairs)
    return pairs


def import_pairs(data: str | os.PathLike | Mapping[str, Any], *, key_map: Mapping[str, str] | None = None,
                 point_order: str = "xy", channels_first: bool | None = None, frame: int = CROP,
                 one_based: bool = False, kind: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Converts pairs made elsewhere (a ``.npz`` path or a mapping of arrays) into this module's layout.

    key_map: our key -> their key (e.g. {'src_images': 'im1'}).  point_order: 'xy' or 'yx'.
    channels_first: images stored (P, 3, H, W); None detects it.  frame: 96 if the pairs are already cropped,
    136 if they are in the full protocol frame (they are then centre-cropped).  one_based: Matlab-style points.
    Float images in [0, 1] are scaled to [0, 255].  kind: supply it if the file does not store it.
    """
    if point_order not in ("xy", "yx"):
        raise ValueError(f"point_order must be 'xy' or 'yx', got {point_order!r}")
    if frame not in (CROP, FULL):
        raise ValueError(f"frame must be {CROP} or {FULL}, got {frame}")
    if isinstance(data, (str, os.PathLike)):
        with np.load(os.fspath(data), allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    key_map = dict(key_map or {})
    out: dict[str, np.ndarray] = {}
    for ours in _SPEC:
        theirs = key_map.get(ours, ours)
        if theirs in data:
            out[ours] = np.asarray(data[theirs])
    if kind is not None:
        out["kind"] = np.asarray(kind)
    missing = [k for k in _SPEC if k not in out]
    if missing:
        raise ValueError(f"import: missing key(s) {missing} (after key_map {key_map}); expected layout: {LAYOUT}")
    for k in ("src_images", "tgt_images"):
        im = out[k]
        if im.ndim != 4:
            raise ValueError(f"import: {k} must be 4-D (P,H,W,3) or (P,3,H,W), got {im.shape}")
        cf = channels_first if channels_first is not None else (im.shape[1] == 3 and im.shape[-1] != 3)
        if cf:
            im = np.transpose(im, (0, 2, 3, 1))
        if np.issubdtype(im.dtype, np.floating):
            im = im * 255.0 if im.max() <= 1.0 + 1e-6 else im
            im = np.clip(np.rint(im), 0, 255)
        im = im.astype(np.uint8)
        if frame == FULL:
            im = im[:, _OFF:_OFF + CROP, _OFF:_OFF + CROP]
        out[k] = im
    for k in ("src_landmarks", "tgt_landmarks"):
        p = out[k].astype(np.float32)
        if point_order == "yx":
            p = p[..., ::-1]
        if one_based:
            p = p - 1.0
        if frame == FULL:
            p = p - _OFF
        out[k] = np.ascontiguousarray(p, dtype=np.float32)
    out["kind"] = out["kind"].astype(np.int8)
    return validate_pairs(out, where="import")
