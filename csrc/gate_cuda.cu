// CUDA kernels of moe_fusion::moe_fused_gate: the dispatch, and the warp kernel.
//
// gate_cuda() sends the common configurations to the segmented kernel
// (gate_cuda_segmented.cu, a few lanes per token) at every size; the warp kernel
// here takes every other configuration (compute_dtype emulation, group scores
// from the top m > 2, groups that do not tile lane chunks, rows that are not
// 16-byte aligned).
//
// One warp routes one token at a time (grid-stride over tokens, the next
// token's logits loaded while the current one is routed). Lane l holds experts
// [l*VPT, (l+1)*VPT) in registers, loaded with 16-byte vector loads. Every
// comparison goes through the 32-bit order key of gate_config.h, so a warp
// arg-max is one `redux.sync` max (sm_80+) plus a ballot: the lowest lane
// holding the maximum owns the lowest expert index, which gives the documented
// lowest-index tie-break without 64-bit shuffles.
//
// Group scores take the register path when each lane's chunk lies inside one
// group and a group spans a power-of-two number of lanes with m <= 2
// (DeepSeek-V3: P=32, VPT=8, 4 lanes a group): a butterfly over those lanes
// merges (top1, top2) pairs. Other layouts go through a per-warp shared-memory
// copy of the selection scores, one lane per group.
#include "dispatch.h"
#include "gate_cuda_common.cuh"
#include "gate_cuda_segmented.h"
#include "gate_op.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

namespace moe_fusion {
namespace {

constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ float warp_nan_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = nan_max(v, __shfl_xor_sync(kFull, v, off));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
}

// Loads lane's chunk [lane*VPT, lane*VPT+VPT) of a row; elements >= E read as 0.
template <typename T, int VPT>
__device__ __forceinline__ void load_chunk(const T* __restrict__ row, int lane, int E, bool vectorized,
                                           float (&v)[VPT]) {
  constexpr int kPerVec = 16 / sizeof(T);
  static_assert(VPT % kPerVec == 0, "VPT must be a multiple of the 16-byte vector width");
  const int first = lane * VPT;
  if (vectorized) {
#pragma unroll
    for (int i = 0; i < VPT / kPerVec; ++i) {
      const int e = first + i * kPerVec;
      if (e < E) {  // E % kPerVec == 0 on this path: a vector is all in or all out
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + e));
        const T* vals = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int j = 0; j < kPerVec; ++j) v[i * kPerVec + j] = to_float(vals[j]);
      } else {
#pragma unroll
        for (int j = 0; j < kPerVec; ++j) v[i * kPerVec + j] = 0.0f;
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < VPT; ++j) v[j] = (first + j < E) ? to_float(row[first + j]) : 0.0f;
  }
}

// Sum of the top-m of `vals[0..n)` (shared memory) in descending order, m >= 1.
__device__ float top_m_sum_smem(const float* vals, int n, int m) {
  // Repeatedly take the best (key, lowest index) strictly after the previous pick.
  uint64_t prev = ~0ull;
  float sum = 0.0f;
  for (int r = 0; r < m; ++r) {
    uint64_t best = 0;
    for (int i = 0; i < n; ++i) {
      const uint64_t c = (static_cast<uint64_t>(order_key(vals[i])) << 32) | (0xFFFFFFFFu - i);
      if (c < prev && c > best) best = c;
    }
    sum += vals[0xFFFFFFFFu - static_cast<uint32_t>(best)];
    prev = best;
  }
  return sum;
}

struct GateArgs {
  const void* logits;
  int64_t row_stride;
  int64_t rows;
  const void* bias;
  bool bias_is_f32;
  bool vectorized;
  bool group_registers;  // register path for group scores (see the file comment)
  int lanes_per_group;   // register path only
  int warp_smem_bytes;   // shared memory of one warp
  void* weights;
  void* ids;
};

// Candidates the threshold top-k ranks in shared memory before it falls back to rounds.
constexpr int kMaxCandidates = 64;

// Top-k for k <= 32 without k serial arg-max rounds over all keys. The k-th largest of the 32 lane
// maxima is at most the k-th largest key (the k lanes holding the largest maxima each own a key at
// least that large), so every pick is among the keys >= it. Those few candidates are compacted to
// shared memory and each is ranked against the others exactly (key, then lower index). Lane r gets
// pick r. Returns false (nothing written) when more than kMaxCandidates keys tie at the threshold.
template <int VPT>
__device__ __forceinline__ bool topk_by_threshold(const uint32_t (&key)[VPT], int lane, int first, int k,
                                                  uint64_t* candidates, int* slots, int& pick) {
  uint32_t remaining = 0;
#pragma unroll
  for (int j = 0; j < VPT; ++j) remaining = max(remaining, key[j]);
  uint32_t threshold = 0;
  for (int r = 0; r < k; ++r) {
    threshold = __reduce_max_sync(kFull, remaining);
    if (lane == __ffs(__ballot_sync(kFull, remaining == threshold)) - 1) remaining = kRemovedKey;
  }
  threshold = max(threshold, 1u);  // never a padding key
  int count = 0;
#pragma unroll
  for (int j = 0; j < VPT; ++j) count += key[j] >= threshold;
  int offset = count;  // inclusive prefix sum over lanes
#pragma unroll
  for (int d = 1; d < kWarp; d <<= 1) {
    const int below = __shfl_up_sync(kFull, offset, d);
    if (lane >= d) offset += below;
  }
  const int total = __shfl_sync(kFull, offset, kWarp - 1);
  if (total > kMaxCandidates) return false;
  offset -= count;
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    if (key[j] >= threshold) {
      candidates[offset++] = (static_cast<uint64_t>(key[j]) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(first + j));
    }
  }
  __syncwarp();
  for (int i = lane; i < total; i += kWarp) {
    const uint64_t mine = candidates[i];
    int rank = 0;
    for (int j = 0; j < total; ++j) rank += candidates[j] > mine;
    if (rank < k) slots[rank] = static_cast<int>(0xFFFFFFFFu - static_cast<uint32_t>(mine));
  }
  __syncwarp();
  pick = lane < k ? slots[lane] : -1;
  __syncwarp();  // candidates and slots are reused by the next token
  return true;
}

// Top-k by k rounds of warp arg-max (any k <= 64): each lane caches its best key; the winner of a
// round removes it and finds its next best. Pick r goes to lane r % 32, slot r / 32.
template <int VPT>
__device__ __forceinline__ void topk_by_rounds(uint32_t (&key)[VPT], int lane, int k, int& pick0, int& pick1) {
  uint32_t best = kRemovedKey;
  int best_j = 0;
#pragma unroll
  for (int j = 0; j < VPT; ++j)
    if (key[j] > best) best = key[j], best_j = j;
  for (int r = 0; r < k; ++r) {
    const uint32_t top = __reduce_max_sync(kFull, best);
    const int winner = __ffs(__ballot_sync(kFull, best == top)) - 1;
    const int e = winner * VPT + __shfl_sync(kFull, best_j, winner);
    if (lane == (r & (kWarp - 1))) {
      if (r < kWarp) {
        pick0 = e;
      } else {
        pick1 = e;
      }
    }
    if (lane == winner) {
      const int removed = best_j;
      best = kRemovedKey;
#pragma unroll
      for (int j = 0; j < VPT; ++j) {
        const uint32_t c = j == removed ? kRemovedKey : key[j];
        key[j] = c;
        if (c > best) best = c, best_j = j;
      }
    }
  }
}

template <typename T, int VPT>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock)
    moe_fused_gate_kernel(const GateArgs args, const GateConfig cfg) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int E = static_cast<int>(cfg.num_experts);
  const int G = static_cast<int>(cfg.num_groups);
  const int P = static_cast<int>(cfg.group_size);
  const int k = static_cast<int>(cfg.topk);
  const int K = static_cast<int>(cfg.out_columns());
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int first = lane * VPT;
  const bool limit_groups = cfg.topk_group < cfg.num_groups;

  // Shared memory of this warp: top-k candidates and slots, then (shared-memory group path only)
  // E selection scores and G group scores / kept flags.
  unsigned char* mine = smem + warp * args.warp_smem_bytes;
  uint64_t* candidates = reinterpret_cast<uint64_t*>(mine);
  int* slots = reinterpret_cast<int*>(candidates + kMaxCandidates);
  float* warp_sel = reinterpret_cast<float*>(slots + kWarp);
  float* warp_group = warp_sel + E;

  wait_for_preceding_kernels();
  let_next_kernel_launch();
  float bias[VPT];
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int e = first + j;
    bias[j] = !cfg.has_bias || e >= E ? 0.0f
              : args.bias_is_f32      ? static_cast<const float*>(args.bias)[e]
                                      : to_float(static_cast<const T*>(args.bias)[e]);
  }
  const uint32_t masked_key = order_key(cfg.masked_score);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const T* logits = static_cast<const T*>(args.logits);

  // The next token's logits are loaded while this one is routed.
  float next[VPT];
  int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t < args.rows) load_chunk<T, VPT>(logits + t * args.row_stride, lane, E, args.vectorized, next);
  for (; t < args.rows; t += stride) {
    const T* row = logits + t * args.row_stride;
    float b[VPT];
#pragma unroll
    for (int j = 0; j < VPT; ++j) b[j] = next[j];
    if (t + stride < args.rows) load_chunk<T, VPT>(row + stride * args.row_stride, lane, E, args.vectorized, next);

    // 1. Selection scores. Sigmoid uses the fast exp and reciprocal here (a few ulps, like the
    // fused sigmoid of torch.compile's Triton code); the weights of the picks are recomputed exactly.
    float row_max = 0.0f, row_total = 1.0f;
    if (cfg.softmax) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < VPT; ++j)
        if (first + j < E) mx = nan_max(mx, b[j]);
      row_max = warp_nan_max(mx);
      float part = 0.0f;
#pragma unroll
      for (int j = 0; j < VPT; ++j) {
        b[j] = first + j < E ? expf(b[j] - row_max) : 0.0f;
        part += b[j];
      }
      row_total = warp_sum(part);
#pragma unroll
      for (int j = 0; j < VPT; ++j) b[j] = b[j] / row_total;
    } else {
#pragma unroll
      for (int j = 0; j < VPT; ++j) b[j] = __fdividef(1.0f, 1.0f + __expf(-b[j]));
    }
    if (cfg.score_rounding != Rounding::FP32) {
#pragma unroll
      for (int j = 0; j < VPT; ++j) b[j] = round_to(b[j], cfg.score_rounding);
    }
    if (cfg.has_bias) {
#pragma unroll
      for (int j = 0; j < VPT; ++j) b[j] = round_to(b[j] + bias[j], cfg.selection_rounding);
    }
    uint32_t key[VPT];  // 0 = not an expert
#pragma unroll
    for (int j = 0; j < VPT; ++j) key[j] = first + j < E ? order_key(b[j]) : kRemovedKey;

    // 2. Group limit: `kept_lane` (register path) or warp_group[g] (shared-memory path).
    bool kept_lane = true;
    if (limit_groups && args.group_registers) {
      const int L = args.lanes_per_group;
      uint32_t top1 = 0, top2 = 0;
#pragma unroll
      for (int j = 0; j < VPT; ++j) {
        top2 = max(top2, min(top1, key[j]));
        top1 = max(top1, key[j]);
      }
      for (int off = 1; off < L; off <<= 1) {
        const uint32_t o1 = __shfl_xor_sync(kFull, top1, off);
        const uint32_t o2 = __shfl_xor_sync(kFull, top2, off);
        top2 = max(min(top1, o1), max(top2, o2));
        top1 = max(top1, o1);
      }
      const float score = cfg.group_score_topk == 1 ? key_value(top1) : key_value(top1) + key_value(top2);
      const bool leader = (lane % L == 0) && first < E;
      uint32_t candidate = leader ? order_key(round_to(score, cfg.selection_rounding)) : kRemovedKey;
      bool taken = false;
      for (int r = 0; r < cfg.topk_group; ++r) {
        const uint32_t best = __reduce_max_sync(kFull, candidate);
        const int winner = __ffs(__ballot_sync(kFull, candidate == best)) - 1;
        if (lane == winner) candidate = kRemovedKey, taken = true;
      }
      kept_lane = __shfl_sync(kFull, taken, (lane / L) * L);
      if (!kept_lane) {
#pragma unroll
        for (int j = 0; j < VPT; ++j)
          if (first + j < E) key[j] = masked_key;
      }
    } else if (limit_groups) {
#pragma unroll
      for (int j = 0; j < VPT; ++j)
        if (first + j < E) warp_sel[first + j] = key_value(key[j]);
      __syncwarp();
      for (int g = lane; g < G; g += kWarp) {
        warp_group[g] = round_to(top_m_sum_smem(warp_sel + g * P, P, static_cast<int>(cfg.group_score_topk)),
                                 cfg.selection_rounding);
      }
      // Pick topk_group groups: the max key, then the lowest group index among lanes holding it.
      uint32_t taken_bits = 0;  // bit i: group lane + 32 * i taken (G <= 1024 on CUDA)
      for (int r = 0; r < cfg.topk_group; ++r) {
        uint32_t best_key = 0;
        int best_g = G;
        for (int i = 0, g = lane; g < G; ++i, g += kWarp) {
          const uint32_t c = (taken_bits >> i) & 1u ? kRemovedKey : order_key(warp_group[g]);
          if (c > best_key) best_key = c, best_g = g;
        }
        const uint32_t top = __reduce_max_sync(kFull, best_key);
        const int g_win = static_cast<int>(__reduce_min_sync(kFull, best_key == top ? best_g : G));
        if (g_win % kWarp == lane) taken_bits |= 1u << (g_win / kWarp);
      }
      __syncwarp();
      for (int i = 0, g = lane; g < G; ++i, g += kWarp) warp_group[g] = ((taken_bits >> i) & 1u) ? 1.0f : 0.0f;
      __syncwarp();
#pragma unroll
      for (int j = 0; j < VPT; ++j)
        if (first + j < E && warp_group[(first + j) / P] == 0.0f) key[j] = masked_key;
    }

    // 3. Top-k: lane r holds pick r (pick0) and pick r + 32 (pick1), -1 when there is none.
    int pick0 = -1, pick1 = -1;
    if (k > kWarp || !topk_by_threshold<VPT>(key, lane, first, k, candidates, slots, pick0)) {
      topk_by_rounds<VPT>(key, lane, k, pick0, pick1);
    }

    // 4. Weights: the exact scores of the picks (their logits are still in L1), renormalised over
    // the routed picks, scaled, written once.
    auto weight_of = [&](int e, bool kept) {
      if (e < 0) return 0.0f;
      const float x = to_float(row[e]);
      float w = round_to(cfg.softmax ? expf(x - row_max) / row_total : sigmoid_of(x), cfg.score_rounding);
      return cfg.weights_from_masked_scores && !kept ? cfg.masked_score : w;
    };
    auto kept_of = [&](int e) {  // collective on the register path
      if (!limit_groups) return true;
      if (args.group_registers) return static_cast<bool>(__shfl_sync(kFull, kept_lane, max(e, 0) / VPT));
      return e < 0 || warp_group[e / P] != 0.0f;
    };
    const float w0 = weight_of(pick0, kept_of(pick0));
    const float w1 = k > kWarp ? weight_of(pick1, kept_of(pick1)) : 0.0f;
    float denom = 1.0f;
    if (cfg.renormalize) {
      denom = round_to(round_to(warp_sum(w0 + w1), cfg.weight_rounding) + cfg.renormalize_eps, cfg.weight_rounding);
    }
    const int64_t out_row = t * K;
#pragma unroll
    for (int slot = 0; slot < 2; ++slot) {
      const int r = lane + slot * kWarp;
      if (r < k) {
        float w = slot == 0 ? w0 : w1;
        w = cfg.renormalize ? round_to(w / denom, cfg.weight_rounding) : w;
        w = round_to(w * cfg.weight_scale, cfg.weight_rounding);
        store_weight(args.weights, out_row + r, w, cfg.weights_dtype);
        store_id(args.ids, out_row + r, slot == 0 ? pick0 : pick1, cfg.ids_int64);
      }
    }
    for (int j = lane; j < cfg.num_shared; j += kWarp) {
      store_weight(args.weights, out_row + k + j, cfg.shared_weight, cfg.weights_dtype);
      store_id(args.ids, out_row + k + j, E + j, cfg.ids_int64);
    }
    __syncwarp();  // this warp's shared memory is rewritten for the next token
  }
}

template <typename T, int VPT>
void launch(const GateArgs& args, const GateConfig& cfg, size_t smem_bytes, cudaStream_t stream) {
  auto kernel = moe_fused_gate_kernel<T, VPT>;
  if (smem_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_bytes)));
  }
  int blocks_per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kWarp * kWarpsPerBlock,
                                                               smem_bytes));
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t needed = (args.rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int blocks = static_cast<int>(std::min<int64_t>(needed, static_cast<int64_t>(sms) * std::max(blocks_per_sm, 1)));
  launch_after_preceding_kernel(kernel, blocks, kWarp * kWarpsPerBlock, smem_bytes, stream, device, args, cfg);
}

// Values per lane: the smallest multiple of the 16-byte vector width covering
// E experts in 32 lanes, from the instantiated set.
template <typename T>
int values_per_lane(int64_t E) {
  constexpr int kPerVec = 16 / sizeof(T);
  const int64_t needed = (E + kWarp - 1) / kWarp;
  for (int multiple : {1, 2, 3, 4, 6, 8}) {
    if (needed <= multiple * kPerVec) return multiple * kPerVec;
  }
  MOE_FUSION_CHECK(false, "moe_fused_gate: unreachable: E <= 1024 is checked before");
}

template <typename T>
void launch_with_width(int vpt, const GateArgs& args, const GateConfig& cfg, size_t smem, cudaStream_t stream) {
  switch (vpt) {
    case 4: if constexpr (sizeof(T) == 4) return launch<T, 4>(args, cfg, smem, stream); break;
    case 8: return launch<T, 8>(args, cfg, smem, stream);
    case 12: if constexpr (sizeof(T) == 4) return launch<T, 12>(args, cfg, smem, stream); break;
    case 16: return launch<T, 16>(args, cfg, smem, stream);
    case 24: return launch<T, 24>(args, cfg, smem, stream);
    case 32: return launch<T, 32>(args, cfg, smem, stream);
    default: break;
  }
  MOE_FUSION_CHECK(false, "moe_fused_gate: no kernel instantiated for ", vpt, " values per lane");
}

void gate_cuda(const at::Tensor& logits2d, const at::Tensor& bias, const GateConfig& cfg, at::Tensor& weights2d,
               at::Tensor& ids2d) {
  MOE_FUSION_CHECK(logits2d.is_cuda(), "moe_fused_gate: logits must be a CUDA tensor for the CUDA kernel");
  MOE_FUSION_CHECK(cfg.num_experts <= 1024, "moe_fused_gate: on CUDA the number of experts logits.size(-1) must be <= 1024, got ",
                    cfg.num_experts);
  const c10::cuda::CUDAGuard guard(logits2d.device());
  // MOE_FUSION_GATE_KERNEL: unset or "auto" (the segmented kernel where it applies, at every size: on
  // an H100 it was faster than the warp kernel from 8192 tokens, and at T = 1, 64 and 4096 in 20 of
  // 24 configuration, dtype and size points; benchmarks/RESULTS.md), "warp" (this file's kernel
  // always), "segmented" (an error where it does not apply): the last two for tests and benchmarks.
  const char* env = std::getenv("MOE_FUSION_GATE_KERNEL");
  const std::string choice = env == nullptr || *env == '\0' ? "auto" : env;
  MOE_FUSION_CHECK(choice == "auto" || choice == "warp" || choice == "segmented",
                    "moe_fused_gate: MOE_FUSION_GATE_KERNEL must be auto, warp or segmented, got '", choice, "'");
  if (choice != "warp") {
    const char* refusal = gate_cuda_segmented(logits2d, bias, cfg, weights2d, ids2d);
    if (refusal == nullptr) return;
    MOE_FUSION_CHECK(choice == "auto", "moe_fused_gate: MOE_FUSION_GATE_KERNEL=segmented, but the segmented kernel "
                     "does not take this call: ", refusal);
  }
  const int64_t E = cfg.num_experts, G = cfg.num_groups, P = cfg.group_size;
  const int elem = static_cast<int>(logits2d.element_size());
  const int per_vec = 16 / elem;

  GateArgs args{};
  args.logits = logits2d.data_ptr();
  args.row_stride = logits2d.stride(0);
  args.rows = logits2d.size(0);
  args.bias = bias.defined() ? bias.data_ptr() : nullptr;
  args.bias_is_f32 = bias.defined() && bias.scalar_type() == at::kFloat;
  args.vectorized = E % per_vec == 0 && (args.row_stride * elem) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(args.logits) % 16 == 0;
  args.weights = weights2d.data_ptr();
  args.ids = ids2d.data_ptr();

  const int vpt = elem == 4 ? values_per_lane<float>(E) : values_per_lane<__half>(E);
  const int64_t lanes_per_group = P / vpt;
  args.group_registers = P % vpt == 0 && lanes_per_group >= 1 && lanes_per_group <= kWarp &&
                         (lanes_per_group & (lanes_per_group - 1)) == 0 && cfg.group_score_topk <= 2;
  args.lanes_per_group = static_cast<int>(std::max<int64_t>(lanes_per_group, 1));

  const bool smem_groups = cfg.groups_limit_choice() && !args.group_registers;
  const size_t topk_bytes = kMaxCandidates * sizeof(uint64_t) + kWarp * sizeof(int);
  args.warp_smem_bytes = static_cast<int>(topk_bytes + (smem_groups ? sizeof(float) * (E + G) : 0) + 15) / 16 * 16;
  const size_t smem = static_cast<size_t>(args.warp_smem_bytes) * kWarpsPerBlock;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_dtype(logits2d.scalar_type(), "moe_fused_gate: logits", [&](auto tag) {
    using T = decltype(tag);
    using Native = std::conditional_t<std::is_same_v<T, c10::BFloat16>, __nv_bfloat16,
                                      std::conditional_t<std::is_same_v<T, c10::Half>, __half, float>>;
    launch_with_width<Native>(vpt, args, cfg, smem, stream);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_fusion, CUDA, m) {
  m.impl("moe_fused_gate", &gate_functional<gate_cuda>);
  m.impl("moe_fused_gate.out", &gate_out<gate_cuda>);
}

}  // namespace moe_fusion
