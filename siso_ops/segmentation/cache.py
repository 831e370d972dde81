"""SubjectMask's loaded models, kept on the CPU between runs and keyed by their files."""
from __future__ import annotations

import os
import threading
import weakref
from typing import Callable

from .config import config_path_for
from .grounding_dino import load_grounding_dino
from .sam import load_sam


def file_key(path: str) -> tuple:
    if os.path.isdir(path):
        return (path,) + tuple(file_key(os.path.join(path, f)) for f in sorted(os.listdir(path)))
    stat = os.stat(path)
    return (path, stat.st_mtime_ns, stat.st_size)


class ModelCache:
    """Loaded models, one per kind (loading another file of a kind replaces it), keyed by the
    files' paths and modification times, kept on the CPU. Models are released by ``clear()``,
    and when the last of the holders registered with ``hold`` is garbage-collected."""

    def __init__(self):
        self._lock = threading.RLock()
        self._slots = {}
        self._holders = 0

    def get(self, kind: str, key: tuple, load: Callable):
        with self._lock:
            slot = self._slots.get(kind)
            if slot is not None and slot[0] == key:
                return slot[1]
            self._slots.pop(kind, None)  # release the previous file before loading another
        model = load()
        with self._lock:
            self._slots[kind] = (key, model)
        return model

    def hold(self, owner):
        with self._lock:
            self._holders += 1
        weakref.finalize(owner, self._release)

    def _release(self):
        with self._lock:
            self._holders -= 1
            if self._holders <= 0:
                self._holders = 0
                self._slots.clear()

    def clear(self):
        with self._lock:
            self._slots.clear()

    def loaded(self) -> dict:
        with self._lock:
            return {kind: slot[1] for kind, slot in self._slots.items()}


MODELS = ModelCache()


def cached_models(grounding_dino_path: str, bert_folder: str, sam_path: str) -> tuple:
    config = config_path_for(grounding_dino_path)
    dino_key = (file_key(grounding_dino_path), file_key(config) if config else None, file_key(bert_folder))
    detector = MODELS.get("grounding_dino", dino_key, lambda: load_grounding_dino(grounding_dino_path, bert_folder))
    sam = MODELS.get("sam", file_key(sam_path), lambda: load_sam(sam_path))
    return detector, sam
