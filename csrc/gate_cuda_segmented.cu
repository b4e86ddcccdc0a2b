// The fast CUDA kernel of moe_fusion::moe_fused_gate: L lanes route one token.
//
// Why: with a whole warp per token (gate_cuda.cu) every cross-lane step of the
// routing (group scores, group choice, top-k, renormalisation) costs all 32
// lanes an instruction for one token, about 1000 warp instructions per token;
// the memory floor of an H100/H200 leaves about 250 (fp32) or 130 (bf16). Here a
// segment of L = 8, 16 or 32 lanes routes one token (32/L tokens per warp), each
// lane holding C consecutive experts, so that the cross-lane steps serve 32/L
// tokens at once and most of the work is per element.
//
// Data path: each warp streams its tokens through a ring of 2 or 3 shared-memory
// stages with cp.async (16-byte pieces, a segment's lanes copying consecutive
// pieces); lane chunks are padded to an odd number of 16-byte units so that the
// vector reads of a chunk per lane are free of bank conflicts.
//
// Top-k without k rounds of arg-max: every lane knows the two best selection
// scores of its chunk (they give the group scores too). If the r = ceil(k/2)
// kept lanes with the largest second-best scores have second-best >= tau, those
// lanes own 2r >= k distinct experts >= tau, so every pick is >= tau. The few
// kept experts >= tau are compacted to shared memory in expert order and each is
// ranked exactly (score, then lower index). A token whose candidates overflow,
// that has NaN scores, or whose masked experts could tie or beat tau, sends its
// warp to exact rounds of segmented arg-max over the same registers, so the
// kernel is exact on every input, not only on the common ones.
//
// Candidates are listed from the registers of the scoring pass, so tau, the
// group scores and the ranking all see the same bits. Supported: fp32
// arithmetic (no compute_dtype emulation), group scores from the top 1 or 2,
// groups of a power-of-two number of lanes, rows that are 16-byte aligned;
// other configurations go to the warp kernel.
#include "dispatch.h"
#include "gate_cuda_common.cuh"
#include "gate_cuda_segmented.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <climits>
#include <type_traits>

namespace moe_fusion {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kBlockThreads = kWarp * kWarpsPerBlock;
constexpr int kBlocksPerSm = 4;  // the register budget's limit (__launch_bounds__ below)
// Shared memory a block may use for kBlocksPerSm of them to fit an H100/H200 SM (228 KB, 1 KB of it
// reserved per block).
constexpr int kBlockSmemBudget = 228 * 1024 / kBlocksPerSm - 1024;
constexpr int kMaxTopk = 64;     // the op's limit on topk
// Below this many tokens the layout with the most lanes per token wins (shorter serial chains).
constexpr int64_t kFewTokens = 2048;

// A chunk padded to an odd number of 16-byte units: 8 lanes reading unit u of
// their chunks touch 8 distinct groups of 4 banks.
__host__ __device__ constexpr int padded_chunk_bytes(int bytes) { return (bytes / 16) % 2 == 0 ? bytes + 16 : bytes; }

template <typename T, int C, int L>
struct Layout {
  static_assert(C * sizeof(T) % 16 == 0, "a lane's chunk must be whole 16-byte units");
  static_assert(C <= 32 && kWarp % L == 0, "C <= 32 (one bit a value) and L divides the warp");
  static constexpr int kTokensPerWarp = kWarp / L;
  static constexpr int kPerUnit = 16 / sizeof(T);
  static constexpr int kUnits = C / kPerUnit;
  static constexpr int kChunkBytes = padded_chunk_bytes(C * sizeof(T));
  static constexpr int kRowBytes = L * kChunkBytes;
  static constexpr int kStageBytes = kTokensPerWarp * kRowBytes;
  static constexpr int kBiasChunkFloats = padded_chunk_bytes(C * 4) / 4;
  static constexpr int kBiasBytes = L * kBiasChunkFloats * 4;
  // Candidates a token may list; more send the warp to the exact rounds. With 16 or 32 lanes a
  // token, tau comes from more (so shallower) chunks and lists more: 64 covers k = 22 of 512.
  static constexpr int kCandidates = L == 8 ? 32 : 64;
  static constexpr int kCandidateBytes = kTokensPerWarp * kCandidates * 8;  // score + expert index
  static constexpr int kSlotBytes = kTokensPerWarp * kMaxTopk * 4;
  static constexpr int block_bytes(int stages) {
    return kBiasBytes + kWarpsPerBlock * (stages * kStageBytes + kCandidateBytes + kSlotBytes);
  }
  // Three stages of the copy ring where kBlocksPerSm blocks still fit, else two (fp32 rows of 256 or
  // 512 experts): warps in flight over prefetch depth.
  static constexpr int kStages = block_bytes(3) <= kBlockSmemBudget ? 3 : 2;
  static constexpr int kWarpBytes = (block_bytes(kStages) - kBiasBytes) / kWarpsPerBlock;
  static constexpr int kBlockBytes = block_bytes(kStages);
  static constexpr int kPickRounds = (kMaxTopk + L - 1) / L;
};

__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float rcp_approx(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
// NaN-propagating min/max (sm_80+): a NaN score reaches the lane's best two.
__device__ __forceinline__ float max_nan(float a, float b) {
  float y;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));
  return y;
}
__device__ __forceinline__ float min_nan(float a, float b) {
  float y;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));
  return y;
}

// Selection score before the bias. Sigmoid with the approximate exp2 and reciprocal (a few ulps,
// like the fused sigmoid of torch.compile's code; pick weights are recomputed exactly); softmax
// exactly.
__device__ __forceinline__ float selection_score(float x, bool softmax, float row_max, float row_total) {
  if (softmax) return __fdiv_rn(expf(__fsub_rn(x, row_max)), row_total);
  return rcp_approx(__fadd_rn(1.0f, ex2_approx(__fmul_rn(x, -1.4426950408889634f))));
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(addr), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending));
}

// Butterflies inside a segment of L lanes: both lanes of a pair compute the same (commutative)
// result, so every lane of the segment ends with the same bits.
template <int L>
__device__ __forceinline__ float segment_sum(float v) {
#pragma unroll
  for (int off = 1; off < L; off <<= 1) v = __fadd_rn(v, __shfl_xor_sync(kFull, v, off));
  return v;
}
template <int L>
__device__ __forceinline__ float segment_max_nan(float v) {
#pragma unroll
  for (int off = 1; off < L; off <<= 1) v = max_nan(v, __shfl_xor_sync(kFull, v, off));
  return v;
}

template <typename T>
__device__ __forceinline__ T negative_infinity() {
  if constexpr (std::is_same_v<T, float>) {
    return -INFINITY;
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(-INFINITY);
  } else {
    return __float2half_rn(-INFINITY);
  }
}

struct SegmentedArgs {
  const void* logits;
  int64_t row_stride;
  int64_t rows;
  const void* bias;
  bool bias_is_f32;
  int lanes_per_group;  // lanes holding one group (when groups limit the choice)
  void* weights;
  void* ids;
};

template <typename T, int C, int L>
__global__ void __launch_bounds__(kBlockThreads, kBlocksPerSm)
    segmented_gate_kernel(const SegmentedArgs args, const GateConfig cfg) {
  using Lay = Layout<T, C, L>;
  constexpr int kTpw = Lay::kTokensPerWarp;
  constexpr int kStages = Lay::kStages;
  extern __shared__ __align__(16) unsigned char smem[];
  const int E = static_cast<int>(cfg.num_experts);
  const int k = static_cast<int>(cfg.topk);
  const int K = static_cast<int>(cfg.out_columns());
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int seg = lane / L;  // this lane's token within the warp
  const int l = lane % L;    // lane within the token's segment
  const int first = l * C;   // first expert of this lane's chunk
  const bool limit_groups = cfg.topk_group < cfg.num_groups;
  const int nvalid = min(max(E - first, 0), C);
  const uint32_t valid_bits = nvalid >= 32 ? kFull : (1u << nvalid) - 1u;

  float* bias_s = reinterpret_cast<float*>(smem);
  unsigned char* warp_s = smem + Lay::kBiasBytes + warp * Lay::kWarpBytes;
  unsigned char* after_stages = warp_s + kStages * Lay::kStageBytes;
  float* cand_score = reinterpret_cast<float*>(after_stages) + seg * Lay::kCandidates;
  int* cand_expert = reinterpret_cast<int*>(after_stages + kTpw * Lay::kCandidates * 4) + seg * Lay::kCandidates;
  int* slots = reinterpret_cast<int*>(after_stages + Lay::kCandidateBytes) + seg * kMaxTopk;

  const int64_t total_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const int64_t warp_id = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  const int row_pieces = E * static_cast<int>(sizeof(T)) / 16;
  const int64_t token_stride = total_warps * kTpw;  // tokens between a warp's iterations
  // Copies this segment's token of the iteration starting at token `base` into `stage`; always
  // commits a group.
  auto issue = [&](int64_t base, int stage) {
    const int64_t t = base + seg;
    if (t < args.rows) {
      const char* src = static_cast<const char*>(args.logits) + t * args.row_stride * static_cast<int64_t>(sizeof(T));
      unsigned char* dst = warp_s + stage * Lay::kStageBytes + seg * Lay::kRowBytes;
#pragma unroll
      for (int i = 0; i < Lay::kUnits; ++i) {
        const int p = i * L + l;  // the segment's lanes copy L consecutive pieces
        if (p < row_pieces) cp_async16(dst + (p / Lay::kUnits) * Lay::kChunkBytes + (p % Lay::kUnits) * 16, src + p * 16);
      }
    }
    cp_async_commit();
  };

  wait_for_preceding_kernels();
  let_next_kernel_launch();
  // The first stages' copies fly while the bias and the padding are set up.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue((warp_id + s * total_warps) * kTpw, s);
  // The bias in fp32 in the chunk layout: 0 without a bias, -inf for the padding experts >= E.
  // Every load is issued before the first store: a loop that stored each value before loading the
  // next paid one memory latency per pass, in series, which at small T is the kernel's critical path.
  constexpr int kBiasPerThread = (L * C + kBlockThreads - 1) / kBlockThreads;
  float bias_r[kBiasPerThread];
#pragma unroll
  for (int i = 0; i < kBiasPerThread; ++i) {
    const int e = threadIdx.x + i * kBlockThreads;
    bias_r[i] = e >= E           ? -INFINITY
                : !cfg.has_bias  ? 0.0f
                : args.bias_is_f32 ? static_cast<const float*>(args.bias)[e]
                                   : to_float(static_cast<const T*>(args.bias)[e]);
  }
#pragma unroll
  for (int i = 0; i < kBiasPerThread; ++i) {
    const int e = threadIdx.x + i * kBlockThreads;
    if (e < L * C) bias_s[(e / C) * Lay::kBiasChunkFloats + e % C] = bias_r[i];
  }
  // Padding experts read as -inf logits in every stage row (cp.async never writes them), so
  // their selection scores are -inf (sigmoid 0 or softmax 0, plus the -inf bias).
  const int pad = L * C - E;
  for (int i = lane; i < kStages * kTpw * pad; i += kWarp) {
    const int row = i / pad, e = E + i % pad;
    reinterpret_cast<T*>(warp_s + row * Lay::kRowBytes + (e / C) * Lay::kChunkBytes)[e % C] = negative_infinity<T>();
  }
  __syncthreads();

  int stage = 0;
  for (int64_t base = warp_id * kTpw; base < args.rows; base += token_stride, stage = stage + 1 == kStages ? 0 : stage + 1) {
    issue(base + (kStages - 1) * token_stride, stage == 0 ? kStages - 1 : stage - 1);
    cp_async_wait<kStages - 1>();
    __syncwarp();
    const int64_t t = base + seg;
    const bool active = t < args.rows;
    const unsigned char* row_s = warp_s + stage * Lay::kStageBytes + seg * Lay::kRowBytes;
    const T* chunk = reinterpret_cast<const T*>(row_s + l * Lay::kChunkBytes);
    const float* bias_chunk = bias_s + l * Lay::kBiasChunkFloats;

    // 1. Selection scores v = score + bias of this lane's chunk.
    float v[C];
#pragma unroll
    for (int u = 0; u < Lay::kUnits; ++u) {
      const uint4 raw = *reinterpret_cast<const uint4*>(chunk + u * Lay::kPerUnit);
      const T* vals = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int q = 0; q < Lay::kPerUnit; ++q) v[u * Lay::kPerUnit + q] = to_float(vals[q]);
    }
    float row_max = 0.0f, row_total = 1.0f;
    if (cfg.softmax) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < C; ++j) mx = max_nan(mx, v[j]);
      row_max = segment_max_nan<L>(mx);
      float part = 0.0f;
#pragma unroll
      for (int j = 0; j < C; ++j) part = __fadd_rn(part, expf(__fsub_rn(v[j], row_max)));
      row_total = segment_sum<L>(part);
    }
#pragma unroll
    for (int j = 0; j < C; j += 4) {
      const float4 b = *reinterpret_cast<const float4*>(bias_chunk + j);
      v[j] = __fadd_rn(selection_score(v[j], cfg.softmax, row_max, row_total), b.x);
      v[j + 1] = __fadd_rn(selection_score(v[j + 1], cfg.softmax, row_max, row_total), b.y);
      v[j + 2] = __fadd_rn(selection_score(v[j + 2], cfg.softmax, row_max, row_total), b.z);
      v[j + 3] = __fadd_rn(selection_score(v[j + 3], cfg.softmax, row_max, row_total), b.w);
    }

    // 2. The chunk's best two (NaN-propagating: a NaN reaches both).
    float top1 = -INFINITY, top2 = -INFINITY;
#pragma unroll
    for (int j = 0; j < C; ++j) {
      top2 = max_nan(top2, min_nan(top1, v[j]));
      top1 = max_nan(top1, v[j]);
    }

    // 3. Group limit: merge the best two over the group's lanes, rank the group among the groups.
    bool kept = true;
    if (limit_groups) {
      const int n = args.lanes_per_group;
      float g1 = top1, g2 = top2;
#pragma unroll
      for (int off = 1; off < L; off <<= 1) {
        if (off < n) {
          const float o1 = __shfl_xor_sync(kFull, g1, off), o2 = __shfl_xor_sync(kFull, g2, off);
          g2 = max_nan(min_nan(g1, o1), max_nan(g2, o2));
          g1 = max_nan(g1, o1);
        }
      }
      const uint32_t key = order_key(cfg.group_score_topk == 1 ? g1 : __fadd_rn(g1, g2));
      // Every lane of a group holds its key, so counting the lanes of the groups ahead of this one
      // (higher score, or equal with a lower index) counts each such group n times. One shuffle per
      // other lane of the segment, independent of each other and free of branches: at small T (32
      // lanes a token) they issue back to back, where a shuffle per group behind a test of the
      // run-time group count went one after the other.
      const int group_first_lane = l & ~(n - 1);
      int better = 0;
#pragma unroll
      for (int o = 1; o < L; ++o) {
        const int q = (l + o) & (L - 1);
        const uint32_t other = __shfl_sync(kFull, key, q, L);
        better += other > key || (other == key && q < group_first_lane);
      }
      kept = better < cfg.topk_group * n;
    }

    // 4. tau: the r-th largest second-best among kept lanes (ties: lower lane).
    const int r = (k + 1) / 2;
    const uint32_t key2 = kept ? order_key(top2) : kRemovedKey;
    int above = 0;
#pragma unroll
    for (int o = 1; o < L; ++o) {
      const int q = (l + o) & (L - 1);
      const uint32_t other = __shfl_sync(kFull, key2, q, L);
      above += other > key2 || (other == key2 && q < l);
    }
    const unsigned segment_lanes = L == kWarp ? kFull : ((1u << L) - 1u) << (seg * L);
    const unsigned holders = __ballot_sync(kFull, kept && above == r - 1) & segment_lanes;
    const float holder_top2 = __shfl_sync(kFull, top2, holders ? __ffs(holders) - 1 : lane);
    const float tau = holders ? holder_top2 : -INFINITY;

    // 5. Candidates: kept experts >= tau, counted per lane, offsets in expert order.
    uint32_t mask = 0;
#pragma unroll
    for (int j = 0; j < C; ++j) mask |= (v[j] >= tau ? 1u : 0u) << j;
    mask = kept ? mask & valid_bits : 0u;
    const int count = __popc(mask);
    int inclusive = count;
#pragma unroll
    for (int d = 1; d < L; d <<= 1) {
      const int below = __shfl_up_sync(kFull, inclusive, d, L);
      if (l >= d) inclusive += below;
    }
    const int total = __shfl_sync(kFull, inclusive, L - 1, L);
    const bool exact_rounds = (kept && top2 != top2) || total > Lay::kCandidates ||
                              (limit_groups && cfg.masked_score >= tau);

    if (!__any_sync(kFull, active && exact_rounds)) {
      // Active tokens have total <= Lay::kCandidates here; a segment past the last token holds stale
      // scores and lists nothing. The list is padded with -inf to whole float4s.
      const int listed = active ? total : 0;
      const int padded = (listed + 3) & ~3;
      if (active) {
        int offset = inclusive - count;
#pragma unroll
        for (int j = 0; j < C; ++j) {
          if ((mask >> j) & 1u) {
            cand_score[offset] = v[j];
            cand_expert[offset] = first + j;
            ++offset;
          }
        }
      }
      if (l < padded - listed) cand_score[listed + l] = -INFINITY;
      __syncwarp();
      // Rank of each candidate: the candidates above it, and the equal ones before it in the list
      // (the list is in expert order, so "before" is "lower index"). Ties are rare: counted
      // apart, they cost a second pass only when they happen.
      const float4* quads = reinterpret_cast<const float4*>(cand_score);
      for (int i = l; i < listed; i += L) {
        const float mine = cand_score[i];
        int greater = 0, at_least = 0;
        for (int q = 0; q < padded / 4; ++q) {
          const float4 s = quads[q];
          greater += (s.x > mine) + (s.y > mine) + (s.z > mine) + (s.w > mine);
          at_least += (s.x >= mine) + (s.y >= mine) + (s.z >= mine) + (s.w >= mine);
        }
        int rank = greater;
        if (at_least != greater + 1) {
          rank = 0;
          for (int q = 0; q < i; ++q) rank += cand_score[q] >= mine;
          for (int q = i + 1; q < listed; ++q) rank += cand_score[q] > mine;
        }
        if (rank < k) slots[rank] = cand_expert[i];
      }
    } else {
      // Exact rounds of segmented arg-max over every expert (masked ones at masked_score).
      const uint32_t masked_key = order_key(cfg.masked_score);
      uint32_t removed = ~valid_bits;
      for (int round = 0; round < k; ++round) {
        uint32_t best = kRemovedKey;
        int best_j = 0;
#pragma unroll
        for (int j = 0; j < C; ++j) {
          const uint32_t key = (removed >> j) & 1u ? kRemovedKey : (kept ? order_key(v[j]) : masked_key);
          if (key > best) best = key, best_j = j;
        }
        int expert = best == kRemovedKey ? INT_MAX : first + best_j;
#pragma unroll
        for (int off = 1; off < L; off <<= 1) {
          const uint32_t other = __shfl_xor_sync(kFull, best, off);
          const int other_expert = __shfl_xor_sync(kFull, expert, off);
          if (other > best || (other == best && other_expert < expert)) best = other, expert = other_expert;
        }
        if (expert >= first && expert < first + C) removed |= 1u << (expert - first);
        if (l == 0) slots[round] = expert;
      }
    }
    __syncwarp();

    // 6. Weights: the exact scores of the picks, renormalised over the routed picks, scaled.
    float w[Lay::kPickRounds];
    int picks[Lay::kPickRounds];
    float part = 0.0f;
#pragma unroll
    for (int rr = 0; rr < Lay::kPickRounds; ++rr) {
      const int slot = rr * L + l;
      w[rr] = 0.0f;
      picks[rr] = 0;
      if (rr * L < k) {
        const int e = slot < k && active ? slots[slot] : 0;
        bool kept_e = true;
        if (limit_groups && cfg.weights_from_masked_scores) kept_e = __shfl_sync(kFull, kept, e / C, L);
        if (slot < k) {
          const float x = to_float(reinterpret_cast<const T*>(row_s + (e / C) * Lay::kChunkBytes)[e % C]);
          const float s = cfg.softmax ? __fdiv_rn(expf(__fsub_rn(x, row_max)), row_total) : sigmoid_of(x);
          w[rr] = cfg.weights_from_masked_scores && !kept_e ? cfg.masked_score : s;
          picks[rr] = e;
          part = __fadd_rn(part, w[rr]);
        }
      }
    }
    const float denom = cfg.renormalize ? __fadd_rn(segment_sum<L>(part), cfg.renormalize_eps) : 1.0f;
    if (active) {
      const int64_t out_row = t * K;
#pragma unroll
      for (int rr = 0; rr < Lay::kPickRounds; ++rr) {
        const int slot = rr * L + l;
        if (slot < k) {
          const float weight = cfg.renormalize ? __fdiv_rn(w[rr], denom) : w[rr];
          store_weight(args.weights, out_row + slot, __fmul_rn(weight, cfg.weight_scale), cfg.weights_dtype);
          store_id(args.ids, out_row + slot, picks[rr], cfg.ids_int64);
        }
      }
      for (int j = l; j < cfg.num_shared; j += L) {
        store_weight(args.weights, out_row + k + j, cfg.shared_weight, cfg.weights_dtype);
        store_id(args.ids, out_row + k + j, E + j, cfg.ids_int64);
      }
    }
    __syncwarp();  // the stage, candidates and slots are rewritten next iteration
  }
  cp_async_wait<0>();
}

template <typename T, int C, int L>
void launch(const SegmentedArgs& args, const GateConfig& cfg, cudaStream_t stream) {
  using Lay = Layout<T, C, L>;
  auto kernel = segmented_gate_kernel<T, C, L>;
  if (Lay::kBlockBytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Lay::kBlockBytes));
  }
  int blocks_per_sm = 0, device = 0, sms = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kBlockThreads, Lay::kBlockBytes));
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t tokens_per_block = static_cast<int64_t>(Lay::kTokensPerWarp) * kWarpsPerBlock;
  const int64_t needed = (args.rows + tokens_per_block - 1) / tokens_per_block;
  const int blocks = static_cast<int>(std::min<int64_t>(needed, static_cast<int64_t>(sms) * std::max(blocks_per_sm, 1)));
  launch_after_preceding_kernel(kernel, blocks, kBlockThreads, Lay::kBlockBytes, stream, device, args, cfg);
}

constexpr int kChunkSizes[] = {8, 16, 24, 32};

// Lanes per token L and experts per lane C: the fewest lanes (large T) or the most (small T)
// whose chunks cover E with less than half padding; with a group limit, chunks must tile the
// groups exactly (E == C*L, a group is a power-of-two number of chunks). 0 when none fits.
void choose_layout(const GateConfig& cfg, int64_t rows, int& C, int& L) {
  const int64_t E = cfg.num_experts, P = cfg.group_size;
  const int few[] = {32, 16, 8}, many[] = {8, 16, 32};
  for (int lanes : rows < kFewTokens ? few : many) {
    for (int chunk : kChunkSizes) {
      const int64_t covered = static_cast<int64_t>(chunk) * lanes;
      if (covered < E || covered >= 2 * E) continue;
      if (cfg.groups_limit_choice()) {
        const int64_t n = P / chunk;
        if (covered != E || P % chunk != 0 || (n & (n - 1)) != 0) continue;
      }
      C = chunk, L = lanes;
      return;
    }
  }
  C = L = 0;
}

template <typename T>
void launch_layout(int C, int L, const SegmentedArgs& args, const GateConfig& cfg, cudaStream_t stream) {
#define MOE_FUSION_SEGMENTED_CASE(c, l) \
  if (C == c && L == l) return launch<T, c, l>(args, cfg, stream);
  MOE_FUSION_SEGMENTED_CASE(8, 8) MOE_FUSION_SEGMENTED_CASE(16, 8) MOE_FUSION_SEGMENTED_CASE(24, 8)
  MOE_FUSION_SEGMENTED_CASE(32, 8) MOE_FUSION_SEGMENTED_CASE(8, 16) MOE_FUSION_SEGMENTED_CASE(16, 16)
  MOE_FUSION_SEGMENTED_CASE(24, 16) MOE_FUSION_SEGMENTED_CASE(32, 16) MOE_FUSION_SEGMENTED_CASE(8, 32)
  MOE_FUSION_SEGMENTED_CASE(16, 32) MOE_FUSION_SEGMENTED_CASE(24, 32) MOE_FUSION_SEGMENTED_CASE(32, 32)
#undef MOE_FUSION_SEGMENTED_CASE
  MOE_FUSION_CHECK(false, "moe_fused_gate: no segmented kernel instantiated for ", C, " experts per lane and ", L,
                    " lanes per token");
}

}  // namespace

const char* gate_cuda_segmented(const at::Tensor& logits2d, const at::Tensor& bias, const GateConfig& cfg,
                                at::Tensor& weights2d, at::Tensor& ids2d) {
  if (cfg.score_rounding != Rounding::FP32 || cfg.selection_rounding != Rounding::FP32 ||
      cfg.weight_rounding != Rounding::FP32) {
    return "compute_dtype emulates 16-bit routing";
  }
  if (cfg.group_score_topk > 2) return "group_score_topk > 2";
  const int64_t elem = logits2d.element_size();
  if ((cfg.num_experts * elem) % 16 != 0 || (logits2d.stride(0) * elem) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(logits2d.data_ptr()) % 16 != 0) {
    return "logits rows are not 16-byte aligned";
  }
  int C = 0, L = 0;
  choose_layout(cfg, logits2d.size(0), C, L);
  if (C == 0) return "no lane layout tiles the experts (and their groups)";

  SegmentedArgs args{};
  args.logits = logits2d.data_ptr();
  args.row_stride = logits2d.stride(0);
  args.rows = logits2d.size(0);
  args.bias = bias.defined() ? bias.data_ptr() : nullptr;
  args.bias_is_f32 = bias.defined() && bias.scalar_type() == at::kFloat;
  args.lanes_per_group = cfg.groups_limit_choice() ? static_cast<int>(cfg.group_size / C) : 1;
  args.weights = weights2d.data_ptr();
  args.ids = ids2d.data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_dtype(logits2d.scalar_type(), "moe_fused_gate: logits", [&](auto tag) {
    using T = decltype(tag);
    using Native = std::conditional_t<std::is_same_v<T, c10::BFloat16>, __nv_bfloat16,
                                      std::conditional_t<std::is_same_v<T, c10::Half>, __half, float>>;
    launch_layout<Native>(C, L, args, cfg, stream);
  });
  return nullptr;
}

}  // namespace moe_fusion
