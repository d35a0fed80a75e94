"""A weights source that streams what does not fit: the ``Weights`` protocol over a plan.

:class:`StreamingWeights` answers the model exactly as a :class:`~flashlm.offload.store.Store`
does (``tensor``, ``has``, ``layer``), from three places, as the plan says
(:mod:`flashlm.offload.budget`):

- resident weights, read once into anonymous memory at start (resident layers, the head
  when it fits, every norm and bias of every layer);
- the prefetcher's window (:mod:`flashlm.offload.prefetch`): ``layer(i)`` of a streamed
  layer hands out views of the slot the readers filled, and gives back the slot of the
  layer before (its kernels have returned: the model asks for layers in order and
  computes synchronously); a streamed output head is a :class:`StreamedMatrix` whose row
  blocks go through the same slots, one after the other;
- the disk, for embedding rows (a token needs one row of a 100+ MB table).

Views of a slot are ``QTensor(..., stable=False)``: the same address holds another
layer later, so nothing may cache anything by their address (the backends' caches
skip them). Norms and biases are resident and stable, so the kernel backend's
float32 copies of F16/BF16 vectors stay right.

The model code does not know any of this; the order of its calls is the protocol:
per forward step ``tensor("token_embd.weight")`` (rows), ``layer(0..L-1)``, then
``tensor("output_norm.weight")`` and the head.

Memory watch: at the start of every step (at most every WATCH_S seconds) it checks the
machine's available memory (and the cgroup's) and this process's RSS against the
budget; when short, resident layers are given up (they stream from then on) rather
than let the process be killed. ``notices`` says so, once per event.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np

from flashlm.errors import OffloadError
from flashlm.kernels.formats import QTensor, slab_bytes, view_as
from flashlm.offload.budget import (AUTO_MARGIN_MIN, Layout, Plan, always_resident, cgroup_memory, process_rss, spread,
                                    trim_heap)
from flashlm.offload.io import ALIGN, StoreFile, aligned_buffer, default_mode
from flashlm.offload.prefetch import ExpertCache, Prefetcher, ReadPool, Segment

WATCH_S = 0.5
MIN_FREE = AUTO_MARGIN_MIN // 2  # the memory watch gives up resident layers below this much available


def _floor(n: int) -> int:
    return n - n % ALIGN


def _ceil(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class StreamedMatrix:
    """A weight matrix that is not held: row blocks through the prefetcher, rows from disk.

    Backends use it where a QTensor would be: ``linear`` over :meth:`blocks`, ``embed``
    through :meth:`rows`.
    """

    def __init__(self, owner: "StreamingWeights", name: str, info: dict, keys: list | None,
                 row_blocks: list[tuple[int, int]] | None) -> None:
        self.owner, self.name = owner, name
        self.fmt: str = info["format"]
        self.shape: tuple[int, ...] = tuple(info["shape"])
        self.nbytes: int = int(info["nbytes"])
        self.path = owner.store.path / info["file"]
        self.offset = int(info["offset"])
        self.keys, self.row_blocks = keys, row_blocks
        self._cuts = slab_bytes(self.fmt, self.shape[-1]) if len(self.shape) == 2 else [(0, self.nbytes)]
        self._reader: StoreFile | None = None

    def __repr__(self) -> str:
        return f"StreamedMatrix({self.name}, {self.fmt}, {self.shape})"

    @property
    def row_nbytes(self) -> int:
        return self.nbytes // self.shape[0]

    def pieces(self, r0: int, r1: int) -> list[tuple[int, int]]:
        """(file offset, nbytes) of rows r0..r1 in each column slab."""
        rows, base, out = self.shape[0], self.offset, []
        for a, b in self._cuts:
            w = b - a
            out.append((base + r0 * w, (r1 - r0) * w))
            base += rows * w
        return out

    def segment(self, key, r0: int, r1: int) -> Segment:
        """The aligned reads that bring rows r0..r1 into a slot (each piece page-aligned in it)."""
        ranges, at = [], 0
        for off, n in self.pieces(r0, r1):
            lo, hi = _floor(off), _ceil(off + n)
            ranges.append((lo, hi - lo, at))
            at += hi - lo
        return Segment(key, self.path, tuple(ranges))

    def _view(self, buf: np.ndarray, r0: int, r1: int) -> QTensor:
        """Rows r0..r1 out of a filled slot, compacted into the layout of an (r1-r0)-row tensor."""
        dst, at = 0, 0
        for off, n in self.pieces(r0, r1):
            lo, hi = _floor(off), _ceil(off + n)
            src = at + (off - lo)
            if len(self._cuts) == 1:
                dst = src
            elif src != dst:
                np.copyto(buf[dst:dst + n], buf[src:src + n])  # moves left; numpy handles the overlap
            if len(self._cuts) > 1:
                dst += n
            at += hi - lo
        start = dst if len(self._cuts) == 1 else 0
        nbytes = (r1 - r0) * self.row_nbytes
        return QTensor(view_as(self.fmt, buf[start:start + nbytes], (r1 - r0,) + self.shape[1:]), self.fmt,
                       (r1 - r0,) + self.shape[1:], stable=False)

    def blocks(self) -> Iterator[tuple[int, int, QTensor]]:
        """(r0, r1, QTensor of rows r0..r1) for every row block, each read by the prefetcher
        and given back when the consumer asks for the next (or stops)."""
        if self.keys is None:
            raise OffloadError(f"{self.name} is read by rows only (it is not a streamed output head)")
        owner = self.owner
        for key, (r0, r1) in zip(self.keys, self.row_blocks):
            owner.release()
            buf = owner.prefetcher.get(key, owner.on_wait)
            owner._held = key
            try:
                yield r0, r1, self._view(buf, r0, r1)
            finally:
                owner.release()

    def rows(self, ids) -> QTensor:
        """Rows ``ids`` read from disk now (a few pages each), as a (len(ids), cols) QTensor."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.shape[0]):
            raise IndexError(f"{self.name}: row out of range")
        if self._reader is None:
            self._reader = StoreFile(self.path, self.owner.mode)
        uniq, inv = np.unique(ids, return_inverse=True)
        widths = [b - a for a, b in self._cuts]
        parts = [np.empty((len(uniq), w), np.uint8) for w in widths]
        scratch = self.owner._scratch(2 * ALIGN + max(widths))
        mv = memoryview(scratch)
        for j, r in enumerate(uniq):
            for s, (off, n) in enumerate(self.pieces(int(r), int(r) + 1)):
                lo, hi = _floor(off), _ceil(off + n)
                self._reader.read_into(mv[: hi - lo], lo)
                parts[s][j] = scratch[off - lo: off - lo + n]
        self.owner.embed_bytes_read += len(uniq) * self.row_nbytes
        data = np.concatenate([p.reshape(-1) for p in parts]).reshape(len(uniq), self.row_nbytes)
        data = data[inv] if len(parts) == 1 else _take_slabbed(data, inv, widths)
        return QTensor(view_as(self.fmt, data.reshape(-1), (len(ids),) + self.shape[1:]), self.fmt,
                       (len(ids),) + self.shape[1:])

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def _take_slabbed(data: np.ndarray, idx: np.ndarray, widths: list[int]) -> np.ndarray:
    """Rows ``idx`` of an (n, row bytes) array in slab order, in slab order."""
    n, flat, base, parts = data.shape[0], data.reshape(-1), 0, []
    for w in widths:
        parts.append(flat[base:base + n * w].reshape(n, w)[idx].reshape(-1))
        base += n * w
    return np.concatenate(parts).reshape(len(idx), data.shape[1])


class StreamingWeights:
    """The ``Weights`` protocol over a store and a streaming plan.

    Args:
        store: the open Store (manifest, paths).
        plan: a Plan with ``streams`` True.
        mode: read mode ("direct", "buffered", "mmap"); default the best available.
        readers: reader threads of the prefetcher.
        chunk: bytes per read request.
        trace: record read intervals (``prefetcher.trace``), for tests.
        watch: check memory at each step and give up resident layers when short.
        vm: a function returning psutil.virtual_memory()-like objects (tests inject one).
    """

    def __init__(self, store, plan: Plan, *, mode: str | None = None, readers: int = 2, chunk: int = 4 << 20,
                 trace: bool = False, watch: bool = True, vm=None, rss=None) -> None:
        if not plan.streams:
            raise ValueError("StreamingWeights needs a plan that streams")
        self.store, self.plan = store, plan
        self.config = store.config
        self.n_layers = store.n_layers
        self.mode = mode or default_mode()
        self.watch, self._vm, self._rss = watch, vm, rss or process_rss
        self.notices: list[str] = []
        self.on_wait = None  # called before the compute side waits for a read (api: pool.park)
        self.steps = 0
        self.embed_bytes_read = 0
        self.resident_read_bytes = 0
        self._held = None
        self._scratch_buf: np.ndarray | None = None
        self._last_watch = 0.0
        self._files: dict[str, StoreFile] = {}
        self.prefetcher: Prefetcher | None = None
        self.experts_cache: ExpertCache | None = None
        self.layout = Layout.of(store)
        self.pool = ReadPool(self.mode, readers=readers, chunk=chunk)
        try:
            self._small = self._read_small()
            self._resident: dict[int, dict[str, QTensor]] = {i: self._read_layer(i) for i in plan.resident_layers}
            self._globals: dict[str, QTensor | StreamedMatrix] = {}
            self._setup_head()
            self.prefetcher = Prefetcher(self._schedule(), n_slots=plan.n_slots, slot_bytes=plan.slot_bytes,
                                         trace=trace, pool=self.pool)
            if self.layout.moe_layers:
                spans = {(i, e): (self.store.path / f, off, n) for i in self.layout.moe_layers
                         for e in range(self.layout.n_experts) for f, off, n in [self.store.expert_span(i, e)]}
                self.experts_cache = ExpertCache(self.pool, n_slots=plan.expert_slots,
                                                 slot_bytes=plan.expert_slot_bytes, spans=spans)
        except BaseException:
            self.close()
            raise
        finally:
            for f in self._files.values():
                f.close()
            self._files.clear()

    # ---- start-up reads ----

    def _file(self, fname: str) -> StoreFile:
        f = self._files.get(fname)
        if f is None:
            f = self._files[fname] = StoreFile(self.store.path / fname, self.mode)
        return f

    def _read_small(self) -> dict[str, QTensor]:
        """Every always-resident tensor (norms, biases, MoE routers), packed into one buffer."""
        infos = {n: t for n, t in self.store.tensor_info.items() if always_resident(n, t)}
        spans = {n: _ceil(t["offset"] + t["nbytes"]) - _floor(t["offset"]) for n, t in infos.items()}
        buf = np.frombuffer(aligned_buffer(sum(spans.values()) or ALIGN), np.uint8)
        out, at = {}, 0
        for n, t in sorted(infos.items(), key=lambda kv: (kv[1]["file"], kv[1]["offset"])):
            lo = _floor(t["offset"])
            self._file(t["file"]).read_into(memoryview(buf[at:at + spans[n]]), lo)
            self.resident_read_bytes += spans[n]
            raw = buf[at + t["offset"] - lo: at + t["offset"] - lo + t["nbytes"]]
            out[n] = QTensor(view_as(t["format"], raw, tuple(t["shape"])), t["format"], tuple(t["shape"]))
            at += spans[n]
        return out

    def _layer_views(self, i: int, buf: np.ndarray, base: int, stable: bool) -> dict[str, QTensor]:
        prefix = f"blk.{i}."
        views = {}
        for name in self.store.layer_names(i):
            if name.startswith(prefix + "expert."):
                continue  # experts come through experts(), from the expert cache
            t = self.store.tensor_info[name]
            short = name[len(prefix):]
            if name in self._small:
                views[short] = self._small[name]
                continue
            o = t["offset"] - base
            views[short] = QTensor(view_as(t["format"], buf[o:o + t["nbytes"]], tuple(t["shape"])), t["format"],
                                   tuple(t["shape"]), stable=stable)
        return views

    def _read_layer(self, i: int) -> dict[str, QTensor]:
        fname = f"layer_{i:03d}.bin"
        size = self.layout.layer_bytes[i]  # a MoE layer: the part before its experts
        buf = np.frombuffer(aligned_buffer(size), np.uint8)
        self._file(fname).read_into(memoryview(buf[:size]), 0)
        self.resident_read_bytes += size
        return self._layer_views(i, buf, 0, True)

    def _setup_head(self) -> None:
        ti = self.store.tensor_info
        head_name = "token_embd.weight" if "output.weight" not in ti else "output.weight"
        if self.plan.head_resident:
            t = ti[head_name]
            lo, hi = _floor(t["offset"]), _ceil(t["offset"] + t["nbytes"])
            buf = np.frombuffer(aligned_buffer(hi - lo), np.uint8)
            self._file(t["file"]).read_into(memoryview(buf[:hi - lo]), lo)
            self.resident_read_bytes += hi - lo
            raw = buf[t["offset"] - lo: t["offset"] - lo + t["nbytes"]]
            self._globals[head_name] = QTensor(view_as(t["format"], raw, tuple(t["shape"])), t["format"],
                                               tuple(t["shape"]))
        else:
            t = ti[head_name]
            rows, rb = int(t["shape"][0]), int(t["nbytes"]) // int(t["shape"][0])
            n_cuts = len(slab_bytes(t["format"], t["shape"][-1])) if len(t["shape"]) == 2 else 1
            per = max(1, (self.plan.slot_bytes - 2 * ALIGN * n_cuts) // rb)
            blocks = [(r, min(rows, r + per)) for r in range(0, rows, per)]
            keys = [("head", b) for b in range(len(blocks))]
            self._globals[head_name] = StreamedMatrix(self, head_name, t, keys, blocks)
        if "token_embd.weight" not in self._globals:
            self._globals["token_embd.weight"] = StreamedMatrix(self, "token_embd.weight", ti["token_embd.weight"],
                                                                None, None)

    def _schedule(self) -> list[Segment]:
        segs = []
        for i in range(self.n_layers):
            if i in self._resident:
                continue
            fname = f"layer_{i:03d}.bin"
            segs.append(Segment(("layer", i), self.store.path / fname, ((0, self.layout.layer_bytes[i], 0),)))
        head = self._head()
        if isinstance(head, StreamedMatrix):
            segs += [head.segment(k, r0, r1) for k, (r0, r1) in zip(head.keys, head.row_blocks)]
        return segs

    def _head(self):
        return self._globals.get("output.weight") or self._globals["token_embd.weight"]

    def _scratch(self, n: int) -> np.ndarray:
        if self._scratch_buf is None or self._scratch_buf.size < n:
            self._scratch_buf = np.frombuffer(aligned_buffer(n), np.uint8)
        return self._scratch_buf

    # ---- the Weights protocol ----

    def has(self, name: str) -> bool:
        return name in self.store.tensor_info

    def tensor(self, name: str):
        """A global tensor: resident QTensor, or StreamedMatrix (a streamed head; embedding rows)."""
        self.release()  # the layers are done once the model asks for a global
        hit = self._globals.get(name) or self._small.get(name)
        if hit is not None:
            return hit
        if name not in self.store.tensor_info:
            raise KeyError(f"weights have no tensor {name!r}")
        raise OffloadError(f"{name} is neither resident nor streamed by this plan")

    def layer(self, i: int) -> dict[str, QTensor]:
        """Tensors of decoder block ``i``: resident views, or views of the slot it was read into."""
        if not 0 <= i < self.n_layers:
            raise KeyError(f"weights have no tensors for layer {i}")
        self.release()
        if i == 0:
            self.steps += 1
            if self.watch:
                self._check_memory()
        hit = self._resident.get(i)
        if hit is not None:
            return hit
        key = ("layer", i)
        buf = self.prefetcher.get(key, self.on_wait)
        self._held = key
        return self._layer_views(i, buf, 0, False)

    def release(self) -> None:
        """Give back the slot in use (the model has finished with the layer or head block) and
        the experts it used."""
        if self._held is not None and self.prefetcher is not None:
            key, self._held = self._held, None
            self.prefetcher.release(key)
        if self.experts_cache is not None:
            self.experts_cache.release()

    def experts(self, i: int, ids, on_submit=None) -> dict[int, dict[str, QTensor]]:
        """Experts ``ids`` of MoE block ``i`` from the expert cache (read now when missing, all
        at once); valid until the next ``experts`` or ``layer`` call. ``on_submit()`` runs
        once the missing ones are queued, before waiting for them (reads ahead go there)."""
        views = self.experts_cache.get(i, ids, self.on_wait, on_submit)
        out = {}
        for e, buf in views.items():
            _, base, _ = self.store.expert_span(i, e)
            d = {}
            for m in ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"):
                t = self.store.tensor_info[f"blk.{i}.expert.{e}.{m}"]
                o = t["offset"] - base
                d[m] = QTensor(view_as(t["format"], buf[o:o + t["nbytes"]], tuple(t["shape"])), t["format"],
                               tuple(t["shape"]), stable=False)
            out[e] = d
        return out

    def router(self, i: int) -> QTensor | None:
        """The router of MoE block ``i`` (always resident), None if it has none."""
        return self._small.get(f"blk.{i}.ffn_gate_inp.weight")

    def prefetch_experts(self, i: int, ids) -> int:
        """Start reading experts ``ids`` of block ``i`` (a prediction) into the expert cache,
        without waiting and without displacing pinned experts; returns the reads started."""
        return self.experts_cache.prefetch(i, ids) if self.experts_cache is not None else 0

    # ---- memory watch ----

    def _check_memory(self) -> None:
        now = time.monotonic()
        if now - self._last_watch < WATCH_S or not self._resident:
            return
        self._last_watch = now
        import psutil

        vm = (self._vm or psutil.virtual_memory)()
        avail = vm.available
        cg = cgroup_memory() if self._vm is None else None
        if cg is not None:
            avail = min(avail, cg[0] - cg[1])
        short = max(MIN_FREE - avail, self._rss() - self.plan.budget)
        if short <= 0:
            return
        lb = max(self.plan.slot_bytes, 1)
        drop = min(len(self._resident), -(-short // lb))
        self.give_up_layers(drop, f"memory is short ({avail / 2**20:.0f} MiB available)")

    def give_up_layers(self, n: int, why: str = "") -> None:
        """Stream ``n`` resident layers from now on and free their memory."""
        keep = list(self._resident)
        drop = [keep[i] for i in spread(len(keep), n)] if n < len(keep) else keep
        for i in drop:
            del self._resident[i]
        self.plan = self.plan.with_resident(self.layout, self._resident)
        self.prefetcher.set_schedule(self._schedule())
        trim_heap()
        self.notices.append(f"{why + ': ' if why else ''}{len(drop)} resident layer(s) given up, "
                            f"{len(self._resident)} left; they stream from now on")

    # ---- stats and lifetime ----

    def read_pass(self, steps: int = 2) -> float:
        """Bytes/s of ``steps`` passes over the streamed segments with no compute: the reads a
        decode step makes, as fast as the disk takes them (the I/O ceiling of this plan)."""
        self.release()
        pf = self.prefetcher
        keys = pf.keys
        if not keys:
            return 0.0
        b0, t0 = self.pool.bytes_read, time.perf_counter()
        for _ in range(steps):
            for k in keys:
                pf.get(k)
                pf.release(k)
        dt = time.perf_counter() - t0
        return (self.pool.bytes_read - b0) / dt if dt > 0 else 0.0

    def reads(self) -> tuple[int, float, float]:
        """(bytes read while streaming: layers, head blocks, experts, embedding rows; seconds with a
        read in flight; seconds the compute side waited for reads) since start."""
        with self.pool.cv:
            nbytes, read_s = self.pool.bytes_read, self.pool.read_s
        wait = self.prefetcher.stats.io_wait_s if self.prefetcher else 0.0
        if self.experts_cache is not None:
            wait += self.experts_cache.stats.io_wait_s
        return nbytes + self.embed_bytes_read, read_s, wait

    def stats(self) -> dict:
        """Reads since start (prefetcher stats, embedding rows, resident loads) and the plan's figures."""
        ps = self.prefetcher.stats.as_dict() if self.prefetcher else {}
        if self.experts_cache is not None:
            ps.update(self.experts_cache.stats.as_dict())
        return {**ps, "embed_bytes_read": self.embed_bytes_read, "resident_read_bytes": self.resident_read_bytes,
                "resident_bytes": self.plan.resident_bytes, "streamed_bytes_per_step": self.plan.streamed_bytes_per_token,
                "steps": self.steps, "read_mode": self.mode}

    def close(self) -> None:
        if self.prefetcher is not None:
            self._held = None
            self.prefetcher.close()
        if getattr(self, "pool", None) is not None:
            self.pool.close()
        for g in getattr(self, "_globals", {}).values():
            if isinstance(g, StreamedMatrix):
                g.close()
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> "StreamingWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def store_files(store) -> list[Path]:
    """The layer files of a store, in order (for read-speed probes)."""
    return [store.path / f"layer_{i:03d}.bin" for i in range(store.n_layers)]
