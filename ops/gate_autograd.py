"""Autograd for ``moe_fusion::moe_fused_gate``: the weights are differentiable w.r.t. the logits.

Given the picked ids (discrete, so constant under differentiation), the routed weights of a token are

    v_i = s[id_i]                       s = sigmoid(logits) or softmax(logits)
    D   = sum_i v_i + renormalize_eps   (routed picks only; shared columns never enter it)
    w_i = c * v_i / D                   (c * v_i without renormalisation)

with ``c = routed_scaling_factor``, or 1 when it is applied on the output. With
``weights_from_masked_scores`` a pick of a dropped group has ``v_i = masked_score``, a constant that
still counts in ``D``. The backward is the exact derivative of that, for an upstream gradient ``g``:

    dL/dv_j = c * (g_j - sum_i g_i v_i / D) / D      (c * g_j without renormalisation; 0 for constant picks)
    dL/ds   = scatter-add of dL/dv over the ids
    dL/dx   = dL/ds * s * (1 - s)                    (sigmoid)
            = s * (dL/ds - sum_e dL/ds_e * s_e)      (softmax)

Constants, with no gradient: the fused shared-expert columns, the constant picks above, the ids (an
integer output) and the bias, which only changes which experts are picked (aux-loss-free balancing
updates it outside autograd); ``bias.grad`` stays None. ``compute_dtype``'s roundings (of the scores,
the masked score and each weight step) are treated as identities: the backward differentiates the
unrounded chain in float32 (float64 when ``gate_logits_grad`` gets float64 logits, as the tests'
gradcheck does; the op takes none) at the forward's picks; only the kept groups, which decide which
picks are constants, are recomputed with the forward's rounding.
``weights_dtype`` is a cast, so its gradient is the upstream gradient in float32.

Nothing but the logits and the ids is saved: the backward recomputes the scores (and, for
``weights_from_masked_scores``, the kept groups) from the logits with the reference's helpers, so
the forward kernels write no extra outputs. The kept groups are recomputed with torch's
sigmoid/softmax, so where two group scores tie to within the kernel's last-ulp difference from torch
the backward may treat a pick from one of them differently from the forward. ``gate_logits_grad`` is
the formula in PyTorch ops. The backward runs it inside an op of its own,
``moe_fusion::moe_fused_gate_backward``, whose CUDA kernel is one Triton kernel
(ops/triton_gate_backward.py); the op is opaque to ``torch.compile``, so compiled steps run the same
kernel. ``weights_from_masked_scores`` (the kernel does not recompute the kept groups) and double
backwards (``create_graph=True``) run the formula's ops directly. The ``.out`` overload is not
differentiable.
"""

from __future__ import annotations

import math

import torch

from .gate import FLOAT_DTYPES
from .reference import gate_scores, kept_experts, picked_scores, rounded


def gate_logits_grad(
    grad_weights: torch.Tensor,
    logits: torch.Tensor,
    ids: torch.Tensor,
    num_expert_group: int,
    topk_group: int,
    topk: int,
    *,
    scoring_func: str,
    group_score_topk: int,
    masked_score: float,
    renormalize: bool,
    renormalize_eps: float,
    routed_scaling_factor: float,
    apply_routed_scaling_factor_on_output: bool,
    weights_from_masked_scores: bool,
    compute_dtype: torch.dtype | None,
) -> torch.Tensor:
    """The gradient w.r.t. `logits` [..., E] of the gate's weights, given their gradient and the ids
    [..., topk + shared]; the options are ``gate_reference``'s (see the module docstring for the formula)."""
    num_experts = logits.shape[-1]
    work_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.reshape(-1, num_experts).to(work_dtype)
    routed_ids = ids.reshape(-1, ids.shape[-1])[:, :topk].long()
    # The shared columns are constants: their gradient is dropped here.
    grad = grad_weights.reshape(-1, grad_weights.shape[-1])[:, :topk].to(work_dtype)

    scores = gate_scores(x, scoring_func)
    kept = None
    if weights_from_masked_scores:
        # bias is None in this mode, so the forward chose the groups on the scores in compute_dtype.
        score_dtype = compute_dtype or torch.float32
        kept = kept_experts(rounded(scores, score_dtype), num_expert_group, topk_group, group_score_topk,
                            score_dtype)
    picked = picked_scores(scores, kept, routed_ids, masked_score if weights_from_masked_scores else None)

    scale = 1.0 if apply_routed_scaling_factor_on_output else routed_scaling_factor
    grad_picked = grad * scale
    if renormalize:
        denominator = picked.sum(-1, keepdim=True) + renormalize_eps
        grad_picked = (grad_picked - (grad_picked * picked).sum(-1, keepdim=True) / denominator) / denominator
    if kept is not None:
        grad_picked = torch.where(kept.gather(1, routed_ids), grad_picked, 0.0)
    grad_scores = torch.zeros_like(scores).scatter_add_(1, routed_ids, grad_picked)

    if scoring_func == "softmax":
        grad_x = scores * (grad_scores - (grad_scores * scores).sum(-1, keepdim=True))
    else:
        grad_x = grad_scores * scores * (1.0 - scores)
    return grad_x.to(logits.dtype).reshape(logits.shape)


def _setup_context(ctx, inputs, output):
    (logits, _bias, num_expert_group, topk_group, topk, scoring_func, group_score_topk, masked_score, renormalize,
     renormalize_eps, routed_scaling_factor, _num_fused_shared_experts, apply_routed_scaling_factor_on_output,
     weights_from_masked_scores, compute_dtype, _weights_dtype, _ids_dtype) = inputs
    _weights, ids = output
    ctx.save_for_backward(logits, ids)
    ctx.groups_and_topk = (num_expert_group, topk_group, topk)
    ctx.options = dict(
        scoring_func=scoring_func, group_score_topk=group_score_topk, masked_score=masked_score,
        renormalize=renormalize, renormalize_eps=renormalize_eps, routed_scaling_factor=routed_scaling_factor,
        apply_routed_scaling_factor_on_output=apply_routed_scaling_factor_on_output,
        weights_from_masked_scores=weights_from_masked_scores, compute_dtype=compute_dtype,
    )


def _backward(ctx, grad_weights, _grad_ids):
    logits, ids = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0]:
        options = ctx.options
        # A double backward (create_graph=True: grad mode on) differentiates the formula's ops; the
        # opaque op is not differentiable.
        if options["weights_from_masked_scores"] or torch.is_grad_enabled():
            grad_logits = gate_logits_grad(grad_weights, logits, ids, *ctx.groups_and_topk, **options)
        else:
            scale = 1.0 if options["apply_routed_scaling_factor_on_output"] else options["routed_scaling_factor"]
            grad_logits = torch.ops.moe_fusion.moe_fused_gate_backward(
                grad_weights, logits, ids, ctx.groups_and_topk[2], options["scoring_func"], options["renormalize"],
                options["renormalize_eps"], scale)
    # Only the logits get a gradient; the bias and the 15 non-tensor arguments get None.
    return (grad_logits,) + (None,) * 16


def check_gate_backward_args(grad_weights: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor, topk: int,
                             scoring_func: str, renormalize_eps: float, scale: float) -> None:
    """Raises ValueError naming the argument of ``moe_fused_gate_backward`` and the rule it breaks.
    Metadata only: the ids' values (moe_fused_gate's output) are not read, so no device synchronises."""

    def fail(message: str) -> None:
        raise ValueError(f"moe_fused_gate_backward: {message}")

    if logits.dtype not in FLOAT_DTYPES:
        fail(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        fail(f"logits must have shape [..., E] with E >= 1, got {list(logits.shape)}")
    if ids.dtype not in (torch.int32, torch.int64):
        fail(f"ids must be int32 or int64, got {ids.dtype}")
    if ids.dim() != logits.dim() or ids.shape[:-1] != logits.shape[:-1]:
        fail(f"ids must have shape [..., K] with logits' leading shape {list(logits.shape[:-1])}, "
             f"got {list(ids.shape)}")
    if not 1 <= topk <= min(64, ids.shape[-1]):
        fail(f"topk must be in [1, min(64, ids.size(-1) = {ids.shape[-1]})], got {topk}")
    if grad_weights.shape != ids.shape or grad_weights.dtype not in FLOAT_DTYPES:
        fail(f"grad_weights must be a float32, bfloat16 or float16 tensor of ids' shape {list(ids.shape)}, "
             f"got {grad_weights.dtype} {list(grad_weights.shape)}")
    if scoring_func not in ("sigmoid", "softmax"):
        fail(f"scoring_func must be 'sigmoid' or 'softmax', got '{scoring_func}'")
    if not (math.isfinite(renormalize_eps) and renormalize_eps >= 0):
        fail(f"renormalize_eps must be finite and >= 0, got {renormalize_eps}")
    if not math.isfinite(scale):
        fail(f"scale must be finite, got {scale}")
    for name, tensor in (("grad_weights", grad_weights), ("ids", ids)):
        if tensor.device != logits.device:
            fail(f"{name} must be on the logits' device ({logits.device}), got {tensor.device}")


@torch.library.impl("moe_fusion::moe_fused_gate_backward", "CompositeExplicitAutograd")
def _gate_backward_formula(grad_weights, logits, ids, topk, scoring_func, renormalize, renormalize_eps, scale):
    """The op (schema in csrc/registration.cpp) on the CPU: the formula; the groups only matter with
    weights_from_masked_scores, which never reaches the op."""
    check_gate_backward_args(grad_weights, logits, ids, topk, scoring_func, renormalize_eps, scale)
    return gate_logits_grad(
        grad_weights, logits, ids, 1, 1, topk, scoring_func=scoring_func, group_score_topk=1, masked_score=0.0,
        renormalize=renormalize, renormalize_eps=renormalize_eps, routed_scaling_factor=scale,
        apply_routed_scaling_factor_on_output=False, weights_from_masked_scores=False, compute_dtype=None)


@torch.library.register_kernel("moe_fusion::moe_fused_gate_backward", "cuda")
def _gate_backward_cuda(grad_weights, logits, ids, topk, scoring_func, renormalize, renormalize_eps, scale):
    check_gate_backward_args(grad_weights, logits, ids, topk, scoring_func, renormalize_eps, scale)
    from .triton_gate_backward import gate_logits_grad_triton  # Triton is imported on first CUDA use only

    return gate_logits_grad_triton(grad_weights, logits, ids, topk, scoring_func, renormalize, renormalize_eps, scale)


torch.library.register_autograd("moe_fusion::moe_fused_gate", _backward, setup_context=_setup_context)
