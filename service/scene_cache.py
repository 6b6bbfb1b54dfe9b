"""Loaded scenes kept in memory for rendering: LRU, bounded by an estimate of their bytes.

Thread-safe: a scene is loaded once even when many requests ask for it at the same time
(per-scene load lock); renders only read the scene, so they run concurrently on it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from recon.assets import LoadedScene


def scene_bytes(loaded: LoadedScene) -> int:
    """Bytes held by the scene's tensors (parameters and buffers)."""
    return int(sum(t.numel() * t.element_size() for t in loaded.scene.state_dict().values()))


class SceneCache:
    """``get(id, loader)``: the cached LoadedScene or ``loader()``'s, then cached."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, tuple[LoadedScene, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.hits = 0
        self.misses = 0

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(n for _, n in self._items.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def get(self, key: str, loader: Callable[[], LoadedScene]) -> LoadedScene:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key][0]
            load_lock = self._loading.setdefault(key, threading.Lock())
        with load_lock:
            with self._lock:
                if key in self._items:  # another thread loaded it meanwhile
                    self._items.move_to_end(key)
                    self.hits += 1
                    return self._items[key][0]
            loaded = loader()
            size = scene_bytes(loaded)
            with self._lock:
                self.misses += 1
                self._items[key] = (loaded, size)
                self._items.move_to_end(key)
                total = sum(n for _, n in self._items.values())
                while total > self.max_bytes and len(self._items) > 1:
                    _, (_, n) = self._items.popitem(last=False)
                    total -= n
                self._loading.pop(key, None)
            return loaded

    def evict(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)
