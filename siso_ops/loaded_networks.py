"""The similarity networks (DINOv2 and the image-retrieval network) across runs: read once and
kept on the CPU between runs (``networks``), and brought to the compute device only for the
time a run uses them (``on_device``). SISO Optimize and SISO Subject Score share both."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import os
import threading
import weakref

import torch

from .feature_networks import load_dino, load_ir
from .runtime import host


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_freed_memory():
    """Hand memory that was freed back to the operating system. glibc keeps freed heap memory
    for reuse, so after the similarity networks are loaded in float32 and converted to bfloat16
    the process would go on holding the float32 copies' gigabytes of RAM, and after a CPU run its
    activations'. Linux with glibc; elsewhere nothing to do."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class _NetworkCache:
    """Similarity networks stay loaded (on the CPU between runs) so a second run in the same
    session skips the file read; keyed by path, modification time and the weights' dtype
    (stored in the compute precision: bfloat16 halves their memory). They are released by
    ``clear()`` and when the last holder registered with ``hold`` (a node object in ComfyUI's
    node cache) is garbage-collected."""

    def __init__(self):
        self.entries = {}
        self._holders = 0
        self._lock = threading.RLock()   # a finalizer may run inside hold() on this thread

    def hold(self, owner) -> None:
        with self._lock:
            self._holders += 1
        weakref.finalize(owner, self._release)

    def _release(self) -> None:
        with self._lock:
            self._holders = max(0, self._holders - 1)
            last = self._holders == 0
        if last and self.entries:
            self.entries.clear()
            release_freed_memory()

    def get(self, kind: str, path: str, dtype: torch.dtype = torch.float32):
        key = (kind, os.path.abspath(path), os.path.getmtime(path), dtype)
        entry = self.entries.get(kind)
        if entry is None or entry[0] != key:
            self.entries.pop(kind, None)
            gc.collect()
            with torch.inference_mode(False):
                network = (load_dino if kind == "dino" else load_ir)(path).to(dtype=dtype)
            self.entries[kind] = (key, network)
            release_freed_memory()   # its collection may release the cache (``_release``): return our own reference
            return network
        return entry[1]

    def peek(self, kind: str, path: str | None, dtype: torch.dtype = torch.float32):
        """The cached network ``get`` would return without reading the file, or None."""
        try:
            key = (kind, os.path.abspath(path), os.path.getmtime(path), dtype)
        except (OSError, TypeError):
            return None
        entry = self.entries.get(kind)
        return entry[1] if entry is not None and entry[0] == key else None

    def clear(self):
        self.entries.clear()
        release_freed_memory()


networks = _NetworkCache()


def load(dino_path: str | None, ir_path: str | None, dino_weight: float, ir_weight: float, dtype: torch.dtype,
         between=None) -> tuple:
    """(dino, ir) from the cache, each None where its weight is 0 (the network is skipped).
    ``between()`` runs between the two reads (Cancel: each read can take seconds)."""
    dino = networks.get("dino", dino_path, dtype) if dino_weight > 0 else None
    if between is not None:
        between()
    ir = networks.get("ir", ir_path, dtype) if ir_weight > 0 else None
    return dino, ir


@contextlib.contextmanager
def on_device(feature_networks, device, checkpointing: bool = False):
    """The given networks (None entries skipped) on ``device`` for the body, with gradient
    checkpointing as asked and the host's Cancel checked before every transformer block; after
    it, even when it raised: back on the CPU, both switches off, and the freed memory handed
    back (to the operating system and to the host's device cache)."""
    used = [network for network in feature_networks if network is not None]
    try:
        for network in used:
            network.to(device)
            network.set_checkpointing(checkpointing)
            network.set_interrupt_check(host.throw_if_interrupted)   # Cancel within one block
        yield used
    finally:
        for network in used:
            network.to("cpu")
            network.set_checkpointing(False)
            network.set_interrupt_check(None)
        release_freed_memory()
        host.free_cached_memory()
