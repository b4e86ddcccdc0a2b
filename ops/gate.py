"""Python API of the fused grouped top-k gate, and the argument rules shared with the fake impl.

The C++ kernels check the same rules (csrc/gate_config.cpp) with the same messages; this copy runs
at trace time so that ``torch.compile`` reports bad arguments when it compiles, not when it runs.
"""

from __future__ import annotations

import math

import torch

# The floating-point dtypes the ops take (logits, hidden states, weights).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_gate_args(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    num_expert_group: int,
    topk_group: int,
    topk: int,
    scoring_func: str,
    group_score_topk: int,
    masked_score: float,
    renormalize: bool,
    renormalize_eps: float,
    routed_scaling_factor: float,
    num_fused_shared_experts: int,
    apply_routed_scaling_factor_on_output: bool,
    weights_from_masked_scores: bool,
    compute_dtype: torch.dtype | None,
    weights_dtype: torch.dtype | None,
    ids_dtype: torch.dtype | None,
) -> None:
    """Raises ValueError naming the argument and the rule it breaks."""

    def fail(message: str) -> None:
        raise ValueError(f"moe_fused_gate: {message}")

    if logits.dtype not in FLOAT_DTYPES:
        fail(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.dim() < 1:
        fail("logits must have at least one dimension")
    num_experts = int(logits.shape[-1])
    if num_experts < 1:
        fail("logits.size(-1) (the number of experts) must be >= 1")
    if num_expert_group < 1:
        fail(f"num_expert_group must be >= 1, got {num_expert_group}")
    if num_experts % num_expert_group != 0:
        fail(
            f"num_expert_group ({num_expert_group}) must divide the number of experts "
            f"logits.size(-1) ({num_experts})"
        )
    group_size = num_experts // num_expert_group
    if not 1 <= topk_group <= num_expert_group:
        fail(f"topk_group must be in [1, num_expert_group={num_expert_group}], got {topk_group}")
    if topk < 1:
        fail(f"topk must be >= 1, got {topk}")
    if topk > topk_group * group_size:
        fail(
            f"topk ({topk}) must not exceed the experts of the kept groups "
            f"(topk_group * E / num_expert_group = {topk_group * group_size})"
        )
    if topk > 64:
        fail(f"topk must be <= 64, got {topk}")
    if not 1 <= group_score_topk <= group_size:
        fail(f"group_score_topk must be in [1, experts per group={group_size}], got {group_score_topk}")
    if scoring_func not in ("sigmoid", "softmax"):
        fail(f"scoring_func must be 'sigmoid' or 'softmax', got '{scoring_func}'")
    if math.isnan(masked_score):
        fail("masked_score must not be NaN")
    if not (math.isfinite(renormalize_eps) and renormalize_eps >= 0):
        fail(f"renormalize_eps must be finite and >= 0, got {renormalize_eps}")
    if not (math.isfinite(routed_scaling_factor) and routed_scaling_factor != 0):
        fail(f"routed_scaling_factor must be finite and non-zero, got {routed_scaling_factor}")
    if num_fused_shared_experts < 0:
        fail(f"num_fused_shared_experts must be >= 0, got {num_fused_shared_experts}")
    if weights_from_masked_scores and bias is not None:
        fail("weights_from_masked_scores requires bias=None (the masked scores are then the unbiased scores)")
    if bias is not None:
        if bias.dim() != 1 or int(bias.shape[0]) != num_experts:
            fail(f"bias must have shape [E] = [{num_experts}], got {list(bias.shape)}")
        if bias.dtype not in FLOAT_DTYPES:
            fail(f"bias must be float32, bfloat16 or float16, got {bias.dtype}")
        if bias.device != logits.device:
            fail(f"bias must be on the logits' device ({logits.device}), got {bias.device}")
    if compute_dtype not in (None, *FLOAT_DTYPES):
        fail(f"compute_dtype must be None, float32, bfloat16 or float16, got {compute_dtype}")
    if weights_dtype not in (None, *FLOAT_DTYPES):
        fail(f"weights_dtype must be float32, bfloat16 or float16, got {weights_dtype}")
    if ids_dtype not in (None, torch.int32, torch.int64):
        fail(f"ids_dtype must be int32 or int64, got {ids_dtype}")


def moe_fused_gate(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    num_expert_group: int,
    topk_group: int,
    topk: int,
    *,
    scoring_func: str = "sigmoid",
    group_score_topk: int = 2,
    masked_score: float = float("-inf"),
    renormalize: bool = True,
    renormalize_eps: float = 0.0,
    routed_scaling_factor: float = 1.0,
    num_fused_shared_experts: int = 0,
    apply_routed_scaling_factor_on_output: bool = False,
    weights_from_masked_scores: bool = False,
    compute_dtype: torch.dtype | None = None,
    weights_dtype: torch.dtype = torch.float32,
    ids_dtype: torch.dtype = torch.int32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped top-k routing ("noaux_tc" / group-limited greedy) in one kernel.

    Per token, in float32 whatever the logits' dtype:

    1. ``s = sigmoid(logits)`` or ``softmax(logits)``; selection scores ``b = s + bias`` (or ``s``).
    2. Each of the ``num_expert_group`` groups scores the sum of its ``group_score_topk`` best ``b``;
       the ``topk_group`` best groups are kept.
    3. Experts of dropped groups take ``masked_score``; the ``topk`` best by that masked ``b`` are chosen.
    4. Weights are the unbiased ``s`` of the chosen experts (the masked score of a chosen expert of a
       dropped group when ``weights_from_masked_scores``), divided by ``sum + renormalize_eps`` when
       ``renormalize``, times ``routed_scaling_factor`` unless ``apply_routed_scaling_factor_on_output``.
    5. ``num_fused_shared_experts`` columns follow, ids ``E .. E+S-1``, weight 1.0 (or
       ``1 / routed_scaling_factor`` when the caller scales the output); they never enter the
       renormalisation.

    Order: descending selection score; ties go to the lower expert (and group) index. NaN ranks above
    every number, as in ``torch.topk``: a token with NaN logits gets NaN weights, and its ids are
    still valid expert indices.

    ``compute_dtype`` (bfloat16/float16) reproduces a model that routes in that dtype: every intermediate the eager code stores in that dtype (scores; ``s + bias`` when the
    bias has that dtype; group scores; each weight step) is rounded to it, so that the fused op
    chooses the experts the eager model chooses.

    Returns ``(weights, ids)`` of shape ``[..., topk + num_fused_shared_experts]``.
    """
    args = (
        logits,
        bias,
        num_expert_group,
        topk_group,
        topk,
        scoring_func,
        group_score_topk,
        float(masked_score),
        renormalize,
        float(renormalize_eps),
        float(routed_scaling_factor),
        num_fused_shared_experts,
        apply_routed_scaling_factor_on_output,
        weights_from_masked_scores,
        compute_dtype,
        weights_dtype,
        ids_dtype,
    )
    # Arguments are checked by the kernels (eager) and by the fake impl (compile time).
    return torch.ops.moe_fusion.moe_fused_gate(*args)
