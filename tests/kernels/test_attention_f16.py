"""f16 KV caches (uint16 arrays of IEEE half bits): kv_write / kv_write_batch round as numpy's
``astype(np.float16)`` bit for bit; attention over them matches a float64 reference computed on
the f16-rounded keys and values; attention_batch rows equal each sequence alone bit for bit; the
conversions without F16C (integer operations) give the same bits."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

from close import assert_close
from flashlm.kernels import ops
from flashlm.kernels.ops import attention, attention_batch, kv_write, kv_write_batch
from test_attention import TinyPool, attention_ref, nerr


def to_f16(x: np.ndarray) -> np.ndarray:
    """numpy's rounding to half, as the bits an f16 cache holds."""
    with np.errstate(over="ignore"):
        return x.astype(np.float16).view(np.uint16)


def from_f16(h: np.ndarray) -> np.ndarray:
    return h.view(np.float16).astype(np.float64)


def hard_values(rng: np.random.Generator, n: int) -> np.ndarray:
    """float32 values over every range a half rounds differently in: normals of all scales,
    subnormals and values below them, ties, the overflow edge, +-0, +-inf, random bit patterns."""
    scaled = rng.standard_normal(n).astype(np.float32) * np.float32(2.0) ** rng.integers(-30, 20, n).astype(np.float32)
    ties = (rng.integers(0, 1 << 10, n // 8).astype(np.float32) + np.float32(0.5)) * np.float32(2.0 ** -24)
    edges = np.array([0.0, -0.0, 65504, 65519.99, 65520, -65520, 65536, 1e6, np.inf, -np.inf, 2 ** -24, 2 ** -25,
                      2 ** -25 * 1.0001, 3 * 2 ** -26, 2 ** -14, 2 ** -14 * (1 - 2 ** -11), -2 ** -26], np.float32)
    bits = rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return np.concatenate([scaled, ties, -ties, edges, bits[np.isfinite(bits)]])


def make_f16(hq: int, hkv: int, d: int, n: int, n_past: int, seed: int = 0, t_max: int | None = None):
    """q float32, and f16 caches written through kv_write (positions past the sequence hold
    nan bits, which must never be read)."""
    rng = np.random.default_rng(seed)
    t_max = t_max or n_past + n + 5
    q = rng.standard_normal((n, hq, d)).astype(np.float32)
    k = np.full((hkv, t_max, d), 0x7E00, np.uint16)
    v = np.full((hkv, t_max, d), 0x7E00, np.uint16)
    kv_write(k, v, (3 * rng.standard_normal((n_past + n, hkv, d))).astype(np.float32),
             rng.standard_normal((n_past + n, hkv, d)).astype(np.float32), 0)
    return q, k, v


@pytest.fixture(scope="module")
def pools() -> list:
    from flashlm.runtime.threadpool import ThreadPool

    with ThreadPool(2) as flash:
        yield [TinyPool(2), TinyPool(3), flash]


# ---- writes ----


def test_kv_write_f16_equals_numpy_astype_bits() -> None:
    rng = np.random.default_rng(0)
    x = hard_values(rng, 20000)
    n = len(x) // 48
    k = x[:n * 48].reshape(n, 2, 24)
    v = np.ascontiguousarray(k[::-1])
    kc, vc = np.zeros((2, n + 3, 24), np.uint16), np.zeros((2, n + 3, 24), np.uint16)
    kv_write(kc, vc, k, v, 2)
    np.testing.assert_array_equal(kc[:, 2:2 + n], to_f16(k).transpose(1, 0, 2))
    np.testing.assert_array_equal(vc[:, 2:2 + n], to_f16(v).transpose(1, 0, 2))
    assert not kc[:, :2].any() and not kc[:, 2 + n:].any()  # nothing else written


def test_kv_write_f16_nan_stays_nan() -> None:
    x = np.array([np.nan, -np.nan, np.float32(np.nan) * 0], np.float32).reshape(1, 1, 3)
    x = np.concatenate([x, np.array([1, 2, 3], np.float32).reshape(1, 1, 3)])
    kc, vc = np.zeros((1, 2, 3), np.uint16), np.zeros((1, 2, 3), np.uint16)
    kv_write(kc, vc, x, x, 0)
    assert np.isnan(kc[0, 0].view(np.float16)).all() and np.isnan(vc[0, 0].view(np.float16)).all()


def test_kv_write_batch_f16_equals_kv_write_and_numpy() -> None:
    rng = np.random.default_rng(9)
    hkv, d = 2, 40
    x = hard_values(rng, 3000)[:3 * hkv * d * 2].reshape(2, 3, hkv, d)
    k, v = x[0].copy(), x[1].copy()
    caches = [(np.zeros((hkv, t, d), np.uint16), np.zeros((hkv, t, d), np.uint16)) for t in (5, 40, 17)]
    pos = [4, 0, 9]
    kv_write_batch([c[0] for c in caches], [c[1] for c in caches], k, v, pos)
    for b, (kc, vc) in enumerate(caches):
        ke, ve = np.zeros_like(kc), np.zeros_like(vc)
        kv_write(ke, ve, k[b:b + 1], v[b:b + 1], pos[b])
        np.testing.assert_array_equal(kc, ke)
        np.testing.assert_array_equal(vc, ve)
        np.testing.assert_array_equal(kc[:, pos[b]], to_f16(k[b]))
        np.testing.assert_array_equal(vc[:, pos[b]], to_f16(v[b]))


@numba.njit(cache=True)
def _sw_bits(x, out):
    for i in range(x.size):
        out[i] = ops._f16_bits_sw(x[i])


@numba.njit(cache=True)
def _to_f32(h, out):
    for i in range(h.size):
        out[i] = ops._f32(h[i])


def test_software_rounding_equals_numpy() -> None:
    """The rounding used without F16C (integer operations), on this machine too."""
    x = hard_values(np.random.default_rng(1), 200000)
    out = np.empty(x.size, np.uint16)
    _sw_bits(x, out)
    np.testing.assert_array_equal(out, to_f16(x))
    nan = np.array([np.nan, -np.nan, np.uint32(0x7F800001).view(np.float32), np.uint32(0xFFC00000).view(np.float32)],
                   np.float32)
    _sw_bits(nan, out[:4])
    assert np.isnan(out[:4].view(np.float16)).all()


def test_every_half_reads_back_exactly() -> None:
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got = np.empty(h.size, np.float32)
    _to_f32(h, got)
    ref = h.view(np.float16).astype(np.float32)
    ok = ~np.isnan(ref)
    np.testing.assert_array_equal(got[ok].view(np.uint32), ref[ok].view(np.uint32))
    assert np.isnan(got[~ok]).all()


def test_conversions_without_f16c_give_the_same_bits(tmp_path) -> None:
    """A generic CPU target (no F16C: the integer conversions) writes the same bits and reads
    them back to the same attention, within float rounding (no FMA there)."""
    script = textwrap.dedent("""
        import numpy as np
        from flashlm.kernels import ops
        assert not ops.HAVE_SIMD
        rng = np.random.default_rng(5)
        k = (3 * rng.standard_normal((40, 2, 36))).astype(np.float32)
        v = rng.standard_normal((40, 2, 36)).astype(np.float32)
        kc, vc = np.zeros((2, 41, 36), np.uint16), np.zeros((2, 41, 36), np.uint16)
        ops.kv_write(kc, vc, k[:30], v[:30], 0)
        ops.kv_write_batch([kc], [vc], k[30:31], v[30:31], [30])
        q = rng.standard_normal((9, 8, 36)).astype(np.float32)
        out = ops.attention(q, kc, vc, 22)
        np.savez(OUT, kc=kc, vc=vc, out=out, k=k, v=v, q=q)
    """).replace("OUT", repr(str(tmp_path / "out.npz")))
    env = {**os.environ, "NUMBA_CPU_NAME": "generic", "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(ops.__file__)))))
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    np.testing.assert_array_equal(got["kc"][:, :31], to_f16(got["k"][:31]).transpose(1, 0, 2))
    np.testing.assert_array_equal(got["vc"][:, :31], to_f16(got["v"][:31]).transpose(1, 0, 2))
    q, kc, vc = got["q"], got["kc"], got["vc"]
    assert nerr(got["out"], attention_ref(q, from_f16(kc), from_f16(vc), 22)) < 2e-6
    assert_close(got["out"], attention(q, kc, vc, 22), rel=1e-5)


# ---- attention ----


@pytest.mark.parametrize("hq,hkv,d", [(14, 2, 64), (12, 2, 128), (9, 3, 64), (4, 2, 36)])
@pytest.mark.parametrize("n,n_past", [(1, 0), (1, 37), (7, 0), (17, 300), (300, 0)])
def test_attention_f16_matches_reference_on_the_rounded_values(hq, hkv, d, n, n_past, pools) -> None:
    """The f16 cache's keys and values, read back exactly, in float32 arithmetic: as close to
    the float64 reference on those same half values as the float32 kernel is to its own."""
    q, k, v = make_f16(hq, hkv, d, n, n_past, seed=n + d + hq)
    ref = attention_ref(q, from_f16(k), from_f16(v), n_past)
    got = attention(q, k, v, n_past)
    assert nerr(got, ref) < 2e-6
    assert_close(got, ref, rel=2e-5)
    for p in pools:  # split over query heads, or as a nogil table task: the same bits
        np.testing.assert_array_equal(attention(q, k, v, n_past, pool=p), got, err_msg=f"pool {p}")


def test_attention_f16_is_close_to_f32_caches() -> None:
    """The same keys and values kept as float32: only the rounding of half (2**-11 relative) apart."""
    rng = np.random.default_rng(2)
    hq, hkv, d, n = 8, 2, 64, 50
    q = rng.standard_normal((n, hq, d)).astype(np.float32)
    k = rng.standard_normal((n, hkv, d)).astype(np.float32)
    v = rng.standard_normal((n, hkv, d)).astype(np.float32)
    k32, v32 = np.zeros((hkv, n, d), np.float32), np.zeros((hkv, n, d), np.float32)
    k16, v16 = np.zeros((hkv, n, d), np.uint16), np.zeros((hkv, n, d), np.uint16)
    kv_write(k32, v32, k, v, 0)
    kv_write(k16, v16, k, v, 0)
    assert_close(attention(q, k16, v16, 0), attention(q, k32, v32, 0), rel=2e-3)


@pytest.mark.parametrize("hq,hkv,d", [(14, 2, 64), (9, 3, 64), (4, 2, 36)])
@pytest.mark.parametrize("n,n_past", [(9, 5), (17, 300)])
def test_rows_of_a_multi_token_call_equal_one_token_calls_f16(hq, hkv, d, n, n_past, pools) -> None:
    q, k, v = make_f16(hq, hkv, d, n, n_past, seed=n * d)
    full = attention(q, k, v, n_past)
    for p in (None, pools[1], pools[2]):
        for i in range(n):
            one = attention(np.ascontiguousarray(q[i:i + 1]), k, v, n_past + i, pool=p)
            np.testing.assert_array_equal(one, full[i:i + 1], err_msg=f"token {i} pool {p}")


@pytest.mark.parametrize("hq,hkv,d", [(14, 2, 64), (12, 2, 128), (9, 3, 64), (4, 2, 16)])
@pytest.mark.parametrize("nb", [1, 2, 8])
def test_attention_batch_f16_equals_each_sequence_alone(hq, hkv, d, nb, pools) -> None:
    rng = np.random.default_rng(nb * d + hq + 1)
    n_past = [int(p) for p in rng.integers(0, 700, nb)]
    q = rng.standard_normal((nb, hq, d)).astype(np.float32)
    ks, vs = [], []
    for p in n_past:
        _, k, v = make_f16(hq, hkv, d, 1, p, seed=p, t_max=p + 1 + int(rng.integers(0, 9)))
        ks.append(k)
        vs.append(v)
    alone = np.concatenate([attention(np.ascontiguousarray(q[b:b + 1]), ks[b], vs[b], n_past[b]) for b in range(nb)])
    for b in range(nb):
        assert nerr(alone[b:b + 1], attention_ref(q[b:b + 1], from_f16(ks[b]), from_f16(vs[b]), n_past[b])) < 2e-6
    for p in [None] + pools:
        np.testing.assert_array_equal(attention_batch(q, ks, vs, n_past, pool=p), alone, err_msg=f"pool {p}")


def test_f16_caches_reject_mixed_or_float16_arrays() -> None:
    q, k, v = make_f16(4, 2, 16, 2, 3)
    with pytest.raises(TypeError, match="k_cache is uint16 but v_cache is float32"):
        attention(q, k, v.view(np.float16).astype(np.float32), 3)
    with pytest.raises(TypeError, match="float32 or uint16"):
        attention(q, k.view(np.float16), v.view(np.float16), 3)  # np.float16: pass the bits as uint16
    with pytest.raises(TypeError, match="one dtype for all"):
        attention_batch(q, [k, k.view(np.float16).astype(np.float32)], [v, v.view(np.float16).astype(np.float32)],
                        [3, 3])
    with pytest.raises(TypeError, match="float32"):
        kv_write(k, v, np.ones((1, 2, 16), np.float64), np.ones((1, 2, 16), np.float64), 0)
    with pytest.raises(TypeError, match="one dtype for all"):
        kv_write_batch([k, np.zeros(k.shape, np.float32)], [v, np.zeros(v.shape, np.float32)],
                       np.ones((2, 2, 16), np.float32), np.ones((2, 2, 16), np.float32), [0, 0])
