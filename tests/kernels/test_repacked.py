"""Store-only layouts (kernels/repacked.py): Q5_0R, Q6_KR and Q4_KR packing and their kernels against gguf.

Weights are random GGUF Q5_0 / Q6_K / Q4_K blocks (valid scales, zero and extreme ones), packed; the
reference is ``gguf.quants.dequantize`` of the unpacked blocks, which must be the
original bytes exactly. Error measure as in test_gemv_basic (``_blocks.row_errors``).
"""
from __future__ import annotations

import numba
import numpy as np
import pytest
from _blocks import TOL, Checker, cpu_runs_variant, dequant_ref, max_error, random_weights

from flashlm.kernels import repacked as rp
from flashlm.kernels import simd
from flashlm.kernels import formats
from flashlm.kernels.formats import row_cols, row_nbytes

IMPLS = {"simd": rp.SIMD_KERNELS, "plain": rp.PLAIN_KERNELS}
DEQUANT = {"simd": rp.DEQUANT_SIMD, "plain": rp.DEQUANT_PLAIN}
# real shapes, and rows of 1 and 2 blocks (only the GGUF tail), nb % 3 = 0, 1, 2
SHAPES = [(896, 896), (128, 896), (4864, 896), (896, 4864), (1536, 8960), (8960, 1536), (576, 1536),
          (1, 896), (7, 32), (5, 64), (33, 96), (9, 128), (3, 160)]


def _q5_0(rows: int, cols: int, seed: int, extreme: bool = True) -> np.ndarray:
    return random_weights("Q5_0", rows, cols, np.random.default_rng(seed), extreme)


@pytest.mark.parametrize("cols", [32, 64, 96, 128, 160, 896, 4864, 8960])
def test_pack_unpack_round_trip_is_exact(cols: int) -> None:
    """Any bytes at all in the quant and high-bit fields come back unchanged."""
    rng = np.random.default_rng(cols)
    w = _q5_0(6, cols, cols)
    w.reshape(6, -1, 22)[:, :, 2:] = rng.integers(0, 256, size=w.reshape(6, -1, 22)[:, :, 2:].shape, dtype=np.uint8)
    fmt, packed = rp.pack("Q5_0", w, (6, cols))
    assert fmt == "Q5_0R" and packed.shape == (6, row_nbytes("Q5_0R", cols)) and packed.dtype == np.uint8
    assert row_cols("Q5_0R", packed.shape[1]) == cols
    back_fmt, back = rp.unpack(fmt, packed, (6, cols))
    assert back_fmt == "Q5_0" and np.array_equal(back, w)


def test_layout_is_as_documented() -> None:
    """Lane j, bits 5k..5k+4 = quant of weight 16k + j; then the 3 scales; then the tail block."""
    cols = 128  # one group and one tail block
    w = _q5_0(1, cols, 9)
    blk = w.reshape(-1, 22)
    q = []
    for b in blk:
        qh = int.from_bytes(b[2:6].tobytes(), "little")
        q += [(int(b[6 + j]) & 15) | ((qh >> j) & 1) << 4 for j in range(16)]
        q += [(int(b[6 + j]) >> 4) | ((qh >> (j + 16)) & 1) << 4 for j in range(16)]
    packed = rp.pack("Q5_0", w, (1, cols))[1][0]
    lanes = packed[:64].view("<u4")
    for k in range(6):
        assert [(int(v) >> (5 * k)) & 31 for v in lanes] == q[16 * k:16 * k + 16]
    assert packed[64:70].tobytes() == b"".join(blk[i, 0:2].tobytes() for i in range(3))
    assert packed[70:].tobytes() == blk[3].tobytes()


def test_pack_leaves_other_formats_alone() -> None:
    """Float formats are stored as they are; Q4_0 gets its store name and the same bytes (one slab)."""
    w = np.ones((3, 64), np.float16)
    assert rp.pack("F16", w, (3, 64))[1] is w and rp.unpack("F16", w, (3, 64))[1] is w
    q = random_weights("Q4_0", 3, 64, np.random.default_rng(0))
    fmt, packed = rp.pack("Q4_0", q, (3, 64))
    assert fmt == "Q4_0S" and np.array_equal(packed, q) and np.array_equal(rp.unpack(fmt, packed, (3, 64))[1], q)


def test_check_detects_swapped_nibbles_and_wrong_scale() -> None:
    """The kernels' output on the packed weight matches the reference of the original blocks
    and not that of blocks with one nibble pair swapped or one scale doubled (in a group and
    in a tail block)."""
    rows, cols = 8, 128
    rng = np.random.default_rng(2)
    w = _q5_0(rows, cols, 2, extreme=False)
    for byte in (6, 3 * 22 + 6):  # group, tail
        w[0, byte] = 0x1E  # nibbles 14 and 1
    p = rp.pack("Q5_0", w, (rows, cols))[1]
    x = rng.standard_normal(cols).astype(np.float32)
    out = np.empty(rows, np.float32)
    for table in IMPLS.values():
        table["Q5_0R"][0](p, x, out, 0, rows)
        assert max_error(out, dequant_ref(w, "Q5_0"), x) < TOL
        for byte in (6, 3 * 22 + 6):
            bad = w.copy()
            bad[0, byte] = 0xE1
            assert max_error(out, dequant_ref(bad, "Q5_0"), x) > 10 * TOL
            bad = w.copy()
            d = bad[3, byte - 6:byte - 4].view(np.float16)
            d[0] = d[0] * np.float16(2.0)
            assert max_error(out, dequant_ref(bad, "Q5_0"), x) > 10 * TOL


@pytest.mark.parametrize("avx512", [False, True], ids=["avx2", "avx512"])
def test_every_simd_code_path(avx512: bool) -> None:
    """The AVX2 lookup (and + convert) and the AVX-512 32-entry table, whichever this CPU's
    default is, compiled here with simd's module flag set."""
    if not cpu_runs_variant({"HAVE_AVX512": avx512}):
        pytest.skip("this CPU cannot run that code")
    saved = simd.HAVE_AVX512
    try:
        simd.HAVE_AVX512 = avx512

        @numba.njit(nogil=True, fastmath=True)
        def dot(w, o, x, xo, ng, nt):
            return rp.dot_q5_0r(w, o, x, xo, ng, nt)

        @numba.njit(nogil=True, fastmath=True)
        def gemv(w, x, out, r0, r1):
            rp._gemv_simd(dot, w, x, out, r0, r1)

        @numba.njit(nogil=True)
        def dequant(w, out, r0, r1):
            for r in range(r0, r1):
                rp._decode_row_simd(w, r * w.strides[0], out.shape[1] // 32, out, r * out.shape[1])

        for rows, cols in ((33, 896), (4, 1536), (3, 160)):
            w = _q5_0(rows, cols, cols)
            p = rp.pack("Q5_0", w, (rows, cols))[1]
            x = np.random.default_rng(rows).standard_normal(cols).astype(np.float32)
            out = np.full(rows, np.nan, np.float32)
            gemv(p, x, out, 0, rows)
            assert max_error(out, dequant_ref(w, "Q5_0"), x) < TOL
            full = np.empty((rows, cols), np.float32)
            dequant(p, full, 0, rows)
            assert np.array_equal(full.astype(np.float64), dequant_ref(w, "Q5_0"), equal_nan=True)
    finally:
        simd.HAVE_AVX512 = saved


# ---- Q6_KR (Q6_K with each sub-block's quants in one lane) ----

# (1536, 8960): 3 column slabs; (5, 3328) 13 blocks: 2 slabs (6 + 7); (896, 4864): 2 (9 + 10)
K_SHAPES = [(1536, 8960), (8960, 1536), (576, 1536), (256, 1536), (896, 4864), (1, 256), (7, 512), (33, 768),
            (5, 3328), (1, 8960)]


def _q6_k(rows: int, cols: int, seed: int, extreme: bool = True) -> np.ndarray:
    return random_weights("Q6_K", rows, cols, np.random.default_rng(seed), extreme)


def _q6_k_quants(blk: np.ndarray) -> list[int]:
    """The 256 quants (0..63) of one GGUF Q6_K block, in weight order (ggml's layout)."""
    q = [0] * 256
    for h in range(2):
        for c in range(4):
            for l in range(32):
                ql = int(blk[64 * h + l + 32 * (c & 1)]) >> (4 * (c >> 1)) & 15
                qh = int(blk[128 + 32 * h + l]) >> (2 * c) & 3
                q[128 * h + 32 * c + l] = ql | qh << 4
    return q


@pytest.mark.parametrize("gguf_fmt,bb,cols", [(f, bb, c) for f, bb in (("Q6_K", 210), ("Q4_K", 144))
                                               for c in (256, 512, 3328, 8960)])
def test_super_block_layouts_round_trip_is_exact(gguf_fmt: str, bb: int, cols: int) -> None:
    """Q6_KR / Q4_KR: any bytes at all in the quant, scale, min and d fields come back
    unchanged (3328 and 8960 are cut into 2 and 3 column slabs)."""
    w = np.random.default_rng(cols).integers(0, 256, size=(5, cols // 256 * bb), dtype=np.uint8)
    fmt, packed = rp.pack(gguf_fmt, w, (5, cols))
    assert fmt == gguf_fmt + "R" and packed.shape == w.shape == (5, row_nbytes(fmt, cols))
    back_fmt, back = rp.unpack(fmt, packed, (5, cols))
    assert back_fmt == gguf_fmt and np.array_equal(back, w)


def test_q6_kr_layout_is_as_documented() -> None:
    """Dword m of lane j: quant 5m + i of sub-block j at bits 6i, bits 2m..2m+1 of quant 15
    at bits 30-31; then the scales and d as in GGUF."""
    w = _q6_k(1, 512, 4)
    packed = rp.pack("Q6_K", w, (1, 512))[1][0]
    for b in range(2):
        blk, pk = w[0, 210 * b:210 * (b + 1)], packed[210 * b:210 * (b + 1)]
        q = _q6_k_quants(blk)
        dw = pk[:192].view("<u4").reshape(3, 16)
        for j in range(16):
            for k in range(15):
                assert (int(dw[k // 5, j]) >> (6 * (k % 5))) & 63 == q[16 * j + k], (b, j, k)
            assert sum((int(dw[m, j]) >> 30) << (2 * m) for m in range(3)) == q[16 * j + 15]
        assert pk[192:].tobytes() == blk[192:].tobytes()


@pytest.mark.parametrize("weight", [0, 15, 16 * 7 + 4, 255], ids=lambda i: f"weight{i}")
def test_q6_kr_check_detects_a_wrong_quant_or_scale(weight: int) -> None:
    """The kernels' output on the packed weight matches the reference of the original
    blocks, and not that of blocks with one quant's high bits changed (a field at every
    kind of place: bits 0, quant 15, a middle field, the last weight) or a sub-block
    scale doubled."""
    rows, cols = 6, 512
    rng = np.random.default_rng(weight)
    w = _q6_k(rows, cols, 7, extreme=False)
    w.reshape(rows, 2, 210)[:, :, 192:208] = 40  # every sub-block scale 40: no zero scale hides a change
    p = rp.pack("Q6_K", w, (rows, cols))[1]
    x = rng.standard_normal(cols).astype(np.float32)
    out = np.empty(rows, np.float32)
    h, c, l = weight // 128, (weight % 128) // 32, weight % 32
    for table in IMPLS.values():
        table["Q6_KR"][0](p, x, out, 0, rows)
        assert max_error(out, dequant_ref(w, "Q6_K"), x) < TOL
        bad = w.copy()
        bad[2, 210 + 128 + 32 * h + l] ^= 3 << (2 * c)  # block 1, the quant's 2 high bits flipped
        assert max_error(out, dequant_ref(bad, "Q6_K"), x) > 10 * TOL
        bad = w.copy()
        bad[2, 210 + 192 + weight // 16] = 80
        assert max_error(out, dequant_ref(bad, "Q6_K"), x) > 10 * TOL


# ---- Q4_KR (Q4_K with each half sub-block's quants in one lane) ----


def _q4_k_quants(blk: np.ndarray) -> list[int]:
    """The 256 quants (0..15) of one GGUF Q4_K block, in weight order (ggml's layout: 32-byte
    chunk c holds sub-block 2c in its low nibbles, 2c + 1 in its high ones)."""
    return [int(blk[16 + 32 * (i // 64) + i % 32]) >> (4 * ((i // 32) % 2)) & 15 for i in range(256)]


def test_q4_kr_layout_is_as_documented() -> None:
    """The 16 header bytes as in GGUF; dword m of lane j: quant 8m + i of half sub-block j
    (weight 16j + 8m + i) at bits 4i."""
    w = random_weights("Q4_K", 1, 512, np.random.default_rng(4))
    packed = rp.pack("Q4_K", w, (1, 512))[1][0]
    for b in range(2):
        blk, pk = w[0, 144 * b:144 * (b + 1)], packed[144 * b:144 * (b + 1)]
        q = _q4_k_quants(blk)
        assert pk[:16].tobytes() == blk[:16].tobytes()
        dw = pk[16:].view("<u4").reshape(2, 16)
        for j in range(16):
            for k in range(16):
                assert (int(dw[k // 8, j]) >> (4 * (k % 8))) & 15 == q[16 * j + k], (b, j, k)


@pytest.mark.parametrize("weight", [0, 7, 15, 32 * 5 + 20, 255], ids=lambda i: f"weight{i}")
def test_q4_kr_check_detects_a_wrong_quant_scale_or_min(weight: int) -> None:
    """The kernels' output on the packed weight matches the reference of the original
    blocks, and not that of blocks with one quant's top bit flipped (bits 0, the sign
    bit's field 7, a lane's last field, a middle one, the last weight), its sub-block's
    scale or its min changed."""
    rows, cols = 6, 512
    rng = np.random.default_rng(weight)
    w = random_weights("Q4_K", rows, cols, np.random.default_rng(7), extreme=False)
    w.reshape(rows, 2, 144)[:, :, 4:16] = 0b10_010101  # scales 21 (j < 4) or 37, mins 21 or 41: none hides a change
    p = rp.pack("Q4_K", w, (rows, cols))[1]
    x = rng.choice([-1.0, 1.0], cols).astype(np.float32) * rng.uniform(0.5, 1.5, cols).astype(np.float32)  # no x near 0 hides a change
    out = np.empty(rows, np.float32)
    j, l = weight // 32, weight % 32
    for table in IMPLS.values():
        table["Q4_KR"][0](p, x, out, 0, rows)
        assert max_error(out, dequant_ref(w, "Q4_K"), x) < TOL
        bad = w.copy()
        bad[2, 144 + 16 + 32 * (j // 2) + l] ^= 8 << (4 * (j % 2))  # block 1, the quant's top bit flipped
        assert max_error(out, dequant_ref(bad, "Q4_K"), x) > 10 * TOL
        # scale: sc[j < 4] = s[j] & 63, else s[j + 4] & 15 | ...; min: m[j < 4] = s[j + 4] & 63, else s[j + 4] >> 4 | ...
        for byte, bit in ((4 + j, 0x20) if j < 4 else (8 + j, 0x08), (8 + j, 0x20 if j < 4 else 0x80)):
            bad = w.copy()
            bad[2, 144 + byte] ^= bit
            assert max_error(out, dequant_ref(bad, "Q4_K"), x) > 10 * TOL, (byte, bit)


# ---- Q4_1R (Q4_1 in groups of 4 blocks, lane j = weights 8j..8j + 7) ----


def test_q4_1r_layout_is_as_documented() -> None:
    """Per group of 4 blocks: dword j holds the quants of weights 8j..8j + 7 at bits 4i, then
    the 4 d and the 4 m halves; the last nb % 4 blocks (here 2) stay GGUF Q4_1 blocks."""
    w = random_weights("Q4_1", 1, 32 * 6, np.random.default_rng(5))
    packed = rp.pack("Q4_1", w, (1, 32 * 6))[1][0]
    blk = w[0].reshape(6, 20)
    q = [int(blk[b, 4 + l % 16]) >> (4 * (l // 16)) & 15 for b in range(4) for l in range(32)]
    dw = packed[:64].view("<u4")
    for wi in range(128):
        assert (int(dw[wi // 8]) >> (4 * (wi % 8))) & 15 == q[wi], wi
    assert packed[64:72].tobytes() == blk[:4, 0:2].tobytes() and packed[72:80].tobytes() == blk[:4, 2:4].tobytes()
    assert packed[80:].tobytes() == blk[4:].tobytes()


@pytest.mark.parametrize("weight", [0, 7, 8, 32 * 2 + 20, 127, 130], ids=lambda i: f"weight{i}")
def test_q4_1r_check_detects_a_wrong_quant_scale_or_min(weight: int) -> None:
    """The kernels' output matches the reference of the original blocks, and not that of
    blocks with one quant's top bit flipped (fields 0, 7 (the sign bit's), a lane's first,
    a middle one, the group's last weight, a tail block), its block's d or its m changed."""
    rows, cols = 6, 32 * 6
    rng = np.random.default_rng(weight)
    w = random_weights("Q4_1", rows, cols, np.random.default_rng(7), extreme=False)
    blocks = w.reshape(rows, 6, 20)
    blocks[:, :, 0:2] = np.frombuffer(np.float16(0.05).tobytes(), np.uint8)  # no tiny d or m hides a change
    blocks[:, :, 2:4] = np.frombuffer(np.float16(-0.3).tobytes(), np.uint8)
    x = rng.choice([-1.0, 1.0], cols).astype(np.float32) * rng.uniform(0.5, 1.5, cols).astype(np.float32)
    p = rp.pack("Q4_1", w, (rows, cols))[1]
    out = np.empty(rows, np.float32)
    b, l = weight // 32, weight % 32
    for table in IMPLS.values():
        table["Q4_1R"][0](p, x, out, 0, rows)
        assert max_error(out, dequant_ref(w, "Q4_1"), x) < TOL
        for byte, bit in ((4 + l % 16, 8 << (4 * (l // 16))), (1, 0x04), (3, 0x04)):  # quant; d, m (half: exponent bit)
            bad = w.copy()
            bad[2, 20 * b + byte] ^= bit
            assert max_error(out, dequant_ref(bad, "Q4_1"), x) > 10 * TOL, (byte, bit)


# ---- every layout: kernels against gguf on the unpacked blocks ----

LAYOUTS = {"Q5_0R": "Q5_0", "Q6_KR": "Q6_K", "Q4_KR": "Q4_K",  # store layout -> its GGUF format
           "Q4_1R": "Q4_1", "Q8_0S": "Q8_0", "Q4_0S": "Q4_0", "Q5_1S": "Q5_1", "Q5_KS": "Q5_K"}
S_SHAPES = [(1536, 8960), (8960, 1536), (5, 3328), (7, 32 * 97), (3, 64)]  # GGUF blocks kept, in slabs
CASES = ([("Q5_0R", s) for s in SHAPES + [(5, 3328), (4, 96 * 33 + 64)]]
         + [("Q4_1R", s) for s in SHAPES + [(5, 3328), (4, 128 * 25 + 96), (37, 576)]]
         + [(f, s) for f in ("Q6_KR", "Q4_KR") for s in K_SHAPES]
         + [(f, s) for f in ("Q8_0S", "Q4_0S", "Q5_1S") for s in S_SHAPES]
         + [("Q5_KS", s) for s in S_SHAPES[:3]])
VOCAB_COLS = {f: 256 if f.startswith("Q5_K") or f.endswith("KR") else 896 for f in LAYOUTS}  # 151936 rows (a head)
DEQUANT_COLS = {"Q5_0R": (96, 128, 160, 896, 3328), "Q6_KR": (256, 1536, 3328), "Q4_KR": (256, 1536, 3328),
                "Q4_1R": (32, 96, 128, 160, 576, 896, 3328 + 96),
                **{f: (256, 3328) for f in ("Q8_0S", "Q4_0S", "Q5_1S", "Q5_KS")}}
RANGE_COLS = {f: 3328 for f in LAYOUTS}  # 2 slabs


def _gguf(layout: str, rows: int, cols: int, seed: int) -> np.ndarray:
    return random_weights(LAYOUTS[layout], rows, cols, np.random.default_rng(seed))


@pytest.mark.parametrize("layout,shape", CASES, ids=[f"{f}-{s[0]}x{s[1]}" for f, s in CASES])
def test_kernels_match_gguf(layout: str, shape: tuple[int, int]) -> None:
    rows, cols = shape
    rng = np.random.default_rng(rows + 3 * cols)
    w = _gguf(layout, rows, cols, rows + cols)
    p = rp.pack(LAYOUTS[layout], w, shape)[1]
    x = rng.standard_normal(cols).astype(np.float32)
    X = rng.standard_normal((8, cols)).astype(np.float32)
    check = Checker(dequant_ref(w, LAYOUTS[layout]), np.concatenate([x[None], X]))
    for name, table in IMPLS.items():
        gemv, gemm = table[layout]
        out = np.full(rows, np.nan, np.float32)
        gemv(p, x, out, 0, rows)
        assert check.error(out, 0, 1) < TOL, f"{name} gemv {shape}"
        for n in (1, 3, 8):
            out2 = np.full((n, rows), np.nan, np.float32)
            gemm(p, X[:n], out2, 0, rows)
            assert check.error(out2, 1, 1 + n) < TOL, f"{name} gemm n={n} {shape}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_vocab_rows_gemv_sampled(layout: str) -> None:
    """151936 rows: all computed by the default kernel, a sample checked in float64."""
    rows, cols = 151936, VOCAB_COLS[layout]
    rng = np.random.default_rng(8)
    w = _gguf(layout, rows, cols, 8)
    p = rp.pack(LAYOUTS[layout], w, (rows, cols))[1]
    sel = np.unique(np.concatenate([[0, rows - 1], rng.integers(0, rows, 1500)]))
    x = rng.standard_normal(cols).astype(np.float32)
    out = np.full(rows, np.nan, np.float32)
    rp.REPACKED_KERNELS[layout][0](p, x, out, 0, rows)
    assert not np.isnan(out).any()
    assert max_error(out[sel], dequant_ref(w, LAYOUTS[layout], sel), x) < TOL


@pytest.mark.parametrize("impl", list(DEQUANT))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_dequant_bit_exact(layout: str, impl: str) -> None:
    for cols in DEQUANT_COLS[layout]:
        w = _gguf(layout, 13, cols, cols)
        out = np.empty((13, cols), np.float32)
        DEQUANT[impl][layout](rp.pack(LAYOUTS[layout], w, (13, cols))[1], out, 0, 13)
        assert np.array_equal(out.astype(np.float64), dequant_ref(w, LAYOUTS[layout]), equal_nan=True), cols


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_row_range_only_writes_its_rows(layout: str, impl: str) -> None:
    rng = np.random.default_rng(3)
    cols = RANGE_COLS[layout]
    p = rp.pack(LAYOUTS[layout], _gguf(layout, 40, cols, 3), (40, cols))[1]
    x = rng.standard_normal(cols).astype(np.float32)
    X = rng.standard_normal((2, cols)).astype(np.float32)
    gemv, gemm = IMPLS[impl][layout]
    out = np.full(40, -7.0, np.float32)
    gemv(p, x, out, 10, 17)
    assert np.all(out[:10] == -7.0) and np.all(out[17:] == -7.0) and np.all(out[10:17] != -7.0)
    out2 = np.full((2, 40), -7.0, np.float32)
    gemm(p, X, out2, 0, 5)
    assert np.all(out2[:, 5:] == -7.0) and np.all(out2[:, :5] != -7.0)


# ---- column slabs (formats.SLABBED) ----


def test_slab_rule() -> None:
    """Every store layout is slabbed; a row of up to SLAB_COLS weights is one slab; slabs are
    whole units (Q5_0R: groups of 3 blocks, the tail blocks in the last slab) of near-equal
    width, and cover the row's columns and bytes."""
    assert formats.SLABBED == set(LAYOUTS)
    assert [formats.n_slabs(c // 256, 12) for c in (256, 1536, 3072, 3328, 4864, 8960, 18944)] == [1, 1, 1, 2, 2, 3, 7]
    for fmt in LAYOUTS:
        uw, ub = formats.slab_unit(fmt)
        for cols in range(uw, 40 * 3072, 7 * uw + formats.block_size(fmt)):
            if cols % formats.block_size(fmt):
                continue
            cuts = formats.slab_cuts(fmt, cols)
            assert cuts[0][:3:2] == (0, 0) and cuts[-1][1] == cols and cuts[-1][3] == row_nbytes(fmt, cols)
            assert all(a[1] == b[0] and a[3] == b[2] for a, b in zip(cuts, cuts[1:]))
            widths = [c1 - c0 for c0, c1, _, _ in cuts[:-1]]
            assert all(w % uw == 0 and w <= formats.SLAB_COLS for w in widths)
            assert (len(cuts) == 1) == (cols // uw <= formats.SLAB_COLS // uw)
            assert all(row_nbytes(fmt, c1 - c0) == b1 - b0 for c0, c1, b0, b1 in cuts), (fmt, cols)


SLABS_8960 = {"Q4_KR": ((0, 11), (11, 23), (23, 35)), "Q6_KR": ((0, 11), (11, 23), (23, 35)),
              "Q5_KS": ((0, 11), (11, 23), (23, 35)),
              "Q4_1R": ((0, 92), (92, 184), (184, 280)),
              **{f: ((0, 93), (93, 186), (186, 280)) for f in ("Q5_0R", "Q8_0S", "Q4_0S", "Q5_1S")}}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_slabbed_layout_is_as_documented(layout: str) -> None:
    """A packed 8960-wide tensor is slab 0 of every row, then slab 1, then slab 2 (the blocks of
    SLABS_8960; Q5_0R: 31 groups of 3, 31, then 31 and the tail block; Q4_1R: 23, 23, 24 groups
    of 4), each the row-major
    packing of those blocks; rows taken with take_rows are the packing of those rows."""
    rows, cols = 6, 8960
    bs, bb = formats.block_size(LAYOUTS[layout]), formats.type_size(LAYOUTS[layout])
    w = _gguf(layout, rows, cols, 11)
    packed = rp.pack(LAYOUTS[layout], w, (rows, cols))[1]
    flat, base = packed.reshape(-1), 0
    for b0, b1 in SLABS_8960[layout]:
        part = rp.pack(LAYOUTS[layout], np.ascontiguousarray(w[:, bb * b0:bb * b1]), (rows, bs * (b1 - b0)))[1]
        assert flat[base:base + part.size].tobytes() == part.tobytes(), (b0, b1)
        base += part.size
    assert formats.from_slabs(layout, packed, cols).shape == packed.shape
    for idx in (np.array([4, 0, 4]), slice(2, 5), np.array([5])):
        got = formats.take_rows(layout, packed, cols, idx)
        assert np.array_equal(got, rp.pack(LAYOUTS[layout], w[idx], (w[idx].shape[0], cols))[1]), idx
