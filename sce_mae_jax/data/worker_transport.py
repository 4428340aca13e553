"""Batches from grain's worker processes through shared memory that is used again, not allocated again.

grain hands each worker's element to the main process in a fresh shared-memory block: every page of every
batch is faulted in and zeroed in the worker and mapped again in the main process, which cost as much CPU as
reading the batch (docs/benchmarks.md, input pipeline). Here each worker owns a ring of `SLOTS` batch-sized
slots in one shared file. It builds a batch in a free slot (`empty`, where the batch is made by filling an
array) or copies it there, and sends grain only the slot's address. The main process hands out arrays that
are views of the slot, and marks the slot released in the file's header when the last of them (and of
anything derived from them, a device buffer that aliases it included) is gone; only then does the worker
write there again. Batches grain drops unread (its queue on `set_state`) release their slots as soon as a
later batch from the same worker arrives. With every slot in use, or a batch larger than a slot, the batch
goes through grain's own shared memory as before: the arrays are the same either way, only the cost differs.

Used by `pipeline.train_iterator` with `num_workers > 0`: `to_ring` maps in the workers, `RingReader` in the
main process, `init_worker` is the workers' `worker_init_fn`.
"""
from __future__ import annotations

import atexit
import contextlib
import mmap
import os
import tempfile
import threading
import weakref

import numpy as np

# batches a worker can have in flight: built ahead by its read threads (2), grain's queue (1), interleave's
# buffer (1), and the ones the training loop still holds (the step's batch, a device buffer aliasing it on CPU)
SLOTS = 10
_HEADER = 4096  # int64s: released[SLOTS], received[SLOTS], the highest batch number received
_ALIGN = 4096
_KEY = '_ring'  # the element's entry that carries the address (or, for batches grain moved, the number)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _shm_dir() -> str:
    return '/dev/shm' if os.path.isdir('/dev/shm') else tempfile.gettempdir()


def _arrays(element: dict) -> dict:
    return {k: v for k, v in element.items() if isinstance(v, np.ndarray) and not v.dtype.hasobject}


def _map(path: str):
    """(the mapping, its header: released, received, the highest number received)."""
    with open(path, 'r+b') as f:
        mem = mmap.mmap(f.fileno(), 0)
    header = np.frombuffer(mem, np.int64, 2 * SLOTS + 1)
    return mem, header[:SLOTS], header[SLOTS:2 * SLOTS], header[2 * SLOTS:]


def _view(mem, offset: int, shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    return np.frombuffer(mem, dtype, int(np.prod(shape)), offset).reshape(shape)


class _Ring:
    """This worker's slots: one file, mapped, `slot_bytes` per slot after the header. A slot is free when the
    batch last sent from it is released (the main process let go of it, or it was dropped unread: a later
    batch arrived and this one never did) and no batch is being built in it. grain's read threads build
    batches ahead (`empty`) while this process's loop sends them (`put`), hence the lock."""

    def __init__(self, slot_bytes: int, worker: int):
        self.slot_bytes = -(-slot_bytes // _ALIGN) * _ALIGN
        fd, self.path = tempfile.mkstemp(prefix=f'sce_mae_ring{worker}_', dir=_shm_dir())
        try:
            os.ftruncate(fd, _HEADER + SLOTS * self.slot_bytes)
        finally:
            os.close(fd)
        atexit.register(_unlink, self.path)  # if the main process never mapped it (it unlinks it when it does)
        self.mem, self.released, self.received, self.upto = _map(self.path)
        self.released[:], self.received[:], self.upto[:] = -1, -1, -1
        self.seq = 0
        self.sent = [-1] * SLOTS   # each slot's last batch number
        self.building = {}         # slot → weak reference to the array being built in it
        self.lock = threading.Lock()

    def _take_free_slot(self) -> int | None:
        upto = int(self.upto[0])
        for slot, seq in enumerate(self.sent):
            ref = self.building.get(slot)
            if ref is not None and ref() is not None:
                continue
            dropped = int(self.received[slot]) != seq and upto >= seq
            if seq < 0 or int(self.released[slot]) == seq or dropped:
                self.building.pop(slot, None)
                return slot
        return None

    def _base(self, slot: int) -> int:
        return _HEADER + slot * self.slot_bytes

    def empty(self, shape, dtype) -> np.ndarray:
        if int(np.prod(shape)) * np.dtype(dtype).itemsize <= self.slot_bytes:
            with self.lock:
                slot = self._take_free_slot()
                if slot is not None:
                    array = _view(self.mem, self._base(slot), shape, dtype)
                    self.building[slot] = weakref.ref(array)  # dropped unsent (an error, a reset): slot free again
                    return array
        return np.empty(shape, dtype)

    def put(self, element: dict) -> dict:
        arrays = _arrays(element)
        with self.lock:
            seq, self.seq = self.seq, self.seq + 1
            slot = next((k for k, ref in self.building.items() for v in arrays.values() if ref() is v), None)
            in_slot = None
            if slot is None:
                slot = self._take_free_slot()
            else:
                in_slot = self.building.pop(slot)()
            order = sorted(arrays, key=lambda k: arrays[k] is not in_slot)  # the array built in place sits first
            offsets, end = {}, 0
            for k in order:
                offsets[k], end = end, -(-(end + arrays[k].nbytes) // 64) * 64
            if in_slot is not None or (slot is not None and end <= self.slot_bytes):
                self.sent[slot] = seq  # busy until released: grain may still be copying a batch built here
            if slot is None or end > self.slot_bytes:  # every slot in use, or too big: grain carries it
                return {**element, _KEY: (self.path, seq, None)}
        layout = {}
        for k in order:
            v, o = arrays[k], self._base(slot) + offsets[k]
            if v is not in_slot:
                np.copyto(_view(self.mem, o, v.shape, v.dtype), v)
            layout[k] = (o, v.shape, v.dtype.str)
        rest = {k: v for k, v in element.items() if k not in arrays}
        return {**rest, _KEY: (self.path, seq, (slot, self._base(slot), end, layout))}


_worker = {'index': None, 'ring': None}  # per worker process


def init_worker(index: int, count: int) -> None:
    """Run in each grain worker (its `worker_init_fn` arguments): the ring is made on the first batch."""
    del count
    _worker.update(index=index, ring=None)


def to_ring(element: dict) -> dict:
    """In a worker: the batch's arrays into a free slot of this worker's ring; a small address goes to grain."""
    ring = _worker['ring']
    if ring is None:
        if _worker['index'] is None:  # not in a worker (grain ran the map in this process): nothing to save
            return element
        nbytes = sum(-(-v.nbytes // 64) * 64 for v in _arrays(element).values())
        ring = _worker['ring'] = _Ring(nbytes, _worker['index'])
    return ring.put(element)


def empty(shape, dtype) -> np.ndarray:
    """Memory to build a batch's array in: in a worker with a free slot, the slot itself (`to_ring` then sends
    the batch without copying it); anywhere else a new array."""
    ring = _worker['ring']
    return np.empty(shape, dtype) if ring is None else ring.empty(shape, dtype)


def _release(released: np.ndarray, slot: int, seq: int) -> None:
    released[slot] = seq


class RingReader:
    """In the main process: each batch's arrays as views of its worker's slot, released when they are gone."""

    def __init__(self):
        self._rings = {}  # path → _map(path); files unlinked once mapped here
        self.in_ring = self.moved_by_grain = 0  # batches each way (tests, benchmarks)

    def _ring(self, path: str):
        if path not in self._rings:
            self._rings[path] = _map(path)
            _unlink(path)  # both processes hold the mapping; the memory goes when both let go
        return self._rings[path]

    def __call__(self, element: dict) -> dict:
        if _KEY not in element:
            return element
        element = dict(element)
        path, seq, where = element.pop(_KEY)
        mem, released, received, upto = self._ring(path)
        if where is not None:
            slot, base, size, layout = where
            received[slot] = seq  # before `upto`: the worker must never see this batch as dropped
        upto[0] = max(int(upto[0]), seq)  # every slot sent before this batch and never received was dropped
        if where is None:
            self.moved_by_grain += 1
            return element
        self.in_ring += 1
        # One array over the batch's bytes, every returned array a view of it: numpy keeps that array (and its
        # buffer) alive while any view of a view lives, so its buffer's end is the batch's end.
        region = np.frombuffer(mem, np.uint8, size, base)
        weakref.finalize(region.base, _release, released, slot, seq)
        for k, (o, shape, dtype) in layout.items():
            element[k] = region[o - base:o - base + int(np.prod(shape)) * np.dtype(dtype).itemsize].view(
                dtype).reshape(shape)
        return element
