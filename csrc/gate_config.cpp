#include "gate_config.h"

#include "error_message.h"

#include <cmath>
#include <limits>

namespace moe_fusion {
namespace {

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

Rounding rounding_of(at::ScalarType t) {
  if (t == at::kBFloat16) return Rounding::BF16;
  if (t == at::kHalf) return Rounding::FP16;
  return Rounding::FP32;
}

}  // namespace

// Kept in step with ops/gate.py:check_gate_args, which raises the same errors
// from the fake implementation at compile time.
GateConfig make_gate_config(
    const at::Tensor& logits,
    const c10::optional<at::Tensor>& bias,
    int64_t num_expert_group,
    int64_t topk_group,
    int64_t topk,
    const std::string& scoring_func,
    int64_t group_score_topk,
    double masked_score,
    bool renormalize,
    double renormalize_eps,
    double routed_scaling_factor,
    int64_t num_fused_shared_experts,
    bool apply_routed_scaling_factor_on_output,
    bool weights_from_masked_scores,
    c10::optional<at::ScalarType> compute_dtype,
    c10::optional<at::ScalarType> weights_dtype,
    c10::optional<at::ScalarType> ids_dtype) {
  MOE_FUSION_CHECK(is_float_dtype(logits.scalar_type()),
                    "moe_fused_gate: logits must be float32, bfloat16 or float16, got ",
                    logits.scalar_type());
  MOE_FUSION_CHECK(logits.dim() >= 1, "moe_fused_gate: logits must have at least one dimension");
  const int64_t E = logits.size(-1);
  MOE_FUSION_CHECK(E >= 1, "moe_fused_gate: logits.size(-1) (the number of experts) must be >= 1");
  MOE_FUSION_CHECK(num_expert_group >= 1, "moe_fused_gate: num_expert_group must be >= 1, got ",
                    num_expert_group);
  MOE_FUSION_CHECK(E % num_expert_group == 0, "moe_fused_gate: num_expert_group (", num_expert_group,
                    ") must divide the number of experts logits.size(-1) (", E, ")");
  const int64_t P = E / num_expert_group;
  MOE_FUSION_CHECK(topk_group >= 1 && topk_group <= num_expert_group,
                    "moe_fused_gate: topk_group must be in [1, num_expert_group=", num_expert_group,
                    "], got ", topk_group);
  MOE_FUSION_CHECK(topk >= 1, "moe_fused_gate: topk must be >= 1, got ", topk);
  MOE_FUSION_CHECK(topk <= topk_group * P,
                    "moe_fused_gate: topk (", topk, ") must not exceed the experts of the kept groups (topk_group * E / num_expert_group = ",
                    topk_group * P, ")");
  MOE_FUSION_CHECK(topk <= 64, "moe_fused_gate: topk must be <= 64, got ", topk);
  MOE_FUSION_CHECK(group_score_topk >= 1 && group_score_topk <= P,
                    "moe_fused_gate: group_score_topk must be in [1, experts per group=", P, "], got ",
                    group_score_topk);
  MOE_FUSION_CHECK(scoring_func == "sigmoid" || scoring_func == "softmax",
                    "moe_fused_gate: scoring_func must be 'sigmoid' or 'softmax', got '", scoring_func, "'");
  MOE_FUSION_CHECK(!std::isnan(masked_score), "moe_fused_gate: masked_score must not be NaN");
  MOE_FUSION_CHECK(std::isfinite(renormalize_eps) && renormalize_eps >= 0,
                    "moe_fused_gate: renormalize_eps must be finite and >= 0, got ", renormalize_eps);
  MOE_FUSION_CHECK(std::isfinite(routed_scaling_factor) && routed_scaling_factor != 0,
                    "moe_fused_gate: routed_scaling_factor must be finite and non-zero, got ",
                    routed_scaling_factor);
  MOE_FUSION_CHECK(num_fused_shared_experts >= 0,
                    "moe_fused_gate: num_fused_shared_experts must be >= 0, got ", num_fused_shared_experts);
  MOE_FUSION_CHECK(!(weights_from_masked_scores && bias.has_value()),
                    "moe_fused_gate: weights_from_masked_scores requires bias=None (the masked scores are "
                    "then the unbiased scores)");
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    MOE_FUSION_CHECK(b.dim() == 1 && b.size(0) == E, "moe_fused_gate: bias must have shape [E] = [", E,
                      "], got ", b.sizes());
    MOE_FUSION_CHECK(is_float_dtype(b.scalar_type()), "moe_fused_gate: bias must be float32, bfloat16 or float16, got ",
                      b.scalar_type());
    MOE_FUSION_CHECK(b.device() == logits.device(), "moe_fused_gate: bias must be on the logits' device (",
                      logits.device(), "), got ", b.device());
  }
  const at::ScalarType cdt = compute_dtype.value_or(at::kFloat);
  MOE_FUSION_CHECK(is_float_dtype(cdt), "moe_fused_gate: compute_dtype must be None, float32, bfloat16 or float16, got ",
                    cdt);
  const at::ScalarType wdt = weights_dtype.value_or(at::kFloat);
  MOE_FUSION_CHECK(is_float_dtype(wdt), "moe_fused_gate: weights_dtype must be float32, bfloat16 or float16, got ",
                    wdt);
  const at::ScalarType idt = ids_dtype.value_or(at::kInt);
  MOE_FUSION_CHECK(idt == at::kInt || idt == at::kLong, "moe_fused_gate: ids_dtype must be int32 or int64, got ",
                    idt);

  GateConfig cfg{};
  cfg.num_experts = E;
  cfg.num_groups = num_expert_group;
  cfg.group_size = P;
  cfg.topk_group = topk_group;
  cfg.topk = topk;
  cfg.group_score_topk = group_score_topk;
  cfg.num_shared = num_fused_shared_experts;
  cfg.softmax = scoring_func == "softmax";
  cfg.renormalize = renormalize;
  cfg.weights_from_masked_scores = weights_from_masked_scores;
  cfg.has_bias = bias.has_value();
  cfg.score_rounding = rounding_of(cdt);
  // s + bias has the promoted dtype of the two, exactly as in eager PyTorch.
  cfg.selection_rounding =
      (!bias.has_value() || bias->scalar_type() == cdt) ? cfg.score_rounding : Rounding::FP32;
  cfg.weight_rounding = cfg.score_rounding;
  cfg.masked_score = round_to(static_cast<float>(masked_score), cfg.selection_rounding);
  cfg.renormalize_eps = static_cast<float>(renormalize_eps);
  cfg.weight_scale = apply_routed_scaling_factor_on_output ? 1.0f : static_cast<float>(routed_scaling_factor);
  cfg.shared_weight =
      apply_routed_scaling_factor_on_output ? static_cast<float>(1.0 / routed_scaling_factor) : 1.0f;
  cfg.weights_dtype = wdt == at::kBFloat16 ? OutDtype::BF16 : (wdt == at::kHalf ? OutDtype::F16 : OutDtype::F32);
  cfg.ids_int64 = idt == at::kLong;
  return cfg;
}

void check_gate_outputs(const at::Tensor& logits, const GateConfig& cfg, const at::Tensor& weights,
                        const at::Tensor& ids) {
  auto expected = logits.sizes().vec();
  expected.back() = cfg.out_columns();
  const at::ScalarType wdt = cfg.weights_dtype == OutDtype::BF16
                                 ? at::kBFloat16
                                 : (cfg.weights_dtype == OutDtype::F16 ? at::kHalf : at::kFloat);
  MOE_FUSION_CHECK(weights.sizes() == expected && ids.sizes() == expected,
                    "moe_fused_gate.out: weights_out and ids_out must have shape ", c10::IntArrayRef(expected), ", got ",
                    weights.sizes(), " and ", ids.sizes());
  MOE_FUSION_CHECK(weights.scalar_type() == wdt, "moe_fused_gate.out: weights_out must have dtype ", wdt,
                    ", got ", weights.scalar_type());
  MOE_FUSION_CHECK(ids.scalar_type() == (cfg.ids_int64 ? at::kLong : at::kInt),
                    "moe_fused_gate.out: ids_out must have dtype ", (cfg.ids_int64 ? "int64" : "int32"), ", got ",
                    ids.scalar_type());
  MOE_FUSION_CHECK(weights.is_contiguous() && ids.is_contiguous(),
                    "moe_fused_gate.out: weights_out and ids_out must be contiguous");
  MOE_FUSION_CHECK(weights.device() == logits.device() && ids.device() == logits.device(),
                    "moe_fused_gate.out: weights_out and ids_out must be on the logits' device (", logits.device(),
                    ")");
}

}  // namespace moe_fusion
