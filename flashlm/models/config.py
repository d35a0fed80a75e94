"""Model configuration, with the Hugging Face ``config.json`` key names."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Bumped whenever an importer's output changes (tokenizer rules, config fields, store
# layouts: 4 = Q5_0 kept as Q5_0R, 5 = Q6_K as Q6_KR, 6 = Q4_K as Q4_KR, 7 = long rows of those two in
# column slabs, 8 = every quantized format in column slabs, 9 = Q4_1 as Q4_1R), so stores imported by
# an older flashlm are re-imported from their cached source.
IMPORTER_VERSION = 9

# model_type -> module in flashlm.models that implements it
ARCH_ALIASES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "llama", "qwen3_moe": "qwen3_moe"}
# GGUF general.architecture -> model_type, where the two differ
GGUF_ARCHS = {"qwen3moe": "qwen3_moe"}


@dataclass
class ModelConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (qwen2)
    qk_norm: bool = False  # rmsnorm on q and k per head (qwen3)
    # "neox": rotate halves (HF layout); "interleaved": rotate adjacent pairs
    # (llama GGUF files, whose q/k rows the converter permuted for it).
    rope_layout: str = "neox"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # mixture of experts (qwen3_moe): 0 experts is a dense model
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalize the top-k router probabilities to sum to 1
    decoder_sparse_step: int = 1  # every step-th layer is sparse (layer i when (i + 1) % step == 0)
    mlp_only_layers: list[int] = field(default_factory=list)  # layers with a dense MLP all the same
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.model_type == "qwen2":
            self.attention_bias = True
        if self.model_type in ("qwen3", "qwen3_moe"):
            self.qk_norm = True
        self.mlp_only_layers = [int(i) for i in (self.mlp_only_layers or [])]

    def is_moe_layer(self, i: int) -> bool:
        """Decoder block ``i`` has a sparse MoE block (else a dense SwiGLU MLP), as transformers decides."""
        return (self.num_experts > 0 and i not in self.mlp_only_layers
                and (i + 1) % max(1, self.decoder_sparse_step) == 0)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        if "num_experts" not in d and "num_local_experts" in d:  # transformers 5 writes qwen3_moe's under this name
            d = {**d, "num_experts": d["num_local_experts"]}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
