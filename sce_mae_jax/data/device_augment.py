"""The training augmentations on the devices, inside the jitted step (`input.device_augment=True`).

The host then only reads, decodes and batches the 136-px images (data/pipeline.py's `raw_transform`); the
random resized crop to the model size, the flip and CL's colour jitter run here on the global batch, sharded on
`data` like it, with per-image parameters drawn from the step's RNG, so a resumed run and any device or process
count crop exactly as an uninterrupted one-device run. They follow the host functions of pipeline.py:

    crop_boxes          torchvision's RandomResizedCrop box (10 tries, then the centre crop), as
                        `pipeline.random_resized_crop` draws it: the same distribution, other random numbers
    resize_boxes        each box resampled to size x size by Keys' cubic with antialiasing
                        (`jax.image.scale_and_translate`), PIL's bicubic resize of a box; the values differ from
                        PIL's by its 8-bit fixed-point arithmetic (tests/test_device_augment.py bounds it)
    colour_jitter       `pipeline.colour_jitter` (brightness, contrast, saturation, in that order)
Images stay float in [0, 255] after resampling (no rounding to uint8); `pipeline.normalize` takes them as they are.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

TRIES = 10  # torchvision's attempts before the centre-crop fallback


def crop_boxes(key: jax.Array, batch: int, height: int, width: int, scale=(0.2, 1.0),
               ratio=(3 / 4, 4 / 3)) -> jax.Array:
    """(B, 4) float32 (top, left, crop height, crop width) in pixels: per image, the first of `TRIES` draws of
    (area share ~ U(scale), log aspect ~ U(log ratio)) whose rounded box fits, at a uniform integer position;
    torchvision's centre crop where none fits. All tries are drawn at once (fixed shapes)."""
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    area = height * width * jax.random.uniform(k_area, (batch, TRIES), minval=scale[0], maxval=scale[1])
    aspect = jnp.exp(jax.random.uniform(k_ratio, (batch, TRIES), minval=math.log(ratio[0]),
                                        maxval=math.log(ratio[1])))
    cw = jnp.round(jnp.sqrt(area * aspect))  # round half to even, as Python's round in the host version
    ch = jnp.round(jnp.sqrt(area / aspect))
    fits = (cw > 0) & (cw <= width) & (ch > 0) & (ch <= height)
    first = jnp.argmax(fits, axis=1)  # the first try that fits (0 where none does: the fallback below)
    cw = jnp.take_along_axis(cw, first[:, None], 1)[:, 0]
    ch = jnp.take_along_axis(ch, first[:, None], 1)[:, 0]
    # a uniform integer in [0, side - crop]: floor(u · (side - crop + 1))
    top = jnp.floor(jax.random.uniform(k_top, (batch,)) * (height - ch + 1))
    left = jnp.floor(jax.random.uniform(k_left, (batch,)) * (width - cw + 1))
    in_ratio = width / height  # static: the fallback box is the same for every image
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    fallback = jnp.asarray([(height - fh) // 2, (width - fw) // 2, fh, fw], jnp.float32)
    boxes = jnp.stack([top, left, ch, cw], axis=1)
    return jnp.where(jnp.any(fits, axis=1)[:, None], boxes, fallback[None]).astype(jnp.float32)


def resize_boxes(images: jax.Array, boxes: jax.Array, size: int) -> jax.Array:
    """(B, H, W, C) images, (B, 4) boxes (top, left, height, width) → (B, size, size, C) float32 in [0, 255]:
    output pixel o samples the input at box_start + (o + 0.5)·box/size − 0.5, PIL's convention for a box."""
    def one(image, box):
        top, left, h, w = box[0], box[1], box[2], box[3]
        scale = jnp.stack([size / h, size / w])
        return jax.image.scale_and_translate(image.astype(jnp.float32), (size, size, image.shape[-1]), (0, 1),
                                             scale, -jnp.stack([top, left]) * scale, method='cubic', antialias=True)
    return jnp.clip(jax.vmap(one)(images, boxes), 0.0, 255.0)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
    """Each image mirrored left-right with probability 1/2."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)


def colour_jitter(key: jax.Array, images: jax.Array, strength: float = 0.4) -> jax.Array:
    """Per image, brightness, contrast and saturation factors uniform in [1 − s, 1 + s], applied in that order as
    `pipeline.colour_jitter` does (float (B, H, W, 3) in [0, 255] → the same)."""
    return jitter_by(images, jax.random.uniform(key, (images.shape[0], 3), minval=1.0 - strength,
                                               maxval=1.0 + strength))


def jitter_by(images: jax.Array, factors: jax.Array) -> jax.Array:
    """`colour_jitter` with given (B, 3) (brightness, contrast, saturation) factors."""
    b, c, s = jnp.moveaxis(factors, 1, 0)[..., None, None, None]
    x = images * b
    mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    x = (x - mean) * c + mean
    grey = jnp.einsum('bhwc,c->bhw', x, jnp.asarray([0.299, 0.587, 0.114], jnp.float32))[..., None]
    return jnp.clip((x - grey) * s + grey, 0.0, 255.0)


def center_crop(images: jax.Array, size: int) -> jax.Array:
    """`pipeline.center_crop` of a batch (a static slice)."""
    top, left = (images.shape[1] - size) // 2, (images.shape[2] - size) // 2
    return images[:, top:top + size, left:left + size]


def shifted_crops(images: jax.Array, size: int, moves: jax.Array) -> jax.Array:
    """Each image's `center_crop` moved by its row of `moves` (B, 2), whole pixels (row, column)."""
    top, left = (images.shape[1] - size) // 2, (images.shape[2] - size) // 2
    return jax.vmap(lambda image, move: jax.lax.dynamic_slice(
        image, (top + move[0], left + move[1], 0), (size, size, image.shape[-1])))(images, moves)


def pretrain(key: jax.Array, images: jax.Array, *, size: int, scale=(0.2, 1.0), flip: bool = True) -> jax.Array:
    """Stage 1's augmentation (`pipeline.pretrain_augment`): random resized crop to `size`, then the flip."""
    k_box, k_flip = jax.random.split(key)
    out = resize_boxes(images, crop_boxes(k_box, images.shape[0], images.shape[1], images.shape[2], tuple(scale)),
                       size)
    return random_flip(k_flip, out) if flip else out


def stage2(key: jax.Array, images: jax.Array, *, size: int, augment: str = 'none', flip: bool = False) -> jax.Array:
    """Stage 2's input (`pipeline.stage2_augment`): 'none' the centre crop, 'cl' CL's random resized crop
    (scale 0.2-1) and colour jitter (0.4); then the optional flip."""
    k_box, k_jitter, k_flip = jax.random.split(key, 3)
    if augment == 'cl':
        boxes = crop_boxes(k_box, images.shape[0], images.shape[1], images.shape[2], (0.2, 1.0))
        out = colour_jitter(k_jitter, resize_boxes(images, boxes, size))
    else:
        out = center_crop(images, size).astype(jnp.float32)
    return random_flip(k_flip, out) if flip else out
