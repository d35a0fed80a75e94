"""Reading store files into aligned memory, without filling the page cache.

Three read modes, chosen per file when it is opened:

- ``direct``: ``O_DIRECT`` + ``os.preadv`` straight into page-aligned buffers. Nothing
  goes through the page cache, so what the process reads is what counts against a
  RAM budget or a memory cgroup. Offsets and lengths must be multiples of the
  filesystem's block size; store tensors start on 4096-byte boundaries and store
  files are padded to whole pages, so a layer's range always is. A filesystem that
  refuses O_DIRECT (tmpfs, some FUSE and network filesystems) answers EINVAL: the
  file falls back to ``buffered`` with one warning (llama.cpp switched direct I/O
  off after such failures; here it is per file and automatic).
- ``buffered``: ``os.preadv`` then ``posix_fadvise(DONTNEED)`` on the range just read,
  so the page cache gives the pages back instead of growing with the model.
- ``mmap``: copy out of a read-only mapping, then ``madvise(DONTNEED)``; the last
  resort where ``preadv`` is missing (Windows).

``os.preadv`` releases the GIL, so reader threads run beside the compute threads.
Errors name the file, the offset and the OS error; EINTR is retried; a short read
(a file shorter than its manifest says) is an error, never a silently zero tail.
"""
from __future__ import annotations

import errno
import mmap
import os
import threading
import time
import warnings
from pathlib import Path

from flashlm.errors import OffloadError

ALIGN = 4096
MODES = ("direct", "buffered", "mmap")
HAVE_DIRECT = hasattr(os, "O_DIRECT") and hasattr(os, "preadv")
HAVE_PREADV = hasattr(os, "preadv")


def default_mode() -> str:
    """The best read mode this platform offers."""
    return "direct" if HAVE_DIRECT else "buffered" if HAVE_PREADV else "mmap"


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """An anonymous, page-aligned, zero-filled buffer of ``nbytes`` (rounded up to a page).

    Pages are committed when first written, so an unused tail costs nothing."""
    return mmap.mmap(-1, max(ALIGN, -(-int(nbytes) // ALIGN) * ALIGN))


class StoreFile:
    """One store file opened for reads in ``mode`` (falls back as described above).

    Args:
        path: the file.
        mode: "direct", "buffered" or "mmap".

    Example:
        >>> f = StoreFile("layer_003.bin", "direct")
        >>> f.read_into(memoryview(buf)[:n], offset)
    """

    def __init__(self, path: str | os.PathLike, mode: str = "direct") -> None:
        if mode not in MODES:
            raise ValueError(f"read mode must be one of {MODES}, got {mode!r}")
        self.path = Path(path)
        if mode == "direct" and not HAVE_DIRECT:
            mode = "buffered"
        if mode == "buffered" and not HAVE_PREADV:
            mode = "mmap"
        self.mode = mode
        self._lock = threading.Lock()
        self._fd = -1
        self._map: mmap.mmap | None = None
        flags = os.O_RDONLY | getattr(os, "O_BINARY", 0)
        try:
            if mode == "direct":
                try:
                    self._fd = os.open(self.path, flags | os.O_DIRECT)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self._fall_back("the filesystem refuses O_DIRECT")
            if self._fd < 0:
                self._fd = os.open(self.path, flags)
            self.size = os.fstat(self._fd).st_size
            if self.mode == "mmap" and self.size:
                self._map = mmap.mmap(self._fd, self.size, access=mmap.ACCESS_READ)
        except OSError as e:
            self.close()
            raise OffloadError(f"cannot open {self.path}: {e.strerror or e}") from None

    def _fall_back(self, why: str) -> None:
        warnings.warn(f"{self.path}: {why}; reading it through the page cache (buffered, "
                      "pages dropped after each read)", RuntimeWarning, stacklevel=3)
        self.mode = "buffered" if HAVE_PREADV else "mmap"

    def read_into(self, buf: memoryview, offset: int) -> int:
        """Fill ``buf`` with the file's bytes at ``offset``; returns ``len(buf)``.

        Raises:
            OffloadError: an OS error or a short read, naming the file and offset.
        """
        n = len(buf)
        if offset < 0 or offset + n > self.size:
            raise OffloadError(f"{self.path}: read of {n} bytes at offset {offset} is past the end of the "
                               f"file ({self.size} bytes); the store is damaged, re-import the model")
        if self.mode == "mmap":
            return self._read_mmap(buf, offset)
        done = 0
        while done < n:
            try:
                got = os.preadv(self._fd, [buf[done:]], offset + done)
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.EINVAL and self.mode == "direct":
                    self._reopen_buffered()
                    continue
                raise OffloadError(f"read error in {self.path} at offset {offset + done} "
                                   f"({n - done} bytes): {e.strerror or e}") from None
            if got == 0:
                raise OffloadError(f"{self.path}: unexpected end of file at offset {offset + done} "
                                   f"(wanted {n} bytes from {offset}); the store is damaged, re-import the model")
            done += got
        if self.mode == "buffered":
            try:
                os.posix_fadvise(self._fd, offset, n, os.POSIX_FADV_DONTNEED)
            except (AttributeError, OSError):
                pass  # a hint: failing it costs page cache, not correctness
        return n

    def _reopen_buffered(self) -> None:
        with self._lock:
            if self.mode != "direct":
                return
            fd = os.open(self.path, os.O_RDONLY)
            old, self._fd = self._fd, fd
            self._fall_back("O_DIRECT reads fail with EINVAL (alignment)")
            os.close(old)

    def _read_mmap(self, buf: memoryview, offset: int) -> int:
        n = len(buf)
        assert self._map is not None or n == 0
        if n:
            buf[:] = self._map[offset:offset + n]
            lo = offset - offset % mmap.PAGESIZE
            try:
                self._map.madvise(mmap.MADV_DONTNEED, lo, offset + n - lo)
            except (AttributeError, OSError, ValueError):
                pass
        return n

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "StoreFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def read_speed(paths: list[Path], mode: str = "direct", *, chunk: int = 4 << 20, threads: int = 2,
               limit: int = 256 << 20) -> float:
    """Bytes/s reading up to ``limit`` bytes of ``paths`` as the prefetcher does (``threads``
    readers, ``chunk``-byte requests into one aligned buffer). Cold only if the caller
    dropped the page cache (or the mode bypasses it)."""
    from concurrent.futures import ThreadPoolExecutor

    buf = aligned_buffer(chunk * threads)
    mv = memoryview(buf)
    jobs = []
    total = 0
    for p in paths:
        size = p.stat().st_size
        for off in range(0, size, chunk):
            n = min(chunk, size - off)
            if total + n > limit:
                break
            jobs.append((p, off, n))
            total += n
        if total >= limit:
            break
    files = {p: StoreFile(p, mode) for p in {j[0] for j in jobs}}
    slots = [mv[i * chunk:(i + 1) * chunk] for i in range(threads)]
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as ex:
            futs = [ex.submit(files[p].read_into, slots[k % threads][:n], off) for k, (p, off, n) in enumerate(jobs)]
            got = sum(f.result() for f in futs)
        dt = time.perf_counter() - t0
    finally:
        for f in files.values():
            f.close()
    return got / dt if dt > 0 else 0.0
