"""Stage 2 (train/carb.py): the CARB step on a frozen backbone, end to end and piece by piece."""
import functools
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, TINY_FIELDS, losses, run_main, train_here
from sce_mae_jax import carb, splits
from sce_mae_jax.config_lib import ABLATIONS
from sce_mae_jax.data import device_augment as device_augment_lib, pipeline
from sce_mae_jax.errors import ConfigError
from sce_mae_jax.models.vit import ViT
from sce_mae_jax.train import carb as carb_train
from sce_mae_jax.train import common, split_inputs
from sce_mae_jax.train import checkpoints

BACKBONE = ['--config.model.embed_dim=48', '--config.model.depth=4', '--config.model.num_heads=2']


def _config(arg=None, **overrides):
    spec = importlib.util.spec_from_file_location('cfg', os.path.join(REPO, 'configs', 'carb_deit_t.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(arg)
    c.model.update(embed_dim=48, depth=4, num_heads=2)
    for k, v in overrides.items():
        c[k] = v
    return c


@pytest.fixture(scope='module')
def stage1(tmp_path_factory):
    """A briefly trained tiny stage-1 workdir whose encoder matches BACKBONE."""
    wd = tmp_path_factory.mktemp('stage1')
    train_here('pretrain', wd, {**TINY_FIELDS, 'model.depth': 4, 'batch_size': 8, 'total_steps': 5,
                                'figure_every': 0})
    return wd


def test_trains_from_stage1_and_backbone_stays_frozen(stage1, tmp_path):
    config = _config(init_from=str(stage1), batch_size=8, total_steps=40, log_every=1, figure_every=40)
    # The trainer's machinery is under test here, so the projector whose loss falls within 40 steps on a 5-step
    # backbone: with the default spatial-softmax projector the loss falls too, but more slowly and noisily
    # (1.94 → 1.3–1.7 over 300 steps on this backbone), which docs/results.md reports.
    config.projector.activation = 'linear'
    out = carb_train.train(config, str(tmp_path))
    loss = losses(tmp_path)
    assert np.mean([loss[s] for s in range(36, 41)]) < 0.9 * np.mean([loss[s] for s in range(1, 6)])
    original = checkpoints.load_params(str(stage1))['encoder']
    for a, b in zip(jax.tree.leaves(original), jax.tree.leaves(out['backbone'])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the optimiser holds the projector's moments only (2 per parameter + step counters)
    n_proj = common.tree_size(out['state']['params'])
    assert common.tree_size(out["state"]["opt_state"]) <= 2 * n_proj + 4
    assert n_proj == 48 * 64 + 64
    assert os.path.exists(tmp_path / 'figures' / 'clusters_0000040.png')


def test_eight_devices_match_one(stage1, tmp_path):
    args = ['--config=configs/carb_deit_t.py', *BACKBONE, f'--config.init_from={stage1}', '--config.batch_size=8',
            '--config.total_steps=3', '--config.log_every=1', '--config.figure_every=0']
    run_main([*args, f'--workdir={tmp_path / "d1"}'], devices=1)
    run_main([*args, f'--workdir={tmp_path / "d8"}'], devices=8)
    l1, l8 = losses(tmp_path / 'd1'), losses(tmp_path / 'd8')
    assert sorted(l1) == [1, 2, 3]
    np.testing.assert_allclose([l8[s] for s in l1], [l1[s] for s in l1], rtol=1e-5)


def _jit(fn, **static):
    """`fn` with its keyword arguments bound, compiled as one program: run eagerly, each of its hundreds of ops
    would be compiled on its own (most of these tests' time)."""
    return jax.jit(functools.partial(fn, **static))


def _backbone_and_images(batch=2, seed=0):
    vit = ViT(embed_dim=48, depth=4, num_heads=2)
    images = jax.random.normal(jax.random.PRNGKey(seed), (batch, 96, 96, 3))
    return vit, vit.init(jax.random.PRNGKey(1), images)['params'], images


def _one_step(config, image_size=96):
    """One jitted stage-2 step on random uint8 images: (metrics, the projector's largest parameter change)."""
    encoder, projector, tx, schedule, _ = carb_train.build(config, 100)
    backbone = _backbone_and_images()[1]
    state = carb_train.init_state(projector, tx, 0, 144, 48)
    images = np.random.default_rng(0).integers(0, 255, (2, image_size, image_size, 3))
    step = jax.jit(functools.partial(carb_train.train_step, encoder=encoder, projector=projector, tx=tx,
                                     schedule=schedule, config=config))
    new_state, metrics = step(state, backbone, {'image': jnp.asarray(images, jnp.uint8)})
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state['params'], new_state['params'])
    return metrics, max(jax.tree.leaves(moved))


@pytest.mark.parametrize('ablation', sorted(ABLATIONS))
def test_every_ablation_runs_one_step(ablation):
    config = _config(f'ablation={ablation}', batch_size=2)
    metrics, moved = _one_step(config)
    assert np.isfinite(float(metrics['loss']))
    if config.carb.objective == 'lcr':
        assert float(metrics['num_selected']) == (144 if not config.carb.clustering else 15 + 4)
    assert moved > 0


def test_mode_a_equals_dropping_tokens():
    """Mode A masks keys instead of dropping tokens: kept tokens must get exactly the outputs of a forward on
    the reduced sequence CLS + attentive + centres."""
    vit, params, images = _backbone_and_images()
    cc = _config().carb
    cc.mode = 'A'
    feats = _jit(carb_train.carb_features, encoder=vit, cc=cc)(params, images)
    layer = cc.layer
    p = {'params': params}
    x = jax.jit(lambda p, im: vit.apply(
        p, vit.apply(p, im, method=lambda m, im: m.prepend_cls(m.embed(im))), 0, layer + 1, None, (layer,),
        method=ViT.blocks_forward)[0])(p, images)
    rest = jax.jit(lambda p, x: vit.apply(p, vit.apply(p, x, layer + 1, None, method=ViT.blocks_forward)[0],
                                          method=ViT.final_norm))
    for b in range(images.shape[0]):
        keep = np.flatnonzero(np.asarray(feats['selected'][b]))
        reduced = x[b:b + 1, np.concatenate([[0], keep + 1])]
        y = rest(p, reduced)[0, 1:]
        np.testing.assert_allclose(np.asarray(feats['tokens'][b, keep]), np.asarray(y), atol=2e-5)
        # every other token carries its centre's output
        cid = np.asarray(feats['cluster_id'][b])
        inatt = np.flatnonzero(cid >= 0)
        tokens = np.asarray(feats['tokens'][b])
        for i in inatt:
            assert any(np.array_equal(tokens[i], tokens[k]) for k in keep)


def test_gathered_loss_equals_masked_loss():
    vit, params, images = _backbone_and_images(batch=3)
    config = _config()
    feats = _jit(carb_train.carb_features, encoder=vit, cc=config.carb)(params, images)
    _, projector, _, _, _ = carb_train.build(config, 10)
    proj_params = carb_train.init_state(projector, carb_train.build(config, 10)[2], 0, 144, 48)['params']
    pos = carb.token_positions(12, 12, 8)
    config.carb.gather_selected = True  # read while tracing: each jit below bakes in its own setting
    gathered, _ = _jit(carb_train.stage2_loss, projector=projector, config=config, positions=pos)(proj_params, feats)
    config.carb.gather_selected = False
    masked, _ = _jit(carb_train.stage2_loss, projector=projector, config=config, positions=pos)(proj_params, feats)
    np.testing.assert_allclose(float(gathered), float(masked), rtol=1e-5)


def test_stage2_trains_on_the_map_that_evaluation_reads():
    """The descriptors the LCR loss reads are the evaluation's descriptor map (cover-and-stride at the plain
    stride, bilinear to 96, projector) at the token centres: the same kind of map, the same softmax normaliser,
    no centre copies in it. The old path (projector on the substituted 12x12 map) is not."""
    from sce_mae_jax.evals import features
    vit, params, _ = _backbone_and_images()
    images = np.random.default_rng(3).integers(0, 256, (2, 96, 96, 3), dtype=np.uint8)
    config = _config()
    assert (config.carb.projector_input, config.carb.projector_map) == ('raw', 'upsampled')
    feats = _jit(carb_train.carb_features, encoder=vit, cc=config.carb)(params, pipeline.normalize(jnp.asarray(images)))
    _, projector, tx, _, _ = carb_train.build(config, 10)
    proj_params = carb_train.init_state(projector, tx, 0, 144, 48)['params']
    train_desc, dense = carb_train.token_descriptors(proj_params, feats, projector=projector, cc=config.carb,
                                                     image_size=96)
    evaluated = np.asarray(features.dense_features(params, proj_params, images, encoder=vit, projector=projector,
                                                   stride=8, size=96))
    centres = np.arange(12) * 8 + 4
    np.testing.assert_allclose(np.asarray(train_desc).reshape(2, 12, 12, -1),
                               evaluated[:, centres][:, :, centres], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dense).reshape(evaluated.shape), evaluated, rtol=1e-4, atol=1e-5)
    config.carb.update(projector_input='substituted', projector_map='tokens')
    old, _ = carb_train.token_descriptors(proj_params, feats, projector=projector, cc=config.carb, image_size=96)
    assert not np.allclose(np.asarray(old), np.asarray(train_desc), rtol=1e-2)


def test_stage2_augmentation():
    """'none' is the centre crop; 'cl' a random resized crop with colour jitter, a function of the rng alone."""
    image = np.random.default_rng(0).integers(0, 256, (136, 136, 3), dtype=np.uint8)
    plain = pipeline.stage2_augment(96, 'none')({'image': image}, np.random.default_rng(1))['image']
    np.testing.assert_array_equal(plain, image[20:116, 20:116])
    cl = pipeline.stage2_augment(96, 'cl')
    a = cl({'image': image}, np.random.default_rng(1))['image']
    assert a.shape == (96, 96, 3) and a.dtype == np.uint8 and not np.array_equal(a, plain)
    np.testing.assert_array_equal(a, cl({'image': image}, np.random.default_rng(1))['image'])
    assert not np.array_equal(a, cl({'image': image}, np.random.default_rng(2))['image'])
    with pytest.raises(ValueError, match='input.augment'):
        pipeline.stage2_augment(96, 'heavy')


def test_cross_view_step_crops_two_views_and_trains():
    """carb.cross_view_shift: the step crops view B from the 136-px batch moved by whole tokens, and the loss
    between the views moves the projector; settings it cannot honour are one clear error."""
    moved = device_augment_lib.shifted_crops(jnp.arange(2 * 136 * 136 * 3).reshape(2, 136, 136, 3), 96,
                                             jnp.asarray([[0, 0], [-16, 8]]))
    full = np.arange(2 * 136 * 136 * 3).reshape(2, 136, 136, 3)
    np.testing.assert_array_equal(moved[0], full[0, 20:116, 20:116])
    np.testing.assert_array_equal(moved[1], full[1, 4:100, 28:124])
    config = _config(batch_size=2)
    config.carb.cross_view_shift = 2
    config.input.device_augment = True
    carb_train.validate(config)
    metrics, moved = _one_step(config, image_size=136)
    assert np.isfinite(float(metrics['loss'])) and 0 < float(metrics['num_selected']) <= 19 and moved > 0
    for field, value in (('input.device_augment', False), ('input.flip', True), ('carb.cross_view_shift', 3)):
        bad = _config()
        bad.carb.cross_view_shift = 2
        bad.input.device_augment = True
        group, name = field.split('.')
        bad[group][name] = value
        with pytest.raises(ConfigError, match='cross_view_shift'):
            carb_train.validate(bad)


def test_missing_init_from_is_a_clear_error(tmp_path):
    proc = run_main(['--config=configs/carb_deit_t.py', f'--workdir={tmp_path}', '--config.total_steps=1'],
                    check=False)
    assert proc.returncode != 0 and 'init_from' in proc.stderr and 'Traceback' not in proc.stderr


def test_bad_carb_setting_is_a_clear_error(tmp_path):
    proc = run_main(['--config=configs/carb_deit_t.py', f'--workdir={tmp_path}', '--config.carb.layer=12',
                     '--config.carb.mode=C'], check=False)
    assert proc.returncode != 0 and 'carb.layer=12' in proc.stderr and "carb.mode='C'" in proc.stderr
    assert 'Traceback' not in proc.stderr


def test_backbone_of_another_size_is_a_clear_error(stage1, tmp_path):
    proc = run_main(['--config=configs/carb_deit_t.py', f'--workdir={tmp_path}', f'--config.init_from={stage1}',
                     '--config.total_steps=1'], check=False)  # DeiT-T config vs the 48-d stage-1 model
    assert proc.returncode != 0 and 'does not fit config.model' in proc.stderr, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr


def test_step_does_no_backward_pass_through_the_backbone():
    """XLA's FLOP count of the whole stage-2 step stays close to one backbone forward pass; a backward through
    the backbone would add about twice the forward again."""
    config = _config(batch_size=4)
    config.carb.projector_map = 'tokens'  # the projector's own 96x96 map would dominate the count
    encoder, projector, tx, schedule, _ = carb_train.build(config, 100)
    vit, backbone, images = _backbone_and_images(batch=4)
    state = carb_train.init_state(projector, tx, 0, 144, 48)
    batch = {'image': jnp.zeros((4, 96, 96, 3), jnp.uint8)}
    step = jax.jit(functools.partial(carb_train.train_step, encoder=encoder, projector=projector, tx=tx,
                                     schedule=schedule, config=config))

    def flops(compiled):
        cost = compiled.cost_analysis()
        return float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])

    step_flops = flops(step.lower(state, backbone, batch).compile())
    forward_flops = flops(jax.jit(lambda p, x: vit.apply({'params': p}, x)).lower(backbone, images).compile())
    assert forward_flops < step_flops < 1.4 * forward_flops, (step_flops, forward_flops)


# ---------------------------------------------------------------------------------------------- the split
def _tiny_mae_and_params(vit, seed=2):
    from sce_mae_jax.models.mae import MAE

    mae = MAE(vit.embed_dim, vit.depth, vit.num_heads, vit.mlp_ratio, vit.patch_size, vit.image_size,
              decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    params = mae.init(jax.random.PRNGKey(seed), jnp.zeros((1, 96, 96, 3)), noise=jnp.zeros((1, 144)))['params']
    return mae, params


@pytest.mark.parametrize('split', splits.SPLITS)
def test_every_split_runs_one_step(split):
    config = _config(f'split={split}', batch_size=2)
    vit, backbone, _ = _backbone_and_images()
    mae, aux = None, {}
    if split == 'recon':
        mae, mae_params = _tiny_mae_and_params(vit)
        backbone, aux = mae_params['encoder'], {'decoder': {k: v for k, v in mae_params.items() if k != 'encoder'}}
    elif split == 'cls_debiased':
        aux = {'prior': jnp.full((144,), 1 / 144)}
    encoder, projector, tx, schedule, _ = carb_train.build(config, 100)
    state = carb_train.init_state(projector, tx, 0, 144, 48)
    batch = {'image': jnp.asarray(np.random.default_rng(0).integers(0, 255, (2, 96, 96, 3)), jnp.uint8)}
    step = jax.jit(functools.partial(carb_train.train_step, encoder=encoder, projector=projector, tx=tx,
                                     schedule=schedule, config=config, mae=mae))
    _, metrics = step(state, backbone, batch, aux)
    assert np.isfinite(float(metrics['loss'])) and float(metrics['num_selected']) == 15 + 4
    feats = _jit(carb_train.carb_features, encoder=encoder, cc=config.carb, mae=mae)(
        backbone, pipeline.normalize(batch['image']), split_aux=aux)
    assert np.all(np.asarray(feats['attentive']).sum(1) == 15)


def test_reconstruction_errors_are_the_maes_own_loss_under_each_mask():
    """Putting a mask's visible tokens first in the noise makes the MAE keep exactly those: its loss under that
    noise is the mean of our per-patch errors over the removed tokens."""
    vit, _, images = _backbone_and_images()
    mae, params = _tiny_mae_and_params(vit)
    masks = splits.complementary_masks(144, 36)
    errors = jax.jit(functools.partial(splits.reconstruction_errors, mae))(params, images, masks)
    assert errors.shape == (4, 2, 144)
    mae_loss = jax.jit(lambda p, im, noise: mae.apply({'params': p}, im, noise=noise))
    for m in range(4):
        loss, _, used = mae_loss(params, images, jnp.broadcast_to(masks[m], (2, 144)))
        np.testing.assert_array_equal(np.asarray(used), np.broadcast_to(masks[m], (2, 144)))
        want = float(np.sum(np.asarray(errors[m]) * masks[m]) / np.sum(np.broadcast_to(masks[m], (2, 144))))
        np.testing.assert_allclose(float(loss), want, rtol=1e-5)


@pytest.mark.parametrize('split', ['cls_debiased', 'recon'])
def test_split_inputs_are_stored_and_reused_on_resume(stage1, tmp_path, split):
    fields = {'carb.split': split, 'model.embed_dim': 48, 'model.depth': 4, 'model.num_heads': 2,
              'init_from': str(stage1), 'batch_size': 8, 'log_every': 1, 'figure_every': 0,
              'carb.prior_images': 16, 'checkpoint_every': 1}
    train_here('carb', tmp_path, {**fields, 'total_steps': 2})  # in this process: the workdir is under test
    meta = json.loads((tmp_path / 'split' / 'split.json').read_text())
    assert meta['split'] == split
    first = checkpoints.restore_tree(str(tmp_path / 'split' / 'aux'))
    if split == 'cls_debiased':
        assert meta['prior_images'] == 16 and first['prior'].shape == (144,)
        np.testing.assert_allclose(first['prior'].sum(), 1.0, rtol=1e-5)
    else:
        assert meta['model']['decoder_depth'] == 1 and 'decoder_pred' in first['decoder']
    train_here('carb', tmp_path, {**fields, 'total_steps': 3})  # resumes at step 2
    again = checkpoints.restore_tree(str(tmp_path / 'split' / 'aux'))
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)
    assert sorted(losses(tmp_path)) == [1, 2, 3]
    other = 'cls_debiased' if split == 'recon' else 'recon'
    proc = run_main(['--config=configs/carb_deit_t.py:split=' + split, *BACKBONE, f'--config.init_from={stage1}',
                     '--config.batch_size=8', f'--config.carb.split={other}', '--config.total_steps=4',
                     f'--workdir={tmp_path}'], check=False)
    assert proc.returncode != 0 and f'was trained with carb.split={split}' in proc.stderr
    assert 'Traceback' not in proc.stderr


def test_recon_split_on_random_init_uses_an_untrained_decoder_and_bad_splits_are_clear_errors(tmp_path):
    config = _config('split=recon', init_from='random_init')
    config.carb.untrained_decoder.update(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    decoder, fields = split_inputs.stage1_decoder(config)
    assert fields['decoder_depth'] == 1 and decoder['decoder_pred']['kernel'].shape == (32, 8 * 8 * 3)
    again, _ = split_inputs.stage1_decoder(config)  # seeded: the control is reproducible
    np.testing.assert_array_equal(decoder['decoder_pred']['kernel'], again['decoder_pred']['kernel'])
    proc = run_main(['--config=configs/carb_deit_t.py:split=nope', f'--workdir={tmp_path}'], check=False)
    assert proc.returncode != 0 and 'unknown split' in proc.stderr and 'Traceback' not in proc.stderr
    proc = run_main(['--config=configs/carb_deit_t.py', *BACKBONE, '--config.carb.split=nope',
                     '--config.init_from=random_init', f'--workdir={tmp_path}'], check=False)
    assert proc.returncode != 0 and "carb.split='nope'" in proc.stderr and 'Traceback' not in proc.stderr
