"""Building blocks of the job configs in `configs/`: each config file is `get_config(arg)` over these.

`arg` is the text after ':' in `--config=configs/x.py:arg`, a comma-separated list of `key=value` pairs
(e.g. `data=synthetic`) that select variants; any single field is still changed with `--config.x=y`.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from sce_mae_jax.errors import ConfigError
from sce_mae_jax.models.vit import DEIT
from sce_mae_jax.splits import SPLITS

# Every row an evaluation can report, in the order of its tables (evals/rows.py builds them; the report sorts by it).
ROWS = ('random_init', 'positions', 'mean_shape', 'pixels', 'mae', 'sce_mae', 'random_init_carb')

SIZES = {'t': 'tiny', 's': 'small', 'b': 'base'}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """'data=synthetic,size=s' → ConfigDict(data='synthetic', size='s'), with types taken from `defaults`."""
    out = dict(defaults)
    for item in filter(None, (arg or '').split(',')):
        key, _, value = item.partition('=')
        if key not in defaults:
            raise ConfigError(f'unknown config argument {key!r} (after the ":" of --config); this config takes '
                              f'{", ".join(f"{k}=..." for k in sorted(defaults))}')
        default = defaults[key]
        try:
            out[key] = type(default)(value) if default is not None and not isinstance(default, bool) else (
                value.lower() in ('1', 'true', 'yes') if isinstance(default, bool) else value)
        except ValueError:
            raise ConfigError(f'config argument {key}={value!r} is not of type {type(default).__name__} '
                              f'(default {key}={default})') from None
    return ml_collections.ConfigDict(out)


def data_fields(c: ml_collections.ConfigDict, data: str) -> None:
    # dataset name: synthetic (the embedded default), synthetic_plain, synthetic_wild (the content benchmark:
    # faces anywhere in the crop), celeba, mafl, aflw_m, aflw_r, aflw_rc, 300w
    c.data = data
    c.data_seed = 0          # seed of the synthetic generator (which faces exist), not of shuffling
    c.data_dir = ''          # where prepared TFDS datasets live (real data only)
    c.manual_dir = ''        # the user-prepared raw files (real data only; docs/datasets.md)


def run_fields(c: ml_collections.ConfigDict) -> None:
    c.seed = 0               # parameter initialisation, masking noise, shuffling and augmentation
    c.total_steps = config_dict.placeholder(int)  # when set, overrides epochs
    c.init_from = ''         # a workdir or checkpoint to start from
    c.log_every = 50         # steps between metrics.jsonl / TensorBoard records
    c.checkpoint_every = 1000  # steps between checkpoints (and one at the end, or on SIGTERM)
    c.keep_checkpoints = 3   # the latest this many are kept
    c.figure_every = 2000    # steps between figures/ PNGs
    # training monitor (train/monitor.py): matching error on the first `pairs` pairs of the training data's
    # matching set (MAFL for CelebA) every `every` steps and at the end of a run at least that long, logged as
    # match_same / match_diff, and match_positional (the descriptors' positional share); 0 turns it off
    c.monitor = dict(every=5000, pairs=100, batch_size=20)


def mae(size: str, arg: str | None) -> ml_collections.ConfigDict:
    """Stage-1 MAE pretraining with the paper's recipe (method.md §1)."""
    a = parse_arg(arg, data='synthetic')
    c = ml_collections.ConfigDict()
    c.job = 'pretrain'       # which function runs the config (jobs.py)
    data_fields(c, a.data)
    c.split = 'pretrain'     # the dataset split trained on (CelebA partition 0 minus MAFL, or synthetic pretrain)
    run_fields(c)
    c.batch_size = 512       # global, over all devices and processes
    c.epochs = 400           # passes over the split (total_steps, when set, overrides)
    c.warmup_epochs = 40     # linear warm-up, then half-cycle cosine to 0
    c.base_lr = 1.5e-4       # × batch_size / 256 (= 3e-4 at 512, the paper's value)
    c.weight_decay = 0.05    # AdamW, on parameters with ≥ 2 dimensions only
    c.b1, c.b2 = 0.9, 0.95   # AdamW betas
    # DeiT size (embed_dim, depth, num_heads, mlp_ratio), patch and input size; decoder width, depth and heads;
    # mask_ratio: share of patches removed; norm_pix_loss: per-patch normalised targets; dtype: compute dtype
    c.model = dict(**DEIT[SIZES[size]], mlp_ratio=4.0, patch_size=8, image_size=96, decoder_embed_dim=512,
                   decoder_depth=8, decoder_num_heads=16, mask_ratio=0.75, norm_pix_loss=True, dtype='float32',
                   # custom-VJP LayerNorm·Dense, GELU·Dense and attention (models/fused.py); False: plain autodiff
                   # and jax.nn.dot_product_attention, the same values
                   fused_ops=True,
                   # the encoder's position embeddings: 'sincos' (MAE's), 'none' (an ablation: the encoder
                   # sees content only), 'rope' (rotary attention between patches: tokens know offsets, not
                   # places) or 'rope_cyclic' (offsets modulo the grid: no border either); the decoder keeps
                   # its table either way (docs/results.md)
                   position='sincos')
    # random resized crop scale range and horizontal flip; workers: grain worker processes (0: threads in-process);
    # read_threads: grain's read threads per worker (more only for shards on remote storage);
    # device_augment: crop, resize and flip inside the jitted step, so the host only reads and batches
    # (data/device_augment.py; the same crops, loss curve and step time as on the host: docs/benchmarks.md)
    c.input = dict(crop_scale=(0.2, 1.0), flip=True, workers=0, read_threads=1, device_augment=True)
    return c


# Stage-2 ablations of the paper (Table 4, S6) and the LEAD baseline (Tables S2/S3), as named presets:
# `configs/carb_deit_s.py:ablation=no_locality`. Each is only a change of the fields below.
ABLATIONS = {
    'none': {},
    'no_clustering': {'carb.clustering': False},                       # full correspondence over all N tokens
    # Table 4's "+clustering" row: CARB's split and clustering kept, CL's loss (||pos_i − pos_j||^0.5, λ = 1) on T
    'no_lcr': {'lcr.locality': 'sqrt', 'lcr.rep': (1.0, 1.0, 1.0)},
    # CL's own stage 2 on the same ViT: every position, no split, no clustering, CL's loss
    'cl': {'carb.clustering': False, 'lcr.locality': 'sqrt', 'lcr.rep': (1.0, 1.0, 1.0)},
    'no_locality': {'lcr.locality': 'none'},                           # repellence without f_loc
    'no_att_att': {'lcr.rep': (0.0, 5.0, 2.0)},                        # Table S6 rows
    'no_att_inatt': {'lcr.rep': (5.0, 0.0, 2.0)},
    'no_inatt_inatt': {'lcr.rep': (5.0, 5.0, 0.0)},
    'lead': {'carb.objective': 'lead', 'carb.clustering': False},      # LEAD's stage 2 on the same frozen ViT
}

PROJECTOR_TAU = {64: 1 / 8, 128: 1 / 7, 256: 1 / 7}  # CL's temperatures (method.md §2.6)

# Stage-2 variants the pipeline configs (quickstart, synthetic_benchmark) train beside the default on the same
# stage 1 with `:study=NAME`, each a row of the evaluations: NAME → ';'-separated `ablation=...` or
# `group.field=value` (quickstart.py parse_overrides). docs/results.md reports both studies.
STUDIES = {
    'none': {},
    # the paper's Table 4 (and CL's own stage 2) on our ViT
    'table4': {'no_clustering': 'ablation=no_clustering', 'no_lcr': 'ablation=no_lcr', 'cl': 'ablation=cl'},
    # the projector: each change of issue 17 against the default, one at a time
    'projector': {
        'paper_map': 'carb.projector_input=substituted;carb.projector_map=tokens;projector.activation=softmax;'
                     'projector.softmax_scale=7.0',  # CL's softmax x7 on the substituted 12x12 map (before)
        'softmax_x7': 'projector.activation=softmax;projector.softmax_scale=7.0',
        'softmax_x1': 'projector.activation=softmax;projector.softmax_scale=1.0',
        'linear': 'projector.activation=linear',
        'augment_cl': 'input.augment=cl',
    },
}


def carb(size: str, arg: str | None, *, dim: int, eta: float) -> ml_collections.ConfigDict:
    """Stage-2 CARB + LCR on a frozen stage-1 DeiT (method.md §2)."""
    a = parse_arg(arg, data='synthetic', dim=dim, ablation='none', split='cls')
    if a.ablation not in ABLATIONS:
        raise ConfigError(f'unknown ablation {a.ablation!r}; choose one of {", ".join(sorted(ABLATIONS))}')
    if a.split not in SPLITS:
        raise ConfigError(f'unknown split {a.split!r}; choose one of {", ".join(SPLITS)}')
    c = ml_collections.ConfigDict()
    c.job = 'carb'           # which function runs the config (jobs.py)
    data_fields(c, a.data)
    c.split = 'pretrain'     # stage 2 trains on the stage-1 images (CelebA), no labels
    run_fields(c)
    c.checkpoint_every = 500
    c.figure_every = 500
    # CL's projector recipe (method.md §2.7): Adam(0.5, 0.999), L2 5e-4, cosine, 10 epochs, batch 32.
    c.batch_size = 32
    c.epochs = 10            # passes over the split (total_steps, when set, overrides)
    c.warmup_epochs = 0
    c.lr = 1e-3              # peak learning rate, cosine to 0
    c.b1, c.b2 = 0.5, 0.999  # Adam betas
    c.weight_decay = 5e-4    # L2 added to the gradient
    # the frozen backbone's architecture: must be the stage-1 model's (init_from is checked against it)
    c.model = dict(**DEIT[SIZES[size]], mlp_ratio=4.0, patch_size=8, image_size=96, dtype='float32',
                   position='sincos')  # the stage-1 model's `position` (what init_from=random_init builds)
    # out_dim: descriptor width; hidden: widths of ReLU layers before the output (none: CL's single layer);
    # kernel_size > 1: spatial convolutions; activation 'linear' (the plain per-position map: the best of the
    # projector study, docs/results.md) or 'softmax' (CL's, the paper's recipe, method.md §2.5: 1x1 conv, then
    # softmax × softmax_scale over the positions of each channel)
    c.projector = dict(out_dim=a.dim, hidden=(), kernel_size=1, activation='linear', softmax_scale=7.0)
    c.carb = dict(
        objective='lcr',     # 'lcr' (SCE-MAE) or 'lead' (LEAD's correspondence-distribution matching)
        split=a.split,       # attentive split criterion, splits.SPLITS: 'cls' is eq. 1 (docs/ablations.md)
        prior_images=512,    # split=cls_debiased: training images the per-position CLS prior is estimated on
        # split=recon with init_from=random_init (the control): the untrained MAE decoder (the paper's by default;
        # the pipeline copies its stage 1's)
        untrained_decoder=dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mask_ratio=0.75,
                               norm_pix_loss=True),
        eta=eta,             # attentive rate η (eq. 1)
        layer=2,             # clustering after this 0-based block: "after the third encoder layer"
        num_clusters=4,      # K_c
        density_k=5,         # neighbours in the DPC-kNN density
        mode='B',            # 'B': substitute final features; 'A': later blocks see only CLS+attentive+centres
        clustering=True,     # False: full correspondence over all tokens
        gather_selected=True,  # compute the loss on the |T| selected tokens only (same value, less work)
        # what the projector reads in training (train/carb.py token_descriptors): 'raw' the unsubstituted final
        # tokens (the centres' copies stay out of a softmax's normaliser) or 'substituted' (the withdrawn reading)
        projector_input='raw',
        # 'upsampled': the projector on the map bilinearly upsampled to image_size, as evaluation applies it,
        # each token read at its centre pixel; 'tokens': on the 12x12 token grid
        projector_map='upsampled',
        # > 0: not the paper's loss; LCR between the crop and a second crop of the same face moved by up to this
        # many tokens each way (carb.cross_view_lcr_loss), so that the place in the frame cannot satisfy it
        # (docs/results.md). Needs input.device_augment=True, input.augment=none, input.flip=False; at most 2.
        cross_view_shift=0,
    )
    # LCR loss (eq. 4-7): temperature τ (CL's: 1/8 for 64-d, 1/7 otherwise); λ_rep for att-att, att-inatt and
    # inatt-inatt pairs; locality f_loc: 'log' log(d + 1) (eq. 5), 'sqrt' CL's d^0.5, 'linear' d, 'none' 1
    c.lcr = dict(tau=PROJECTOR_TAU.get(a.dim, 1 / 7), rep=(5.0, 5.0, 2.0), locality='log')
    c.lead = dict(tau=0.05)  # carb.objective=lead: LEAD's temperature (paper 003)
    c.input = dict(
        augment='none',      # 'none': the centre crop; 'cl': CL's random resized crop + colour jitter (data/pipeline.py)
        flip=False,          # horizontal flip
        workers=0,           # grain worker processes (0: threads in-process)
        read_threads=1,      # grain's read threads per worker (more only for shards on remote storage)
        device_augment=False,  # crop, jitter and flip inside the jitted step, not on the host (data/device_augment.py)
    )
    for key, value in ABLATIONS[a.ablation].items():
        group, field = key.split('.')
        c[group][field] = value
    return c


# ---------------------------------------------------------------------------------------------- evaluation
def eval_fields(c: ml_collections.ConfigDict) -> None:
    """What every evaluation job reads: the workdirs whose rows it reports (evals/rows.py)."""
    c.stage1 = ''            # stage-1 workdir: the `mae` row, and the architecture of `random_init`
    c.stage2 = ''            # stage-2 workdir trained on stage1: the `sce_mae` row
    c.random_init_carb = ''  # stage-2 workdir trained with init_from=random_init: the control row
    c.extra = ''             # further stage-2 workdirs as rows: 'no_lcr=DIR,lead=DIR2'
    c.rows = ROWS            # the rows to report, of ROWS (evals/rows.py builds them)
    c.seed = 0               # random_init's initialisation
    c.batch_size = 32        # global; a multiple of the device count
    # cover-and-stride stride (divides the patch); block: −1 = final normed tokens (the paper's), or a 0-based
    # block, for the rows without a projector (a projector always reads the final tokens it was trained on)
    c.features = dict(stride=4, block=-1)


def eval_matching(arg: str | None) -> ml_collections.ConfigDict:
    """Landmark matching (paper Table 1, method.md §4): mean pixel error in the 70-px frame on stored pairs."""
    a = parse_arg(arg, data='synthetic')
    c = ml_collections.ConfigDict()
    c.job = 'eval_matching'  # which function runs the config (jobs.py)
    data_fields(c, a.data)
    c.split = 'match' if a.data.startswith('synthetic') else 'test'  # where the pairs' images come from
    eval_fields(c)
    # source images read (even): the first N of the split, two at a time (a, b), give N pairs: N/2 same-identity
    # (a against a warped copy of a) and N/2 different-identity (a against a warped b)
    c.num_images = 1000
    c.pairs_seed = 0         # the random thin-plate-spline warps of the generated pairs
    c.pairs_file = ''        # an .npz in data/pairs.py's layout (made elsewhere): used instead of generating
    c.pairs_cache = ''       # where generated pairs are stored ('' = ~/.cache/sce_mae_jax/pairs)
    # pairs shown in figures/matches.png and similarity.png (0: no figures); images, runs and gradient steps of
    # the t-SNE (scikit-learn's max_iter: 1000 is its default, 250 its least)
    c.figures = dict(pairs=4, tsne_images=200, tsne_runs=3, tsne_iters=1000)
    # the CLS-attention premise (eq. 1) on the target faces, per block, for the rows without a projector
    c.premise = dict(images=128, eta=0.1)
    return c


def _regressor_fields(c: ml_collections.ConfigDict) -> None:
    """What detection and limited annotations share (method.md §4; evals/detection.py)."""
    c.features.stride = 2    # the regressor's map: 96/stride cells a side (2: 48x48, method.md §3 decision)
    # Conv block (our choice; the paper says "a convolution block"): per hidden width a k x k conv + ReLU, then
    # a 1x1 conv to L·50 heatmaps, soft-argmax (softmax × 100), per-landmark linear 100 → 2 without bias.
    c.regressor = dict(heatmaps_per_landmark=50, hidden=(256,), kernel_size=3, temperature=100.0)
    c.loss_scale = 10.0      # smooth-L1 (β = 1) on 10× normalised coordinates
    c.b1, c.b2 = 0.9, 0.999  # Adam; weight decay is L2 added to the gradient (PyTorch Adam's weight_decay)
    c.weight_decay = 5e-4
    c.total_steps = config_dict.placeholder(int)  # when set, every regressor trains this many steps
    c.num_train_images = 0   # the first N training images only (0 = the whole split): quick runs
    c.num_test_images = 0    # the first N test images only (0 = the whole split): quick runs
    c.only = ''              # comma-separated sets to run (e.g. 'synthetic_5'); '' = all of the data's sets
    # TPS augmentation (used when augment='tps'): one warp per example at 136 px, then the centre crop
    c.tps = dict(noise_all=5e-4, noise_half=0.0, translation=0.02, scale=0.02, rotation_deg=2.0)
    c.figures = dict(faces=6)  # test faces per row in figures/detection_<set>.png (0 = no figure)
    c.log_every = 100        # regressor steps between metrics records
    c.checkpoint_every = 1000  # regressor steps between checkpoints
    c.keep_checkpoints = 1   # per regressor


def _regressor_job(job: str, arg: str | None, *, data: str, lr: float, augment: str) -> ml_collections.ConfigDict:
    a = parse_arg(arg, data=data)
    c = ml_collections.ConfigDict()
    c.job = job              # which function runs the config (jobs.py)
    data_fields(c, a.data)
    eval_fields(c)
    _regressor_fields(c)
    c.lr = lr                # Adam, cosine to 0 (method.md §4)
    c.batch_size = 32
    c.augment = augment      # 'none' or 'tps' (one random warp per example, the fields `tps`)
    return c


def eval_detection(arg: str | None) -> ml_collections.ConfigDict:
    """Landmark detection (paper Table 2, method.md §4): a regressor on frozen features, error in % of IOD."""
    c = _regressor_job('eval_detection', arg, data='synthetic', lr=1e-3, augment='none')
    # Regressor epochs per dataset (the paper gives none; our choice). '300w' is spelled w300 (a field name).
    c.epochs = dict(synthetic=20, mafl=50, aflw_m=50, aflw_r=50, w300=100)
    # regressors per row without stage-2 seed replicates (seeds seed, seed + 1, ...; results ROW@regK): a row's
    # spread then includes the regressor's own, and the report judges `sce_mae` against `mae` only when `mae`
    # has one (a row with stage-2 replicates has its spread from them, one regressor each)
    c.regressor_seeds = 1
    return c


def eval_limited(arg: str | None) -> ml_collections.ConfigDict:
    """Limited annotations (paper Table 3, method.md §4): N annotated AFLW_M images, mean ± std over seeds,
    lr 0.01, a single TPS warp per example."""
    c = _regressor_job('eval_limited', arg, data='aflw_m', lr=1e-2, augment='tps')
    # one draw of N images per seed; an epoch = the N images repeated to epoch_size (0 = the train split's size)
    c.limited = dict(sizes=(1, 5, 10, 20, 50, 100), seeds=(0, 1, 2), epochs=50, epoch_size=0)
    c.figures.faces = 0
    return c
