"""The gate's backward as one Triton kernel (CUDA): ops/gate_autograd.py's formula, one token per program.

Per token it recomputes the scores from the logits row, reads the picked scores by the routed ids,
applies the renormalisation's derivative to the upstream gradient, scatters it onto the picked
experts (a compare over [K, E] in registers: no atomics) and applies the sigmoid's or the softmax's
derivative, writing each logit's gradient once: about fifteen launches of the PyTorch formula become
one. It is the CUDA kernel of the op ``moe_fusion::moe_fused_gate_backward`` (an opaque op, so that
compiled steps run it too and tracing never reaches the kernel with fake tensors). The mode where
picks of dropped groups are constants (``weights_from_masked_scores``) needs the kept groups and keeps
the PyTorch formula.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_experts import on_device


@triton.jit
def _gate_backward_kernel(
    grad_weights_ptr, logits_ptr, ids_ptr, grad_logits_ptr,
    num_experts, topk, stride_grad, stride_logits, stride_ids, stride_out,
    scale, renormalize_eps,
    SOFTMAX: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs_e = tl.arange(0, BLOCK_E)
    offs_k = tl.arange(0, BLOCK_K)
    e_mask = offs_e < num_experts
    k_mask = offs_k < topk
    row = logits_ptr + token * stride_logits
    x = tl.load(row + offs_e, mask=e_mask, other=float("-inf")).to(tl.float32)
    ids = tl.load(ids_ptr + token * stride_ids + offs_k, mask=k_mask, other=-1).to(tl.int32)
    picked_x = tl.load(row + ids, mask=k_mask, other=0.0).to(tl.float32)
    if SOFTMAX:
        row_max = tl.max(x, axis=0)
        exp_x = tl.where(e_mask, tl.exp(x - row_max), 0.0)
        total = tl.sum(exp_x, axis=0)
        scores = exp_x / total
        picked = tl.where(k_mask, tl.exp(picked_x - row_max) / total, 0.0)
    else:
        scores = 1.0 / (1.0 + tl.exp(-x))
        picked = tl.where(k_mask, 1.0 / (1.0 + tl.exp(-picked_x)), 0.0)

    grad = tl.load(grad_weights_ptr + token * stride_grad + offs_k, mask=k_mask, other=0.0).to(tl.float32) * scale
    if RENORMALIZE:
        denominator = tl.sum(picked, axis=0) + renormalize_eps
        grad = (grad - tl.sum(grad * picked, axis=0) / denominator) / denominator
    grad = tl.where(k_mask, grad, 0.0)
    # Each pick's gradient onto its expert; an id picked twice gets both.
    grad_scores = tl.sum(tl.where(ids[:, None] == offs_e[None, :], grad[:, None], 0.0), axis=0)
    if SOFTMAX:
        grad_x = scores * (grad_scores - tl.sum(grad_scores * scores, axis=0))
    else:
        grad_x = grad_scores * scores * (1.0 - scores)
    tl.store(grad_logits_ptr + token * stride_out + offs_e, grad_x.to(grad_logits_ptr.dtype.element_ty), mask=e_mask)


def gate_logits_grad_triton(grad_weights: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor, topk: int,
                            scoring_func: str, renormalize: bool, renormalize_eps: float, scale: float) -> torch.Tensor:
    """The CUDA kernel of ``moe_fusion::moe_fused_gate_backward`` (schema in csrc/registration.cpp)."""
    num_experts = logits.shape[-1]
    x = logits.reshape(-1, num_experts)
    grad = grad_weights.reshape(-1, grad_weights.shape[-1])
    routed_ids = ids.reshape(-1, ids.shape[-1])
    grad_x = torch.empty(x.shape, dtype=logits.dtype, device=logits.device)
    if x.shape[0] > 0:
        # Rows are read with unit stride along the experts (and the picks).
        x, grad, routed_ids = x.contiguous(), grad.contiguous(), routed_ids.contiguous()
        block_e, block_k = triton.next_power_of_2(num_experts), triton.next_power_of_2(topk)
        with on_device(logits.device):
            _gate_backward_kernel[(x.shape[0],)](
                grad, x, routed_ids, grad_x,
                num_experts, topk, grad.stride(0), x.stride(0), routed_ids.stride(0), grad_x.stride(0),
                scale, renormalize_eps,
                SOFTMAX=scoring_func == "softmax", RENORMALIZE=renormalize, BLOCK_E=block_e, BLOCK_K=block_k,
                num_warps=4 if block_e * block_k <= 4096 else 8,  # the [K, E] scatter lives in registers
            )
    return grad_x.reshape(logits.shape)
