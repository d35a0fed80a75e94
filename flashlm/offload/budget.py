"""The RAM budget and the plan: which weights stay in RAM and which stream from disk.

``--ram SIZE | N% | auto`` is the footprint of the whole process. The planner starts
from what is already there (the measured baseline: interpreter, libraries, tokenizer,
compiled kernels), adds the KV cache for ctx x batch and the activations of the
largest step, and then spends what is left on weights:

1. if every store file fits, nothing streams (the store is memory-mapped, as before);
2. otherwise a window of ``n_slots`` streaming buffers, each the size of the largest
   streamed layer, is set aside, and the rest holds resident weights: the output head
   (when it fits; otherwise it streams in row blocks through the same buffers) and as
   many decoder layers as fit, spread evenly over the depth so that reads continue
   while resident layers compute. Norms and biases are always resident (a few KB a
   layer); embedding rows are read on demand, never the whole table.

A budget below the minimum (baseline + KV cache + smallest step + window) is a
BudgetError that names the minimum. When ``ctx`` was not given and weights stream, the
KV cache gets at most KV_SHARE of the budget (ctx 4096 -> 512), so that RAM goes to
weights; the prefill step (512 -> 16 rows) is the one with which a typical request
reads the fewest bytes: a smaller step reads the streamed weights once per step, so it
costs speed, not correctness.

Mechanism (reading, slots, threads) lives in :mod:`flashlm.offload.prefetch`; the plan
is a frozen value (FlexGen's ``Policy``, accelerate's device map): build it, print it,
hand it to :class:`flashlm.offload.streaming.StreamingWeights`.
"""
from __future__ import annotations

import ctypes
import gc
import math
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from flashlm.errors import BudgetError, InputError

MiB = 1 << 20
ALIGN = 4096
DEFAULT_CTX = 4096
MIN_CTX = 512
DEFAULT_PREFILL = 512  # rows per prefill step (llama.cpp's n_ubatch)
MIN_PREFILL = 16
# When weights stream and --ctx is not given, the KV cache gets at most this share of the budget.
KV_SHARE = 0.125
# The request the prefill step is chosen for (bytes read = steps x streamed bytes per step).
TYPICAL_PROMPT, TYPICAL_GEN = 512, 32  # 32 decode steps: ~100 tokens with prompt-lookup drafts
# Kept free of the machine's available memory by --ram auto (and by the memory watch).
AUTO_MARGIN_MIN = 256 * MiB
AUTO_MARGIN_FRACTION = 0.05
# Activations, from peak RSS during forwards of n rows (tests/offload/test_budget.py and
# docs/offload.md): per row about 4 bytes x (4 hidden + q + 2 kv + attention out + 3 ffn),
# measured 93-161 KiB a row on the 0.5B/1.5B (formula: 84/152), so 1.25x that; from
# matmul.BLAS_MIN_ROWS rows a dequantized f32 tile of TILE_ROWS weight rows + BLAS buffers.
ACT_FIXED = 2 * MiB
ACT_ROW_FACTOR = 1.25
BLAS_ROWS = 64
BLAS_TILE_ROWS = 1024
BLAS_EXTRA = 12 * MiB


def _round_up(n: int, a: int = ALIGN) -> int:
    return -(-int(n) // a) * a


# ---- parsing --ram ----


@dataclass(frozen=True)
class RamSpec:
    """A parsed ``--ram``: ``kind`` is "bytes", "percent" or "auto"."""

    kind: str
    value: float = 0.0
    text: str = "auto"

    def __str__(self) -> str:
        return self.text


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.I)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(s: int | str, *, what: str = "--ram") -> int:
    """'512M', '4G', '1.5GiB', '1e9', or a byte count -> bytes (powers of 1024).

    Raises:
        InputError: not a finite, positive size.
    """
    if isinstance(s, bool):
        raise InputError(f"{what} {s!r} is not a size: use e.g. 512M or 4G")
    if isinstance(s, int):
        if s <= 0:
            raise InputError(f"{what} {s} must be more than 0 bytes")
        return s
    m = _SIZE_RE.match(str(s))
    if not m:
        raise InputError(f"{what} {s!r} is not a size: use e.g. 512M, 4G, 1.5GiB or a byte count")
    v = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if not math.isfinite(v) or v < 1 or v > 1 << 60:
        raise InputError(f"{what} {s!r} is not a usable size: use e.g. 512M or 4G")
    return int(v)


def parse_ram(s: int | str | RamSpec | None) -> RamSpec:
    """``--ram``: a size ("560M", "4G", a byte count), a share of the machine's memory
    ("60%"), or "auto" / None (what is available now, less a margin)."""
    if isinstance(s, RamSpec):
        return s
    if s is None or (isinstance(s, str) and s.strip().lower() == "auto"):
        return RamSpec("auto")
    if isinstance(s, str) and s.strip().endswith("%"):
        try:
            p = float(s.strip()[:-1])
        except ValueError:
            p = float("nan")
        if not (0 < p <= 100):
            raise InputError(f"--ram {s!r}: a share of memory must be between 0% and 100%, e.g. 60%")
        return RamSpec("percent", p, s.strip())
    return RamSpec("bytes", parse_size(s), str(s).strip())


# ---- measuring the machine and the process ----


def cgroup_memory() -> tuple[int, int] | None:
    """(limit, usage) of this process's memory cgroup, v2 or v1, or None when unlimited/unknown."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrl, rel = parts
        rel = rel.lstrip("/")
        if ctrl == "":  # v2
            base = Path("/sys/fs/cgroup") / rel
            limit_f, usage_f = base / "memory.max", base / "memory.current"
        elif "memory" in ctrl.split(","):
            base = Path("/sys/fs/cgroup/memory") / rel
            limit_f, usage_f = base / "memory.limit_in_bytes", base / "memory.usage_in_bytes"
        else:
            continue
        try:
            raw = limit_f.read_text().strip()
            usage = int(usage_f.read_text().strip())
        except (OSError, ValueError):
            continue
        if raw == "max":
            continue
        limit = int(raw)
        if limit >= 1 << 60:  # v1's "unlimited"
            continue
        return limit, usage
    return None


def process_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def trim_heap() -> None:
    """Give freed heap back to the OS (glibc keeps it otherwise: parsing a 150k-token
    tokenizer.json leaves ~120 MB of freed arena resident)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def measure_baseline() -> int:
    """RSS of this process after a heap trim: what it costs before any weight is held."""
    trim_heap()
    return process_rss()


def resolve_budget(spec: RamSpec, *, vm=None, rss: int | None = None, cgroup: tuple[int, int] | None | bool = True) -> int:
    """Bytes the whole process may use under ``spec``.

    auto: this process's RSS + the memory available to it (psutil's ``available``, and
    within the memory cgroup's limit when there is one) - a margin of max(256 MiB, 5% of RAM).
    N%: that share of the machine's memory (or of the cgroup limit, if smaller).
    """
    import psutil

    vm = vm or psutil.virtual_memory()
    rss = process_rss() if rss is None else rss
    cg = cgroup_memory() if cgroup is True else (cgroup or None)
    total = vm.total if cg is None else min(vm.total, cg[0])
    if spec.kind == "bytes":
        return int(spec.value)
    if spec.kind == "percent":
        return int(total * spec.value / 100)
    avail = vm.available if cg is None else min(vm.available, cg[0] - cg[1])
    margin = max(AUTO_MARGIN_MIN, int(AUTO_MARGIN_FRACTION * total))
    return max(0, rss + avail - margin)


# ---- what a store needs ----


def always_resident(name: str, info: dict) -> bool:
    """Tensors read once and kept whatever the budget: norms and biases (1-D), and the routers
    of MoE layers (E x d, small), which predict the next layer's experts before it runs."""
    return len(info["shape"]) == 1 or name.endswith(".ffn_gate_inp.weight")


@dataclass(frozen=True)
class Layout:
    """The sizes the planner needs, read off a store's manifest.

    Attributes:
        layer_bytes: bytes of each decoder layer that stream together (the layer's file; for a
            mixture-of-experts layer, the part before its experts).
        small_bytes: 1-D tensors (norms, biases) of all layers and the head: always resident.
        head_name: the output projection ("output.weight", or "token_embd.weight" when tied).
        head_bytes, head_rows, head_row_bytes: its size, rows (vocab) and bytes a row.
        embed_bytes: the embedding table (rows are read on demand).
        tied: the head is the embedding.
        store_bytes: every file of the store (what runs fully in RAM).
        n_layers: decoder layers.
        n_experts, top_k: experts per MoE layer and experts a token uses (0 for a dense model).
        moe_layers: the layers with experts.
        expert_bytes: the largest expert (its gate, up and down: one contiguous range).
    """

    layer_bytes: tuple[int, ...]
    small_bytes: int
    head_name: str
    head_bytes: int
    head_rows: int
    head_row_bytes: int
    embed_bytes: int
    tied: bool
    store_bytes: int
    n_layers: int
    n_experts: int = 0
    top_k: int = 0
    moe_layers: tuple[int, ...] = ()
    expert_bytes: int = 0

    @property
    def experts_total(self) -> int:
        return self.n_experts * len(self.moe_layers)

    @classmethod
    def of(cls, store) -> "Layout":
        ti = store.tensor_info
        n = store.n_layers
        cfg = store.config
        small = sum(_round_up(t["nbytes"], 64) for k, t in ti.items() if always_resident(k, t))
        moe = tuple(i for i in range(n) if getattr(cfg, "is_moe_layer", lambda _: False)(i))
        layer = [store.files.get(f"layer_{i:03d}.bin", {}).get("size", 0) for i in range(n)]
        expert = 0
        for i in moe:
            prefix = f"blk.{i}."
            dense = [t for k, t in ti.items() if k.startswith(prefix) and not k.startswith(prefix + "expert.")]
            layer[i] = _round_up(max(t["offset"] + t["nbytes"] for t in dense))
            expert = max(expert, max(_round_up(store.expert_span(i, e)[2]) for e in range(cfg.num_experts)))
        tied = "output.weight" not in ti
        head_name = "token_embd.weight" if tied else "output.weight"
        h = ti[head_name]
        return cls(tuple(layer), small, head_name, int(h["nbytes"]), int(h["shape"][0]),
                   int(h["nbytes"]) // int(h["shape"][0]), int(ti["token_embd.weight"]["nbytes"]), tied,
                   int(store.nbytes), n, int(cfg.num_experts) if moe else 0,
                   int(cfg.num_experts_per_tok) if moe else 0, moe, expert)


def activation_bytes(config, rows: int, *, logits_rows: int = 1, ctx: int = 0) -> int:
    """Peak bytes of activations of a forward step of ``rows`` rows (see the constants above)."""
    c = config
    d, ff, hd = c.hidden_size, c.intermediate_size, c.head_dim
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    per_row = 4 * (4 * d + q + 2 * kv + q + 3 * ff)
    attn = 4 * min(rows, 256) * c.num_attention_heads * max(ctx, rows)  # one chunk of scores
    total = ACT_FIXED + int(ACT_ROW_FACTOR * rows * per_row) + attn + 4 * logits_rows * c.vocab_size
    if rows >= BLAS_ROWS:
        total += int(ACT_ROW_FACTOR * 4 * BLAS_TILE_ROWS * max(d, ff, q)) + BLAS_EXTRA
    return total


def kv_bytes(config, ctx: int, batch: int = 1, kv: str = "f32") -> int:
    from flashlm.runtime.kvcache import KVCache

    return KVCache.bytes_for(config, ctx, kv=kv) * batch


# ---- the plan ----


@dataclass(frozen=True)
class Plan:
    """Where every weight lives for one run. Build with :func:`make_plan`."""

    budget: int
    baseline: int
    kv_bytes: int
    act_bytes: int
    ctx: int
    batch: int
    prefill_rows: int
    streams: bool
    store_bytes: int
    n_layers: int
    resident_layers: tuple[int, ...] = ()
    head_resident: bool = True
    n_slots: int = 0
    slot_bytes: int = 0
    small_bytes: int = 0
    resident_bytes: int = 0  # weights held in RAM (the whole store when not streaming)
    streamed_bytes_per_token: int = 0  # read from disk per forward step (experts: expected misses)
    notes: tuple[str, ...] = field(default=())
    expert_slots: int = 0  # the expert cache of a mixture-of-experts model
    expert_slot_bytes: int = 0
    expert_read_per_token: int = 0  # expected, with routing spread evenly over the experts
    kv: str = "f32"  # the KV cache's element type (kv_bytes counts it)

    @property
    def streamed_layers(self) -> tuple[int, ...]:
        keep = set(self.resident_layers)
        return tuple(i for i in range(self.n_layers) if i not in keep) if self.streams else ()

    @property
    def window_bytes(self) -> int:
        return self.n_slots * self.slot_bytes + self.expert_slots * self.expert_slot_bytes

    @property
    def planned_bytes(self) -> int:
        """What the plan expects the process to use at most."""
        return self.baseline + self.kv_bytes + self.act_bytes + self.resident_bytes + self.window_bytes + self.small_bytes

    def with_resident(self, layout: "Layout", layers, head: bool | None = None) -> "Plan":
        """The same plan with other resident layers (and head), its byte counts recomputed."""
        layers = tuple(sorted(set(layers)))
        head = self.head_resident if head is None else head
        res = sum(layout.layer_bytes[i] for i in layers) + (layout.head_bytes if head else 0)
        total = sum(layout.layer_bytes) + layout.head_bytes
        return replace(self, resident_layers=layers, head_resident=head, resident_bytes=res,
                       streamed_bytes_per_token=total - res + self.expert_read_per_token)

    def expected_tok_s(self, read_bytes_per_s: float) -> float | None:
        """Disk-bound decode tok/s at that read speed (None when nothing streams)."""
        if not self.streams or not self.streamed_bytes_per_token:
            return None
        return read_bytes_per_s / self.streamed_bytes_per_token

    def summary(self) -> str:
        """One line for stderr."""
        mb = lambda n: f"{n / MiB:.0f} MiB"  # noqa: E731
        if not self.streams:
            return (f"ram budget {mb(self.budget)}: the whole model ({mb(self.store_bytes)}) fits in RAM, nothing "
                    f"streams (ctx {self.ctx})")
        res = [f"{len(self.resident_layers)}/{self.n_layers} layers"] + (["the head"] if self.head_resident else [])
        experts = (f", an expert cache of {self.expert_slots} experts ({mb(self.expert_slots * self.expert_slot_bytes)}"
                   f", ~{mb(self.expert_read_per_token)} of experts read per token)" if self.expert_slots else "")
        return (f"ram budget {mb(self.budget)} < model {mb(self.store_bytes)}: streaming "
                f"{mb(self.streamed_bytes_per_token)} per step through {self.n_slots} buffers of {mb(self.slot_bytes)}, "
                f"resident {' and '.join(res)} ({mb(self.resident_bytes)}){experts}, ctx {self.ctx}"
                + "".join(f"; {n}" for n in self.notes))

    def as_dict(self) -> dict:
        return {"budget": self.budget, "baseline": self.baseline, "kv_bytes": self.kv_bytes,
                "act_bytes": self.act_bytes, "ctx": self.ctx, "batch": self.batch, "prefill_rows": self.prefill_rows,
                "streams": self.streams, "store_bytes": self.store_bytes, "resident_bytes": self.resident_bytes,
                "resident_layers": list(self.resident_layers), "head_resident": self.head_resident,
                "n_slots": self.n_slots, "slot_bytes": self.slot_bytes, "small_bytes": self.small_bytes,
                "streamed_bytes_per_token": self.streamed_bytes_per_token, "planned_bytes": self.planned_bytes,
                "expert_slots": self.expert_slots, "expert_slot_bytes": self.expert_slot_bytes,
                "expert_read_per_token": self.expert_read_per_token, "kv": self.kv, "notes": list(self.notes)}


def spread(n: int, k: int) -> tuple[int, ...]:
    """k of range(n), evenly spaced (so reads go on while resident layers compute)."""
    if k <= 0:
        return ()
    if k >= n:
        return tuple(range(n))
    return tuple(sorted({int((i + 0.5) * n / k) for i in range(k)}))


def make_plan(layout: Layout, config, *, budget: int, baseline: int, ctx: int | None = None, batch: int = 1,
              draft: int = 0, prefill_rows: int = DEFAULT_PREFILL, n_slots: int = 2, force_stream: bool = False,
              kv: str = "f32") -> Plan:
    """Plan a run of ``config``/``layout`` inside ``budget`` bytes.

    Args:
        layout: sizes of the store (:meth:`Layout.of`).
        config: the ModelConfig.
        budget: bytes the whole process may use.
        baseline: bytes it uses before any weight (:func:`measure_baseline`).
        ctx: positions per sequence; None = DEFAULT_CTX, lowered to MIN_CTX if needed.
        batch: sequences decoded together (KV caches, rows per decode step).
        draft: draft tokens verified per step (rows per sequence: draft + 1).
        prefill_rows: rows per prefill step wanted (lowered to MIN_PREFILL if needed).
        n_slots: streaming buffers.
        force_stream: plan streaming even when everything fits (tests, benchmarks).
        kv: the KV cache's element type, "f32" (4 bytes per element) or "f16" (2).

    Raises:
        BudgetError: even the smallest plan does not fit; names the minimum.
    """
    if batch < 1:
        raise InputError(f"batch {batch} is invalid: use 1 or more")
    ctx_given = ctx is not None
    limit = int(getattr(config, "max_position_embeddings", 0) or DEFAULT_CTX)
    ctxs = [int(ctx)] if ctx_given else sorted({min(c, limit) for c in (DEFAULT_CTX, 2048, 1024, MIN_CTX)}, reverse=True)
    decode_rows = batch * (draft + 1)
    steps = sorted({r for r in (prefill_rows, 256, 128, 64, 32, MIN_PREFILL) if r <= prefill_rows} | {prefill_rows},
                   reverse=True)

    def act(rows: int, c: int) -> int:
        rows = max(rows, decode_rows)
        return activation_bytes(config, rows, logits_rows=decode_rows, ctx=c)

    def min_experts(r: int) -> int:
        """Expert slots a step of ``r`` rows needs at once: the union of its rows' experts in one layer."""
        return min(layout.n_experts, max(r, decode_rows) * layout.top_k) if layout.moe_layers else 0

    def fixed(c: int, r: int) -> int:
        return (baseline + kv_bytes(config, c, batch, kv) + act(r, c) + layout.small_bytes
                + min_experts(r) * layout.expert_bytes)

    # 1. everything in RAM (memory-mapped store)?
    if not force_stream:
        for c in ctxs:
            if fixed(c, steps[0]) + layout.store_bytes <= budget:
                return Plan(budget, baseline, kv_bytes(config, c, batch, kv), act(steps[0], c), c, batch, steps[0], False,
                            layout.store_bytes, layout.n_layers, tuple(range(layout.n_layers)), True,
                            resident_bytes=layout.store_bytes, kv=kv)
    # 2. stream: the smallest ctx / step that leaves room for the window
    slot = _round_up(max(layout.layer_bytes) if layout.layer_bytes else layout.head_bytes)
    window = n_slots * slot
    choice = None
    for c in ctxs:
        for r in steps:
            if fixed(c, r) + window <= budget:
                choice = (c, r)
                break
        if choice:
            break
    if choice is None:
        c_min = ctxs[-1]
        need = fixed(c_min, MIN_PREFILL) + window
        raise BudgetError(
            f"--ram {budget / MiB:.0f} MiB is too small for this model: it needs at least {need / MiB:.0f} MiB "
            f"({baseline / MiB:.0f} MiB for the process itself, {kv_bytes(config, c_min, batch, kv) / MiB:.0f} MiB of "
            f"KV cache for ctx {c_min}{f' x batch {batch}' if batch > 1 else ''}, {n_slots} streaming buffers of "
            f"{slot / MiB:.0f} MiB"
            + (f", {min_experts(MIN_PREFILL)} expert slots of {layout.expert_bytes / MiB:.1f} MiB" if layout.moe_layers
               else "")
            + " and activations); raise --ram"
            + (f" or lower --ctx (now {c_min})" if c_min > MIN_CTX else ""))
    c, _ = choice
    if not ctx_given:  # streaming: a KV cache of at most KV_SHARE of the budget, so weights keep the rest
        c = next((x for x in ctxs if x <= c and kv_bytes(config, x, batch, kv) <= KV_SHARE * budget
                  and fixed(x, steps[-1]) + window <= budget), ctxs[-1])
    n = layout.n_layers
    lb = max(layout.layer_bytes) if layout.layer_bytes else 0

    def resident_for(room: int) -> tuple[int, bool, tuple[int, ...]]:
        """(resident bytes, head resident, layers) for ``room`` bytes: the head (if it fits)
        and evenly spread layers, whichever choice holds more bytes."""
        best = (0, False, ())
        for head in (True, False):
            left = room - (layout.head_bytes if head else 0)
            if left < 0:
                continue
            layers = spread(n, min(n, left // lb) if lb else n)
            got = sum(layout.layer_bytes[i] for i in layers) + (layout.head_bytes if head else 0)
            best = max(best, (got, head, layers), key=lambda o: (o[0], o[1]))
        return best

    def experts_for(room: int, r: int) -> tuple[int, int]:
        """(expert slots, expected expert bytes read per token) with ``room`` bytes left: every
        slot past the minimum is one more expert kept (hits estimated for routing spread evenly)."""
        if not layout.moe_layers:
            return 0, 0
        slots = min(layout.experts_total, min_experts(r) + max(0, room) // layout.expert_bytes)
        miss = 1.0 - slots / layout.experts_total
        return slots, int(len(layout.moe_layers) * layout.top_k * layout.expert_bytes * miss)

    # 3. the prefill step: larger steps read the streamed weights fewer times per prompt, but
    # their activations leave less room for resident weights. Pick the step that makes a
    # typical request (TYPICAL_PROMPT tokens in, TYPICAL_GEN out) read the fewest bytes.
    # Dense weights come first (every token reads them); an expert cache gets what is left.
    total = sum(layout.layer_bytes) + layout.head_bytes
    best = None
    for r in steps:
        room = budget - fixed(c, r) - window
        if room < 0:
            continue
        got, head_res, resident = resident_for(room)
        slots, expert_read = experts_for(room - got, r)
        cost = (-(-TYPICAL_PROMPT // r) + TYPICAL_GEN) * (total - got + expert_read)
        if best is None or cost < best[0]:
            best = (cost, r, got, head_res, resident, slots, expert_read)
    _, r, res_bytes, head_res, resident, slots, expert_read = best
    streamed = total - res_bytes + expert_read
    notes = []
    if not ctx_given and c != ctxs[0]:
        notes.append(f"ctx {c}, not {ctxs[0]}: a longer context would take RAM from the weights (--ctx sets it)")
    if r != prefill_rows:
        notes.append(f"prefill in steps of {r} tokens")
    return Plan(budget, baseline, kv_bytes(config, c, batch, kv), act(r, c), c, batch, r, True, layout.store_bytes, n,
                resident, head_res, n_slots, slot, layout.small_bytes, res_bytes, streamed, tuple(notes),
                slots, layout.expert_bytes if slots else 0, expert_read, kv)


