r"""Landmarks and correspondences of a trained model on your own images.

    python -m sce_mae_jax.predict --model=/tmp/sce_mae_quickstart --images=faces/ --out=pred [--overlays]
    python -m sce_mae_jax.predict --model=MODEL_DIR --images='faces/*.jpg' --out=pred --crop=none
    python -m sce_mae_jax.predict --model=MODEL_DIR --images=photos/ --boxes=boxes.csv --out=pred
    python -m sce_mae_jax.predict --model=MODEL_DIR --match a.jpg b.png [--points='40,52;61,50'] --out=pred

--model: a quick-start workdir or an export (`python -m sce_mae_jax.export`); see `landmarker.py`.
--images: a folder (its files), a glob or one file; JPEG, PNG or anything Pillow reads, any size. A file
that is not an image, is truncated or is empty gets one line naming it and is skipped; the exit status is
non-zero only when no image could be read.
--crop / --boxes: how a face is placed in the model's frame (`data/framing.py`): `center` (default) takes the
largest centred square through the training data's resize and crop, `none` resizes the whole image to the
model input; a CSV of `file,x0,y0,x1,y1` face boxes (x1, y1 one past the last pixel; `file` the name as
listed, or its base name) uses the 300W protocol's window around each box, and --crop for files it lacks.
Writes OUT/landmarks.csv (a header, then per image its file and x, y of every landmark in the image's own
pixels), OUT/landmarks.json (the same with each image's size and model window, the skipped files and the model)
and with --overlays OUT/overlays/<name>.png. --match writes OUT/match.png (matches and similarity maps).
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys

import numpy as np

from sce_mae_jax.data import framing


def list_files(spec: str) -> tuple[list[tuple[str, str]], str]:
    """(path, name written to the outputs) of every file `spec` names: a folder's files (hidden ones
    left out), a glob's matches, or one file; and what was searched, for messages."""
    if os.path.isdir(spec):
        names = sorted(n for n in os.listdir(spec) if not n.startswith('.')
                       and os.path.isfile(os.path.join(spec, n)))
        return [(os.path.join(spec, n), n) for n in names], f'folder {spec}'
    if os.path.isfile(spec):
        return [(spec, os.path.basename(spec))], spec
    return [(p, p) for p in sorted(glob.glob(spec)) if os.path.isfile(p)], f'glob {spec}'


def read_image(path: str) -> tuple[np.ndarray | None, str]:
    """(H, W, 3) uint8 RGB, or None and why not. Decoding the whole file is what finds a truncated one."""
    from PIL import Image, UnidentifiedImageError
    if os.path.getsize(path) == 0:
        return None, 'empty file'
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert('RGB')), ''
    except UnidentifiedImageError:
        return None, 'not an image Pillow can read'
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data raises while decoding
        return None, f'unreadable image data ({" ".join(str(e).split())})'


def read_boxes(path: str) -> dict[str, tuple[float, ...]]:
    """file → (x0, y0, x1, y1) from a CSV; a first line that is not numbers is a header."""
    out = {}
    with open(path, newline='') as f:
        for i, row in enumerate(csv.reader(f)):
            if not row or row[0].startswith('#'):
                continue
            try:
                box = tuple(float(v) for v in row[1:5])
            except ValueError:
                if i == 0:
                    continue
                raise SystemExit(f'error: {path} line {i + 1}: expected file,x0,y0,x1,y1, got {",".join(row)}')
            if len(box) != 4:
                raise SystemExit(f'error: {path} line {i + 1}: expected file,x0,y0,x1,y1, got {",".join(row)}')
            out[row[0]] = box
    return out


def parse_points(spec: str) -> np.ndarray:
    try:
        pts = np.array([[float(v) for v in p.split(',')] for p in spec.split(';') if p.strip()], np.float64)
    except ValueError:
        pts = np.zeros((0, 3))
    if pts.ndim != 2 or pts.shape[1] != 2 or not len(pts):
        raise SystemExit(f'error: --points={spec!r}: expected x1,y1;x2,y2;... in the source image\'s pixels')
    return pts


def predict_folder(lm, args) -> int:
    files, what = list_files(args.images)
    if not files:
        raise SystemExit(f'error: no file in {what}')
    boxes = read_boxes(args.boxes) if args.boxes else {}
    crops, kept, skipped = [], [], []
    for path, name in files:
        image, why = read_image(path)
        if image is None:
            print(f'skipped {path}: {why}', flush=True)
            skipped.append({'file': name, 'reason': why})
            continue
        box = boxes.get(name, boxes.get(os.path.basename(path)))
        frame = framing.frame_for(image.shape[:2], lm.size, args.crop, box)
        crops.append(framing.to_model_image(image, frame))
        kept.append({'file': name, 'path': path, 'width': image.shape[1], 'height': image.shape[0], 'box': box,
                     'frame': frame})
    if not kept:
        print(f'predict: read 0 images, skipped {len(skipped)} in {what}', flush=True)
        raise SystemExit(f'error: no image could be read from {what}')
    # every image in one call: one batch size, so one compilation
    points = lm.landmarks_in_model_frame(np.stack(crops))
    os.makedirs(args.out, exist_ok=True)
    k = points.shape[1]
    records = []
    with open(os.path.join(args.out, 'landmarks.csv'), 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['file', *[c for i in range(k) for c in (f'x{i}', f'y{i}')]])
        for item, p in zip(kept, points):
            xy = item['frame'].to_original(p)
            w.writerow([item['file'], *[f'{v:.2f}' for v in xy.reshape(-1)]])
            fr = item['frame']
            records.append({'file': item['file'], 'width': item['width'], 'height': item['height'],
                            'window': {'top': fr.top, 'left': fr.left, 'height': fr.height, 'width': fr.width},
                            'box': item['box'], 'landmarks': np.round(xy, 3).tolist()})
            item['xy'] = xy
    with open(os.path.join(args.out, 'landmarks.json'), 'w') as f:
        json.dump({'model': lm.describe(), 'crop': args.crop, 'boxes': args.boxes or None, 'read': len(kept),
                   'skipped': skipped, 'images': records}, f, indent=1)
    if args.overlays:
        from sce_mae_jax import predict_figures
        d = os.path.join(args.out, 'overlays')
        os.makedirs(d, exist_ok=True)
        used = set()
        for item in kept:
            stem = os.path.splitext(os.path.basename(item['file']))[0]
            name, n = stem, 1
            while name in used:  # a glob over several folders may repeat a name
                n += 1
                name = f'{stem}_{n}'
            used.add(name)
            fr = item['frame']
            predict_figures.overlay(read_image(item['path'])[0], item['xy'], (fr.top, fr.left, fr.height, fr.width)
                                    ).save(os.path.join(d, f'{name}.png'))
    print(f'predict: read {len(kept)} images, skipped {len(skipped)}; {k} landmarks each ({lm.regressor_name}) '
          f'→ {os.path.join(args.out, "landmarks.csv")}, landmarks.json'
          + (', overlays/' if args.overlays else ''), flush=True)
    return 0


def match_pair(lm, args) -> int:
    images = []
    for path in args.match:
        image, why = read_image(path) if os.path.isfile(path) else (None, 'no such file')
        if image is None:
            raise SystemExit(f'error: --match {path}: {why}')
        images.append(image)
    boxes = read_boxes(args.boxes) if args.boxes else {}
    given = [boxes.get(p, boxes.get(os.path.basename(p))) for p in args.match]
    if (given[0] is None) != (given[1] is None):
        raise SystemExit('error: --boxes has a box for one image of --match but not the other; give both')
    points = parse_points(args.points) if args.points else None
    result = lm.correspondences(images[0], images[1], points, args.crop, None if given[0] is None else given)
    src, tgt = args.match
    for i, (p, q, out) in enumerate(zip(result['source_points'], result['target_points'], result['outside'])):
        note = '  (outside the model\'s view of the source: its nearest edge pixel was used)' if out else ''
        print(f'point {i}: {src} ({p[0]:.1f}, {p[1]:.1f}) → {tgt} ({q[0]:.1f}, {q[1]:.1f}){note}')
    os.makedirs(args.out, exist_ok=True)
    from sce_mae_jax import predict_figures
    path = os.path.join(args.out, 'match.png')
    predict_figures.match_figure(result).save(path)
    print(f'predict: {len(result["source_points"])} points matched with the {lm.match_row.name} features → {path}')
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m sce_mae_jax.predict', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', required=True, help='quick-start workdir or exported model directory')
    p.add_argument('--images', help='folder, glob or file')
    p.add_argument('--match', nargs=2, metavar=('SRC', 'TGT'), help='two images: where points of SRC land in TGT')
    p.add_argument('--points', help="with --match: 'x1,y1;x2,y2' in SRC's pixels (default: its landmarks)")
    p.add_argument('--out', default='predictions', help='output folder (default: predictions)')
    p.add_argument('--crop', default='center', choices=framing.CROPS)
    p.add_argument('--boxes', help='CSV of file,x0,y0,x1,y1 face boxes')
    p.add_argument('--overlays', action='store_true', help='write OUT/overlays/<name>.png')
    p.add_argument('--regressor', help='SET/ROW of the detection regressor (default: the first set, sce_mae)')
    p.add_argument('--batch_size', type=int, default=32)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if bool(args.images) == bool(args.match):
        raise SystemExit('error: give --images=PATH (landmarks) or --match SRC TGT (correspondences)')
    from absl import logging
    logging.set_verbosity(logging.ERROR)  # orbax warns on every training checkpoint it reads params from
    from sce_mae_jax.errors import ConfigError
    from sce_mae_jax.landmarker import Landmarker
    try:
        lm = Landmarker.load(args.model, regressor=args.regressor, batch_size=args.batch_size)
        return predict_folder(lm, args) if args.images else match_pair(lm, args)
    except (ConfigError, ValueError) as e:
        raise SystemExit(f'error: {e}')


if __name__ == '__main__':
    sys.exit(main())
