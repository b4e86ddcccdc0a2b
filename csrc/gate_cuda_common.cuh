// Device helpers shared by the two CUDA kernels of moe_fusion::moe_fused_gate
// (gate_cuda.cu: one warp per token; gate_cuda_segmented.cu: a few lanes per token).
#pragma once

#include "gate_config.h"

#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>

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

// Programmatic dependent launch (Hopper and later). At decode sizes a gate call is a few
// microseconds, part of which is the launch behind the preceding kernel (the router's matmul, or
// the previous layer). Launched with the programmatic-serialisation attribute, the
// kernel's blocks are scheduled while that kernel finishes; each block waits in
// wait_for_preceding_kernels() (griddepcontrol.wait: the preceding grid has completed and its writes
// are visible) before its first global read, so the result is the same as with a plain launch. Both
// are no-ops for a kernel launched without the attribute or on older GPUs.
__device__ __forceinline__ void wait_for_preceding_kernels() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel in the stream, if it was launched with the attribute, be scheduled now; it
// still waits for this grid to complete before it reads anything. Called at the start: the gate's
// grid is at most one wave, so no block of ours waits behind the next kernel's blocks.
__device__ __forceinline__ void let_next_kernel_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// `kernel<<<blocks, threads, smem, stream>>>(args...)`, with programmatic dependent launch on
// compute capability 9.0 and later unless MOE_FUSION_GATE_PDL=0 (for tools or drivers that object).
template <typename... Params, typename... Args>
void launch_after_preceding_kernel(void (*kernel)(Params...), int blocks, int threads, size_t smem,
                                   cudaStream_t stream, int device, Args&&... args) {
  static const bool pdl_allowed = [] {
    const char* env = std::getenv("MOE_FUSION_GATE_PDL");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = pdl_allowed && major >= 9 ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace moe_fusion
