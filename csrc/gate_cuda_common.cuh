// Device helpers shared by the two CUDA kernels of moe_fusion::moe_fused_gate
// (gate_cuda.cu: one warp per token; gate_cuda_segmented.cu: a few lanes per token).
#pragma once

#include "gate_config.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace moe_fusion {

constexpr int kWarp = 32;
constexpr unsigned kFull = 0xFFFFFFFFu;

__device__ __forceinline__ float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }

// torch builds with __CUDA_NO_{HALF,BFLOAT16}_CONVERSIONS__: convert explicitly.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

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

}  // namespace moe_fusion
