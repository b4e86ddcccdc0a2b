// The functional op and its out= overload, written once over a device kernel.
#pragma once

#include "gate_config.h"

#include <ATen/ATen.h>

#include <tuple>

namespace moe_fusion {

// A device kernel: logits2d [T, E] with unit stride along E, bias [E]
// contiguous or undefined, outputs [T, K] contiguous.
using GateKernel = void (*)(const at::Tensor& logits2d, const at::Tensor& bias, const GateConfig& cfg,
                            at::Tensor& weights2d, at::Tensor& ids2d);

#define MOE_FUSION_GATE_PARAMS                                                                       \
  const at::Tensor &logits, const c10::optional<at::Tensor>&bias, int64_t num_expert_group,          \
      int64_t topk_group, int64_t topk, c10::string_view scoring_func, int64_t group_score_topk,     \
      double masked_score, bool renormalize, double renormalize_eps, double routed_scaling_factor,   \
      int64_t num_fused_shared_experts, bool apply_routed_scaling_factor_on_output,                  \
      bool weights_from_masked_scores, c10::optional<at::ScalarType> compute_dtype,                  \
      c10::optional<at::ScalarType> weights_dtype, c10::optional<at::ScalarType> ids_dtype

#define MOE_FUSION_GATE_ARGS                                                                          \
  logits, bias, num_expert_group, topk_group, topk, std::string(scoring_func), group_score_topk,      \
      masked_score, renormalize, renormalize_eps, routed_scaling_factor, num_fused_shared_experts,   \
      apply_routed_scaling_factor_on_output, weights_from_masked_scores, compute_dtype, weights_dtype, \
      ids_dtype

inline void run_gate(GateKernel kernel, const at::Tensor& logits, const c10::optional<at::Tensor>& bias,
                     const GateConfig& cfg, at::Tensor& weights, at::Tensor& ids) {
  const int64_t K = cfg.out_columns();
  if (weights.numel() == 0) return;  // T == 0
  at::Tensor logits2d = logits.reshape({-1, cfg.num_experts});
  if (logits2d.stride(1) != 1) logits2d = logits2d.contiguous();
  // Kernels read the bias as float32 or in the logits' dtype; any other float dtype converts exactly
  // to float32 (the rounding rule of cfg already follows the bias' own dtype).
  at::Tensor bias1d;
  if (bias.has_value()) {
    const bool readable = bias->scalar_type() == at::kFloat || bias->scalar_type() == logits.scalar_type();
    bias1d = readable ? bias->contiguous() : bias->to(at::kFloat).contiguous();
  }
  at::Tensor w2d = weights.view({-1, K});
  at::Tensor i2d = ids.view({-1, K});
  kernel(logits2d, bias1d, cfg, w2d, i2d);
}

template <GateKernel kKernel>
std::tuple<at::Tensor, at::Tensor> gate_functional(MOE_FUSION_GATE_PARAMS) {
  const GateConfig cfg = make_gate_config(MOE_FUSION_GATE_ARGS);
  auto shape = logits.sizes().vec();
  shape.back() = cfg.out_columns();
  at::Tensor weights = at::empty(shape, logits.options().dtype(weights_dtype.value_or(at::kFloat)));
  at::Tensor ids = at::empty(shape, logits.options().dtype(ids_dtype.value_or(at::kInt)));
  run_gate(kKernel, logits, bias, cfg, weights, ids);
  return {weights, ids};
}

template <GateKernel kKernel>
void gate_out(MOE_FUSION_GATE_PARAMS, at::Tensor& weights_out, at::Tensor& ids_out) {
  const GateConfig cfg = make_gate_config(MOE_FUSION_GATE_ARGS);
  check_gate_outputs(logits, cfg, weights_out, ids_out);
  run_gate(kKernel, logits, bias, cfg, weights_out, ids_out);
}

}  // namespace moe_fusion
