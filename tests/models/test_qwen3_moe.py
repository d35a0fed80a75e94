"""Qwen3-MoE: tiny random transformers models, imported from safetensors and from GGUF files
(F32, F16, Q8_0, and Q4_K/Q6_K experts), against transformers fp32; batches; the experts()
interface of every weights source; bad files.

The quantized GGUF variants are compared with a transformers model whose weights were set
to the values the file holds (gguf-py's dequantizers), so all sources meet the same bound.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from close import assert_close, max_rel_err
from synth import encode, tiny_tokenizer_json, tiny_vocab, write_qwen3moe_gguf

from flashlm.errors import GGUFError, ImportError_
from flashlm.models import build_model
from flashlm.models.gguf_import import import_gguf
from flashlm.models.hf_import import import_hf
from flashlm.models.weights import DictWeights, gguf_weights
from flashlm.offload.store import ALIGN, Store
from flashlm.runtime.backend import KernelBackend, NumpyBackend, kernels_available, kernels_error

# transformers parity at float32 tolerances: the exact path (the integer path: test_intpath_fidelity.py).
pytestmark = pytest.mark.usefixtures("exact_path")

torch = pytest.importorskip("torch", reason="torch is needed for the transformers parity tests")
transformers = pytest.importorskip("transformers", reason="transformers is needed for the parity tests")

# Of the largest |logit|: two float32 paths differ by rounding only (the routing is the same
# discrete choice); measured <= 8.2e-7 against transformers (F32 .. Q4_K/Q6_K experts, both backends,
# every position) and <= 8.3e-7 batch against alone; the dense models' tests use the same bound.
REL = 2e-6
VOCAB = len(tiny_vocab()[0])
CASES = {
    # norm_topk_prob, a dense layer in mlp_only_layers, untied head
    "norm-dense1": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
                        tie_word_embeddings=False, head_dim=16),
    # raw softmax weights, every 2nd layer sparse, top-3, tied head, head_dim != hidden / heads
    "nonorm-step2": dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=64, num_hidden_layers=2,
                         num_experts=6, num_experts_per_tok=3, norm_topk_prob=False, decoder_sparse_step=2,
                         tie_word_embeddings=True, head_dim=32),
    # K-quant sized (rows of 256): Q4_K gate/up, Q6_K down as in the benchmark model
    "kquant": dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=256, num_hidden_layers=2,
                   num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False, head_dim=64),
}
SOURCES = {"norm-dense1": ["hf", "gguf-F32", "gguf-F16", "gguf-Q8_0", "inplace-Q8_0"],
           "nonorm-step2": ["hf", "gguf-F32", "inplace-F32"],
           "kquant": ["gguf-kquant", "inplace-kquant"]}
BACKENDS = ["numpy", "kernels"]


def make_hf(case: str):
    cfg = transformers.Qwen3MoeConfig(**CASES[case], num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=256, rms_norm_eps=1e-6, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.Qwen3MoeForCausalLM(cfg).float().eval()
    with torch.no_grad():  # weights larger than the default init, so logits are O(1) and routing is spread
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_(0, 1.0)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
            else:
                p.normal_(0, 0.1)
    return hf


def gguf_tensors(hf) -> dict[str, np.ndarray]:
    """The transformers model's weights under GGUF names, experts as (E, rows, cols)."""
    sd = {k: v.detach().numpy().copy() for k, v in hf.named_parameters()}
    c = hf.config
    out = {"token_embd.weight": sd["model.embed_tokens.weight"]}
    names = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
             "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
             "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_norm.weight": "attn_q_norm.weight",
             "self_attn.k_norm.weight": "attn_k_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight", "mlp.gate.weight": "ffn_gate_inp.weight"}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        for hn, gn in names.items():
            if p + hn in sd:
                out[f"blk.{i}.{gn}"] = sd[p + hn]
        if p + "mlp.experts.gate_up_proj" in sd:
            gu, f = sd[p + "mlp.experts.gate_up_proj"], c.moe_intermediate_size
            out[f"blk.{i}.ffn_gate_exps.weight"] = np.ascontiguousarray(gu[:, :f])
            out[f"blk.{i}.ffn_up_exps.weight"] = np.ascontiguousarray(gu[:, f:])
            out[f"blk.{i}.ffn_down_exps.weight"] = sd[p + "mlp.experts.down_proj"]
    out["output_norm.weight"] = sd["model.norm.weight"]
    if not c.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    return out


def set_hf_weights(hf, t: dict[str, np.ndarray]) -> None:
    """Write GGUF-named values back into the transformers model (the reference for a quantized file)."""
    inv = {"attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
                             "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
                             "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
                             "ffn_down.weight": "mlp.down_proj.weight"}
    sd = dict(hf.named_parameters())  # (state_dict() holds copies in transformers 5)
    with torch.no_grad():
        sd["model.embed_tokens.weight"].copy_(torch.from_numpy(t["token_embd.weight"]))
        if "output.weight" in t:
            sd["lm_head.weight"].copy_(torch.from_numpy(t["output.weight"]))
        for name, a in t.items():
            if not name.startswith("blk."):
                continue
            _, i, short = name.split(".", 2)
            p = f"model.layers.{i}."
            if short in inv:
                sd[p + inv[short]].copy_(torch.from_numpy(a))
            elif short == "ffn_gate_exps.weight":
                sd[p + "mlp.experts.gate_up_proj"][:, : a.shape[1]].copy_(torch.from_numpy(a))
            elif short == "ffn_up_exps.weight":
                sd[p + "mlp.experts.gate_up_proj"][:, a.shape[1]:].copy_(torch.from_numpy(a))
            elif short == "ffn_down_exps.weight":
                sd[p + "mlp.experts.down_proj"].copy_(torch.from_numpy(a))


def write_gguf(hf, path, fmt: str, **kw):
    """A qwen3moe GGUF of ``hf``'s weights with 2-D/3-D matrices in ``fmt`` (routers and norms F32;
    "kquant": Q4_K gate/up, Q6_K down, Q8_0 the rest); ``hf`` is set to the values written."""
    c = hf.config
    t = gguf_tensors(hf)
    rng = np.random.default_rng(7)
    data, fmts = {}, {}
    for name, a in t.items():
        f = fmt
        if fmt == "kquant":
            f = "Q4_K" if name.endswith(("gate_exps.weight", "up_exps.weight")) else "Q6_K" if "down_exps" in name else "Q8_0"
        if a.ndim == 1 or name.endswith("ffn_gate_inp.weight"):
            f = "F32"
        data[name], val = encode(a, f, rng)
        t[name], fmts[name] = val, f
    set_hf_weights(hf, t)
    dense = [i for i in range(c.num_hidden_layers) if f"blk.{i}.ffn_gate.weight" in t]
    return write_qwen3moe_gguf(path, data, fmts=fmts, hidden=c.hidden_size, n_layers=c.num_hidden_layers,
                               n_heads=c.num_attention_heads, n_kv=c.num_key_value_heads, head_dim=c.head_dim,
                               n_experts=c.num_experts, k=c.num_experts_per_tok, expert_ffn=c.moe_intermediate_size,
                               ffn=c.intermediate_size if dense else None, norm_topk=c.norm_topk_prob, **kw)


def load(hf, source: str, tmp):
    """(config, weights) of ``hf`` through ``source``: hf (safetensors -> store), gguf-FMT (GGUF -> store),
    inplace-FMT (the GGUF read in place: 3-D expert slices)."""
    kind, _, fmt = source.partition("-")
    if kind == "hf":
        hf.save_pretrained(tmp / "hf")
        (tmp / "hf" / "tokenizer.json").write_text(tiny_tokenizer_json())
        store = Store(import_hf(tmp / "hf", tmp / "store"))
        return store.config, store
    path = write_gguf(hf, tmp / "m.gguf", fmt)
    if kind == "inplace":
        return gguf_weights(path)
    store = Store(import_gguf(path, tmp / "store"))
    return store.config, store


@pytest.fixture(scope="module", params=[(c, s) for c in CASES for s in SOURCES[c]], ids=lambda p: "-".join(p))
def tiny(request, tmp_path_factory):
    case, source = request.param
    hf = make_hf(case)
    cfg, weights = load(hf, source, tmp_path_factory.mktemp(f"{case}-{source}"))
    return hf, cfg, weights


def backend_of(name: str):
    if name == "kernels":
        if not kernels_available():  # a broken install must fail, not skip
            pytest.fail(f"flashlm.kernels do not import: {kernels_error()}")
        return KernelBackend()
    return NumpyBackend()


def hf_logits(hf, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor(ids[None], dtype=torch.long)).logits[0].numpy()


def ids_of(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, n)


# ---- against transformers ----


def test_config(tiny):
    hf, cfg, _ = tiny
    c = hf.config
    assert cfg.model_type == "qwen3_moe" and cfg.qk_norm and cfg.rope_layout == "neox"
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (
        c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size)
    assert cfg.norm_topk_prob == c.norm_topk_prob
    assert [cfg.is_moe_layer(i) for i in range(c.num_hidden_layers)] == [
        type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in hf.model.layers]


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_positions(tiny, backend):
    hf, cfg, weights = tiny
    model = build_model(cfg, weights, backend_of(backend))
    ids = ids_of(23, 1)
    ours = model.forward(ids, np.arange(len(ids)), model.make_cache(32), all_logits=True)
    ref = hf_logits(hf, ids)
    assert np.abs(ref).max() > 0.5
    assert_close(ours, ref, rel=REL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_steps(tiny, backend):
    hf, cfg, weights = tiny
    model = build_model(cfg, weights, backend_of(backend))
    ids = ids_of(12, 2)
    ref = hf_logits(hf, ids)
    cache = model.make_cache(16)
    assert_close(model.forward(ids[:5], None, cache), ref[4], rel=REL)
    for t in range(5, len(ids)):
        assert_close(model.forward(ids[t:t + 1], None, cache), ref[t], rel=REL, err_msg=f"decode at {t}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_equals_each_alone(tiny, backend):
    hf, cfg, weights = tiny
    model = build_model(cfg, weights, backend_of(backend))
    a, b, c = ids_of(6, 3), ids_of(9, 4), ids_of(5, 5)
    ca, cb, cc = model.make_cache(16), model.make_cache(16), model.make_cache(16)
    model.forward(a[:5], None, ca)
    model.forward(c[:3], None, cc)
    out = model.forward_batch([(a[5:], None, ca), (b, None, cb), (c[3:], None, cc)])
    alone = np.stack([model.forward(s, None, model.make_cache(16)) for s in (a, b, c)])
    # An expert's rows go through the fused GEMM in a batch and may go through the GEMV alone:
    # the same products, summed in another order (measured <= 8.3e-7; 0 for F32/F16 on the kernels).
    assert_close(out, alone, rel=REL)
    for j, s in enumerate((a, b, c)):
        assert_close(out[j], hf_logits(hf, s)[-1], rel=REL, err_msg=f"sequence {j}")


# ---- the experts() interface ----


class Counting:
    """Wraps a weights source and records layer() and experts() calls."""

    def __init__(self, inner):
        self.inner, self.layers, self.expert_calls = inner, [], []

    def tensor(self, name):
        return self.inner.tensor(name)

    def has(self, name):
        return self.inner.has(name)

    def layer(self, i):
        self.layers.append(i)
        return self.inner.layer(i)

    def experts(self, i, ids, on_submit=None):
        ids = list(ids)
        self.expert_calls.append((i, ids))
        return self.inner.experts(i, ids, on_submit)


@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_asked_once_per_layer_with_the_union(tiny, backend):
    _, cfg, weights = tiny
    w = Counting(weights)
    model = build_model(cfg, w, backend_of(backend))
    moe = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    seqs = [ids_of(7, 11), ids_of(1, 12), ids_of(4, 13)]
    alone = []
    for s in seqs:
        w.layers, w.expert_calls = [], []
        model.forward(s, None, model.make_cache(8))
        assert w.layers == list(range(cfg.num_hidden_layers))
        assert [i for i, _ in w.expert_calls] == moe  # once per MoE layer, in order
        for _, ids in w.expert_calls:
            assert ids == sorted(set(ids)) and all(0 <= e < cfg.num_experts for e in ids)
        alone.append(dict(w.expert_calls))
    assert all(len(a[i]) == cfg.num_experts_per_tok for i in moe for a in alone[1:2])  # one token: k experts
    assert any(len(alone[0][i]) > cfg.num_experts_per_tok for i in moe)  # 7 tokens spread over more
    w.layers, w.expert_calls = [], []
    model.forward_batch([(s, None, model.make_cache(8)) for s in seqs])
    assert [i for i, _ in w.expert_calls] == moe
    for i, ids in w.expert_calls:  # the batch reads the union of what each sequence reads alone
        assert ids == sorted(set().union(*(a[i] for a in alone)))


def test_store_experts_layout(tmp_path):
    """Store: per-expert tensors after the layer's dense ones, gate/up/down consecutive, one
    aligned byte range per expert, the same bytes as the GGUF's 3-D tensors; layer() is dense only."""
    hf = make_hf("kquant")
    path = write_gguf(hf, tmp_path / "m.gguf", "kquant")
    store = Store(import_gguf(path, tmp_path / "store"))
    cfg, inplace = gguf_weights(path)
    from flashlm.kernels.repacked import unpack

    for i in range(cfg.num_hidden_layers):
        assert not any(".exp" in n or "_exps" in n for n in store.layer(i))
        assert "ffn_gate_inp.weight" in store.layer(i) and "ffn_gate_inp.weight" in inplace.layer(i)
        assert not any("_exps" in n for n in inplace.layer(i))
        infos = [store.tensor_info[n] for n in store.layer_names(i)]
        names = store.layer_names(i)
        first_expert = min(j for j, n in enumerate(names) if ".expert." in n)
        dense_end = max(t["offset"] + t["nbytes"] for t in infos[:first_expert])
        ids = [0, 3, cfg.num_experts - 1]
        got, ref = store.experts(i, ids), inplace.experts(i, ids)
        assert list(got) == ids == list(ref)
        prev_end = dense_end
        for e in range(cfg.num_experts):
            fname, off, nbytes = store.expert_span(i, e)
            assert fname == f"layer_{i:03d}.bin" and off % ALIGN == 0 and off >= prev_end
            ts = [store.tensor_info[f"blk.{i}.expert.{e}.{m}"] for m in ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")]
            assert ts[0]["offset"] == off and ts[2]["offset"] + ts[2]["nbytes"] == off + nbytes
            assert ts[1]["offset"] == ts[0]["offset"] + -(-ts[0]["nbytes"] // ALIGN) * ALIGN  # nothing between
            assert ts[2]["offset"] == ts[1]["offset"] + -(-ts[1]["nbytes"] // ALIGN) * ALIGN
            prev_end = off + nbytes
        for e in ids:
            for m, fmt in (("ffn_gate.weight", "Q4_K"), ("ffn_up.weight", "Q4_K"), ("ffn_down.weight", "Q6_K")):
                s, r = got[e][m], ref[e][m]
                assert s.fmt == fmt[:-1] + "KR" and r.fmt == fmt and s.shape == r.shape
                assert unpack(s.fmt, s.data, s.shape)[1].tobytes() == r.data.tobytes()
                assert not r.data.flags.owndata  # a view of the GGUF's memory map
    with pytest.raises(Exception, match="no expert 8"):
        store.experts(0, [8])
    with pytest.raises(KeyError, match="no expert 8"):
        inplace.experts(0, [8])


def test_dict_weights_per_expert_names():
    from flashlm.kernels.formats import QTensor

    def t(v):
        return QTensor(np.full((2, 2), v, np.float32), "F32", (2, 2))

    tensors = {"token_embd.weight": t(0), "blk.0.attn_q.weight": t(1), "blk.0.ffn_gate_inp.weight": t(2)}
    for e in range(3):
        for j, m in enumerate(("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")):
            tensors[f"blk.0.expert.{e}.{m}"] = t(10 * e + j)
    w = DictWeights(tensors)
    assert set(w.layer(0)) == {"attn_q.weight", "ffn_gate_inp.weight"}
    ex = w.experts(0, [0, 2])
    assert list(ex) == [0, 2] and ex[2]["ffn_up.weight"] is tensors["blk.0.expert.2.ffn_up.weight"]
    with pytest.raises(KeyError, match="no expert 3 in layer 0"):
        w.experts(0, [3])


# ---- bad files ----


def test_gguf_missing_expert_tensor(tmp_path):
    hf = make_hf("nonorm-step2")
    path = write_gguf(hf, tmp_path / "m.gguf", "F32", skip=("blk.1.ffn_up_exps.weight",))
    with pytest.raises(GGUFError, match=r"m\.gguf: the file lacks expert tensor blk\.1\.ffn_up_exps\.weight"):
        import_gguf(path, tmp_path / "store")
    with pytest.raises(GGUFError, match="lacks expert tensor"):
        gguf_weights(path)


def test_gguf_expert_count_mismatch(tmp_path):
    hf = make_hf("nonorm-step2")
    path = write_gguf(hf, tmp_path / "m.gguf", "F32", meta={"qwen3moe.expert_count": 8})
    with pytest.raises(GGUFError, match=r"m\.gguf: blk\.1\.ffn_gate_inp\.weight has shape \(6, 64\), expected \(8, 64\)"):
        import_gguf(path, tmp_path / "store")


def test_hf_missing_and_extra_experts(tmp_path):
    import json

    from synth import save_safetensors

    hf = make_hf("nonorm-step2")
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(tiny_tokenizer_json())
    from flashlm.models.hf_import import SafetensorsFile

    st = SafetensorsFile(tmp_path / "hf" / "model.safetensors")
    full = {n: (f, np.array(a)) for n, (f, a) in ((n, st.get(n)) for n in st.keys())}  # copies: the file is rewritten
    del st
    gone = "model.layers.1.mlp.experts.4.down_proj.weight"
    save_safetensors(tmp_path / "hf" / "model.safetensors", {n: v for n, v in full.items() if n != gone})
    with pytest.raises(ImportError_, match=r"lack 1 tensors .* blk\.1\.expert\.4\.ffn_down\.weight"):
        import_hf(tmp_path / "hf", tmp_path / "store")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["num_experts"] = cfg.pop("num_local_experts", cfg.get("num_experts")) - 1
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    save_safetensors(tmp_path / "hf" / "model.safetensors", full)
    with pytest.raises(ImportError_, match=r"hold blk\.1\.expert\.5\..*num_experts = 5"):
        import_hf(tmp_path / "hf", tmp_path / "store")


def test_hf_fused_experts_are_split(tmp_path):
    """A checkpoint with transformers 5's in-memory fused experts (gate_up_proj, down_proj) imports too."""
    from synth import save_safetensors

    hf = make_hf("nonorm-step2")
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(tiny_tokenizer_json())
    save_safetensors(tmp_path / "hf" / "model.safetensors",
                     {n: ("F32", p.detach().numpy()) for n, p in hf.named_parameters()})
    store = Store(import_hf(tmp_path / "hf", tmp_path / "store"))
    model = build_model(store.config, store, NumpyBackend())
    ids = ids_of(9, 8)
    assert_close(model.forward(ids, None, model.make_cache(16), all_logits=True), hf_logits(hf, ids), rel=REL)
    assert max_rel_err(store.experts(1, [2])[2]["ffn_up.weight"].data,
                       hf.model.layers[1].mlp.experts.gate_up_proj[2, 64:].detach().numpy()) == 0


def test_hf_import_quantized(tmp_path):
    """--quant q8_0 quantizes every expert (Q8_0 blocks in column slabs) and keeps the router exact;
    the kernels agree with the numpy reference on it."""
    hf = make_hf("norm-dense1")
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(tiny_tokenizer_json())
    store = Store(import_hf(tmp_path / "hf", tmp_path / "store", quant="q8_0"))
    assert store.layer(0)["ffn_gate_inp.weight"].fmt == "F32"
    assert {t.fmt for e in store.experts(0, range(8)).values() for t in e.values()} == {"Q8_0S"}
    ids = ids_of(10, 9)
    a = build_model(store.config, store, backend_of("kernels")).forward(ids, None, cache_of(store), all_logits=True)
    b = build_model(store.config, store, NumpyBackend()).forward(ids, None, cache_of(store), all_logits=True)
    assert_close(a, b, rel=REL)
    assert max_rel_err(b, hf_logits(hf, ids)) < 0.05  # Q8_0: within a few percent of the f32 model


def cache_of(store):
    from flashlm.runtime.kvcache import KVCache

    return KVCache.for_config(store.config, 16)


def test_get_model_class():
    from flashlm.models import get_model_class

    assert get_model_class("qwen3_moe").__module__ == "flashlm.models.qwen3_moe"
