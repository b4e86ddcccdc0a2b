// The segmented CUDA kernel of moe_fusion::moe_fused_gate (gate_cuda_segmented.cu).
#pragma once

#include "gate_config.h"

#include <ATen/core/Tensor.h>

namespace moe_fusion {

// Routes logits2d [T, E] with the segmented kernel and returns nullptr, or launches nothing and
// returns why this configuration or layout is not one the kernel handles (the warp kernel does).
const char* gate_cuda_segmented(const at::Tensor& logits2d, const at::Tensor& bias, const GateConfig& cfg,
                                at::Tensor& weights2d, at::Tensor& ids2d);

}  // namespace moe_fusion
