"""Throughput and cost benchmarks; results go to docs/benchmarks.md with the command, machine and date.

    # the compiled train step of any training config, on synthetic input, after warm-up
    python -m sce_mae_jax.bench --config=configs/mae_deit_s.py --config.batch_size=64 --steps=20
    python -m sce_mae_jax.bench --config=configs/carb_deit_s.py --steps=20
    # synthetic-face generator and stage-1 input pipeline images/s on this host
    python -m sce_mae_jax.bench --config=configs/mae_deit_s.py --config.batch_size=64 --mode=data
    # per-core images/s of each input stage (render, read, decode, crop/resize, flip, batch), rendered and
    # prepared faces, and the cores a step rate needs; --input_data_dir=DIR times a prepared real dataset
    python -m sce_mae_jax.bench --config=configs/mae_deit_s.py --config.batch_size=64 --mode=input
    # stage-2 loss: selective (attentive + centres) vs full correspondence, FLOPs / memory / time
    python -m sce_mae_jax.bench --config=configs/carb_deit_s.py --mode=loss
    # bare fp32 matmul GFLOP/s at the MAE step's shapes: the ceiling any implementation has on this device
    python -m sce_mae_jax.bench --config=configs/mae_deit_s.py --config.batch_size=64 --mode=matmul
    # evaluation features: cover-and-stride at each stride (+ upsampling to 96 px and the projector), images/s
    python -m sce_mae_jax.bench --config=configs/carb_deit_s.py --config.batch_size=32 --mode=features

`--mode=step` prints the device, dtype, batch, step time, images/s, MFU and peak memory; its last line is
`imgs_per_s=<number>`. MFU is the analytic model FLOPs (flops.py) over the device kind's datasheet peak
(flops.PEAKS), not XLA's cost analysis, which leaves out the cuBLAS calls on GPU; kinds not in the table (CPUs)
get no MFU unless `--peak_tflops` gives one.
"""
from __future__ import annotations

import functools
import platform
import resource
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from sce_mae_jax import flops


def define_flags(flag_values: flags.FlagValues, sys_argv: Sequence[str] | None = None) -> None:
    """The benchmark's flags on `flag_values`; `--config.x=y` overrides are taken from `sys_argv` (default
    sys.argv), as ml_collections defines one flag per override it finds there."""
    fv = dict(flag_values=flag_values)
    config_flags.DEFINE_config_file('config', None, 'A training config (configs/*.py[:arg]).', lock_config=True,
                                    sys_argv=sys_argv, **fv)
    flags.DEFINE_enum('mode', 'step', ['step', 'data', 'input', 'loss', 'matmul', 'features'], 'What to measure.',
                      **fv)
    flags.DEFINE_string('input_data_dir', '', 'With --mode=input: where config.data is prepared as array_record; '
                        "'' = prepare --input_images synthetic faces in a temporary folder.", **fv)
    flags.DEFINE_integer('input_images', 300, 'With --mode=input: images timed per stage.', **fv)
    flags.DEFINE_list('input_workers', ['0', '2'], 'With --mode=input or --mode=data: grain worker processes of '
                      'the end-to-end pipeline runs.', **fv)
    flags.DEFINE_list('input_threads', [], "With --mode=input: grain's read threads (per worker process, or "
                      "in this process with 0 workers) of the end-to-end runs; default the config's "
                      'input.read_threads.', **fv)
    flags.DEFINE_float('input_target', 5763.0, 'With --mode=input: the step rate (images/s) the input must feed; '
                       "the default is the issue's H100 DeiT-S bf16 batch-512 step.", **fv)
    flags.DEFINE_list('strides', ['8', '4', '2'], 'With --mode=features: the cover-and-stride strides to time.',
                      **fv)
    flags.DEFINE_integer('steps', 20, 'Timed steps (after warm-up).', **fv)
    flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.', **fv)
    flags.DEFINE_float('peak_tflops', 0.0, 'Peak TFLOP/s of one device to report MFU against, overriding the '
                       'datasheet table (flops.PEAKS); needed for device kinds not in it, e.g. CPUs.', **fv)


define_flags(flags.FLAGS)
FLAGS = flags.FLAGS


def _machine() -> str:
    d = jax.devices()[0]
    return f'{jax.device_count()}x {d.device_kind} ({d.platform}), host {platform.node()}, jax {jax.__version__}'


def peak_memory() -> str:
    """The device allocator's peak where the backend keeps one (GPU, TPU); XLA:CPU keeps none, so there the
    process's peak resident set, which includes the host-side Python, data and compiler memory."""
    stats = jax.devices()[0].memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
        return f'device peak {stats["peak_bytes_in_use"] / 2**30:.2f} GiB (device 0)'
    return f'host peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (no device stats)'


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get('flops', 0.0))


def mfu_line(model_flops_per_image: float, images_per_s: float, dtype: str, peak_override: float = 0.0) -> str:
    """Analytic model FLOP/s per device against the device kind's datasheet peak (flops.PEAKS), or against
    `peak_override` TFLOP/s when given; no MFU where neither is known."""
    per_device = model_flops_per_image * images_per_s / jax.device_count() / 1e12
    line = f'model FLOPs {model_flops_per_image / 1e9:.2f} G/image (analytic), {per_device:.3f} TFLOP/s per device'
    kind = jax.devices()[0].device_kind
    if peak_override:
        peak, source = peak_override, '--peak_tflops'
    else:
        found = flops.peak_tflops(kind, dtype)
        if found is None:
            return line + f', MFU n/a (no {dtype} peak known for device kind {kind!r}; pass --peak_tflops)'
        peak, source = found
    return line + f', MFU {100 * per_device / peak:.1f}% of {peak:g} TFLOP/s ({source})'


def build_step(config):
    """(jitted step, state, the step's other arguments) for the config's job, on random input."""
    from sce_mae_jax.train import carb as carb_train, common, pretrain

    mesh = common.make_mesh()
    repl, data_sh = common.replicated(mesh), common.data_sharded(mesh)
    common.check_batch_size(config.batch_size)
    size = config.model.image_size
    side = size
    if config.input.device_augment:  # the step crops the images as read
        from sce_mae_jax.data import preprocess
        side = preprocess.OUT_SIZE
    images = np.random.default_rng(0).integers(0, 256, (config.batch_size, side, side, 3), dtype=np.uint8)
    batch = common.global_batch({'image': images}, data_sh)
    if config.job == 'pretrain':
        *_, state, _, step = pretrain.state_and_step(config, mesh, 10**6)
        return step, state, (batch,)
    if config.job == 'carb':
        carb_train.validate(config)
        split = config.carb.get('split', 'cls')
        if split in ('cls_debiased', 'recon'):  # their split inputs come from a stage-1 workdir (prepare_split)
            raise ValueError(f'no step benchmark for carb.split={split}: it reads a stage-1 workdir; time the '
                             'default split (the step differs only in how the attentive tokens are scored)')
        encoder, _, state, _, step = carb_train.state_and_step(config, mesh, 10**6)
        backbone = jax.jit(encoder.init, out_shardings=repl)(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
        return step, state, (backbone['params'], batch, {})
    raise ValueError(f'no benchmark for job {config.job!r}')


def bench_step(config, steps: int, warmup: int, peak_override: float = 0.0) -> dict:
    """Times the compiled train step; prints device, dtype, batch, step time, images/s, MFU and peak memory."""
    if steps < 1 or warmup < 0:
        raise ValueError(f'need steps >= 1 and warmup >= 0, got steps={steps} warmup={warmup}')
    step, state, args = build_step(config)
    t0 = time.perf_counter()
    compiled = step.lower(state, *args).compile()
    print(f'compile: {time.perf_counter() - t0:.1f} s')
    mem = compiled.memory_analysis()
    temp = f', XLA temp buffers {mem.temp_size_in_bytes / 2**30:.2f} GiB' if mem is not None else ''
    for _ in range(warmup):
        state, metrics = compiled(state, *args)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, *args)
    jax.block_until_ready((state, metrics))
    dt = (time.perf_counter() - t0) / steps
    ips = config.batch_size / dt
    dtype = config.model.get('dtype', 'float32')
    print(f'machine: {_machine()}')
    print(f'job={config.job} batch={config.batch_size} dtype={dtype} step={dt * 1e3:.1f} ms '
          f'images/s={ips:.2f} loss={float(metrics["loss"]):.4f}')
    print(mfu_line(flops.step_flops(config), ips, dtype, peak_override))
    print(f'memory: {peak_memory()}{temp}')
    xla = _flops(compiled)
    if xla:  # kept for comparison only: it misses cuBLAS calls on GPU and counts recomputation
        print(f'XLA cost analysis (not used for MFU): {xla / config.batch_size / 1e9:.2f} G/image')
    print(f'imgs_per_s={ips:.2f}')
    return {'step_s': dt, 'images_per_s': ips, 'loss': float(metrics['loss'])}


def bench_data(config, workers: Sequence[int] = (0, 2)) -> dict:
    """images/s of the synthetic generator alone, then of the stage-1 grain pipeline at `config.batch_size`
    with each number of `workers` processes."""
    from sce_mae_jax.data.synthetic import SyntheticFaces

    src = SyntheticFaces('pretrain', seed=config.data_seed)
    src[0]
    n = 200
    t0 = time.perf_counter()
    for i in range(1, n + 1):
        src[i]
    gen = n / (time.perf_counter() - t0)
    print(f'synthetic generator (136 px, one thread): {gen:.0f} images/s')
    rates = {'generator': gen}
    for w in workers:
        # 60 batches: long enough that batches prefetched before the clock starts do not count much
        rates[w] = _pipeline_rate(src, config, w, batches=60)
        host = 'generate' if config.input.device_augment else 'generate + random resized crop + flip'
        print(f'stage-1 pipeline ({host}, batch {config.batch_size}, {w} worker processes): {rates[w]:.0f} '
              'images/s')
    print(f'machine: {_machine()}')
    return rates


def _rate(fn, items) -> float:
    """Items per second of `fn` over `items`, one call each, after one untimed call."""
    fn(items[0])
    t0 = time.perf_counter()
    for item in items:
        fn(item)
    return len(items) / (time.perf_counter() - t0)


def _pipeline_rate(source, config, workers: int, batches: int = 40, threads: int | None = None,
                   seconds: float = 3.0) -> float:
    """images/s of the stage-1 grain pipeline over at least `batches` batches and `seconds`, after 3 untimed
    batches (worker start-up). At ~10 ms a batch, 40 batches alone took under half a second, in which the
    batches prefetched before the clock started still counted."""
    from sce_mae_jax.data import pipeline
    batch = config.batch_size
    from sce_mae_jax.train import pretrain
    threads = config.input.read_threads if threads is None else threads
    it = pipeline.train_iterator(source, global_batch=batch, seed=0, num_workers=workers, num_threads=threads,
                                 transform=pretrain.host_transform(config))
    for _ in range(3):
        next(it)
    n, t0 = 0, time.perf_counter()
    while n < batches or time.perf_counter() - t0 < seconds:
        next(it)
        n += 1
    return n * batch / (time.perf_counter() - t0)


def bench_input(config, data_dir: str, n: int, workers: Sequence[int], target: float,
                threads: Sequence[int] = ()) -> dict:
    """Per-core images/s of each stage of the stage-1 input, one thread in this process, then the grain pipeline
    end to end. The prepared array_record set is `config.data`/`config.split` in `data_dir`; without one,
    `n` synthetic faces are prepared into a temporary folder (`prepare --dataset=synthetic`). The end-to-end runs
    batch `config.batch_size` images."""
    import tempfile

    from sce_mae_jax.data import pipeline, sources
    from sce_mae_jax.data.synthetic import SyntheticFaces

    pipeline.keep_freed_memory()  # as every training iterator does: the stages are timed under it too
    rng = np.random.default_rng(0)
    size = config.model.image_size
    rendered = SyntheticFaces('pretrain', seed=config.data_seed)
    rates = {'render (synthetic face, 136 px)': _rate(lambda i: rendered[i], list(range(1, n + 1)))}

    tmp = None
    if not data_dir:
        tmp = data_dir = tempfile.mkdtemp(prefix='bench_input_')
        sources.prepare_synthetic('synthetic', data_dir=data_dir, seed=config.data_seed, num_examples=n)
        name, split = 'synthetic', 'pretrain'
    else:
        name, split = config.data, config.get('split', 'pretrain')
    stored = sources.get_source(name, split, data_dir=data_dir, manual_dir=None, seed=config.data_seed)
    records = getattr(stored, '_records', None) or getattr(stored, '_source', None)  # the TFDS data source
    order = [int(i) for i in rng.permutation(len(stored))[:n]]
    for i in order:  # one pass first: the timings are of the page cache, not the disk
        stored[i]
    if records is not None and hasattr(records, 'data_source'):
        rates['read (array_record, one record)'] = _rate(lambda i: records.data_source[i], order)
    rates['read + decode (record → uint8 136 px)'] = _rate(lambda i: stored[i], order)
    batch = config.batch_size
    batched = hasattr(stored, 'read_images') and config.input.device_augment and len(order) >= batch
    if batched:  # what the training pipeline does with the crops on the device
        calls = [order[i:i + batch] for i in range(0, len(order) - batch + 1, batch)] * max(1, 2560 // len(order))
        rates[f'read + decode + batch, {batch} records a call (read_images)'] = batch * _rate(stored.read_images,
                                                                                             calls)

    images = [rendered[i]['image'] for i in range(1, min(n, 64) + 1)]
    crop_rng = np.random.default_rng(1)
    rates[f'random resized crop + bicubic resize to {size}'] = _rate(
        lambda im: pipeline.random_resized_crop(im, size, crop_rng, scale=tuple(config.input.crop_scale)), images)
    small = [np.ascontiguousarray(im[:size, :size]) for im in images]
    rates['flip (always; the pipeline flips half)'] = _rate(lambda im: np.ascontiguousarray(im[:, ::-1]), small)
    rates[f'batch (np.stack of {len(small)})'] = len(small) * _rate(lambda _: np.stack(small), list(range(20)))

    print(f'input stages, one thread: {_machine()}, {len(stored)} prepared {name}/{split} records in {data_dir}')
    for what, rate in rates.items():
        print(f'  {what}: {rate:,.0f} images/s ({1e3 / rate:.3f} ms/image)')
    # with input.device_augment the crop and flip run in the step: the host reads, decodes and batches
    on_host = ('batch',) if config.input.device_augment else ('random resized', 'flip', 'batch')
    augment = [k for k in rates if k.startswith(on_host)]
    print(f'  host stages (input.device_augment={config.input.device_augment}): read + decode, '
          f'{", ".join(k.split(" (")[0] for k in augment)}'
          + (f'; from prepared records read_images, {batch} a call' if batched else ''))
    per_image = {'rendered': 1 / rates['render (synthetic face, 136 px)'],
                 'prepared': 1 / rates['read + decode (record → uint8 136 px)']}
    for src_name in per_image:
        if src_name == 'prepared' and batched:  # the batched read replaces read + decode and the stack
            per_image[src_name] = 1 / rates[f'read + decode + batch, {batch} records a call (read_images)']
        else:  # the pipeline flips half the images
            per_image[src_name] += sum((0.5 if k.startswith('flip') else 1.0) / rates[k] for k in augment)
        print(f'  {src_name} ({name if src_name == "prepared" else "synthetic"}), all stages: '
              f'{1 / per_image[src_name]:,.0f} images/s per core; '
              f'{target:,.0f} images/s needs {target * per_image[src_name]:.1f} cores')
    for w in workers:
        for t in threads or [config.input.read_threads]:
            for src_name, src in (('rendered', rendered), ('prepared', stored)):
                rates[f'grain, {src_name}, {w} workers, {t} threads'] = r = _pipeline_rate(src, config, w, threads=t)
                cores = max(w, 1)  # the yardstick: w workers against w cores at the stage sum
                print(f'  grain pipeline, {src_name}, {w} worker processes, {t} read threads: {r:,.0f} images/s '
                      f'({r * per_image[src_name] / cores:.0%} of {cores} core{"s" * (cores > 1)} at the stage sum)')
    if tmp:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return {'rates': rates, 'per_image_s': per_image}


def bench_loss(config) -> None:
    """The LCR loss (projector output → loss, forward + backward) on |T| selected tokens vs all N."""
    from sce_mae_jax import carb
    from sce_mae_jax.train import carb as carb_train

    b, n, d = config.batch_size, (config.model.image_size // config.model.patch_size) ** 2, config.projector.out_dim
    rng = np.random.default_rng(0)
    proj = jnp.asarray(rng.normal(size=(b, n, d)), jnp.float32)
    sim = jnp.asarray(rng.normal(size=(b, 1, n)), jnp.float32)
    attentive = carb.attentive_mask(sim, config.carb.eta)
    centres = jnp.asarray(np.stack([rng.choice(np.flatnonzero(~np.asarray(a)), config.carb.num_clusters, replace=False)
                                    for a in attentive]))
    selected = attentive | jnp.any(centres[..., None] == jnp.arange(n), axis=1)
    pos = carb.token_positions(int(n ** 0.5), int(n ** 0.5), config.model.patch_size)
    size = carb_train.selected_size(config.carb, n)
    lcr = functools.partial(carb.lcr_loss, tau=config.lcr.tau, rep=tuple(config.lcr.rep), locality=config.lcr.locality)

    def selective(p):
        g, att, valid, gpos = carb_train.gather_selected(p, attentive, selected, pos, size)
        return lcr(g, valid, att, gpos)[0]

    def full(p):
        return lcr(p, jnp.ones_like(selected), attentive, pos)[0]

    print(f'LCR loss + gradient, batch {b}, N={n}, |T|={size}, D={d}; {_machine()}')
    for name, fn in (('selective (attentive + centres)', selective), ('full correspondence (all N)', full)):
        compiled = jax.jit(jax.value_and_grad(fn)).lower(proj).compile()
        mem = compiled.memory_analysis()
        temp = getattr(mem, 'temp_size_in_bytes', 0) if mem is not None else 0
        out = compiled(proj)
        jax.block_until_ready(out)
        t0 = time.perf_counter()
        for _ in range(50):
            out = compiled(proj)
        jax.block_until_ready(out)
        dt = (time.perf_counter() - t0) / 50
        print(f'{name}: {_flops(compiled) / 1e6:.2f} MFLOP, temp memory {temp / 2**20:.2f} MiB, {dt * 1e3:.3f} ms')


def bench_matmul(config) -> None:
    """GFLOP/s of single fp32 matmuls shaped like the MAE step's encoder MLP, decoder MLP and decoder qkv."""
    m = config.model
    b = config.batch_size
    visible = int(m.image_size ** 2 / m.patch_size ** 2 * (1 - m.mask_ratio)) + 1
    shapes = [(b * visible, m.embed_dim, 4 * m.embed_dim),
              (b * (m.image_size ** 2 // m.patch_size ** 2 + 1), m.decoder_embed_dim, 4 * m.decoder_embed_dim),
              (b * (m.image_size ** 2 // m.patch_size ** 2 + 1), m.decoder_embed_dim, 3 * m.decoder_embed_dim)]
    print(f'machine: {_machine()}')
    for rows, k, n in shapes:
        x = jnp.ones((rows, k), jnp.float32)
        w = jnp.ones((k, n), jnp.float32)
        f = jax.jit(jnp.matmul)
        f(x, w).block_until_ready()
        t0 = time.perf_counter()
        for _ in range(10):
            out = f(x, w)
        out.block_until_ready()
        dt = (time.perf_counter() - t0) / 10
        print(f'({rows}x{k}) @ ({k}x{n}): {2 * rows * k * n / dt / 1e9:.0f} GFLOP/s')


def bench_features(config, strides: Sequence[int] = (8, 4, 2), steps: int = 20) -> None:
    """The evaluation's descriptor maps (evals/features.py) on random images, jitted over the mesh with the batch
    on `data`: stage-1 map at each stride, then (as in matching) bilinear to the image size and the projector."""
    from sce_mae_jax.evals import features
    from sce_mae_jax.models.heads import Projector
    from sce_mae_jax.models.mae import encoder_from_model_config, random_encoder_params
    from sce_mae_jax.train import common

    mesh = common.make_mesh()
    repl, data_sh = common.replicated(mesh), common.data_sharded(mesh)
    common.check_batch_size(config.batch_size)
    encoder = encoder_from_model_config(config.model)
    backbone = common.replicate(random_encoder_params(encoder, 0), mesh)
    projector = Projector(**{**config.projector, 'hidden': tuple(config.projector.hidden)})
    size = encoder.image_size
    proj = common.replicate(projector.init(jax.random.PRNGKey(0), jnp.zeros((1, encoder.num_patches,
                                                                              encoder.embed_dim)))['params'], mesh)
    images = jax.device_put(np.random.default_rng(0).integers(0, 256, (config.batch_size, size, size, 3),
                                                              dtype=np.uint8), data_sh)
    print(f'features: {_machine()}, batch {config.batch_size}, dtype {config.model.get("dtype", "float32")}, '
          f'DeiT {encoder.embed_dim}-d x {encoder.depth}, projector {projector.out_dim}-d')
    for stride in strides:
        for name, kw in (('stage 1', {}), ('stage 1 → 96 px → projector', {'projector': projector, 'size': size})):
            fn = jax.jit(functools.partial(features.dense_features, encoder=encoder, stride=stride, **kw),
                         in_shardings=(repl, repl, data_sh), out_shardings=data_sh)
            fn(backbone, proj, images).block_until_ready()
            t0 = time.perf_counter()
            for _ in range(steps):
                out = fn(backbone, proj, images)
            out.block_until_ready()
            dt = (time.perf_counter() - t0) / steps
            print(f'stride {stride} ({(encoder.patch_size // stride) ** 2} passes), {name}: map {out.shape[1:]}, '
                  f'{config.batch_size / dt:.1f} images/s, {peak_memory()}')


def dispatch(fv: flags.FlagValues):
    """Runs the benchmark that parsed flags `fv` ask for."""
    config = fv.config
    workers = [int(w) for w in fv.input_workers]
    if fv.mode == 'features':
        return bench_features(config, [int(s) for s in fv.strides], fv.steps)
    if fv.mode == 'data':
        return bench_data(config, workers)
    if fv.mode == 'input':
        return bench_input(config, fv.input_data_dir, fv.input_images, workers, fv.input_target,
                           [int(t) for t in fv.input_threads])
    if fv.mode == 'loss':
        return bench_loss(config)
    if fv.mode == 'matmul':
        return bench_matmul(config)
    return bench_step(config, fv.steps, fv.warmup, fv.peak_tflops)


def run(argv: Sequence[str]):
    """`python -m sce_mae_jax.bench ARGV[1:]` in this process, on flags of its own (tests run the documented
    commands this way, sharing one JAX)."""
    fv = flags.FlagValues()
    define_flags(fv, argv)
    fv(list(argv))
    if fv.config is None:
        raise ValueError('--config is required')
    return dispatch(fv)


def main(argv):
    del argv
    dispatch(FLAGS)


if __name__ == '__main__':
    flags.mark_flags_as_required(['config'])
    app.run(main)
