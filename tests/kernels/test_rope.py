"""rope: both layouts against a numpy reference of HF's rotate_half formula, the
llama.cpp q/k permutation identity behind "interleaved", scaling, and HF itself."""
from __future__ import annotations

import numpy as np
import pytest

from close import assert_close
from flashlm.errors import UnsupportedError
from flashlm.kernels.ops import rope, rope_inv_freq


def nerr(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - ref) / np.linalg.norm(ref))


def hf_inv_freq(theta: float, d: int) -> np.ndarray:
    """HF: 1 / (theta ** (arange(0, d, 2, int64).float() / d)), float32."""
    expo = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    return (1.0 / (theta ** expo.astype(np.float64)).astype(np.float32)).astype(np.float32)


def rope_ref(x: np.ndarray, pos: np.ndarray, inv: np.ndarray, layout: str) -> np.ndarray:
    """float64 rotation with HF's float32 angles; q*cos + rotate_half(q)*sin for neox."""
    ang = (pos.astype(np.float32)[:, None] * inv[None, :]).astype(np.float64)  # (n, rd/2)
    rd = 2 * inv.shape[0]
    x64 = x.astype(np.float64)
    out = x64.copy()
    if layout == "neox":
        cos = np.concatenate([np.cos(ang), np.cos(ang)], -1)[:, None, :]
        sin = np.concatenate([np.sin(ang), np.sin(ang)], -1)[:, None, :]
        xr = x64[..., :rd]
        rot = np.concatenate([-xr[..., rd // 2:], xr[..., : rd // 2]], -1)  # rotate_half
        out[..., :rd] = xr * cos + rot * sin
    else:
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x0, x1 = x64[..., 0:rd:2], x64[..., 1:rd:2]
        out[..., 0:rd:2] = x0 * c - x1 * s
        out[..., 1:rd:2] = x1 * c + x0 * s
    return out


@pytest.mark.parametrize("layout", ["neox", "interleaved"])
@pytest.mark.parametrize("theta", [10000.0, 100000.0, 1000000.0])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_matches_reference(layout: str, theta: float, head_dim: int) -> None:
    rng = np.random.default_rng(int(theta) + head_dim)
    pos = np.concatenate([np.arange(7), [1000, 4095, 31999]])
    x = rng.standard_normal((pos.shape[0], 3, head_dim)).astype(np.float32)
    ref = rope_ref(x, pos, hf_inv_freq(theta, head_dim), layout)
    out = rope(x, pos, theta, layout)
    assert out is x
    assert nerr(x, ref) < 2e-7
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["neox", "interleaved"])
def test_rope_decode_offset(layout: str) -> None:
    """One token at position 1000 equals row 1000 of a full 0..1000 prefill."""
    rng = np.random.default_rng(5)
    xs = rng.standard_normal((1001, 2, 64)).astype(np.float32)
    full = xs.copy()
    rope(full, np.arange(1001), 10000.0, layout)
    one = xs[1000:].copy()
    rope(one, np.array([1000]), 10000.0, layout)
    np.testing.assert_array_equal(one, full[1000:])
    assert nerr(one, rope_ref(xs[1000:], np.array([1000]), hf_inv_freq(10000.0, 64), layout)) < 2e-7
    assert not np.allclose(one, xs[1000:])


def test_rope_position_zero_is_identity_and_norm_is_kept() -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 4, 64)).astype(np.float32)
    y = x.copy()
    rope(y, np.zeros(3, np.int32), 10000.0, "neox")
    np.testing.assert_array_equal(y, x)
    rope(y, np.array([5, 77, 123456]), 10000.0, "interleaved")
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


@pytest.mark.parametrize("head_dim,n_heads", [(64, 9), (128, 4)])
def test_interleaved_equals_neox_on_llama_cpp_permuted_weights(head_dim: int, n_heads: int) -> None:
    """llama.cpp's converter permutes HF q/k rows per head so that interleaved rope on
    the GGUF rows is neox rope on the HF rows, in permuted order (scores unchanged)."""
    rng = np.random.default_rng(head_dim)
    cols, n = 96, 11
    w_hf = rng.standard_normal((n_heads * head_dim, cols)).astype(np.float32)
    w_gguf = w_hf.reshape(n_heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w_hf.shape)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    pos = np.arange(40, 40 + n)
    q_hf = np.ascontiguousarray((x @ w_hf.T).reshape(n, n_heads, head_dim))
    q_gg = np.ascontiguousarray((x @ w_gguf.T).reshape(n, n_heads, head_dim))
    rope(q_hf, pos, 500000.0, "neox")
    rope(q_gg, pos, 500000.0, "interleaved")
    perm = q_hf.reshape(n, n_heads, 2, head_dim // 2).swapaxes(2, 3).reshape(q_hf.shape)
    np.testing.assert_allclose(q_gg, perm, rtol=1e-5, atol=1e-5)
    # the same holds for k, so per-head q.k scores agree between the two layouts
    s_hf = np.einsum("ihd,jhd->hij", q_hf, q_hf)
    s_gg = np.einsum("ihd,jhd->hij", q_gg, q_gg)
    assert_close(s_gg, s_hf, rel=1e-6)  # scores up to ~1.6e4; measured 1.2e-7 of that


@pytest.mark.parametrize("layout", ["neox", "interleaved"])
def test_partial_rotary_dim(layout: str) -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 2, 128)).astype(np.float32)
    pos = np.array([0, 3, 100, 2000])
    ref = rope_ref(x, pos, hf_inv_freq(10000.0, 64), layout)
    rope(x, pos, 10000.0, layout, rotary_dim=64)
    assert nerr(x, ref) < 2e-7
    np.testing.assert_array_equal(x[..., 64:], ref[..., 64:].astype(np.float32))


def test_linear_scaling_divides_inv_freq() -> None:
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 2, 64)).astype(np.float32)
    pos = np.array([1, 500, 7000])
    inv = (hf_inv_freq(10000.0, 64) / np.float32(4.0)).astype(np.float32)
    ref = rope_ref(x, pos, inv, "neox")
    rope(x, pos, 10000.0, "neox", scaling={"type": "linear", "factor": 4.0})
    assert nerr(x, ref) < 2e-7


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_llama3_scaling_matches_hf() -> None:
    pytest.importorskip("torch")
    tr = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = tr.LlamaConfig(hidden_size=512, num_attention_heads=4, max_position_embeddings=131072,
                         rope_parameters=dict(LLAMA3, rope_theta=500000.0))
    hf, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    inv = rope_inv_freq(500000.0, 128, LLAMA3)
    np.testing.assert_array_equal(inv, hf.numpy())
    plain = rope_inv_freq(500000.0, 128)
    assert (inv < plain).any() and (inv[:8] == plain[:8]).all()  # high freqs unchanged
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 3, 128)).astype(np.float32)
    pos = np.array([3, 9000])
    ref = rope_ref(x, pos, hf.numpy(), "neox")
    rope(x, pos, 500000.0, "neox", scaling=LLAMA3)
    assert nerr(x, ref) < 2e-7


def test_matches_hf_apply_rotary_pos_emb() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    d, theta = 64, 100000.0
    pos = np.array([0, 1, 2, 1000, 1001])
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    freqs = inv[None, :] * torch.from_numpy(pos).float()[:, None]
    emb = torch.cat((freqs, freqs), dim=-1)
    rng = np.random.default_rng(10)
    q = rng.standard_normal((len(pos), 3, d)).astype(np.float32)
    qt = torch.from_numpy(q.copy()).transpose(0, 1)[None]  # (1, H, n, d)
    hf, _ = apply_rotary_pos_emb(qt, qt, emb.cos()[None], emb.sin()[None])
    hf = hf[0].transpose(0, 1).numpy()
    rope(q, pos, theta, "neox")
    np.testing.assert_allclose(q, hf, rtol=1e-5, atol=2e-6)


def test_table_growth_and_huge_positions_agree() -> None:
    rng = np.random.default_rng(11)
    x = rng.standard_normal((1, 1, 64)).astype(np.float32)
    for p in (10, 70000, 10, 1 << 19):  # small table, grown table, beyond the table
        y = x.copy()
        rope(y, np.array([p]), 12345.0, "neox")
        ref = rope_ref(x, np.array([p]), hf_inv_freq(12345.0, 64), "neox")
        assert nerr(y, ref) < 2e-7


def test_rope_rejects_bad_input() -> None:
    x = np.ones((2, 1, 8), np.float32)
    with pytest.raises(ValueError):
        rope(x, np.arange(3), 10000.0)
    with pytest.raises(ValueError):
        rope(x, np.arange(2), 10000.0, "gptj")
    with pytest.raises(ValueError):
        rope(x, np.arange(2), 10000.0, rotary_dim=5)
    with pytest.raises(ValueError):
        rope(x, np.array([0, -1]), 10000.0)
    with pytest.raises(TypeError):
        rope(x.astype(np.float64), np.arange(2), 10000.0)
    with pytest.raises(UnsupportedError):
        rope(x, np.arange(2), 10000.0, scaling={"rope_type": "yarn", "factor": 4.0})
