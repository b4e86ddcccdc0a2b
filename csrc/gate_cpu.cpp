// CPU kernel of moe_fusion::moe_fused_gate: one token at a time, tokens in
// parallel. Every comparison is on the 32-bit order keys of gate_config.h, and
// candidates are offered in increasing expert index, so ties go to the lower
// index without storing it in the key.
#include "dispatch.h"
#include "gate_op.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace moe_fusion {
namespace {

// The score loops are the CPU kernel's main cost: they are written to vectorise
// (no calls, no branches: build with -fno-trapping-math so that the NaN selects
// if-convert), and cloned for AVX2/FMA with run-time dispatch where GCC allows.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MOE_FUSION_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MOE_FUSION_VECTOR_CLONES
#endif

// exp(x) within about 1 ulp, vectorisable: 2^n * exp(r) with n = round(x / ln 2), |r| <= ln(2)/2, and
// the Cephes polynomial for exp(r). 2^n is applied as two factors so that results down to the
// smallest denormal stay exact; overflow gives inf, NaN stays NaN.
inline float exp_approx(float x) {
  float clamped = x < -104.0f ? -104.0f : x;
  clamped = clamped > 89.0f ? 89.0f : clamped;
  const float shifted = clamped * 1.44269504088896341f + 12582912.0f;  // + 1.5 * 2^23 rounds to an integer
  const float n = shifted - 12582912.0f;
  int32_t ni;
  std::memcpy(&ni, &shifted, sizeof(ni));
  ni -= 0x4B400000;
  const float r = (clamped - n * 0.693359375f) + n * 2.12194440e-4f;  // ln 2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t half = ni >> 1;
  const int32_t bits_a = (half + 127) << 23, bits_b = (ni - half + 127) << 23;
  float scale_a, scale_b;
  std::memcpy(&scale_a, &bits_a, sizeof(scale_a));
  std::memcpy(&scale_b, &bits_b, sizeof(scale_b));
  const float result = p * scale_a * scale_b;
  return x != x ? x : result;
}

MOE_FUSION_VECTOR_CLONES void sigmoid_inplace(float* v, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) v[i] = 1.0f / (1.0f + exp_approx(-v[i]));
}

// v <- exp(v - max(v)) / sum; NaN anywhere makes the row NaN, as in torch.softmax.
MOE_FUSION_VECTOR_CLONES void softmax_inplace(float* v, int64_t n) {
  float mx = -INFINITY;
  for (int64_t i = 0; i < n; ++i) mx = (v[i] != v[i] || v[i] > mx) ? v[i] : mx;
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) {
    v[i] = exp_approx(v[i] - mx);
    total += v[i];
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) v[i] = v[i] / total;
}

MOE_FUSION_VECTOR_CLONES void order_keys(const float* v, uint32_t* keys, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) keys[i] = order_key(v[i]);
}

// Keeps the k best (key, index) pairs offered in increasing index order, best first. Equal keys
// keep their offer order, so the lower index wins ties.
class TopK {
 public:
  explicit TopK(int64_t k) : keys_(k), ids_(k), k_(k) {}
  void reset() { count_ = 0; }
  void offer(uint32_t key, int64_t id) {
    if (count_ == k_ && key <= keys_[k_ - 1]) return;
    int64_t pos = count_ < k_ ? count_++ : k_ - 1;
    for (; pos > 0 && keys_[pos - 1] < key; --pos) {
      keys_[pos] = keys_[pos - 1];
      ids_[pos] = ids_[pos - 1];
    }
    keys_[pos] = key;
    ids_[pos] = id;
  }
  uint32_t key(int64_t i) const { return keys_[i]; }
  int64_t id(int64_t i) const { return ids_[i]; }

 private:
  std::vector<uint32_t> keys_;
  std::vector<int64_t> ids_;
  int64_t k_;
  int64_t count_ = 0;
};

// Sum of the m best of keys[0..n) in descending order (NaN ranks first).
float top_m_sum(const uint32_t* keys, int64_t n, int64_t m, TopK& scratch) {
  if (m <= 2) {
    uint32_t top1 = 0, top2 = 0;
    for (int64_t i = 0; i < n; ++i) {
      top2 = std::max(top2, std::min(top1, keys[i]));
      top1 = std::max(top1, keys[i]);
    }
    return m == 1 ? key_value(top1) : key_value(top1) + key_value(top2);
  }
  scratch.reset();
  for (int64_t i = 0; i < n; ++i) scratch.offer(keys[i], i);
  float sum = 0.0f;
  for (int64_t j = 0; j < m; ++j) sum += key_value(scratch.key(j));
  return sum;
}

template <typename T, typename W, typename I>
void gate_rows(const T* logits, int64_t row_stride, const float* bias, const GateConfig& cfg, W* weights,
               I* ids, int64_t row_begin, int64_t row_end) {
  const int64_t E = cfg.num_experts, G = cfg.num_groups, P = cfg.group_size, k = cfg.topk;
  const int64_t K = cfg.out_columns();
  const uint32_t masked_key = order_key(cfg.masked_score);
  std::vector<float> s(E), b(E), w(k);
  std::vector<uint32_t> keys(E);
  std::vector<char> kept(G, 1);
  TopK experts(k), groups(cfg.topk_group), group_members(cfg.group_score_topk);

  for (int64_t t = row_begin; t < row_end; ++t) {
    const T* row = logits + t * row_stride;
    for (int64_t e = 0; e < E; ++e) s[e] = static_cast<float>(row[e]);
    // 1. Scores, rounded to the dtype the unfused code stores them in.
    if (cfg.softmax) {
      softmax_inplace(s.data(), E);
    } else {
      sigmoid_inplace(s.data(), E);
    }
    if (cfg.score_rounding != Rounding::FP32) {
      for (int64_t e = 0; e < E; ++e) s[e] = round_to(s[e], cfg.score_rounding);
    }
    // 2. Selection keys of b = s + bias.
    if (cfg.has_bias) {
      for (int64_t e = 0; e < E; ++e) b[e] = round_to(s[e] + bias[e], cfg.selection_rounding);
      order_keys(b.data(), keys.data(), E);
    } else {
      order_keys(s.data(), keys.data(), E);
    }
    // 3. Group limit.
    if (cfg.groups_limit_choice()) {
      groups.reset();
      for (int64_t g = 0; g < G; ++g) {
        const float score = top_m_sum(&keys[g * P], P, cfg.group_score_topk, group_members);
        groups.offer(order_key(round_to(score, cfg.selection_rounding)), g);
        kept[g] = 0;
      }
      for (int64_t j = 0; j < cfg.topk_group; ++j) kept[groups.id(j)] = 1;
    }
    // 4. Expert top-k over the masked selection keys.
    experts.reset();
    for (int64_t g = 0, e = 0; g < G; ++g) {
      if (kept[g]) {
        for (int64_t end = e + P; e < end; ++e) experts.offer(keys[e], e);
      } else {
        for (int64_t end = e + P; e < end; ++e) experts.offer(masked_key, e);
      }
    }
    // 5. Weights from the unbiased scores.
    float sum = 0.0f;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = experts.id(j);
      w[j] = (cfg.weights_from_masked_scores && !kept[e / P]) ? cfg.masked_score : s[e];
      sum += w[j];
    }
    float denom = 1.0f;
    if (cfg.renormalize) {
      denom = round_to(round_to(sum, cfg.weight_rounding) + cfg.renormalize_eps, cfg.weight_rounding);
    }
    W* wrow = weights + t * K;
    I* irow = ids + t * K;
    for (int64_t j = 0; j < k; ++j) {
      const float v = cfg.renormalize ? round_to(w[j] / denom, cfg.weight_rounding) : w[j];
      wrow[j] = static_cast<W>(round_to(v * cfg.weight_scale, cfg.weight_rounding));
      irow[j] = static_cast<I>(experts.id(j));
    }
    for (int64_t j = 0; j < cfg.num_shared; ++j) {
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
  MOE_FUSION_CHECK(logits2d.device().is_cpu(), "moe_fused_gate: logits must be on the CPU for the CPU kernel");
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
