"""Prepares one dataset (all its splits) as array_record files.

    python -m sce_mae_jax.data.prepare --dataset=mafl --manual_dir=/data/celeba --data_dir=/data/tfds
    python -m sce_mae_jax.data.prepare --dataset=synthetic --data_dir=/data/tfds [--seed=0] [--num_examples=N]

Datasets: celeba, mafl, aflw_m, aflw_r, aflw_rc, 300w (manual_dir layouts in docs/datasets.md), and synthetic,
synthetic_plain, synthetic_wild: the generator's faces rendered once, which training then reads from --config.data_dir instead
of rendering them every step (needs no manual_dir; --seed is --config.data_seed). Run on a dataset prepared
already, it only rewrites shards that are still compressed (faster reads; the same records).
"""

from __future__ import annotations

import argparse
import sys

from sce_mae_jax.data import sources


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m sce_mae_jax.data.prepare', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    synthetic = tuple(sources.SYNTHETIC_VARIANTS)
    parser.add_argument('--dataset', required=True, choices=sorted(sources.DATASETS) + list(synthetic))
    parser.add_argument('--manual_dir', default=None, help='folder with the raw files (docs/datasets.md); '
                        'required for the real datasets')
    parser.add_argument('--data_dir', default=None, help='output folder (TFDS default ~/tensorflow_datasets)')
    parser.add_argument('--seed', type=int, default=0, help='synthetic only: the generator seed (data_seed)')
    parser.add_argument('--num_examples', type=int, default=None,
                        help='synthetic only: at most this many faces per split (default: each split\'s size)')
    args = parser.parse_args(argv)
    if args.dataset not in synthetic and args.manual_dir is None:
        parser.error(f'--manual_dir is required for --dataset={args.dataset}')
    try:
        if args.dataset in synthetic:
            builder = sources.prepare_synthetic(args.dataset, data_dir=args.data_dir, seed=args.seed,
                                                num_examples=args.num_examples)
        else:
            builder = sources.prepare(args.dataset, manual_dir=args.manual_dir, data_dir=args.data_dir)
    except sources.DatasetError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    sources.store_uncompressed(builder)  # also a dataset prepared before shards were stored uncompressed
    sizes = {split: info.num_examples for split, info in builder.info.splits.items()}
    print(f'{args.dataset}: prepared in {builder.data_dir}: {sizes}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
