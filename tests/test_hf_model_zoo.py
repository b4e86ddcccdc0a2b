"""Public HF transformers MoE models beyond the DeepSeek-style kinds of fusion_passes.hf_examples:
tiny random configs compiled with the backend (experts fused on the CPU too) against eager, with the
rewrites each model must get, or the refusal that must keep its graph as it was.

What each model's MoE block is, and so what the passes must do with it:
- Mixtral, OLMoE, MiniMax: softmax top-k routing (renormalised or not), SiLU experts, no shared
  expert: routing and experts fused.
- dots.llm1: DeepSeek-V3-style grouped routing with a score-correction bias and a shared expert;
  HunYuan-MoE-V1: softmax top-k routing and a shared MLP: all three rewrites.
- GPT-OSS: the experts add biases and clamp an interleaved SwiGLU of their own: not
  fused_experts' function, nothing rewritten.
- ERNIE-4.5-MoE: softmax routing with a score-correction bias, the weights divided by
  clamp(sum, min=eps), a renormalisation the gate op does not have (it adds eps to the sum): the
  gate computes the weights unnormalised and the clamp and division stay in the graph; the experts
  read the renormalised weights and the shared MLP rides along: all three rewrites.
- DeepSeek-V3.2 (DeepseekV32), GlmMoeDsa, Glm4MoeLite, Solar-Open, MiniCPM5-MoE, EXAONE-MoE: the
  DeepSeek-V3 block (grouped sigmoid routing with a bias, renormalised and scaled, a shared expert;
  MLA or sparse attention around it); AFMoE: sigmoid routing with a bias and no groups, a shared
  expert; Qwen3-Next: softmax top-k routing and a sigmoid-gated shared expert: all three rewrites.
- Cohere2-MoE: top-k of the raw router logits, then softmax over the k picked logits, a spelling the
  routing rewrite does not take (its picks follow the logits, not the scores): nothing rewritten.
"""

from __future__ import annotations

import pytest
import torch
from compile_checks import compile_with_report, fused_op_calls, internal_errors

transformers = pytest.importorskip("transformers")

GATE, EXPERTS = "moe_fusion::moe_fused_gate", "moe_fusion::fused_experts"
LAYERS = 2
COMMON = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
              num_key_value_heads=4, vocab_size=128, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)
FULL_ATTENTION = dict(head_dim=16, layer_types=["full_attention"] * LAYERS)

# DeepSeek-V3's routing (sigmoid + bias, groups, renormalised, scaled) and one shared expert; MLA sizes.
_DEEPSEEK_STYLE = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                       n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True)
_MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)

# name: (config class, model class, tiny config, rewrites per layer (routing, experts, shared), refusal text)
MODELS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=8, num_experts_per_tok=2),
                (1, 1, 0), None),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=8, num_experts_per_tok=2), (1, 1, 0), None),
    "minimax": ("MiniMaxConfig", "MiniMaxForCausalLM",
                dict(num_local_experts=8, num_experts_per_tok=2, **FULL_ATTENTION), (1, 1, 0), None),
    "dots1": ("Dots1Config", "Dots1ForCausalLM",
              dict(n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, n_shared_experts=1, n_group=4,
                   topk_group=2, first_k_dense_replace=0, head_dim=16), (1, 1, 1), None),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM", dict(num_experts=8, moe_topk=2, head_dim=16),
                       (1, 1, 1), None),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(num_local_experts=8, num_experts_per_tok=2, **FULL_ATTENTION), (0, 0, 0), None),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM",
                     dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1,
                          moe_layer_start_index=0), (1, 1, 1), None),
    "deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM",
                     dict(_DEEPSEEK_STYLE, **_MLA, n_group=4, topk_group=2, mlp_layer_types=["sparse"] * LAYERS,
                          first_k_dense_replace=0, use_cache=False), (1, 1, 1), None),
    "glm_moe_dsa": ("GlmMoeDsaConfig", "GlmMoeDsaForCausalLM",
                    dict(_DEEPSEEK_STYLE, **_MLA, mlp_layer_types=["sparse"] * LAYERS, first_k_dense_replace=0,
                         use_cache=False), (1, 1, 1), None),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM",
                      dict(_DEEPSEEK_STYLE, **_MLA, mlp_layer_types=["sparse"] * LAYERS), (1, 1, 1), None),
    "solar_open": ("SolarOpenConfig", "SolarOpenForCausalLM", dict(_DEEPSEEK_STYLE, head_dim=16), (1, 1, 1), None),
    "minicpm5_moe": ("MiniCPM5MoeConfig", "MiniCPM5MoeForCausalLM",
                     dict(_DEEPSEEK_STYLE, head_dim=16, mlp_layer_types=["sparse"] * LAYERS), (1, 1, 1), None),
    "exaone_moe": ("ExaoneMoeConfig", "ExaoneMoeForCausalLM",
                   dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, num_shared_experts=1,
                        n_group=2, topk_group=1, mlp_layer_types=["sparse"] * LAYERS, first_k_dense_replace=0,
                        head_dim=16), (1, 1, 1), None),
    "afmoe": ("AfmoeConfig", "AfmoeForCausalLM",
              dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, num_shared_experts=1,
                   num_dense_layers=0, head_dim=16), (1, 1, 1), None),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                        shared_expert_intermediate_size=32, **FULL_ATTENTION), (1, 1, 1), None),
    "cohere2_moe": ("Cohere2MoeConfig", "Cohere2MoeForCausalLM",
                    dict(num_experts=8, num_experts_per_tok=2, num_shared_experts=1, head_dim=16), (0, 0, 0), None),
}


def tiny_model(name: str) -> torch.nn.Module:
    config_name, model_name, config, _, _ = MODELS[name]
    if not hasattr(transformers, model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, model_name)(getattr(transformers, config_name)(**COMMON, **config)).eval()
        with torch.no_grad():
            # A router initialised to zeros (AFMoE's) ties every score: which experts win a tie is
            # implementation-defined for torch.topk (the fused gate takes the lower index).
            for param_name, param in model.named_parameters():
                if param_name.endswith("router.gate.weight") and not param.any():
                    param.normal_(0.0, 0.5)
        return model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_public_moe_model_is_rewritten_as_its_block_allows(name):
    model = tiny_model(name)
    _, _, _, per_layer, refusal = MODELS[name]
    tokens = torch.randint(0, COMMON["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    compiled, outputs, report = compile_with_report(model, tokens)

    assert not internal_errors(report)
    assert [report.count(n) for n in ("routing", "experts", "shared_experts")] == [LAYERS * n for n in per_layer]
    reasons = [r.reason for r in report.refusals]
    if refusal is None:
        assert not reasons, reasons
    else:
        assert len(reasons) == LAYERS and all(refusal in reason for reason in reasons), reasons
    with torch.no_grad():
        expected_calls = {op: LAYERS * n for op, n in zip((GATE, EXPERTS), per_layer[:2], strict=True) if n}
        assert fused_op_calls(compiled, tokens) == expected_calls
        torch.testing.assert_close(outputs.logits, model(tokens).logits, rtol=1e-5, atol=1e-5)
