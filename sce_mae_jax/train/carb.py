"""Stage 2: CARB with the LCR loss on a frozen stage-1 ViT; only the projector trains (paper 002 Table S7).

    python -m sce_mae_jax.main --config=configs/carb_deit_s.py --config.init_from=<stage-1 workdir> --workdir=DIR

The step is one jitted function over the mesh: frozen backbone forward (outside the gradient, so there is no
backward pass and no optimiser state for it) → attentive split → density-peak clustering → substitution →
projector → LCR loss on the fixed-size set T = attentive ∪ centres. The backbone is a step *argument*, never
part of the trained state, and is written once to `workdir/backbone` so the workdir is self-contained.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from sce_mae_jax import carb, fileio, figures, workdir as workdir_lib
from sce_mae_jax.data import device_augment as device_augment_lib, pipeline, preprocess
from sce_mae_jax.errors import ConfigError
from sce_mae_jax.models.heads import (PROJECTOR_ACTIVATIONS, Projector, channel_support, descriptor_map,
                                      token_pixels)
from sce_mae_jax.models import load
from sce_mae_jax.models.mae import MAE, encoder_from_model_config
from sce_mae_jax.models.vit import ViT
from sce_mae_jax.splits import SPLITS, split_scores
from sce_mae_jax.train import checkpoints, common, monitor as monitor_lib, optim
from sce_mae_jax.train.split_inputs import prepare_split


# ---------------------------------------------------------------------------------------------- CARB forward
def selected_size(cc, num_tokens: int) -> int:
    """|T| with clustering: ceil(η·N) attentive tokens + K_c centres (fewer only if too few inattentive)."""
    if not cc.clustering:
        return num_tokens
    return min(num_tokens, carb.num_attentive(cc.eta, num_tokens) + cc.num_clusters)


def carb_features(backbone, images, *, encoder: ViT, cc, split_aux=None, mae: MAE | None = None) -> dict:
    """Frozen backbone features with CARB's token selection (paper 001 §3.2–3.3), the attentive split by
    `cc.split` (eq. 1 for 'cls'; `split_aux` and `mae` as `split_scores` needs them, from `prepare_split`).

    Returns `tokens` (B, N, C) the map fed to the projector (inattentive tokens replaced by their centre's
    feature unless clustering is off), `raw` (B, N, C) the unsubstituted final features, `attentive` and
    `selected` (B, N) bool, and `cluster_id` (B, N) int (−1 attentive) for the figure.
    Mode 'B' (default) substitutes final-layer features; mode 'A' lets the blocks after the clustering layer see
    only CLS + attentive + centre tokens and spreads their outputs back over the map.
    """
    layer = cc.layer
    p = {'params': backbone}
    x = encoder.apply(p, images, method=lambda m, im: m.prepend_cls(m.embed(im)))
    x, outs, logits = encoder.apply(p, x, 0, layer + 1, None, (layer,), method=ViT.blocks_forward)
    scores = split_scores(cc.get('split', 'cls'), logits=logits[layer], tokens=outs[layer][:, 1:], encoder=encoder,
                          density_k=cc.density_k, images=images, backbone=backbone, aux=split_aux, mae=mae)
    attentive = carb.top_scores_mask(scores, cc.eta)
    if not cc.clustering:
        x, _, _ = encoder.apply(p, x, layer + 1, None, method=ViT.blocks_forward)
        final = encoder.apply(p, x, method=ViT.final_norm)[:, 1:]
        return dict(tokens=final, raw=final, attentive=attentive, selected=jnp.ones_like(attentive),
                    cluster_id=jnp.where(attentive, -1, 0).astype(jnp.int32))
    clusters = carb.density_peak_clustering(outs[layer][:, 1:], ~attentive, cc.num_clusters, k=cc.density_k)
    key_mask = None
    if cc.mode == 'A':
        keep = carb.keep_mask(attentive, clusters['is_centre'])
        key_mask = jnp.concatenate([jnp.ones_like(keep[:, :1]), keep], axis=1)
    elif cc.mode != 'B':
        raise ValueError(f"carb.mode must be 'A' or 'B', got {cc.mode!r}")
    x, _, _ = encoder.apply(p, x, layer + 1, None, key_mask, method=ViT.blocks_forward)
    final = encoder.apply(p, x, method=ViT.final_norm)[:, 1:]
    tokens = carb.substitute(final, ~attentive, clusters['assignment'])
    return dict(tokens=tokens, raw=final, attentive=attentive, selected=attentive | clusters['is_centre'],
                cluster_id=clusters['cluster_id'])


def gather_selected(proj, attentive, selected, positions, size: int):
    """The loss only reads T, which has a static size, so gather it: the pairwise work is |T|² instead of N²
    (19² vs 144² for DeiT-S). Returns proj (B, size, D), attentive/valid (B, size), positions (B, size, 2)."""
    idx, valid = carb.kept_indices(selected, size)
    take = lambda a: jnp.take_along_axis(a, idx if a.ndim == 2 else idx[..., None], axis=1)
    return take(proj), take(attentive) & valid, valid, positions[idx]


PROJECTOR_INPUTS = ('raw', 'substituted')
PROJECTOR_MAPS = ('upsampled', 'tokens')


def token_descriptors(proj_params, feats, *, projector: Projector, cc, image_size: int):
    """(B, N, D) the projector's descriptors of the N tokens, and the (B, P, D) map they were taken from.

    `cc.projector_input`: 'raw' feeds the unsubstituted final tokens, so the copies of the cluster centres never
    enter a softmax projector's per-channel normaliser (in mode B the selected tokens T, all the loss reads,
    are the same either way); 'substituted' feeds the map after substitution (the withdrawn reading of
    method.md §2.5). `cc.projector_map`: 'upsampled' applies the projector as evaluation does
    (`heads.descriptor_map`: bilinear to image_size, then the projector) and reads each token at its centre
    pixel; 'tokens' applies it to the g x g token map itself."""
    tokens = feats['raw'] if cc.projector_input == 'raw' else feats['tokens']
    b, n, c = tokens.shape
    g = int(round(n ** 0.5))
    grid = tokens.reshape(b, g, g, c)
    if cc.projector_map == 'tokens':
        dense = descriptor_map(projector, proj_params, grid, None).reshape(b, n, -1)
        return dense, dense
    dense = descriptor_map(projector, proj_params, grid, image_size)
    dense = dense.reshape(b, image_size * image_size, -1)
    return jnp.take(dense, token_pixels(g, image_size // g, image_size), axis=1), dense


def stage2_loss(proj_params, feats, *, projector: Projector, config, positions):
    """(loss, aux) of the configured objective on precomputed (frozen) features."""
    cc = config.carb
    proj, dense = token_descriptors(proj_params, feats, projector=projector, cc=cc,
                                    image_size=config.model.image_size)
    support = {'channel_support': channel_support(dense)} if projector.activation == 'softmax' else {}
    if cc.objective == 'lead':
        # LEAD (paper 003 eq. 2–3) pairs every image with the next one in the global batch.
        teacher, student = feats['raw'], proj
        loss = carb.lead_loss(teacher, jnp.roll(teacher, 1, axis=0), student, jnp.roll(student, 1, axis=0),
                              tau=config.lead.tau)
        return loss, support
    if cc.objective != 'lcr':
        raise ValueError(f"carb.objective must be 'lcr' or 'lead', got {cc.objective!r}")
    att, sel, pos = feats['attentive'], feats['selected'], positions
    if cc.gather_selected:
        proj, att, sel, pos = gather_selected(proj, att, sel, positions, selected_size(cc, proj.shape[1]))
    if 'view_b' in feats:
        proj_b, _ = token_descriptors(proj_params, {'raw': feats['view_b'], 'tokens': feats['view_b']},
                                      projector=projector, cc=cc, image_size=config.model.image_size)
        loss, aux = carb.cross_view_lcr_loss(proj, sel, att, pos, proj_b, feats['positions_b'], tau=config.lcr.tau,
                                             rep=tuple(config.lcr.rep), locality=config.lcr.locality)
    else:
        loss, aux = carb.lcr_loss(proj, sel, att, pos, tau=config.lcr.tau, rep=tuple(config.lcr.rep),
                                  locality=config.lcr.locality)
    return loss, {'num_selected': aux['num_selected'].mean(), 'p_self': aux['p_self'].mean(), **support}


# ---------------------------------------------------------------------------------------------- model & step
def validate(config) -> None:
    """Stops on settings that would otherwise fail deep inside the jitted step."""
    cc, m = config.carb, config.model
    n = (m.image_size // m.patch_size) ** 2
    problems = []
    if not 0 <= cc.layer < m.depth:
        problems.append(f'carb.layer={cc.layer} must be a block of the backbone, 0..{m.depth - 1}')
    if not 0.0 <= cc.eta <= 1.0:
        problems.append(f'carb.eta={cc.eta} must be in [0, 1]')
    if not 1 <= cc.num_clusters <= n:
        problems.append(f'carb.num_clusters={cc.num_clusters} must be in 1..{n}')
    if cc.get('split', 'cls') not in SPLITS:
        problems.append(f'carb.split={cc.split!r} must be one of {SPLITS}')
    if cc.mode not in ('A', 'B'):
        problems.append(f"carb.mode={cc.mode!r} must be 'A' or 'B'")
    if cc.objective not in ('lcr', 'lead'):
        problems.append(f"carb.objective={cc.objective!r} must be 'lcr' or 'lead'")
    if config.lcr.locality not in carb.LOCALITIES:
        problems.append(f'lcr.locality={config.lcr.locality!r} must be one of {carb.LOCALITIES}')
    if config.projector.get('activation', 'linear') not in PROJECTOR_ACTIVATIONS:
        problems.append(f'projector.activation={config.projector.activation!r} must be one of '
                        f'{PROJECTOR_ACTIVATIONS}')
    if cc.get('projector_input', 'raw') not in PROJECTOR_INPUTS:
        problems.append(f'carb.projector_input={cc.projector_input!r} must be one of {PROJECTOR_INPUTS}')
    if cc.get('projector_map', 'upsampled') not in PROJECTOR_MAPS:
        problems.append(f'carb.projector_map={cc.projector_map!r} must be one of {PROJECTOR_MAPS}')
    if config.input.get('augment', 'none') not in pipeline.STAGE2_AUGMENTATIONS:
        problems.append(f'input.augment={config.input.augment!r} must be one of {pipeline.STAGE2_AUGMENTATIONS}')
    shift = cc.get('cross_view_shift', 0)
    room = (preprocess.OUT_SIZE - m.image_size) // 2 // m.patch_size
    if shift and not (0 < shift <= room and cc.objective == 'lcr' and config.input.device_augment
                      and config.input.get('augment', 'none') == 'none' and not config.input.flip):
        problems.append(f'carb.cross_view_shift={shift} needs carb.objective=lcr, input.device_augment=True (the '
                        f'step crops both views from the {preprocess.OUT_SIZE}-px image), input.augment=none, '
                        f'input.flip=False, and at most {room} tokens of room around the centre crop')
    if len(config.lcr.rep) != 3:
        problems.append(f'lcr.rep={config.lcr.rep} must be three numbers (att-att, att-inatt, inatt-inatt)')
    if problems:
        raise ConfigError('; '.join(problems))


def build(config, dataset_len: int):
    encoder = encoder_from_model_config(config.model)
    projector = Projector(**config.projector)
    total, warmup = optim.steps_for(config, dataset_len)
    schedule = optim.warmup_cosine(config.lr, total, warmup)
    tx = optim.projector_optimizer(schedule, config.weight_decay, config.b1, config.b2)
    return encoder, projector, tx, schedule, total


def state_and_step(config, mesh, dataset_len: int, mae: MAE | None = None):
    """The replicated initial projector state and the step jitted over `mesh` (the backbone and the split's
    inputs replicated arguments, the batch on `data`, the state donated): what training runs and what `bench.py`
    times. Returns (encoder, total_steps, state, state_sharding, step) with `step(state, backbone, batch,
    split_aux)` itself the jitted function, so that it can be lowered and compiled ahead (bench.py); `split_aux`
    is `prepare_split`'s dict ({} for the criteria that need nothing) and `mae` the frozen MAE of split=recon."""
    repl, data_sh = common.replicated(mesh), common.data_sharded(mesh)
    encoder, projector, tx, schedule, total_steps = build(config, dataset_len)
    init = functools.partial(init_state, projector, tx, config.seed, encoder.num_patches, encoder.embed_dim)
    state_sh = jax.tree.map(lambda _: repl, jax.eval_shape(init))
    state = jax.jit(init, out_shardings=state_sh)()
    step = jax.jit(functools.partial(train_step, encoder=encoder, projector=projector, tx=tx, schedule=schedule,
                                     config=config, mae=mae),
                   in_shardings=(state_sh, repl, data_sh, repl), out_shardings=(state_sh, repl), donate_argnums=0)
    return encoder, total_steps, state, state_sh, step


def init_state(projector, tx, seed: int, num_tokens: int, width: int):
    rng = jax.random.PRNGKey(seed)
    params = projector.init(jax.random.fold_in(rng, 0), jnp.zeros((1, num_tokens, width)))['params']
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
            'rng': jax.random.fold_in(rng, 2)}


def device_augment(config):
    """`fn(key, images)` of `input.device_augment` (crop, CL's jitter and flip in the step), else None."""
    if not config.input.device_augment:
        return None
    return functools.partial(device_augment_lib.stage2, size=config.model.image_size,
                             augment=config.input.get('augment', 'none'), flip=config.input.flip)


def host_transform(config):
    """The input pipeline's per-example transform: all of stage 2's input, or none of it with device_augment."""
    if config.input.device_augment:
        return None  # the image as read
    return pipeline.stage2_augment(config.model.image_size, config.input.get('augment', 'none'), config.input.flip)


def train_step(state, backbone, batch, split_aux=None, *, encoder, projector, tx, schedule, config, mae=None):
    """One projector update. `backbone` and `split_aux` are arguments, read only: their forward runs outside
    `value_and_grad`. With `input.device_augment` the batch is cropped and augmented here, from (rng, step)."""
    images = batch['image']
    augment = device_augment(config)
    if augment is not None:
        images = augment(jax.random.fold_in(jax.random.fold_in(state['rng'], state['step']), 1), images)
    images = pipeline.normalize(images, encoder.dtype)
    feats = carb_features(backbone, images, encoder=encoder, cc=config.carb, split_aux=split_aux, mae=mae)
    positions = carb.token_positions(encoder.grid, encoder.grid, encoder.patch_size)
    shift = config.carb.get('cross_view_shift', 0)
    if shift:  # a second view: the same face moved by up to `shift` tokens each way (cross_view_lcr_loss)
        key = jax.random.fold_in(jax.random.fold_in(state['rng'], state['step']), 2)
        moves = jax.random.randint(key, (images.shape[0], 2), -shift, shift + 1) * encoder.patch_size
        view_b = device_augment_lib.shifted_crops(batch['image'], encoder.image_size, moves)
        feats['view_b'] = encoder.apply({'params': backbone}, pipeline.normalize(view_b, encoder.dtype))['tokens']
        feats['positions_b'] = positions[None] + moves[:, None, :].astype(jnp.float32)
    feats = jax.lax.stop_gradient(feats)
    loss_fn = functools.partial(stage2_loss, projector=projector, config=config, positions=positions)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'], feats)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'lr': schedule(state['step']), **aux}
    return {**state, 'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}, metrics


# ---------------------------------------------------------------------------------------------- backbone I/O
def load_backbone(config, workdir: str, expected, encoder=None) -> dict:
    """The frozen encoder: from `workdir/backbone` on a resume, else from `init_from` (then saved there).
    `init_from='random_init'` freezes an untrained encoder (seed `config.seed`): the `random_init_carb` control,
    which tells whether stage 1 matters at all."""
    saved = os.path.join(fileio.resolve(workdir), 'backbone')
    if fileio.isdir(saved):
        params = checkpoints.restore_tree(saved)
    elif not config.init_from:
        raise ConfigError('stage 2 needs a stage-1 backbone: pass --config.init_from=<stage-1 workdir> '
                          '(or a directory written by python -m sce_mae_jax.convert, or random_init '
                          'for an untrained backbone)')
    else:
        params = load.encoder_params(config.init_from, encoder or encoder_from_model_config(config.model),
                                     config.seed)
    bad = checkpoints.shape_mismatches(params, expected)
    if bad:
        raise ConfigError(f'the backbone from {config.init_from or saved} does not fit config.model '
                          f'(a different DeiT size?): ' + '; '.join(bad[:6]))
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    if not fileio.isdir(saved):
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(saved, params)  # orbax finalises by rename: never half written
        ckptr.wait_until_finished()
    return params


# ---------------------------------------------------------------------------------------------- loop
def train(config, workdir: str) -> dict:
    from sce_mae_jax.data.sources import get_source

    validate(config)
    workdir_lib.prepare_workdir(workdir, config)
    mesh = common.make_mesh()
    common.check_batch_size(config.batch_size)
    repl, data_sh = common.replicated(mesh), common.data_sharded(mesh)

    source = get_source(config.data, config.split, manual_dir=config.manual_dir or None,
                        data_dir=config.data_dir or None, seed=config.data_seed)
    size = config.model.image_size
    it = pipeline.train_iterator(source, global_batch=config.batch_size, seed=config.seed,
                                 transform=host_transform(config), num_workers=config.input.workers,
                                 num_threads=config.input.read_threads)

    encoder = encoder_from_model_config(config.model)
    expected = jax.eval_shape(encoder.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))['params']
    backbone = common.replicate(load_backbone(config, workdir, expected, encoder), mesh)
    split_aux, mae = prepare_split(config, workdir, source, encoder=encoder, backbone=backbone, mesh=mesh)
    encoder, total_steps, state, state_sh, step = state_and_step(config, mesh, len(source), mae=mae)
    logging.info('frozen backbone %s parameters; projector %s', f'{common.tree_size(backbone):,}',
                 f'{common.tree_size(state["params"]):,}')

    # Returns the images too, replicated, so every process can fetch them; all processes join the call.
    clusters_fn = jax.jit(lambda bb, aux, im: (im, carb_features(bb, pipeline.normalize(im, encoder.dtype),
                                                                 encoder=encoder, cc=config.carb, split_aux=aux,
                                                                 mae=mae)['cluster_id']), out_shardings=repl)

    def figure_fn(step_num, state, batch):
        images = batch['image'][:8]
        if images.shape[1] != size:  # device_augment: the batch is as read; show its centre
            images = device_augment_lib.center_crop(images, size)
        images, cid = clusters_fn(backbone, split_aux, images)
        if jax.process_index() == 0:
            fileio.makedirs(os.path.join(workdir, 'figures'))
            figures.save_cluster_png(os.path.join(workdir, 'figures', f'clusters_{step_num:07d}.png'),
                                     np.asarray(images), np.asarray(cid), encoder.patch_size)

    monitor = monitor_lib.build(config, encoder, mesh, total_steps, Projector(**config.projector))
    out = common.train_loop(config, workdir, state=state, state_sharding=state_sh,
                            step_fn=lambda s, b: step(s, backbone, b, split_aux), data_iter=it, batch_sharding=data_sh,
                            total_steps=total_steps, figure_fn=figure_fn,
                            monitor_fn=monitor and (lambda state: monitor(backbone, state['params'])))
    return {**out, 'backbone': backbone}
