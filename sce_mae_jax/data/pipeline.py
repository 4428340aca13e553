"""grain input pipelines: per-process sharding, per-epoch shuffling, resumable iterator state, augmentation.

Every source yields 136-px uint8 images (see `sources.py`); pipelines emit uint8 (batch, 96, 96, 3) so the
host→device copy is a quarter of float32, and the jitted step normalises with `normalize`. With
`input.device_augment` the training pipelines emit the 136-px images as read (`_LocalBatches`) and the step
crops, resizes and flips them on the devices (data/device_augment.py).
"""
from __future__ import annotations

import ctypes
from typing import Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from sce_mae_jax.data import worker_transport

# CelebA statistics (method.md §1), used for every dataset so that features are comparable across them.
MEAN_RGB = (0.5084, 0.4224, 0.3769)
STD_RGB = (0.2599, 0.2371, 0.2323)


def normalize(images_uint8: jax.Array, dtype=jnp.float32) -> jax.Array:
    """uint8 (..., 3) → float (x/255 − mean)/std; runs inside the jitted step."""
    x = images_uint8.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(MEAN_RGB)) / jnp.asarray(STD_RGB)
    return x.astype(dtype)


def denormalize(images: np.ndarray) -> np.ndarray:
    """Inverse of `normalize`, to uint8, for figures."""
    x = np.asarray(images, np.float32) * np.asarray(STD_RGB) + np.asarray(MEAN_RGB)
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Centre crop (H, W, C) → (size, size, C); for 136 → 96 this removes 20 px each side (DVE protocol)."""
    top = (image.shape[0] - size) // 2
    left = (image.shape[1] - size) // 2
    return image[top:top + size, left:left + size]


def random_crop_box(height: int, width: int, rng: np.random.Generator, scale=(0.2, 1.0),
                    ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (10 tries, then a centre crop): (left, top, right, bottom) pixels."""
    area = height * width
    log_ratio = np.log(ratio)
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(*log_ratio))
        cw = int(round(np.sqrt(target_area * aspect)))
        ch = int(round(np.sqrt(target_area / aspect)))
        if 0 < cw <= width and 0 < ch <= height:
            top = int(rng.integers(0, height - ch + 1))
            left = int(rng.integers(0, width - cw + 1))
            return left, top, left + cw, top + ch
    in_ratio = width / height
    cw, ch = (width, int(round(width / ratio[0]))) if in_ratio < ratio[0] else (
        (int(round(height * ratio[1])), height) if in_ratio > ratio[1] else (width, height))
    left, top = (width - cw) // 2, (height - ch) // 2
    return left, top, left + cw, top + ch


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator,
                        scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """`random_crop_box`, resized to size x size, bicubic as in the MAE recipe."""
    box = random_crop_box(image.shape[0], image.shape[1], rng, scale, ratio)
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC, box=box))


def pretrain_augment(size: int, scale=(0.2, 1.0), flip: bool = True) -> Callable:
    """Stage-1 augmentation (method.md §1 decision): random resized crop to `size` + horizontal flip."""
    def fn(example, rng: np.random.Generator):
        img = random_resized_crop(example['image'], size, rng, scale=tuple(scale))
        if flip and rng.uniform() < 0.5:
            img = img[:, ::-1]
        return {'image': np.ascontiguousarray(img)}
    return fn


STAGE2_AUGMENTATIONS = ('none', 'cl')


def colour_jitter(image: np.ndarray, rng: np.random.Generator, strength: float = 0.4) -> np.ndarray:
    """Brightness, contrast and saturation each scaled by a factor uniform in [1 − s, 1 + s], in that order
    (torchvision's ColorJitter(s, s, s) without its random order or hue): uint8 (H, W, 3) → uint8."""
    x = image.astype(np.float32)
    b, c, sat = rng.uniform(1.0 - strength, 1.0 + strength, 3)
    x = x * b
    x = (x - x.mean()) * c + x.mean()
    grey = (x @ np.asarray([0.299, 0.587, 0.114], np.float32))[..., None]
    x = (x - grey) * sat + grey
    return np.clip(x, 0, 255).astype(np.uint8)


def stage2_augment(size: int, augment: str = 'none', flip: bool = False) -> Callable:
    """Stage-2 input: 'none' the centre crop (the evaluation's frame); 'cl' the augmentation of CL's projector
    training (`do_augmentations`): a random resized crop (scale 0.2-1) to `size` and colour jitter (0.4). Then
    an optional horizontal flip. CL's PCA lighting and JPEG noise are not reproduced."""
    if augment not in STAGE2_AUGMENTATIONS:
        raise ValueError(f'input.augment={augment!r} must be one of {STAGE2_AUGMENTATIONS}')
    crop = eval_transform(size)

    def fn(example, rng: np.random.Generator):
        if augment == 'cl':
            img = colour_jitter(random_resized_crop(example['image'], size, rng, scale=(0.2, 1.0)), rng)
        else:
            img = crop({'image': example['image']})['image']
        if flip and rng.uniform() < 0.5:
            img = img[:, ::-1]
        return {'image': np.ascontiguousarray(img)}
    return fn


def eval_transform(size: int) -> Callable:
    """Centre crop to the model frame; landmarks (if any) move with it."""
    def fn(example):
        img = example['image']
        out = {'image': np.ascontiguousarray(center_crop(img, size))}
        if 'landmarks' in example:
            off = (img.shape[1] - size) // 2, (img.shape[0] - size) // 2
            out['landmarks'] = (example['landmarks'] - np.asarray(off, np.float32)).astype(np.float32)
        return out
    return fn


class _ShuffledEpochs:
    """`source` repeated without end, each epoch in its own order: a permutation drawn from (seed, epoch), so
    the order is a function of the global position alone (resume, any process count). grain's `shuffle()`
    computes its permutation index by index, 0.07 ms each (docs/benchmarks.md, input pipeline): as much as
    reading and decoding the record; a whole permutation per epoch costs ~1 ms per 100,000 examples."""

    def __init__(self, source, seed: int):
        self.source, self.seed, self.n = source, seed, len(source)
        self._epoch = (-1, None)

    def __len__(self):
        return self.n * 1_000_000  # epochs enough for any run; grain needs a length

    def order(self, epoch: int) -> np.ndarray:
        cached, perm = self._epoch  # one tuple, swapped whole: safe under grain's read threads
        if cached != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch = (epoch, perm)
        return perm

    def record(self, k) -> int:
        """The source index at global position k."""
        k = int(k)
        return int(self.order(k // self.n)[k % self.n])

    def __getitem__(self, k):
        return self.source[self.record(k)]


class _ProcessSlice:
    """This process's view of a global example stream: rows [offset, offset + local) of every global batch.

    Shuffling and augmentation are keyed by the *global* position, so the global batch at every step is the
    same whatever the number of processes (a 2-host run reproduces a 1-host run), and each host reads only
    its own examples.
    """

    def __init__(self, ds, global_batch: int, local_batch: int, offset: int):
        self.ds, self.global_batch, self.local_batch, self.offset = ds, global_batch, local_batch, offset

    def __len__(self):
        return len(self.ds) // self.global_batch * self.local_batch

    def __getitem__(self, k):
        return self.ds[(k // self.local_batch) * self.global_batch + self.offset + k % self.local_batch]


class _LocalBatches:
    """Batch k of this process: its rows of global batch k of `examples`, images only. One grain element per
    batch rather than per image: grain's own bookkeeping per element (its getitem chain, the batching tree_map)
    cost as much as reading and decoding the image (docs/benchmarks.md, input pipeline). A prepared source reads
    the batch's images in one call (`read_images`: TFDS's decoding of every feature of every record cost more
    than the read), any other item by item. The same batches as `_ProcessSlice` → the image alone → `batch`."""

    def __init__(self, examples: _ShuffledEpochs, global_batch: int, local_batch: int, offset: int):
        self.examples, self.global_batch, self.local_batch, self.offset = examples, global_batch, local_batch, offset
        self._read_images = getattr(examples.source, 'read_images', None)

    def __len__(self):
        return len(self.examples) // self.global_batch

    def __getitem__(self, k):
        first = int(k) * self.global_batch + self.offset
        positions = range(first, first + self.local_batch)
        if self._read_images is not None:
            return {'image': self._read_images([self.examples.record(p) for p in positions])}
        return {'image': np.stack([self.examples[p]['image'] for p in positions])}


def keep_freed_memory(*_) -> None:
    """Lets this process reuse the memory of freed batches. By default glibc returns a freed multi-megabyte
    block to the kernel (or serves the next one from a fresh mapping), so every batch's pages were faulted in
    and zeroed again: 1,700 page faults per batch of 64 136-px images, and half the in-process pipeline's rate
    (docs/benchmarks.md, input pipeline). Above both thresholds (256 MB kept, 64 MB mapped) a batch reuses a
    freed one. Called for every training iterator, in this process and in grain's workers (the signature of a
    `worker_init_fn`); a no-op where there is no glibc `mallopt`."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    mallopt(m_trim_threshold, 256 << 20)
    mallopt(m_mmap_threshold, 64 << 20)


def train_iterator(source, *, global_batch: int, seed: int, transform: Callable | None, random: bool = True,
                   num_workers: int = 0, num_threads: int = 1):
    """Infinite, epoch-shuffled iterator of this process's slice of each global batch, with
    `get_state`/`set_state` (checkpointed with orbax). `transform` is `fn(example, rng)` when `random` else
    `fn(example)`; its rng depends on (seed, global position) only. None: the image as read, without the
    per-example generator a random transform costs.

    `num_threads` read threads in each worker process (in this process without workers): on page-cached
    shards one thread was fastest, 3,881 ± 210 images/s against 2,854 ± 163 with 8, and equal with 2 workers
    (docs/benchmarks.md, input pipeline); more help only where each read waits on remote storage.
    """
    pc, pi = jax.process_count(), jax.process_index()
    if global_batch % pc:
        raise ValueError(f'batch_size={global_batch} must be divisible by the number of processes ({pc})')
    if len(source) < global_batch:
        raise ValueError(f'the dataset has {len(source)} examples, fewer than one batch ({global_batch}); '
                         'lower --config.batch_size or use a bigger split')
    local_batch = global_batch // pc
    if transform is None:  # the images as read: whole batches as single elements
        ds = grain.MapDataset.source(_LocalBatches(_ShuffledEpochs(source, seed), global_batch, local_batch,
                                                   pi * local_batch))
    else:
        ds = grain.MapDataset.source(_ShuffledEpochs(source, seed)).seed(seed)
        ds = ds.random_map(transform) if random else ds.map(transform)
        ds = grain.MapDataset.source(_ProcessSlice(ds, global_batch, local_batch, pi * local_batch))
        ds = ds.batch(local_batch, drop_remainder=True)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads))
    keep_freed_memory()
    if num_workers > 0:
        it_ds = it_ds.map(worker_transport.to_ring).mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers), worker_init_fn=_init_worker)
        it_ds = it_ds.map(worker_transport.RingReader())
    return iter(it_ds)


def _init_worker(index: int, count: int) -> None:
    keep_freed_memory()
    worker_transport.init_worker(index, count)


class _Padded:
    """`source` extended to `total` examples by repeating example 0 with `_mask` False, so every global batch of
    an evaluation is full and each real example counts exactly once."""

    def __init__(self, source, total: int, transform: Callable | None):
        self.source, self.total, self.transform = source, total, transform

    def __len__(self):
        return self.total

    def __getitem__(self, k):
        real = k < len(self.source)
        item = self.source[k if real else 0]
        item = dict(self.transform(item) if self.transform is not None else item)
        item['_mask'] = np.bool_(real)
        return item


def eval_iterator(source, *, global_batch: int, transform: Callable | None = None, num_threads: int = 8):
    """One pass over `source` in order: this process's slice of each global batch, the last batch padded
    (`_mask` False on padding). Returns (iterator, number of global batches). Every process gets the same
    number of batches, so collectives in the evaluation step line up."""
    pc, pi = jax.process_count(), jax.process_index()
    if global_batch % pc:
        raise ValueError(f'batch_size={global_batch} must be divisible by the number of processes ({pc})')
    num_batches = -(-len(source) // global_batch)
    local_batch = global_batch // pc
    ds = grain.MapDataset.source(_Padded(source, num_batches * global_batch, transform))
    ds = grain.MapDataset.source(_ProcessSlice(ds, global_batch, local_batch, pi * local_batch))
    ds = ds.batch(local_batch, drop_remainder=True)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads))
    return iter(it), num_batches


class ArraySource:
    """In-memory random-access source over a dict of equally long arrays (tests, imported pairs)."""

    def __init__(self, **arrays):
        lens = {len(v) for v in arrays.values()}
        if len(lens) != 1:
            raise ValueError(f'arrays differ in length: { {k: len(v) for k, v in arrays.items()} }')
        self.arrays = arrays

    def __len__(self):
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.arrays.items()}
