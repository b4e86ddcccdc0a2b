"""Fake (meta) implementations of the moe_fusion ops, registered exactly once on import.

They check the arguments (so that ``torch.compile`` reports a bad call at compile time) and
describe the outputs' shapes and dtypes.
"""

from __future__ import annotations

import torch

from .experts import check_experts_args
from .experts_autograd import check_experts_backward_args
from .gate import check_gate_args
from .gate_autograd import check_gate_backward_args


@torch.library.register_fake("moe_fusion::moe_fused_gate")
def _moe_fused_gate_fake(logits, bias, num_expert_group, topk_group, topk, scoring_func, group_score_topk,
                         masked_score, renormalize, renormalize_eps, routed_scaling_factor,
                         num_fused_shared_experts, apply_routed_scaling_factor_on_output,
                         weights_from_masked_scores, compute_dtype, weights_dtype, ids_dtype):
    check_gate_args(logits, bias, num_expert_group, topk_group, topk, scoring_func, group_score_topk,
                    masked_score, renormalize, renormalize_eps, routed_scaling_factor, num_fused_shared_experts,
                    apply_routed_scaling_factor_on_output, weights_from_masked_scores, compute_dtype,
                    weights_dtype, ids_dtype)
    shape = (*logits.shape[:-1], topk + num_fused_shared_experts)
    weights = logits.new_empty(shape, dtype=weights_dtype or torch.float32)
    ids = logits.new_empty(shape, dtype=ids_dtype or torch.int32)
    return weights, ids


@torch.library.register_fake("moe_fusion::moe_fused_gate.out")
def _moe_fused_gate_out_fake(logits, bias, num_expert_group, topk_group, topk, scoring_func, group_score_topk,
                             masked_score, renormalize, renormalize_eps, routed_scaling_factor,
                             num_fused_shared_experts, apply_routed_scaling_factor_on_output,
                             weights_from_masked_scores, compute_dtype, weights_dtype, ids_dtype, *,
                             weights_out, ids_out):
    check_gate_args(logits, bias, num_expert_group, topk_group, topk, scoring_func, group_score_topk,
                    masked_score, renormalize, renormalize_eps, routed_scaling_factor, num_fused_shared_experts,
                    apply_routed_scaling_factor_on_output, weights_from_masked_scores, compute_dtype,
                    weights_dtype, ids_dtype)


@torch.library.register_fake("moe_fusion::moe_fused_gate_backward")
def _moe_fused_gate_backward_fake(grad_weights, logits, ids, topk, scoring_func, renormalize, renormalize_eps, scale):
    check_gate_backward_args(grad_weights, logits, ids, topk, scoring_func, renormalize_eps, scale)
    return logits.new_empty(logits.shape)


@torch.library.register_fake("moe_fusion::fused_experts")
def _fused_experts_fake(hidden, topk_weights, topk_ids, w_gate, w_up, w_down, shared_gate, shared_up, shared_down,
                        shared_token_weight):
    check_experts_args(hidden, topk_weights, topk_ids, w_gate, w_up, w_down, shared_gate, shared_up, shared_down,
                       shared_token_weight)
    return hidden.new_empty(hidden.shape)


@torch.library.register_fake("moe_fusion::fused_experts_train")
def _fused_experts_train_fake(hidden, topk_weights, topk_ids, w_gate, w_up, w_down, shared_gate, shared_up,
                              shared_down, shared_token_weight):
    check_experts_args(hidden, topk_weights, topk_ids, w_gate, w_up, w_down, shared_gate, shared_up, shared_down,
                       shared_token_weight)
    return hidden.new_empty(hidden.shape), hidden.new_empty((topk_ids.numel(), 2 * w_down.shape[2]))


@torch.library.register_fake("moe_fusion::fused_experts_backward")
def _fused_experts_backward_fake(grad_out, projections, hidden, topk_weights, topk_ids, w_gate, w_up, w_down,
                                 shared_gate, shared_up, shared_down, shared_token_weight, needs_grad):
    check_experts_backward_args(grad_out, projections, hidden, topk_weights, topk_ids, w_gate, w_up, w_down,
                                shared_gate, shared_up, shared_down, shared_token_weight, needs_grad)
    differentiable = (hidden, topk_weights, w_gate, w_up, w_down, shared_gate, shared_up, shared_down,
                      shared_token_weight)
    return [x.new_empty(x.shape) for x, needed in zip(differentiable, needs_grad, strict=True) if needed]
