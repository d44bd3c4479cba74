"""Growable, append-only raw memmaps written under temporary names and renamed when done.

Shared by the datastore dump and the saved-neighbours file of offline sweeps: rows go straight
to disk (no corpus-sized arrays in RAM), files double in size as they fill, and ``finish``
truncates them to the rows written before renaming ``NAME.tmp`` to ``NAME``.
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path
from typing import Union

import numpy as np

PathLike = Union[str, os.PathLike]
RELEASE_EVERY_BYTES = 256 << 20  # written pages are flushed and dropped from RSS this often


def tmp_path(path: PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def write_json_atomic(path: PathLike, obj: object) -> None:
    """Write JSON under a temporary name, fsync and rename: readers see all or nothing."""
    path = Path(path)
    tmp = tmp_path(path)
    with open(tmp, "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj, indent=2, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RowWriter:
    """Named raw arrays that share a row count; ``add`` appends rows to all of them."""

    def __init__(self, specs: dict[str, tuple[Path, np.dtype, tuple[int, ...]]],
                 initial_capacity: int = 1 << 16) -> None:
        self.specs = {name: (Path(p), np.dtype(dt), tuple(shape))
                      for name, (p, dt, shape) in specs.items()}
        self.size = 0
        self.capacity = 0
        self.finished = False
        self._unreleased = 0
        for path, _, _ in self.specs.values():
            path.parent.mkdir(parents=True, exist_ok=True)
            open(tmp_path(path), "wb").close()
        self._maps: dict[str, np.memmap] = {}
        self._grow(max(1, int(initial_capacity)))

    def _row_bytes(self, name: str) -> int:
        _, dt, shape = self.specs[name]
        return int(np.prod(shape, dtype=np.int64)) * dt.itemsize

    def _grow(self, capacity: int) -> None:
        for m in self._maps.values():
            m.flush()
        self._maps.clear()
        for name, (path, dt, shape) in self.specs.items():
            os.truncate(tmp_path(path), capacity * self._row_bytes(name))
            if capacity > 0:
                self._maps[name] = np.memmap(tmp_path(path), dtype=dt, mode="r+",
                                             shape=(capacity, *shape))
        self.capacity = capacity

    def add(self, **rows: np.ndarray) -> None:
        if self.finished:
            raise RuntimeError("writer already finished")
        if set(rows) != set(self.specs):
            raise ValueError(f"expected arrays {sorted(self.specs)}, got {sorted(rows)}")
        n = {len(v) for v in rows.values()}
        if len(n) != 1:
            raise ValueError(f"row counts differ: { {k: len(v) for k, v in rows.items()} }")
        count = n.pop()
        for name, v in rows.items():
            shape = self.specs[name][2]
            if tuple(np.shape(v)[1:]) != shape:
                raise ValueError(f"{name}: rows must have shape {shape}, got {np.shape(v)[1:]}")
        if count == 0:
            return
        need = self.size + count
        if need > self.capacity:
            self._grow(max(need, 2 * self.capacity))
        for name, v in rows.items():
            self._maps[name][self.size:need] = v
        self.size = need
        self._unreleased += sum(count * self._row_bytes(name) for name in rows)
        if self._unreleased >= RELEASE_EVERY_BYTES:  # keep RSS bounded on long dumps
            for m in self._maps.values():
                m.flush()
                release_pages(m)
            self._unreleased = 0

    def finish(self) -> int:
        """Truncate to the rows written, fsync, rename into place; returns the row count."""
        if self.finished:
            raise RuntimeError("writer already finished")
        self._grow(self.size)
        self._maps.clear()
        for path, _, _ in self.specs.values():
            with open(tmp_path(path), "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp_path(path), path)
        self.finished = True
        return self.size

    def abort(self) -> None:
        self._maps.clear()
        for path, _, _ in self.specs.values():
            if tmp_path(path).exists():
                tmp_path(path).unlink()
        self.finished = True


def open_rows(path: PathLike, dtype: np.dtype, shape: tuple[int, ...], n: int) -> np.ndarray:
    """Read-only memmap of n rows, checking the file size first."""
    path = Path(path)
    dtype = np.dtype(dtype)
    if not path.exists():
        raise FileNotFoundError(f"missing file {path}")
    expected = n * int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise ValueError(f"{path}: {actual} bytes, expected {expected} ({n} rows of {shape} "
                         f"{dtype.name}); the file is truncated or belongs to something else")
    if n == 0:
        return np.zeros((0, *shape), dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n, *shape))


def release_pages(arr: object) -> None:
    """Drop a read-only memmap's pages from this process's resident set (they stay in the OS
    page cache). Pages of a mapped file count in RSS once touched; long sequential or sampled
    reads call this so that RSS stays bounded by what they hold, not by the file size.
    Works on ConcatRows too (each part); anything else is left alone."""
    for part in getattr(arr, "parts", None) or [arr]:
        mm = getattr(part, "_mmap", None)
        if isinstance(mm, mmap.mmap) and hasattr(mm, "madvise"):
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass
