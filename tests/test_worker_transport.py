"""Batches from grain's workers through reused shared memory: the same arrays as grain's own transfer, a slot
never written while the main process still holds a view of it, and nothing left in /dev/shm."""
import gc
import os

import grain
import jax
import numpy as np
import pytest

from sce_mae_jax.data import pipeline, worker_transport as wt


def _batch(k, rows=4):
    return {'image': np.full((rows, 6, 6, 3), k, np.uint8), 'id': np.arange(rows) + 10 * k, 'name': f'b{k}'}


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _in_ring(sent):
    return sent[wt._KEY][2] is not None


@pytest.fixture
def as_worker():
    wt.init_worker(0, 1)
    yield
    ring = wt._worker['ring']
    if ring is not None and os.path.exists(ring.path):
        os.unlink(ring.path)
    wt._worker.update(index=None, ring=None)


def test_a_batch_round_trips_through_a_slot_and_the_file_goes_once_mapped(as_worker):
    sent = wt.to_ring(_batch(1))
    path, seq, (slot, _, _, layout) = sent[wt._KEY]
    assert seq == 0 and set(layout) == {'image', 'id'} and 'image' not in sent and sent['name'] == 'b1'
    reader = wt.RingReader()
    got = reader(sent)
    assert _equal(got, _batch(1)) and (reader.in_ring, reader.moved_by_grain) == (1, 0)
    assert got['image'].base is got['id'].base  # views of one array over the slot, not copies
    assert not os.path.exists(path)  # unlinked once both processes map it
    ring = wt._worker['ring']
    assert ring.released[slot] == -1
    del got
    gc.collect()
    assert ring.released[slot] == 0  # released when the views are gone
    assert _equal(reader(wt.to_ring(_batch(2))), _batch(2))  # the mapping outlives the name


def test_a_slot_is_never_written_while_a_view_of_it_lives(as_worker):
    """The main process keeps a view derived from batch 0 while 3 x SLOTS more batches pass: every one of them
    goes through the other slots (or grain), and batch 0 stays intact until the view is dropped."""
    reader = wt.RingReader()
    kept = reader(wt.to_ring(_batch(0)))['image'][1:].reshape(-1)  # a view of a view of the slot
    for k in range(1, 3 * wt.SLOTS):
        assert _equal(reader(wt.to_ring(_batch(k))), _batch(k))
    assert (kept == 0).all() and reader.in_ring == 3 * wt.SLOTS
    ring = wt._worker['ring']
    assert ring.released[0] == -1 and ring.sent[0] == 0  # slot 0 never reused
    del kept
    gc.collect()
    assert ring.released[0] == 0


def test_a_worker_ahead_of_the_reader_never_overwrites_a_slot(as_worker):
    """The worker runs SLOTS + 2 batches ahead of the reader: the extra ones go through grain's transfer (their
    arrays in the element) and every slot still holds its own batch when read."""
    sent = [wt.to_ring(_batch(k)) for k in range(wt.SLOTS + 2)]
    assert [_in_ring(m) for m in sent] == [True] * wt.SLOTS + [False, False]
    reader = wt.RingReader()
    assert all(_equal(reader(m), _batch(k)) for k, m in enumerate(sent))
    assert (reader.in_ring, reader.moved_by_grain) == (wt.SLOTS, 2)
    gc.collect()
    assert all(_in_ring(m) and _equal(reader(m), _batch(k)) for k, m in ((k, wt.to_ring(_batch(k))) for k in range(3)))


def test_batches_grain_dropped_do_not_hold_their_slots(as_worker):
    """On set_state grain drops queued batches unread; the next batch read frees every slot sent before it."""
    reader = wt.RingReader()
    dropped = [wt.to_ring(_batch(k)) for k in range(wt.SLOTS)]
    del dropped
    late = wt.to_ring(_batch(99))  # all slots taken: grain carries it, and reading it frees the ring
    assert not _in_ring(late) and _equal(reader(late), _batch(99))
    again = [wt.to_ring(_batch(k)) for k in range(wt.SLOTS)]
    assert all(map(_in_ring, again)) and all(_equal(reader(m), _batch(k)) for k, m in enumerate(again))


def test_a_batch_larger_than_a_slot_goes_through_grain(as_worker):
    reader = wt.RingReader()
    reader(wt.to_ring(_batch(1)))
    big = _batch(2, rows=40)
    sent = wt.to_ring(big)
    assert not _in_ring(sent) and _equal(reader(sent), big)


def test_a_batch_built_in_its_slot_is_sent_without_a_copy(as_worker):
    reader = wt.RingReader()
    assert not np.shares_memory(wt.empty((4, 6, 6, 3), np.uint8), np.zeros(1))  # no ring yet: ordinary memory
    reader(wt.to_ring(_batch(0)))  # the first batch sizes the ring
    ring = wt._worker['ring']
    image = wt.empty((4, 6, 6, 3), np.uint8)
    image[...] = 7
    offset = image.__array_interface__['data'][0] - np.frombuffer(ring.mem, np.uint8).ctypes.data
    sent = wt.to_ring({'image': image, 'id': np.arange(4)})
    assert sent[wt._KEY][2][3]['image'][0] == offset  # sent from where it was built
    assert _equal(reader(sent), {'image': np.full((4, 6, 6, 3), 7, np.uint8), 'id': np.arange(4)})
    held = [wt.to_ring(_batch(k)) for k in range(wt.SLOTS)]  # every slot sent and unread: nowhere to build
    assert not np.shares_memory(wt.empty((4, 6, 6, 3), np.uint8), np.frombuffer(ring.mem, np.uint8))
    del held


def test_batches_built_ahead_get_slots_of_their_own(as_worker):
    """grain's read threads build the next batches before this one is sent: each in its own slot."""
    reader = wt.RingReader()
    reader(wt.to_ring(_batch(0)))
    ahead = [wt.empty((4, 6, 6, 3), np.uint8) for _ in range(3)]
    for k, image in enumerate(ahead):
        image[...] = k + 1
    assert not any(np.shares_memory(a, b) for i, a in enumerate(ahead) for b in ahead[i + 1:])
    sent = [wt.to_ring({'image': image}) for image in ahead]
    assert [reader(m)['image'][0, 0, 0, 0] for m in sent] == [1, 2, 3] and reader.in_ring == 4


def test_grain_workers_write_into_the_ring():
    """In grain's worker processes the elements that reach this process carry slot addresses, not arrays, and
    the reader gives back what the workers made, in order; nothing stays in /dev/shm."""
    ds = grain.MapDataset.range(24).map(_batch).to_iter_dataset().map(wt.to_ring)
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=2), worker_init_fn=wt.init_worker)
    reader = wt.RingReader()
    it = iter(ds)
    addresses = []
    for k in range(24):
        sent = next(it)
        addresses.append(sent[wt._KEY])
        assert _equal(reader(sent), _batch(k))
    assert sum(where is not None for _, _, where in addresses) >= 20
    paths = {path for path, _, _ in addresses}
    del it, ds
    assert len(paths) == 2 and not any(os.path.exists(p) for p in paths)


def test_train_iterator_with_workers_resumes_through_the_ring():
    """set_state on a running 2-worker iterator drops its queued batches; the ring recovers and the batches
    after the restored state are the in-process ones, also when the caller keeps every batch, as numpy arrays
    or as device arrays made from them."""
    rng = np.random.default_rng(0)
    src = pipeline.ArraySource(image=rng.integers(0, 256, (40, 6, 6, 3), np.uint8), id=np.arange(40))
    plain = pipeline.train_iterator(src, global_batch=8, seed=3, transform=None)
    expected = [next(plain)['image'] for _ in range(40)]
    workers = pipeline.train_iterator(src, global_batch=8, seed=3, transform=None, num_workers=2)
    kept = [next(workers)['image'] for _ in range(3)]
    state = workers.get_state()
    for _ in range(6):  # the workers run ahead; set_state drops what they queued
        next(workers)
    workers.set_state(state)
    kept += [next(workers)['image'] for _ in range(17)]  # more batches held than the rings have slots
    kept += [jax.device_put(next(workers)['image']) for _ in range(20)]  # on CPU jax may alias the slot
    assert all(np.array_equal(a, b) for a, b in zip(kept, expected))
