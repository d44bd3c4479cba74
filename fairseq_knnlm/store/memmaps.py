"""Growable, append-only raw memmaps written under temporary names and renamed when done.

Shared by the datastore dump and the saved-neighbours file of offline sweeps: rows go straight
to disk (no corpus-sized arrays in RAM), files double in size as they fill, and ``finish``
truncates them to the rows written before renaming ``NAME.tmp`` to ``NAME``.

Disk space: growing reserves the new blocks (``fallocate``) instead of making a sparse file,
so a full disk is an error at grow time (``DiskFullError``, one line, unfinished files
removed) rather than a SIGBUS ("Bus error") when a page of the memmap is written. Filesystems
without fallocate fall back to a sparse ``truncate``. ``expected_rows`` checks the free space
before the first row.

Also here: ``WriterLock``, an exclusive lock (``flock``) on a file for the life of a writer, so
that two runs writing the same output fail fast instead of mixing their rows.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import logging
import mmap
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from fairseq_knnlm.errors import KNNLMError

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
RELEASE_EVERY_BYTES = 256 << 20  # written pages are flushed and dropped from RSS this often
# errors that mean "no room for these bytes": full disk, quota, file size limit
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# fallocate errors that mean "this filesystem cannot reserve": fall back to a sparse file
_NO_FALLOCATE_ERRNOS = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})
# flock errors that mean "this filesystem has no locks": go on unlocked, with a warning
_NO_LOCK_ERRNOS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})


class DiskFullError(KNNLMError):
    """No space left for the rows being written; the unfinished files have been removed."""


class LockBusy(KNNLMError):
    """Another live process holds the writer lock of this output."""


def tmp_path(path: PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def write_json_atomic(path: PathLike, obj: object) -> None:
    """Write JSON under a temporary name, fsync and rename: readers see all or nothing. The
    temporary name is this call's own, so two processes writing the same file at once (the
    last two shards of a dump both writing the manifest) do not trip over each other."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(obj if isinstance(obj, str) else json.dumps(obj, indent=2, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _libc_fallocate() -> Optional[Callable[..., int]]:
    """Linux's fallocate(2) through libc (None elsewhere). Not os.posix_fallocate: glibc's
    posix_fallocate emulates unsupported filesystems by writing every block (hours for a
    200 GB datastore on NFS); fallocate(2) says EOPNOTSUPP and we use a sparse file instead."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate64
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_FALLOCATE = _libc_fallocate()


def _fallocate(fd: int, offset: int, length: int) -> bool:
    """Reserve blocks [offset, offset + length) of fd, extending the file. False where the
    filesystem cannot; OSError for real failures (ENOSPC, EDQUOT, EFBIG, ...)."""
    if _FALLOCATE is not None:
        if _FALLOCATE(fd, 0, offset, length) == 0:
            return True
        err = ctypes.get_errno()
        if err in _NO_FALLOCATE_ERRNOS:
            return False
        raise OSError(err, os.strerror(err))
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, offset, length)
            return True
        except OSError as e:
            if e.errno in _NO_FALLOCATE_ERRNOS:
                return False
            raise
    return False


def resize_file(path: PathLike, size: int) -> None:
    """Set a file's size; growing reserves the new blocks where the filesystem can, so that
    a full disk raises OSError here, not SIGBUS on a later write through a memmap."""
    fd = os.open(path, os.O_RDWR)
    try:
        cur = os.fstat(fd).st_size
        if size > cur and _fallocate(fd, cur, size - cur):
            return
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def free_bytes(folder: PathLike) -> int:
    return int(shutil.disk_usage(folder).free)


def _nbytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} bytes"


class RowWriter:
    """Named raw arrays that share a row count; ``add`` appends rows to all of them.

    expected_rows: rows the caller expects to write; the free space for them is checked
    first (DiskFullError) and reserved at once. label names the output in error messages.
    """

    def __init__(self, specs: dict[str, tuple[Path, np.dtype, tuple[int, ...]]],
                 initial_capacity: int = 1 << 16, expected_rows: Optional[int] = None,
                 label: Optional[str] = None) -> None:
        self.specs = {name: (Path(p), np.dtype(dt), tuple(shape))
                      for name, (p, dt, shape) in specs.items()}
        self.label = label or str(next(iter(self.specs.values()))[0])
        self.size = 0
        self.capacity = 0
        self.finished = False
        self._unreleased = 0
        self._maps: dict[str, np.memmap] = {}
        for path, _, _ in self.specs.values():
            path.parent.mkdir(parents=True, exist_ok=True)
        if expected_rows is not None and expected_rows > 0:
            self.check_space(expected_rows)
            initial_capacity = expected_rows
        for path, _, _ in self.specs.values():
            open(tmp_path(path), "wb").close()
        self._grow(max(1, int(initial_capacity)))

    @property
    def row_bytes(self) -> int:
        return sum(self._row_bytes(name) for name in self.specs)

    def _row_bytes(self, name: str) -> int:
        _, dt, shape = self.specs[name]
        return int(np.prod(shape, dtype=np.int64)) * dt.itemsize

    def check_space(self, rows: int) -> None:
        """DiskFullError if the folder lacks the bytes for ``rows`` rows (leftover .tmp files
        of an earlier run count as free: they are truncated before writing)."""
        folder = next(iter(self.specs.values()))[0].parent
        need = int(rows) * self.row_bytes
        leftover = sum(tmp_path(p).stat().st_size for p, _, _ in self.specs.values()
                       if tmp_path(p).exists())
        free = free_bytes(folder) + leftover
        if need > free:
            raise DiskFullError(
                f"{self.label}: {rows:,} rows need {_nbytes(need)} ({need} bytes) but {folder} "
                f"has {_nbytes(free)} ({free} bytes) free; free some space or write elsewhere")

    def _grow(self, capacity: int) -> None:
        for m in self._maps.values():
            m.flush()
        self._maps.clear()
        for name, (path, dt, shape) in self.specs.items():
            nbytes = capacity * self._row_bytes(name)
            try:
                resize_file(tmp_path(path), nbytes)
            except OSError as e:
                if e.errno not in NO_SPACE_ERRNOS:
                    raise
                why = (f"{e.strerror}: a file size limit (ulimit -f) or the filesystem's "
                       "largest file" if e.errno == errno.EFBIG else
                       f"{e.strerror}; {path.parent} has {_nbytes(free_bytes(path.parent))} free")
                self.abort()
                raise DiskFullError(
                    f"{self.label}: no space to grow {tmp_path(path).name} to {_nbytes(nbytes)} "
                    f"for {capacity:,} rows ({why}); the unfinished files were removed") from e
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
        """Remove the temporary files (safe to call more than once)."""
        self._maps.clear()
        for path, _, _ in self.specs.values():
            if tmp_path(path).exists():
                tmp_path(path).unlink()
        self.finished = True


def lock_holder(path: PathLike) -> str:
    """Who holds (or held) a WriterLock, from its file: 'pid N on HOST since TIME'."""
    try:
        rec = json.loads(Path(path).read_text())
        return f"pid {rec['pid']} on {rec['host']} since {rec['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its pid yet)"


class WriterLock:
    """An exclusive ``flock`` on ``path`` for the life of one writer.

    A second writer (another process, another machine on a filesystem with working locks,
    or the same process) gets LockBusy at once, naming the holder's pid, host and start time
    (written into the lock file). The kernel drops the lock when its holder dies, so a killed
    run never blocks the next one. ``release`` deletes the file while still holding the lock;
    ``acquire`` checks that the file it locked is still the one at ``path`` (else retries), so
    deleting never lets two writers in. On filesystems without locks it warns and goes on.
    """

    def __init__(self, path: PathLike, info: Optional[dict[str, Any]] = None) -> None:
        self.path = Path(path)
        self._fd: Optional[int] = None
        self._acquire(info or {})

    def _acquire(self, info: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise LockBusy(f"{self.path} is held by {self.holder()}") from e
                if e.errno in _NO_LOCK_ERRNOS:
                    logger.warning("cannot lock %s (%s): a second run writing the same output "
                                   "would not be detected", self.path, e.strerror)
                    return
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released and deleted it between our open and flock
        self._fd = fd
        rec = {"pid": os.getpid(), "host": socket.gethostname(),
               "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(rec).encode(), 0)

    def holder(self) -> str:
        return lock_holder(self.path)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:  # dropped without release (an exception): just unlock
            try:
                os.close(fd)
            except OSError:
                pass


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


def copy_to_memory(arr: Any, chunk_bytes: int = 256 << 20) -> np.ndarray:
    """A real in-RAM copy of a (memmapped) array or ConcatRows, read in chunks of about
    chunk_bytes, releasing the source's pages after each (np.ascontiguousarray of a memmap is
    a view of the mapped file, not a copy)."""
    n = len(arr)
    tail = tuple(arr.shape[1:])
    out = np.empty((n, *tail), dtype=arr.dtype)
    row = max(1, int(np.prod(tail, dtype=np.int64)) * np.dtype(arr.dtype).itemsize)
    step = max(1, chunk_bytes // row)
    for s in range(0, n, step):
        out[s:s + step] = arr[s:s + step]
        release_pages(arr)
    return out


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
