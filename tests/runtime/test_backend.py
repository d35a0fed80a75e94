"""NumpyBackend's reference ops against naive loops; KernelBackend against NumpyBackend."""
from __future__ import annotations

import math

import numpy as np
import pytest

from flashlm.kernels.formats import QTensor
from flashlm.runtime.backend import KernelBackend, NumpyBackend, kernels_available, rope_inv_freq, to_f32

rng = np.random.default_rng(0)


def naive_attention(q, k, v, n_past):
    n, hq, d = q.shape
    g = hq // k.shape[0]
    out = np.zeros_like(q)
    for i in range(n):
        for h in range(hq):
            t = n_past + i + 1
            s = np.array([q[i, h] @ k[h // g, j] for j in range(t)]) / math.sqrt(d)
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ v[h // g, :t]
    return out


@pytest.mark.parametrize("n,n_past,hq,hkv", [(1, 0, 4, 2), (1, 9, 6, 2), (5, 0, 4, 4), (300, 3, 2, 1)])
def test_attention_matches_naive(n, n_past, hq, hkv):
    d, t = 8, n_past + n + 2
    q = rng.standard_normal((n, hq, d)).astype(np.float32)
    k = rng.standard_normal((hkv, t, d)).astype(np.float32)
    v = rng.standard_normal((hkv, t, d)).astype(np.float32)
    k[:, n_past + n :] = 1e6  # positions past the last query must be ignored
    ref = naive_attention(q, k, v, n_past)
    np.testing.assert_allclose(NumpyBackend().attention(q, k, v, n_past), ref, atol=1e-5)


@pytest.mark.parametrize("layout", ["neox", "interleaved"])
def test_rope_is_a_complex_rotation(layout):
    n, h, d = 5, 3, 16
    x = rng.standard_normal((n, h, d)).astype(np.float32)
    pos = np.array([0, 1, 7, 100, 4096])
    y = NumpyBackend().rope(x.copy(), pos, 10000.0, layout)
    if layout == "neox":
        zx, zy = x[..., : d // 2] + 1j * x[..., d // 2 :], y[..., : d // 2] + 1j * y[..., d // 2 :]
    else:
        zx, zy = x[..., 0::2] + 1j * x[..., 1::2], y[..., 0::2] + 1j * y[..., 1::2]
    ang = pos[:, None, None] * rope_inv_freq(d, 10000.0)[None, None, :]
    np.testing.assert_allclose(zy, zx * np.exp(1j * ang), atol=1e-4)


def test_rope_scaling():
    inv = rope_inv_freq(16, 10000.0)
    np.testing.assert_allclose(rope_inv_freq(16, 10000.0, {"rope_type": "linear", "factor": 4.0}), inv / 4)
    l3 = rope_inv_freq(16, 10000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    wl = 2 * np.pi / inv
    assert np.allclose(l3[wl < 4], inv[wl < 4]) and np.allclose(l3[wl > 16], inv[wl > 16] / 8)


@pytest.mark.parametrize("fmt", ["F32", "F16", "BF16", "Q8_0", "Q5_0"])
def test_to_f32_and_weight_cache(fmt):
    import gguf

    a = rng.standard_normal((4, 256)).astype(np.float32)
    if fmt == "F32":
        w = QTensor(a, fmt, a.shape)
    elif fmt == "F16":
        w = QTensor(a.astype(np.float16), fmt, a.shape)
    elif fmt == "BF16":
        w = QTensor((a.view(np.uint32) >> 16).astype(np.uint16), fmt, a.shape)
    else:
        w = QTensor(gguf.quants.quantize(a, gguf.GGMLQuantizationType[fmt]), fmt, a.shape)
    f = to_f32(w)
    assert f.shape == a.shape and f.dtype == np.float32
    assert np.linalg.norm(f - a) / np.linalg.norm(a) < {"Q5_0": 0.05}.get(fmt, 0.01)
    be = NumpyBackend()
    first, again = be.f32(w), be.f32(QTensor(w.data, w.fmt, w.shape))
    assert np.shares_memory(first, again)  # dequantized once per buffer
    x = rng.standard_normal((3, 256)).astype(np.float32)
    np.testing.assert_allclose(be.linear(x, w), x @ f.T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(be.embed(w, np.array([3, 0, 3])), f[[3, 0, 3]])


@pytest.mark.parametrize("gguf_fmt,d_at", [("Q4_K", 0), ("Q6_K", 208)])
def test_embed_rows_of_a_slabbed_layout(gguf_fmt, d_at):
    """An embedding kept as Q4_KR / Q6_KR with rows long enough for 2 column slabs: both
    backends' rows are gguf's rows of the original blocks."""
    import gguf

    from flashlm.kernels.repacked import pack

    rows, cols = 9, 3328  # 13 super-blocks: 2 slabs
    bb = {"Q4_K": 144, "Q6_K": 210}[gguf_fmt]
    blocks = rng.integers(0, 256, size=(rows, cols // 256, bb), dtype=np.uint8)
    blocks[:, :, d_at:d_at + 4 if gguf_fmt == "Q4_K" else d_at + 2] = np.frombuffer(
        np.float16([0.01, 0.002][: 2 if gguf_fmt == "Q4_K" else 1]).tobytes(), np.uint8)
    g = blocks.reshape(rows, -1)
    fmt, data = pack(gguf_fmt, g, (rows, cols))
    w = QTensor(data, fmt, (rows, cols))
    ref = gguf.quants.dequantize(g, gguf.GGMLQuantizationType[gguf_fmt])
    ids = np.array([8, 0, 3, 8])
    backends = [NumpyBackend()] + ([KernelBackend()] if kernels_available() else [])
    for be in backends:
        np.testing.assert_array_equal(be.embed(w, ids), ref[ids])


@pytest.mark.skipif(not kernels_available(), reason="flashlm.kernels.matmul/ops do not import yet")
def test_kernel_backend_ops_agree():
    kb, nb = KernelBackend(), NumpyBackend()
    x = rng.standard_normal((5, 64)).astype(np.float32)
    w = QTensor(rng.standard_normal(64).astype(np.float32), "F32", (64,))
    np.testing.assert_allclose(kb.rmsnorm(x, w, 1e-6), nb.rmsnorm(x, w, 1e-6), rtol=1e-5, atol=1e-6)
    g, u = x * 4, x[::-1].copy()
    np.testing.assert_allclose(kb.silu_mul(g, u), nb.silu_mul(g, u), rtol=1e-5, atol=1e-6)
    for layout in ("neox", "interleaved"):
        q = rng.standard_normal((5, 4, 16)).astype(np.float32)
        pos = np.arange(3, 8)
        np.testing.assert_allclose(kb.rope(q.copy(), pos, 1e4, layout), nb.rope(q.copy(), pos, 1e4, layout), atol=1e-5)
    q = rng.standard_normal((3, 4, 16)).astype(np.float32)
    kv = [np.zeros((2, 8, 16), np.float32) for _ in range(4)]
    k, v = rng.standard_normal((2, 3, 2, 16)).astype(np.float32)
    kb.kv_write(kv[0], kv[1], k, v, 2)
    nb.kv_write(kv[2], kv[3], k, v, 2)
    assert np.array_equal(kv[0], kv[2]) and np.array_equal(kv[1], kv[3])
    kv[0][:, :2] = kv[2][:, :2] = 1.0
    np.testing.assert_allclose(kb.attention(q, kv[0], kv[1], 2), nb.attention(q, kv[2], kv[3], 2), atol=1e-5)


@pytest.mark.skipif(not kernels_available(), reason="flashlm.kernels.matmul/ops do not import yet")
def test_backends_agree_on_f16_caches():
    """An f16 KV cache (uint16 half bits, runtime.kvcache) in either backend: the same bits written
    (numpy's rounding), attention on the same half values, one token per sequence or batched."""
    from close import assert_close

    from flashlm.runtime.kvcache import KVCache

    r = np.random.default_rng(4)
    kb, nb = KernelBackend(), NumpyBackend()
    caches = {be: [KVCache(1, 2, 16, 12, dtype="f16") for _ in range(2)] for be in (kb, nb)}
    k, v = (3 * r.standard_normal((2, 9, 2, 16))).astype(np.float32)
    q = r.standard_normal((9, 4, 16)).astype(np.float32)
    out = {}
    for be, cs in caches.items():
        be.kv_write(cs[0].k[0], cs[0].v[0], k, v, 0)
        be.kv_write(cs[1].k[0], cs[1].v[0], k[:5], v[:5], 0)
        out[be] = be.attention(q, cs[0].k[0], cs[0].v[0], 0)
        ks, vs = [c.k[0] for c in cs], [c.v[0] for c in cs]
        be.kv_write_batch(ks, vs, k[7:], v[7:], [9, 5])
        out[be, "batch"] = be.attention_batch(q[:2], ks, vs, [9, 5])
    for i in range(2):
        np.testing.assert_array_equal(caches[kb][i].k[0], caches[nb][i].k[0])
        np.testing.assert_array_equal(caches[kb][i].v[0], caches[nb][i].v[0])
    np.testing.assert_array_equal(caches[nb][0].k[0][:, :9], k.transpose(1, 0, 2).astype(np.float16).view(np.uint16))
    assert_close(out[kb], out[nb], rel=1e-5)
    assert_close(out[kb, "batch"], out[nb, "batch"], rel=1e-5)
