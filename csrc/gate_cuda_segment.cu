// Sub-warp CUDA kernel of moe_fusion::moe_fused_gate for the common configurations: float32
// arithmetic (no compute_dtype emulation), at most 512 experts, groups that map onto whole lanes.
//
// A segment of L lanes routes one token, so a warp routes 32/L tokens at once; lane i of a segment
// holds experts [i*V, (i+1)*V) in registers. The one-warp-per-token kernel (gate_cuda.cu) spends
// most of its instructions in cross-lane steps that serve a single token and was issue-bound at
// prefill sizes (benchmarks/RESULTS.md); here each such step spans log2(L) lanes and serves 32/L
// tokens, while the per-expert work per token stays the same.
//
// The warp's lanes stay converged: cross-lane steps are full-warp shuffles and ballots restricted
// to a segment by their width or a mask of the result (sync intrinsics with per-segment member
// masks would split the warp and run the segments one after another).
//
// Top-k: the k-th largest of the lanes' own top-2 keys is a lower bound of the k-th largest key
// (they are 2L actual keys), so the picks are among the keys at or above it. Those few candidates
// are compacted to shared memory and ranked exactly (key, then lower index); if more than
// kCandidatesPerLane * L keys reach the bound in any segment of the warp (ties, padding), k rounds
// of segment arg-max decide for the whole warp.
#include "dispatch.h"
#include "gate_cuda_common.cuh"

#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <type_traits>

namespace moe_fusion {
namespace {

using namespace gate_device;

constexpr int kCandidatesPerLane = 4;

struct SegmentArgs {
  const void* logits;
  int64_t row_stride;
  int64_t rows;
  const void* bias;
  bool bias_is_f32;
  bool vectorized;
  int lanes_per_group;  // lanes holding one expert group (a power of two <= L) when groups limit the choice
  void* weights;
  void* ids;
};

// Packed (key, index) with a larger value for the better expert: higher key, then lower index.
__device__ __forceinline__ uint64_t pack(uint32_t key, int e) {
  return (static_cast<uint64_t>(key) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(e));
}

__device__ __forceinline__ int unpack_expert(uint64_t packed) {
  return static_cast<int>(0xFFFFFFFFu - static_cast<uint32_t>(packed));
}

template <int L>
struct Segment {
  int lane;       // 0..L-1 inside the segment
  int base;       // warp lane of segment lane 0
  unsigned mask;  // the segment's lanes
};

// Lowest segment lane (0..L-1) whose `pred` holds.
template <int L>
__device__ __forceinline__ int first_lane(bool pred, const Segment<L>& seg) {
  return __ffs((__ballot_sync(kFull, pred) & seg.mask) >> seg.base) - 1;
}

template <int L>
__device__ __forceinline__ uint32_t segment_max(uint32_t v) {
#pragma unroll
  for (int off = L / 2; off > 0; off >>= 1) v = max(v, __shfl_xor_sync(kFull, v, off));
  return v;
}

// Picks by the lower bound of the file comment; false (nothing written) when a segment of the warp
// has too many candidates. Pick r goes to segment lane r % L, slot r / L.
template <int L, int V>
__device__ __forceinline__ bool topk_by_bound(const uint32_t (&key)[V], uint32_t top1, uint32_t top2,
                                              const Segment<L>& seg, int first, int k, uint64_t* candidates,
                                              int* slots, int& pick0, int& pick1) {
  uint32_t head = top1;
  bool popped_first = false;
  uint32_t bound = 0;
  for (int r = 0; r < k; ++r) {
    bound = segment_max<L>(head);
    if (seg.lane == first_lane<L>(head == bound, seg)) {
      head = popped_first ? kRemovedKey : top2;
      popped_first = true;
    }
  }
  bound = max(bound, 1u);  // never a padding key
  int count = 0;
#pragma unroll
  for (int j = 0; j < V; ++j) count += key[j] >= bound;
  int offset = count;  // inclusive prefix sum over the segment
#pragma unroll
  for (int d = 1; d < L; d <<= 1) {
    const int below = __shfl_up_sync(kFull, offset, d, L);
    if (seg.lane >= d) offset += below;
  }
  const int total = __shfl_sync(kFull, offset, L - 1, L);
  if (__any_sync(kFull, total > kCandidatesPerLane * L)) return false;
  offset -= count;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    if (key[j] >= bound) candidates[offset++] = pack(key[j], first + j);
  }
  __syncwarp();
  for (int i = seg.lane; i < total; i += L) {
    const uint64_t mine = candidates[i];
    int rank = 0;
    for (int j = 0; j < total; ++j) rank += candidates[j] > mine;
    if (rank < k) slots[rank] = unpack_expert(mine);
  }
  __syncwarp();
  pick0 = seg.lane < k ? slots[seg.lane] : -1;
  pick1 = seg.lane + L < k ? slots[seg.lane + L] : -1;
  __syncwarp();  // candidates and slots are rewritten for the next token
  return true;
}

// Picks by k rounds of segment arg-max: each lane caches its best key; the winner of a round
// removes it and finds its next best.
template <int L, int V>
__device__ __forceinline__ void topk_by_rounds(uint32_t (&key)[V], const Segment<L>& seg, int k, int& pick0,
                                               int& pick1) {
  uint32_t best = kRemovedKey;
  int best_j = 0;
#pragma unroll
  for (int j = 0; j < V; ++j)
    if (key[j] > best) best = key[j], best_j = j;
  for (int r = 0; r < k; ++r) {
    const uint32_t top = segment_max<L>(best);
    const int winner = first_lane<L>(best == top, seg);
    const int e = winner * V + __shfl_sync(kFull, best_j, winner, L);
    if (seg.lane == r % L) (r < L ? pick0 : pick1) = e;
    if (seg.lane == winner) {
      const int removed = best_j;
      best = kRemovedKey;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const uint32_t c = j == removed ? kRemovedKey : key[j];
        key[j] = c;
        if (c > best) best = c, best_j = j;
      }
    }
  }
}

template <typename T, int L, int V>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock, 2)
    segment_gate_kernel(const SegmentArgs args, const GateConfig cfg) {
  constexpr int kSegmentsPerWarp = kWarp / L;
  constexpr int kSegmentSmem = kCandidatesPerLane * L * sizeof(uint64_t) + 2 * L * sizeof(int);
  __shared__ __align__(16) unsigned char smem[kWarpsPerBlock * kSegmentsPerWarp * kSegmentSmem];

  const int E = static_cast<int>(cfg.num_experts);
  const int k = static_cast<int>(cfg.topk);
  const int K = static_cast<int>(cfg.out_columns());
  const int lane = threadIdx.x % kWarp;
  const int segment_in_block = threadIdx.x / L;
  Segment<L> seg;
  seg.lane = lane % L;
  seg.base = lane - seg.lane;
  seg.mask = L == kWarp ? kFull : ((1u << L) - 1u) << seg.base;
  const int first = seg.lane * V;
  const bool limit_groups = cfg.topk_group < cfg.num_groups;

  uint64_t* candidates = reinterpret_cast<uint64_t*>(smem + segment_in_block * kSegmentSmem);
  int* slots = reinterpret_cast<int*>(candidates + kCandidatesPerLane * L);

  // The bias lives in shared memory (float32, zero-padded to L*V): registers go to the prefetch.
  __shared__ __align__(16) float bias[L * V];
  for (int e = threadIdx.x; e < L * V; e += blockDim.x) {
    bias[e] = !cfg.has_bias || e >= E ? 0.0f
              : args.bias_is_f32      ? static_cast<const float*>(args.bias)[e]
                                      : to_float(static_cast<const T*>(args.bias)[e]);
  }
  __syncthreads();
  const uint32_t masked_key = order_key(cfg.masked_score);
  const T* logits = static_cast<const T*>(args.logits);
  // Segments of a warp take consecutive tokens; the warp strides over the rows. A segment past the
  // last row routes the last row again and stores nothing.
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const int64_t stride = warps * kSegmentsPerWarp;
  const int64_t last = args.rows - 1;
  int64_t t = (static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp) * kSegmentsPerWarp +
              lane / L;

  // The next token's logits are loaded while this one is routed.
  float next[V];
  load_chunk<T, V>(logits + min(t, last) * args.row_stride, first, E, args.vectorized, next);
  for (; t - lane / L <= last; t += stride) {
    const T* row = logits + min(t, last) * args.row_stride;
    float b[V];
#pragma unroll
    for (int j = 0; j < V; ++j) b[j] = next[j];
    if (t + stride - lane / L <= last) {
      load_chunk<T, V>(logits + min(t + stride, last) * args.row_stride, first, E, args.vectorized, next);
    }

    // 1. Selection scores (fast sigmoid: the picks' weights are recomputed exactly below).
    float row_max = 0.0f, row_total = 1.0f;
    if (cfg.softmax) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < V; ++j)
        if (first + j < E) mx = nan_max(mx, b[j]);
      row_max = lanes_nan_max<L>(mx);
      float part = 0.0f;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        b[j] = first + j < E ? expf(b[j] - row_max) : 0.0f;
        part += b[j];
      }
      row_total = lanes_sum<L>(part);
#pragma unroll
      for (int j = 0; j < V; ++j) b[j] = b[j] / row_total;
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) b[j] = __fdividef(1.0f, 1.0f + __expf(-b[j]));
    }
    uint32_t key[V];  // kRemovedKey = not an expert
    uint32_t top1 = kRemovedKey, top2 = kRemovedKey;  // this lane's two best keys
#pragma unroll
    for (int j = 0; j < V; ++j) {
      key[j] = first + j < E ? order_key(b[j] + bias[first + j]) : kRemovedKey;
      top2 = max(top2, min(top1, key[j]));
      top1 = max(top1, key[j]);
    }

    // 2. Group limit: the lanes of a group merge their top-2, the group's first lane competes for
    // the topk_group places (ties: the lower group), dropped groups' keys become the masked score.
    if (limit_groups) {
      const int Lg = args.lanes_per_group;
      uint32_t g1 = top1, g2 = top2;
      for (int off = 1; off < Lg; off <<= 1) {
        const uint32_t o1 = __shfl_xor_sync(kFull, g1, off);
        const uint32_t o2 = __shfl_xor_sync(kFull, g2, off);
        g2 = max(min(g1, o1), max(g2, o2));
        g1 = max(g1, o1);
      }
      const float score = cfg.group_score_topk == 1 ? key_value(g1) : key_value(g1) + key_value(g2);
      const bool leader = seg.lane % Lg == 0 && first < E;
      uint32_t candidate = leader ? order_key(score) : kRemovedKey;
      bool taken = false;
      for (int r = 0; r < cfg.topk_group; ++r) {
        const uint32_t best = segment_max<L>(candidate);
        if (seg.lane == first_lane<L>(candidate == best, seg)) candidate = kRemovedKey, taken = true;
      }
      if (!__shfl_sync(kFull, taken, seg.lane / Lg * Lg, L)) {
#pragma unroll
        for (int j = 0; j < V; ++j)
          if (first + j < E) key[j] = masked_key;
        top1 = top1 == kRemovedKey ? kRemovedKey : masked_key;
        top2 = top2 == kRemovedKey ? kRemovedKey : masked_key;
      }
    }

    // 3. Top-k.
    int pick0 = -1, pick1 = -1;
    if (!topk_by_bound<L, V>(key, top1, top2, seg, first, k, candidates, slots, pick0, pick1)) {
      topk_by_rounds<L, V>(key, seg, k, pick0, pick1);
    }

    // 4. Weights: the exact scores of the picks (their logits are still in L1), renormalised over
    // the routed picks, scaled, written once.
    auto weight_of = [&](int e) {
      if (e < 0) return 0.0f;
      const float x = to_float(row[e]);
      return cfg.softmax ? expf(x - row_max) / row_total : sigmoid_of(x);
    };
    const float w0 = weight_of(pick0);
    const float w1 = k > L ? weight_of(pick1) : 0.0f;
    const float denom = cfg.renormalize ? lanes_sum<L>(w0 + w1) + cfg.renormalize_eps : 1.0f;
    if (t <= last) {
      const int64_t out_row = t * K;
#pragma unroll
      for (int slot = 0; slot < 2; ++slot) {
        const int r = seg.lane + slot * L;
        if (r < k) {
          const float w = slot == 0 ? w0 : w1;
          store_weight(args.weights, out_row + r, (cfg.renormalize ? w / denom : w) * cfg.weight_scale,
                       cfg.weights_dtype);
          store_id(args.ids, out_row + r, slot == 0 ? pick0 : pick1, cfg.ids_int64);
        }
      }
      for (int j = seg.lane; j < cfg.num_shared; j += L) {
        store_weight(args.weights, out_row + k + j, cfg.shared_weight, cfg.weights_dtype);
        store_id(args.ids, out_row + k + j, E + j, cfg.ids_int64);
      }
    }
  }
}

// The segment shape (L lanes of V values) for `cfg`, or false when this kernel does not apply.
bool segment_shape(const GateConfig& cfg, int& L, int& V, int& lanes_per_group) {
  const bool fp32_arithmetic = cfg.score_rounding == Rounding::FP32 &&
                               cfg.selection_rounding == Rounding::FP32 && cfg.weight_rounding == Rounding::FP32;
  if (!fp32_arithmetic || cfg.weights_from_masked_scores || cfg.num_experts > 512) return false;
  L = cfg.num_experts <= 256 ? 8 : 16;
  V = 0;
  for (int v : {8, 16, 24, 32}) {  // multiples of the 16-byte vector width of every dtype
    if (static_cast<int64_t>(L) * v >= cfg.num_experts) {
      V = v;
      break;
    }
  }
  if (cfg.topk > 2 * L) return false;
  lanes_per_group = 1;
  if (cfg.groups_limit_choice()) {
    const int64_t P = cfg.group_size;
    if (P % V != 0 || cfg.group_score_topk > 2) return false;
    lanes_per_group = static_cast<int>(P / V);
    if ((lanes_per_group & (lanes_per_group - 1)) != 0 || lanes_per_group > L) return false;
  }
  return true;
}

template <typename T, int L, int V>
void launch(const SegmentArgs& args, const GateConfig& cfg, cudaStream_t stream) {
  auto kernel = segment_gate_kernel<T, L, V>;
  int blocks_per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kWarp * kWarpsPerBlock, 0));
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t tokens_per_block = kWarpsPerBlock * (kWarp / L);
  const int64_t needed = (args.rows + tokens_per_block - 1) / tokens_per_block;
  const int blocks = static_cast<int>(std::min<int64_t>(needed, static_cast<int64_t>(sms) * std::max(blocks_per_sm, 1)));
  kernel<<<blocks, kWarp * kWarpsPerBlock, 0, stream>>>(args, cfg);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_shape(int L, int V, const SegmentArgs& args, const GateConfig& cfg, cudaStream_t stream) {
  if (L == 8) {
    switch (V) {
      case 8: return launch<T, 8, 8>(args, cfg, stream);
      case 16: return launch<T, 8, 16>(args, cfg, stream);
      case 24: return launch<T, 8, 24>(args, cfg, stream);
      case 32: return launch<T, 8, 32>(args, cfg, stream);
    }
  } else if (V == 24) {
    return launch<T, 16, 24>(args, cfg, stream);
  } else if (V == 32) {
    return launch<T, 16, 32>(args, cfg, stream);
  }
  MOE_FUSION_CHECK(false, "moe_fused_gate: no segment kernel instantiated for ", L, " lanes of ", V, " values");
}

}  // namespace

bool launch_segment_gate(const at::Tensor& logits2d, const at::Tensor& bias, const GateConfig& cfg,
                         at::Tensor& weights2d, at::Tensor& ids2d, cudaStream_t stream) {
  int L = 0, V = 0, lanes_per_group = 1;
  if (!segment_shape(cfg, L, V, lanes_per_group)) return false;
  const int elem = static_cast<int>(logits2d.element_size());
  SegmentArgs args{};
  args.logits = logits2d.data_ptr();
  args.row_stride = logits2d.stride(0);
  args.rows = logits2d.size(0);
  args.bias = bias.defined() ? bias.data_ptr() : nullptr;
  args.bias_is_f32 = bias.defined() && bias.scalar_type() == at::kFloat;
  args.vectorized = cfg.num_experts % (16 / elem) == 0 && (args.row_stride * elem) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(args.logits) % 16 == 0;
  args.lanes_per_group = lanes_per_group;
  args.weights = weights2d.data_ptr();
  args.ids = ids2d.data_ptr();
  dispatch_float_dtype(logits2d.scalar_type(), "moe_fused_gate: logits", [&](auto tag) {
    using T = decltype(tag);
    using Native = std::conditional_t<std::is_same_v<T, c10::BFloat16>, __nv_bfloat16,
                                      std::conditional_t<std::is_same_v<T, c10::Half>, __half, float>>;
    launch_shape<Native>(L, V, args, cfg, stream);
  });
  return true;
}

}  // namespace moe_fusion
