"""Prepares one real dataset (all its splits) as array_record files.

    python -m sce_mae_jax.data.prepare --dataset=mafl --manual_dir=/data/celeba --data_dir=/data/tfds

Datasets: celeba, mafl, aflw_m, aflw_r, aflw_rc, 300w; manual_dir layouts in docs/datasets.md.
"""

from __future__ import annotations

import argparse
import sys

from sce_mae_jax.data import sources


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m sce_mae_jax.data.prepare', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dataset', required=True, choices=sorted(sources.DATASETS))
    parser.add_argument('--manual_dir', required=True, help='folder with the raw files (docs/datasets.md)')
    parser.add_argument('--data_dir', default=None, help='output folder (TFDS default ~/tensorflow_datasets)')
    args = parser.parse_args(argv)
    try:
        builder = sources.prepare(args.dataset, manual_dir=args.manual_dir, data_dir=args.data_dir)
    except sources.DatasetError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    sizes = {split: info.num_examples for split, info in builder.info.splits.items()}
    print(f'{args.dataset}: prepared in {builder.data_dir}: {sizes}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
