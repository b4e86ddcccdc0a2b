// CPU kernel of moe_fusion::moe_fused_gate: one token at a time, tokens in
// parallel. Selection uses 64-bit composite keys (order key of the score in the
// high half, the complement of the index in the low half), so "larger key" is
// exactly "better score, then lower index" and every comparison is one integer
// compare.
#include "dispatch.h"
#include "gate_op.h"

#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace moe_fusion {
namespace {

inline uint64_t composite_key(float score, int64_t index) {
  return (static_cast<uint64_t>(order_key(score)) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(index));
}

inline int64_t index_of(uint64_t key) { return 0xFFFFFFFFu - static_cast<uint32_t>(key & 0xFFFFFFFFu); }

// Keeps the `k` largest keys seen, in descending order.
class TopKeys {
 public:
  explicit TopKeys(int64_t k) : keys_(k), k_(k) {}
  void reset() { count_ = 0; }
  void offer(uint64_t key) {
    if (count_ == k_ && key <= keys_[k_ - 1]) return;
    int64_t pos = count_ < k_ ? count_++ : k_ - 1;
    while (pos > 0 && keys_[pos - 1] < key) {
      keys_[pos] = keys_[pos - 1];
      --pos;
    }
    keys_[pos] = key;
  }
  uint64_t operator[](int64_t i) const { return keys_[i]; }

 private:
  std::vector<uint64_t> keys_;
  int64_t k_;
  int64_t count_ = 0;
};

// Sum of the top-m values of `v[0..n)` in descending order (NaN ranks first).
float top_m_sum(const float* v, int64_t n, int64_t m, TopKeys& scratch) {
  if (m == 1) {
    uint32_t best = order_key(v[0]);
    float value = v[0];
    for (int64_t i = 1; i < n; ++i) {
      uint32_t key = order_key(v[i]);
      if (key > best) best = key, value = v[i];
    }
    return value;
  }
  scratch.reset();
  for (int64_t i = 0; i < n; ++i) scratch.offer(composite_key(v[i], i));
  float sum = 0.0f;
  for (int64_t j = 0; j < m; ++j) sum += v[index_of(scratch[j])];
  return sum;
}

template <typename T, typename W, typename I>
void gate_rows(const T* logits, int64_t row_stride, const float* bias, const GateConfig& cfg, W* weights,
               I* ids, int64_t row_begin, int64_t row_end) {
  const int64_t E = cfg.num_experts, G = cfg.num_groups, P = cfg.group_size, k = cfg.topk;
  const int64_t K = cfg.out_columns();
  std::vector<float> s(E), b(E), group_score(G), w(k);
  std::vector<char> kept(G, 1);
  TopKeys experts(k), groups(cfg.topk_group), group_members(cfg.group_score_topk);

  for (int64_t t = row_begin; t < row_end; ++t) {
    const T* row = logits + t * row_stride;
    // 1. Scores, rounded to the dtype the unfused code stores them in.
    if (cfg.softmax) {
      float mx = -INFINITY;
      for (const auto e : c10::irange(E)) {
        float x = static_cast<float>(row[e]);
        mx = (x != x || x > mx) ? x : mx;
      }
      float total = 0.0f;
      for (const auto e : c10::irange(E)) total += (s[e] = std::exp(static_cast<float>(row[e]) - mx));
      for (const auto e : c10::irange(E)) s[e] = round_to(s[e] / total, cfg.score_rounding);
    } else {
      for (const auto e : c10::irange(E))
        s[e] = round_to(sigmoid_of(static_cast<float>(row[e])), cfg.score_rounding);
    }
    // 2. Selection scores.
    for (const auto e : c10::irange(E))
      b[e] = cfg.has_bias ? round_to(s[e] + bias[e], cfg.selection_rounding) : s[e];
    // 3. Group limit.
    if (cfg.groups_limit_choice()) {
      groups.reset();
      for (const auto g : c10::irange(G)) {
        float score = round_to(top_m_sum(&b[g * P], P, cfg.group_score_topk, group_members),
                               cfg.selection_rounding);
        groups.offer(composite_key(score, g));
        kept[g] = 0;
      }
      for (const auto j : c10::irange(cfg.topk_group)) kept[index_of(groups[j])] = 1;
    }
    // 4. Expert top-k over the masked selection scores.
    experts.reset();
    for (const auto e : c10::irange(E)) experts.offer(composite_key(kept[e / P] ? b[e] : cfg.masked_score, e));
    // 5. Weights from the unbiased scores.
    float sum = 0.0f;
    for (const auto j : c10::irange(k)) {
      const int64_t e = index_of(experts[j]);
      w[j] = (cfg.weights_from_masked_scores && !kept[e / P]) ? cfg.masked_score : s[e];
      sum += w[j];
    }
    float denom = 1.0f;
    if (cfg.renormalize) {
      denom = round_to(round_to(sum, cfg.weight_rounding) + cfg.renormalize_eps, cfg.weight_rounding);
    }
    W* wrow = weights + t * K;
    I* irow = ids + t * K;
    for (const auto j : c10::irange(k)) {
      float v = cfg.renormalize ? round_to(w[j] / denom, cfg.weight_rounding) : w[j];
      wrow[j] = static_cast<W>(round_to(v * cfg.weight_scale, cfg.weight_rounding));
      irow[j] = static_cast<I>(index_of(experts[j]));
    }
    for (const auto j : c10::irange(cfg.num_shared)) {
      wrow[k + j] = static_cast<W>(cfg.shared_weight);
      irow[k + j] = static_cast<I>(E + j);
    }
  }
}

template <typename T, typename W, typename I>
void gate_cpu_typed(const at::Tensor& logits2d, const float* bias, const GateConfig& cfg, at::Tensor& weights2d,
                    at::Tensor& ids2d) {
  const T* logits = logits2d.data_ptr<T>();
  const int64_t row_stride = logits2d.stride(0);
  W* weights = weights2d.data_ptr<W>();
  I* ids = ids2d.data_ptr<I>();
  // About 64 tokens per task keeps scheduling overhead small at E=256.
  const int64_t grain = std::max<int64_t>(1, 16384 / cfg.num_experts);
  at::parallel_for(0, logits2d.size(0), grain, [&](int64_t begin, int64_t end) {
    gate_rows<T, W, I>(logits, row_stride, bias, cfg, weights, ids, begin, end);
  });
}

template <typename T>
void gate_cpu_dispatch_outputs(const at::Tensor& logits2d, const float* bias, const GateConfig& cfg,
                               at::Tensor& weights2d, at::Tensor& ids2d) {
  dispatch_float_dtype(weights2d.scalar_type(), "moe_fused_gate: weights", [&](auto weight_tag) {
    using W = decltype(weight_tag);
    if (cfg.ids_int64) {
      gate_cpu_typed<T, W, int64_t>(logits2d, bias, cfg, weights2d, ids2d);
    } else {
      gate_cpu_typed<T, W, int32_t>(logits2d, bias, cfg, weights2d, ids2d);
    }
  });
}

void gate_cpu(const at::Tensor& logits2d, const at::Tensor& bias, const GateConfig& cfg, at::Tensor& weights2d,
              at::Tensor& ids2d) {
  TORCH_CHECK_VALUE(logits2d.device().is_cpu(), "moe_fused_gate: logits must be on the CPU for the CPU kernel");
  // Bias in float32 (exact for bf16/fp16), read once per call rather than converted per token.
  at::Tensor bias_f32 = bias.defined() ? bias.to(at::kFloat).contiguous() : at::Tensor();
  const float* bias_ptr = bias.defined() ? bias_f32.data_ptr<float>() : nullptr;
  dispatch_float_dtype(logits2d.scalar_type(), "moe_fused_gate: logits", [&](auto logit_tag) {
    gate_cpu_dispatch_outputs<decltype(logit_tag)>(logits2d, bias_ptr, cfg, weights2d, ids2d);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_fusion, CPU, m) {
  m.impl("moe_fused_gate", &gate_functional<gate_cpu>);
  m.impl("moe_fused_gate.out", &gate_out<gate_cpu>);
}

}  // namespace moe_fusion
