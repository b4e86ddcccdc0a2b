// The contract of moe_fusion::moe_fused_gate shared by the CPU and CUDA kernels:
// the validated configuration and the scalar helpers both kernels use, so that
// the two implementations cannot drift apart on ordering, rounding or NaNs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <cstring>
#include <string>

namespace moe_fusion {

// How the unfused routing stored its intermediates. FP32 is exact arithmetic;
// BF16/FP16 emulate a model that routes in a 16-bit dtype (each intermediate
// the eager code materialises in that dtype is rounded to it), so that the
// fused op picks the experts the eager model picks.
enum class Rounding : int8_t { FP32 = 0, BF16 = 1, FP16 = 2 };

enum class OutDtype : int8_t { F32 = 0, BF16 = 1, F16 = 2 };

struct GateConfig {
  int64_t num_experts;       // E
  int64_t num_groups;        // G
  int64_t group_size;        // P = E / G
  int64_t topk_group;        // groups kept
  int64_t topk;              // routed experts per token
  int64_t group_score_topk;  // m: group score = sum of the top-m biased scores
  int64_t num_shared;        // S fused shared-expert columns
  bool softmax;              // scoring: softmax over E, else sigmoid
  bool renormalize;
  bool weights_from_masked_scores;  // weight = masked_score for experts of dropped groups
  bool has_bias;
  float masked_score;
  float renormalize_eps;
  float weight_scale;   // multiplies the routed weights (rsf, or 1 when applied on the output)
  float shared_weight;  // weight of each fused shared column
  Rounding score_rounding;      // dtype the scores s are stored in
  Rounding selection_rounding;  // dtype of s + bias (and of the group scores)
  Rounding weight_rounding;     // dtype of the weight arithmetic
  OutDtype weights_dtype;
  bool ids_int64;

  C10_HOST_DEVICE int64_t out_columns() const { return topk + num_shared; }
  C10_HOST_DEVICE bool groups_limit_choice() const { return topk_group < num_groups; }
};

// Validates every argument (raising ValueError that names the argument and the
// rule) and derives the kernel configuration. Shared by the CPU and CUDA paths.
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
    c10::optional<at::ScalarType> ids_dtype);

// Checks that `weights`/`ids` can receive the op's output for `logits`.
void check_gate_outputs(const at::Tensor& logits, const GateConfig& cfg,
                        const at::Tensor& weights, const at::Tensor& ids);

// ---------------------------------------------------------------------------
// Scalar helpers (host and device).

C10_HOST_DEVICE inline float round_to(float x, Rounding r) {
  if (r == Rounding::BF16) return static_cast<float>(c10::BFloat16(x));
  if (r == Rounding::FP16) return static_cast<float>(c10::Half(x));
  return x;
}

C10_HOST_DEVICE inline uint32_t float_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

// A total order on floats as unsigned integers: larger key = better expert.
// NaN ranks above every number (as torch.topk ranks it) and -0.0 equals +0.0.
// Key 0 is never produced, so kernels use it for "removed".
C10_HOST_DEVICE inline uint32_t order_key(float x) {
  if (x != x) return 0xFFFFFFFFu;
  uint32_t u = float_bits(x + 0.0f);  // -0.0 + 0.0 == +0.0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

constexpr uint32_t kRemovedKey = 0u;

// Inverse of order_key (NaN comes back as NaN, -0.0 as +0.0).
C10_HOST_DEVICE inline float key_value(uint32_t key) {
  const uint32_t bits = (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key;
#ifdef __CUDA_ARCH__
  return __uint_as_float(bits);
#else
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
#endif
}

C10_HOST_DEVICE inline float sigmoid_of(float x) {
  // The same formula as PyTorch's eager kernels, with accurate exp and division.
#ifdef __CUDA_ARCH__
  return 1.0f / (1.0f + expf(-x));
#else
  return 1.0f / (1.0f + std::exp(-x));
#endif
}

}  // namespace moe_fusion
