// Device helpers shared by the CUDA kernels of moe_fusion::moe_fused_gate
// (gate_cuda.cu: one warp per token; gate_cuda_segment.cu: a few lanes per token).
#pragma once

#include "gate_config.h"

#include <ATen/core/Tensor.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace moe_fusion {
namespace gate_device {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr unsigned kFull = 0xFFFFFFFFu;

__device__ __forceinline__ float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }

// Reductions over aligned groups of Width lanes of a converged warp (xor offsets below Width stay
// inside the group).
template <int Width>
__device__ __forceinline__ float lanes_nan_max(float v) {
#pragma unroll
  for (int off = Width / 2; off > 0; off >>= 1) v = nan_max(v, __shfl_xor_sync(kFull, v, off));
  return v;
}

template <int Width>
__device__ __forceinline__ float lanes_sum(float v) {
#pragma unroll
  for (int off = Width / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
}

// torch builds with __CUDA_NO_{HALF,BFLOAT16}_CONVERSIONS__: convert explicitly.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// Loads experts [first, first+VPT) of a row; elements >= E read as 0.
template <typename T, int VPT>
__device__ __forceinline__ void load_chunk(const T* __restrict__ row, int first, int E, bool vectorized,
                                           float (&v)[VPT]) {
  constexpr int kPerVec = 16 / sizeof(T);
  static_assert(VPT % kPerVec == 0, "VPT must be a multiple of the 16-byte vector width");
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

__device__ __forceinline__ void store_weight(void* base, int64_t i, float w, OutDtype dtype) {
  if (dtype == OutDtype::F32) {
    static_cast<float*>(base)[i] = w;
  } else if (dtype == OutDtype::BF16) {
    static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(w);
  } else {
    static_cast<__half*>(base)[i] = __float2half_rn(w);
  }
}

__device__ __forceinline__ void store_id(void* base, int64_t i, int id, bool int64) {
  if (int64) {
    static_cast<int64_t*>(base)[i] = id;
  } else {
    static_cast<int32_t*>(base)[i] = id;
  }
}

}  // namespace gate_device

// The sub-warp kernel (gate_cuda_segment.cu) for the configurations it supports: returns false,
// launching nothing, for the others (the one-warp-per-token kernel takes them).
bool launch_segment_gate(const at::Tensor& logits2d, const at::Tensor& bias, const GateConfig& cfg,
                         at::Tensor& weights2d, at::Tensor& ids2d, cudaStream_t stream);

}  // namespace moe_fusion
