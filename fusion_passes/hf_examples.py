"""Random HF transformers MoE models (DeepSeek-V3, GLM-4.5, DeepSeek-V2, Qwen3-MoE, Qwen2-MoE): tiny
ones for demos, the inspector and tests, full-width ones for benchmarks. Requires transformers >= 5
(an optional dependency)."""

from __future__ import annotations

from typing import Any

import torch

KINDS = ("deepseek_v3", "glm4_moe", "deepseek_v2", "qwen3_moe", "qwen2_moe")

# DeepSeek's configs call the routed experts n_routed_experts, Qwen's num_experts.
TINY_SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, first_k_dense_replace=0,
                  n_routed_experts=16, num_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
# Qwen2-MoE's shared expert at tiny size: two slots of the routed intermediate size.
_TINY_PER_KIND = {"qwen2_moe": dict(shared_expert_intermediate_size=64)}
_MLA = dict(q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
_PER_KIND = {
    "deepseek_v3": dict(_MLA, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True),
    "glm4_moe": dict(n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True, head_dim=16),
    "deepseek_v2": dict(_MLA, n_shared_experts=2, routed_scaling_factor=16.0, topk_method="group_limited_greedy",
                        n_group=4, topk_group=2),
    # Softmax top-k without groups; Qwen2-MoE adds a shared expert gated per token by sigmoid(x @ w).
    "qwen3_moe": dict(norm_topk_prob=True, head_dim=16),
    "qwen2_moe": dict(norm_topk_prob=False),
}


def tiny_hf_moe(kind: str = "deepseek_v3", experts_implementation: str = "grouped_mm", seed: int = 0,
                **overrides: Any) -> torch.nn.Module:
    """A randomly initialised tiny `kind` causal LM in eval mode (on the CPU, float32); see hf_moe."""
    return hf_moe(kind, experts_implementation, seed, **{**TINY_SIZES, **_TINY_PER_KIND.get(kind, {}), **overrides})


def hf_moe(kind: str, experts_implementation: str = "grouped_mm", seed: int = 0, device: Any = "cpu",
           bias_std: float = 0.3, **config: Any) -> torch.nn.Module:
    """A randomly initialised `kind` causal LM in eval mode, built on `device`, float32.

    `config` overrides the HF config's defaults (the real model's sizes). Router weights get a
    standard deviation of 4 / sqrt(hidden_size) (router logits of about 4 for unit-scale hidden
    states: spread scores; larger weights saturate the sigmoid and make every token pick the same
    experts) and score-correction biases random values of standard deviation `bias_std` (the HF init
    leaves the bias at zero, which would hide bias handling; a large bias sends most tokens to the
    same experts).
    """
    import transformers

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    config_class, model_class = {
        "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
        "glm4_moe": (transformers.Glm4MoeConfig, transformers.Glm4MoeForCausalLM),
        "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
        "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
    }[kind]
    hf_config = config_class(**{**_PER_KIND[kind], **config})
    hf_config._experts_implementation = experts_implementation
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = model_class(hf_config).eval()
    for module in model.modules():
        if type(module).__name__.lower().endswith("topkrouter"):  # DeepseekV3TopkRouter, Qwen3MoeTopKRouter
            std = 4 / hf_config.hidden_size**0.5
            module.weight.data = (torch.randn(module.weight.shape, generator=generator) * std).to(device)
            bias = getattr(module, "e_score_correction_bias", None)
            if bias is not None:
                bias.copy_(torch.randn(bias.shape, generator=generator) * bias_std)
    return model
