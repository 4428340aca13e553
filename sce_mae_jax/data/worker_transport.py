"""Batches from grain's worker processes through shared memory that is written again, not allocated again.

grain hands each worker's element to the main process in a fresh shared-memory block: every page of every
batch is faulted in and zeroed in the worker and mapped again in the main process, which cost as much CPU as
reading the batch (docs/benchmarks.md, input pipeline). Here each worker owns a ring of `SLOTS` batch-sized
slots in one shared file: it builds a batch in the next slot (`empty`, where the batch is made by filling an
array) or copies it there, and sends grain only the slot's address; the
main process copies the batch out (into memory it reuses, `pipeline.keep_freed_memory`) and records in the
file's header the last sequence number it has copied. A worker writes a slot only once the batch that last
filled it has been copied; if it has not been (the main process fell behind, or grain discarded queued batches
on `set_state`), or a batch is larger than a slot, the batch goes through grain's own shared memory as before.
Either way the main process gets the same arrays; only the cost differs.

Used by `pipeline.train_iterator` with `num_workers > 0`: `to_ring` maps in the workers, `RingReader` in the
main process, `init_worker` is the workers' `worker_init_fn`.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import tempfile
import threading
import weakref

import numpy as np

SLOTS = 8  # ≥ batches a worker has in flight: built ahead by its read threads (2), grain's queue (1), interleave's
           # buffer (1), the one being read
_HEADER = 4096  # int64 at 0: the highest sequence number the main process has copied out
_ALIGN = 4096
_KEY = '_ring'  # the element's entry that carries the address (or, for batches grain moved, the number)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _shm_dir() -> str:
    return '/dev/shm' if os.path.isdir('/dev/shm') else tempfile.gettempdir()


def _arrays(element: dict) -> dict:
    return {k: v for k, v in element.items() if isinstance(v, np.ndarray) and not v.dtype.hasobject}


def _view(mem: np.ndarray, offset: int, shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    return mem[offset:offset + int(np.prod(shape)) * dtype.itemsize].view(dtype).reshape(shape)


class _Ring:
    """This worker's slots: one file, mapped, `slot_bytes` per slot after the header. A slot is free when the
    batch last sent from it has been copied out (the main process's counter has reached its number: batches
    are read in the order sent, so one read releases every slot sent before it, discarded ones included) and
    no batch is being built in it. grain's read threads build batches ahead (`empty`) while this process's
    loop sends them (`put`), hence the lock."""

    def __init__(self, slot_bytes: int, worker: int):
        self.slot_bytes = -(-slot_bytes // _ALIGN) * _ALIGN
        fd, self.path = tempfile.mkstemp(prefix=f'sce_mae_ring{worker}_', dir=_shm_dir())
        try:
            os.ftruncate(fd, _HEADER + SLOTS * self.slot_bytes)
        finally:
            os.close(fd)
        atexit.register(_unlink, self.path)  # if the main process never mapped it (it unlinks it when it does)
        self.mem = np.memmap(self.path, np.uint8, 'r+').view(np.ndarray)
        self.consumed = self.mem[:8].view(np.int64)
        self.consumed[0] = -1
        self.seq = 0
        self.sent = [-1] * SLOTS   # each slot's last batch number
        self.building = {}         # slot → weak reference to the array being built in it
        self.lock = threading.Lock()

    def _take_free_slot(self) -> int | None:
        consumed = int(self.consumed[0])
        for slot in range(SLOTS):
            ref = self.building.get(slot)
            if self.sent[slot] <= consumed and (ref is None or ref() is None):
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
                self.sent[slot] = seq  # busy until read: grain may still be copying a batch built here
            if slot is None or end > self.slot_bytes:  # every slot in use, or too big: grain carries it
                return {**element, _KEY: (self.path, seq, None)}
        layout = {}
        for k in order:
            v, o = arrays[k], self._base(slot) + offsets[k]
            if v is not in_slot:
                np.copyto(_view(self.mem, o, v.shape, v.dtype), v)
            layout[k] = (o, v.shape, v.dtype.str)
        rest = {k: v for k, v in element.items() if k not in arrays}
        return {**rest, _KEY: (self.path, seq, layout)}


_worker = {'index': None, 'ring': None}  # per worker process


def init_worker(index: int, count: int) -> None:
    """Run in each grain worker (its `worker_init_fn` arguments): the ring is made on the first batch."""
    del count
    _worker.update(index=index, ring=None)


def to_ring(element: dict) -> dict:
    """In a worker: the batch's arrays into this worker's next free slot; a small address goes to grain."""
    ring = _worker['ring']
    if ring is None:
        if _worker['index'] is None:  # not in a worker (grain ran the map in this process): nothing to save
            return element
        nbytes = sum(-(-v.nbytes // 64) * 64 for v in _arrays(element).values())
        ring = _worker['ring'] = _Ring(nbytes, _worker['index'])
    return ring.put(element)


def empty(shape, dtype) -> np.ndarray:
    """Memory to build a batch's array in: in a worker whose next slot is free, the slot itself (`to_ring` then
    sends the batch without copying it); anywhere else a new array."""
    ring = _worker['ring']
    return np.empty(shape, dtype) if ring is None else ring.empty(shape, dtype)


class RingReader:
    """In the main process: each batch's arrays copied out of its worker's slot, then the slot released."""

    def __init__(self):
        self._rings = {}  # path → (memory, consumed counter); files unlinked once mapped here
        self.copied = self.moved_by_grain = 0  # batches each way (tests, benchmarks)

    def _ring(self, path: str):
        if path not in self._rings:
            mem = np.memmap(path, np.uint8, 'r+').view(np.ndarray)
            _unlink(path)  # both processes hold the mapping; the memory goes when both let go
            self._rings[path] = (mem, mem[:8].view(np.int64))
        return self._rings[path]

    def __call__(self, element: dict) -> dict:
        if _KEY not in element:
            return element
        element = dict(element)
        path, seq, layout = element.pop(_KEY)
        mem, consumed = self._ring(path)
        self.copied += layout is not None
        self.moved_by_grain += layout is None
        for k, (o, shape, dtype) in (layout or {}).items():
            element[k] = _view(mem, o, shape, dtype).copy()
        consumed[0] = max(int(consumed[0]), seq)  # after the copy: the worker may now write that slot again
        return element
