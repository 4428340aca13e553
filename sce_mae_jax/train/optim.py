"""Optimisers and learning-rate schedules of both stages (method.md §1 and §2.7)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

# Fixed sin-cos tables stored as parameters only so counts and PyTorch imports line up; never trained.
FROZEN_PARAMS = ('pos_embed', 'decoder_pos_embed')


def _is_frozen(path) -> bool:
    return any(getattr(k, 'key', None) in FROZEN_PARAMS for k in path)


def warmup_cosine(base_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0):
    """The MAE schedule: linear warm-up, then a half-cycle cosine to `min_lr`, evaluated every step
    (the reference recomputes it from the fractional epoch, which is the same thing in steps)."""
    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = base_lr * step / max(warmup_steps, 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        cos = min_lr + (base_lr - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * jnp.clip(progress, 0.0, 1.0)))
        return jnp.where(step < warmup_steps, warm, cos)
    return schedule


def mae_optimizer(schedule, weight_decay: float, b1: float, b2: float, eps: float = 1e-8):
    """AdamW; decay on every parameter with ≥ 2 dims (cls and mask tokens included, biases and norms not);
    position tables frozen (no update and no optimiser state)."""
    def labels(params):
        return jax.tree_util.tree_map_with_path(lambda p, _: 'frozen' if _is_frozen(p) else 'train', params)

    def decay_mask(params):
        return jax.tree.map(lambda x: x.ndim >= 2, params)

    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    return optax.multi_transform({'train': adamw, 'frozen': optax.set_to_zero()}, labels)


def projector_optimizer(schedule, weight_decay: float, b1: float, b2: float):
    """CL's projector recipe: Adam with PyTorch-style (coupled, L2) weight decay, i.e. decay added to the
    gradient before the Adam moments, which is what `torch.optim.Adam(weight_decay=...)` does."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.scale_by_adam(b1=b1, b2=b2),
                       optax.scale_by_learning_rate(schedule))


def steps_for(config, dataset_len: int) -> tuple[int, int]:
    """(total_steps, warmup_steps) from epochs, or from `total_steps` when set (warm-up keeps its fraction)."""
    steps_per_epoch = max(dataset_len // config.batch_size, 1)
    if config.get('total_steps'):
        total = int(config.total_steps)
        warmup = int(round(total * config.get('warmup_epochs', 0) / max(config.epochs, 1)))
    else:
        total = int(config.epochs * steps_per_epoch)
        warmup = int(config.get('warmup_epochs', 0) * steps_per_epoch)
    return total, warmup
