"""grain input pipeline: the global batch does not depend on the process count, state resumes exactly."""
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from sce_mae_jax.data import pipeline


def _source(n=40):
    return pipeline.ArraySource(image=np.zeros((n, 4, 4, 3), np.uint8), id=np.arange(n))


def _ids(it, steps):
    return [next(it)['id'].tolist() for _ in range(steps)]


def _iterator(src, process_count=1, process_index=0, **kw):
    with mock.patch.object(jax, 'process_count', return_value=process_count), \
            mock.patch.object(jax, 'process_index', return_value=process_index):
        return pipeline.train_iterator(src, global_batch=8, seed=3, transform=lambda e, r: e, **kw)


def test_global_batch_is_the_same_for_any_process_count():
    src = _source()
    single = _ids(_iterator(src), 12)  # 12 steps > 1 epoch of 40: crosses a reshuffle
    parts = [_ids(_iterator(src, 2, i), 12) for i in range(2)]
    assert [a + b for a, b in zip(*parts)] == single
    assert not set(parts[0][0]) & set(parts[1][0])
    # every epoch is a permutation, and epochs are shuffled differently
    flat = sum(single, [])
    assert sorted(flat[:40]) == list(range(40)) and flat[:40] != flat[40:80]


def test_each_epoch_is_a_permutation_of_the_seed_and_epoch_alone():
    src = _source()
    first = pipeline._ShuffledEpochs(src, seed=3)
    again = pipeline._ShuffledEpochs(src, seed=3)
    ids = [first[k]['id'] for k in range(120)]
    assert [again[k]['id'] for k in (119, 5, 80, 41)] == [ids[119], ids[5], ids[80], ids[41]]  # any access order
    epochs = [ids[e * 40:(e + 1) * 40] for e in range(3)]
    assert all(sorted(e) == list(range(40)) for e in epochs) and len({tuple(e) for e in epochs}) == 3
    other = [pipeline._ShuffledEpochs(src, seed=4)[k]['id'] for k in range(40)]
    assert other != epochs[0] and sorted(other) == list(range(40))


def test_images_only_path_reads_the_same_batches_as_the_transform_path():
    """With the crops on the device the host reads whole batches itself (`_LocalBatches`): the same images,
    batch for batch, for each process's slice, across a reshuffle, and the same iterator state."""
    n = 40
    images = np.random.default_rng(0).integers(0, 256, (n, 4, 4, 3), np.uint8)
    src = pipeline.ArraySource(image=images, id=np.arange(n))
    for count, index in ((1, 0), (2, 1)):
        with mock.patch.object(jax, 'process_count', return_value=count), \
                mock.patch.object(jax, 'process_index', return_value=index):
            plain = pipeline.train_iterator(src, global_batch=8, seed=3, transform=None)
            mapped = pipeline.train_iterator(src, global_batch=8, seed=3, transform=lambda e, r: e)
        for _ in range(12):
            a, b = next(plain), next(mapped)
            assert list(a) == ['image'] and a['image'].shape == (8 // count, 4, 4, 3)
            np.testing.assert_array_equal(a['image'], b['image'])
            np.testing.assert_array_equal(a['image'], images[b['id']])
        assert plain.get_state() == mapped.get_state()


def test_iterator_state_resumes_on_the_next_batch():
    it = _iterator(_source())
    _ids(it, 3)
    state = it.get_state()
    expected = _ids(it, 4)
    it2 = _iterator(_source())
    it2.set_state(state)
    assert _ids(it2, 4) == expected


def test_worker_processes_give_the_same_batches():
    src = _source()
    assert _ids(_iterator(src, num_workers=2), 6) == _ids(_iterator(src), 6)


def test_batches_reuse_freed_memory():
    """In a fresh interpreter (this one's allocator may be set already), batches of 64 136-px images read as
    one new bytes object per record (as array_record returns them) and dropped as soon as they arrive: glibc's
    defaults faulted ~1,700 pages in again for every batch (867 pages each; read in this thread, the case
    where the default was worst)."""
    code = """
import resource, numpy as np
from sce_mae_jax.data import pipeline
class Records:
    def __len__(self):
        return 256
    def read_images(self, keys):
        raw = [bytes(136 * 136 * 3) for _ in keys]
        out = np.empty((len(raw), 136, 136, 3), np.uint8)
        for i, record in enumerate(raw):
            out[i] = np.frombuffer(record, np.uint8).reshape(136, 136, 3)
        return out
it = pipeline.train_iterator(Records(), global_batch=64, seed=0, transform=None, num_threads=0)
for _ in range(8):
    next(it)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    next(it)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 40)
"""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                         env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    assert float(out.stdout.split()[-1]) < 50, out.stdout


def test_pretrain_augment_is_deterministic_per_position_and_shaped():
    src = pipeline.ArraySource(image=np.random.default_rng(0).integers(0, 255, (16, 136, 136, 3), dtype=np.uint8))
    aug = pipeline.pretrain_augment(96)
    a = next(pipeline.train_iterator(src, global_batch=8, seed=1, transform=aug))['image']
    b = next(pipeline.train_iterator(src, global_batch=8, seed=1, transform=aug))['image']
    assert a.shape == (8, 96, 96, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_random_resized_crop_of_full_box_is_a_resize():
    img = np.random.default_rng(1).integers(0, 255, (136, 136, 3), dtype=np.uint8)
    out = pipeline.random_resized_crop(img, 96, np.random.default_rng(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert out.shape == (96, 96, 3)
    assert abs(float(out.mean()) - float(img.mean())) < 2.0


def test_eval_transform_moves_landmarks_with_the_crop():
    img = np.zeros((136, 136, 3), np.uint8)
    img[70, 50] = 255
    out = pipeline.eval_transform(96)({'image': img, 'landmarks': np.array([[50.0, 70.0]], np.float32)})
    x, y = out['landmarks'][0]
    assert out['image'][int(y), int(x), 0] == 255 and (x, y) == (30.0, 50.0)


def test_normalize_uses_celeba_statistics_and_inverts():
    img = np.random.default_rng(2).integers(0, 255, (2, 4, 4, 3), dtype=np.uint8)
    x = np.asarray(pipeline.normalize(jnp.asarray(img)))
    np.testing.assert_allclose(x[..., 0], (img[..., 0] / 255 - 0.5084) / 0.2599, rtol=1e-5)
    np.testing.assert_array_equal(pipeline.denormalize(x), img)
