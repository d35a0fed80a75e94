"""The prefetcher and the store-file reader on files of known bytes: data, overlap,
reuse of the same buffers, errors that surface in the caller, no thread left running."""
from __future__ import annotations

import errno
import os
import threading
import time

import numpy as np
import pytest

from flashlm.errors import OffloadError
from flashlm.offload import io as fio
from flashlm.offload.io import ALIGN, StoreFile, aligned_buffer
from flashlm.offload.prefetch import Prefetcher, ReadPool, Segment

SEG = 1 << 20  # 1 MiB segments


@pytest.fixture
def data_file(tmp_path):
    """A 12-segment file of random bytes (and the bytes)."""
    data = np.random.default_rng(0).integers(0, 256, 12 * SEG, dtype=np.uint8)
    p = tmp_path / "layers.bin"
    p.write_bytes(data.tobytes())
    return p, data


def segments(path, n=12, size=SEG):
    return [Segment(("layer", i), path, ((i * size, size, 0),)) for i in range(n)]


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("flashlm-reader")]


MODES = ["direct", "buffered", "mmap"]


@pytest.mark.parametrize("mode", MODES)
def test_store_file_reads_exact_bytes(data_file, mode):
    path, data = data_file
    buf = aligned_buffer(3 * ALIGN)
    with StoreFile(path, mode) as f:
        assert f.mode == mode or (mode == "direct" and not fio.HAVE_DIRECT)
        f.read_into(memoryview(buf)[: 3 * ALIGN], 5 * ALIGN)
    assert bytes(buf[: 3 * ALIGN]) == data[5 * ALIGN: 8 * ALIGN].tobytes()


def test_store_file_errors_name_the_file(data_file):
    path, _ = data_file
    buf = aligned_buffer(2 * ALIGN)
    with StoreFile(path, "buffered") as f:
        with pytest.raises(OffloadError, match=r"layers\.bin.*past the end"):
            f.read_into(memoryview(buf), 12 * SEG - ALIGN)
    with pytest.raises(OffloadError, match="cannot open .*missing.bin"):
        StoreFile(path.parent / "missing.bin", "buffered")


def test_short_read_is_an_error(data_file, monkeypatch):
    """A file that ends early (truncated after the check) never gives a zero tail."""
    path, _ = data_file
    with StoreFile(path, "buffered") as f:
        os.truncate(path, 4 * ALIGN + 100)
        buf = aligned_buffer(2 * ALIGN)
        with pytest.raises(OffloadError, match="unexpected end of file"):
            f.read_into(memoryview(buf), 4 * ALIGN)


@pytest.mark.parametrize("mode", MODES)
def test_segments_arrive_with_their_bytes(data_file, mode):
    path, data = data_file
    with Prefetcher(segments(path), n_slots=3, slot_bytes=SEG, mode=mode, readers=2, chunk=256 << 10) as pf:
        for _ in range(2):  # two passes: wrap-around
            for i in range(12):
                buf = pf.get(("layer", i))
                assert np.array_equal(buf[:SEG], data[i * SEG:(i + 1) * SEG]), f"segment {i}"
                pf.release(("layer", i))
        st = pf.stats  # read-ahead of the next pass may be under way
        assert st.bytes_read >= 24 * SEG and st.segments_read >= 24 and st.read_s > 0 and st.gets == 24
    assert not reader_threads()


def test_several_ranges_land_where_the_segment_says(data_file):
    path, data = data_file
    seg = Segment("x", path, ((3 * SEG, ALIGN, 0), (SEG, 2 * ALIGN, 2 * ALIGN)))
    with Prefetcher([seg], n_slots=1, slot_bytes=4 * ALIGN, mode="buffered") as pf:
        buf = pf.get("x")
        assert np.array_equal(buf[:ALIGN], data[3 * SEG:3 * SEG + ALIGN])
        assert np.array_equal(buf[2 * ALIGN:4 * ALIGN], data[SEG:SEG + 2 * ALIGN])
        pf.release("x")


def busy(seconds: float) -> tuple[float, float]:
    """Real work (no sleep) for about ``seconds``; returns its (start, end)."""
    t0 = time.perf_counter()
    a = np.random.default_rng(1).standard_normal((256, 256)).astype(np.float32)
    while time.perf_counter() - t0 < seconds:
        a = np.tanh(a @ a.T * 1e-3)
    return t0, time.perf_counter()


@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_reads_overlap_compute_and_reuse_the_same_buffers(data_file, mode):
    path, _ = data_file
    computes, addrs = [], []
    with Prefetcher(segments(path), n_slots=2, slot_bytes=SEG, mode=mode, readers=2, chunk=128 << 10,
                    trace=True) as pf:
        slab = {pf._slots[i].view.ctypes.data for i in range(2)}
        for step in range(3):
            seen = set()
            for i in range(12):
                buf = pf.get(("layer", i))
                seen.add(buf.ctypes.data)
                computes.append(busy(0.004))
                pf.release(("layer", i))
            addrs.append(seen)
        trace = list(pf.trace)
    assert addrs[0] == addrs[1] == addrs[2] == slab  # the same two slots, every step
    overlapped = [k for k, t0, t1 in trace for c0, c1 in computes if t0 < c1 and c0 < t1]
    assert overlapped, "no read was in flight while the compute ran"
    assert len(trace) >= 36  # and the read-ahead of a 4th step


def test_read_error_surfaces_in_get_and_no_thread_is_left(data_file, monkeypatch):
    path, _ = data_file
    real = StoreFile.read_into

    def failing(self, buf, offset):
        if offset == 5 * SEG:
            raise OffloadError(f"read error in {self.path} at offset {offset}: Input/output error")
        return real(self, buf, offset)

    monkeypatch.setattr(StoreFile, "read_into", failing)
    pf = Prefetcher(segments(path), n_slots=2, slot_bytes=SEG, mode="buffered", readers=3)
    try:
        for i in range(5):
            pf.get(("layer", i))
            pf.release(("layer", i))
        with pytest.raises(OffloadError, match=r"layers\.bin at offset 5242880: Input/output error"):
            pf.get(("layer", 5))
    finally:
        pf.close()
    assert pf.threads_alive == 0 and not reader_threads()


def test_os_error_in_a_reader_names_file_offset_and_errno(data_file, monkeypatch):
    path, _ = data_file

    def eio(fd, bufs, offset):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(fio.os, "preadv", eio)
    with Prefetcher(segments(path, 2), n_slots=1, slot_bytes=SEG, mode="buffered") as pf:
        with pytest.raises(OffloadError, match=r"read error in .*layers\.bin at offset 0 .*Input/output error"):
            pf.get(("layer", 0))
    assert not reader_threads()


def test_out_of_order_get_and_misuse(data_file):
    path, data = data_file
    with Prefetcher(segments(path), n_slots=2, slot_bytes=SEG, mode="buffered") as pf:
        buf = pf.get(("layer", 7))  # mispredicted: slots hold 0 and 1
        assert np.array_equal(buf[:SEG], data[7 * SEG:8 * SEG])
        with pytest.raises(RuntimeError, match="already held"):
            pf.get(("layer", 7))
        pf.release(("layer", 7))
        with pytest.raises(RuntimeError, match="not held"):
            pf.release(("layer", 7))
        with pytest.raises(KeyError):
            pf.get(("layer", 99))
        assert pf.stats.misses == 1
        buf = pf.get(("layer", 8))  # prefetched after 7
        assert np.array_equal(buf[:SEG], data[8 * SEG:9 * SEG])
        pf.release(("layer", 8))
        assert pf.stats.hits + pf.stats.misses <= pf.stats.gets


def test_segment_larger_than_a_slot_is_refused(data_file):
    path, _ = data_file
    with pytest.raises(ValueError, match="more than a slot"):
        Prefetcher(segments(path, 2), n_slots=2, slot_bytes=SEG // 2)
    assert not reader_threads()


def test_set_schedule_drops_what_is_no_longer_scheduled(data_file):
    path, data = data_file
    segs = segments(path)
    with Prefetcher(segs, n_slots=2, slot_bytes=SEG, mode="buffered") as pf:
        pf.get(("layer", 0))
        pf.release(("layer", 0))
        pf.set_schedule(segs[3:])
        assert pf.keys[0] == ("layer", 3)
        buf = pf.get(("layer", 3))
        assert np.array_equal(buf[:SEG], data[3 * SEG:4 * SEG])
        pf.release(("layer", 3))


def test_background_reads_wait_for_the_others(data_file, monkeypatch):
    path, data = data_file
    """A background request (an expert read ahead on a guess) is taken only when no other
    request is queued: a read the compute side waits for overtakes queued guesses."""
    gate, order = threading.Event(), []
    real = StoreFile.read_into

    def read_into(self, buf, offset):
        if offset == 0:
            gate.wait(10)  # hold the only reader until everything is queued
        return real(self, buf, offset)

    monkeypatch.setattr(StoreFile, "read_into", read_into)
    pool = ReadPool("buffered", readers=1, chunk=4096)
    bufs = [np.zeros(4096, np.uint8) for _ in range(4)]
    try:
        with pool.cv:
            pool.submit(path, ((0, 4096, 0),), bufs[0], lambda e: order.append("first"))
            pool.submit(path, ((4096, 4096, 0),), bufs[1], lambda e: order.append("guess 1"), background=True)
            pool.submit(path, ((8192, 4096, 0),), bufs[2], lambda e: order.append("guess 2"), background=True)
            pool.submit(path, ((12288, 4096, 0),), bufs[3], lambda e: order.append("needed"))
        gate.set()
        with pool.cv:
            assert pool.cv.wait_for(lambda: len(order) == 4, timeout=10)
    finally:
        gate.set()
        pool.close()
    assert order == ["first", "needed", "guess 1", "guess 2"]
    for k, b in enumerate(bufs):
        np.testing.assert_array_equal(b, data[4096 * k:4096 * (k + 1)])


def test_close_drops_queued_background_reads(data_file, monkeypatch):
    path, _ = data_file
    gate, started, first, guess = threading.Event(), threading.Event(), [], []
    real = StoreFile.read_into

    def read_into(self, buf, offset):
        started.set()
        gate.wait(10)
        return real(self, buf, offset)

    monkeypatch.setattr(StoreFile, "read_into", read_into)
    pool = ReadPool("buffered", readers=1, chunk=4096)
    with pool.cv:
        pool.submit(path, ((0, 4096, 0),), np.zeros(4096, np.uint8), first.append)
        pool.submit(path, ((4096, 4096, 0),), np.zeros(4096, np.uint8), guess.append, background=True)
    assert started.wait(10)
    threading.Timer(0.2, gate.set).start()
    pool.close()  # the read in flight finishes; the queued guess is dropped with an error
    assert first == [None] and len(guess) == 1 and isinstance(guess[0], OffloadError) and "closed" in str(guess[0])
