"""Checks a moe_fused_gate result against the reference contract, tie-aware.

A kernel may legitimately differ from the reference by an ulp in the scores (its exp is not
torch's), which can swap two experts whose selection scores are tied to that precision. So rather
than demanding identical ids, the check demands what the contract promises:

1. the ids are distinct valid experts, and at every position the reference's masked selection
   score of our pick equals that of the reference's pick (to the score precision): our order is a
   valid descending top-k of the reference's scores;
2. our weights are exactly what the contract gives *for our ids* (reference formula);
3. the shared columns hold ids E..E+S-1 and their fixed weight.
"""

from __future__ import annotations

import torch

from ops.reference import gate_reference, gate_weights_for_ids

# Score precision: an ulp of float32 scores, or of the 16-bit dtype the routing is emulated in.
_SCORE_ATOL = {None: 2e-6, torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}
_WEIGHT_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

POISON_ID = -7


def call_poisoned(logits, bias, num_expert_group, topk_group, topk, **options):
    """Runs the out= overload on outputs filled with NaN / POISON_ID, so unwritten entries show."""
    shared = options.get("num_fused_shared_experts", 0)
    weights_dtype = options.get("weights_dtype", torch.float32)
    ids_dtype = options.get("ids_dtype", torch.int32)
    shape = (*logits.shape[:-1], topk + shared)
    weights = torch.full(shape, float("nan"), dtype=weights_dtype, device=logits.device)
    ids = torch.full(shape, POISON_ID, dtype=ids_dtype, device=logits.device)
    args = _positional(logits, bias, num_expert_group, topk_group, topk, options)
    torch.ops.moe_fusion.moe_fused_gate.out(*args, weights_out=weights, ids_out=ids)
    return weights, ids


def _positional(logits, bias, num_expert_group, topk_group, topk, options):
    return (
        logits,
        bias,
        num_expert_group,
        topk_group,
        topk,
        options.get("scoring_func", "sigmoid"),
        options.get("group_score_topk", 2),
        float(options.get("masked_score", float("-inf"))),
        options.get("renormalize", True),
        float(options.get("renormalize_eps", 0.0)),
        float(options.get("routed_scaling_factor", 1.0)),
        options.get("num_fused_shared_experts", 0),
        options.get("apply_routed_scaling_factor_on_output", False),
        options.get("weights_from_masked_scores", False),
        options.get("compute_dtype"),
        options.get("weights_dtype", torch.float32),
        options.get("ids_dtype", torch.int32),
    )


def positional_args(logits, bias, num_expert_group, topk_group, topk, **options):
    """The op's positional arguments for `options` given as the Python API's keywords."""
    return _positional(logits, bias, num_expert_group, topk_group, topk, options)


def check_gate_result(weights, ids, logits, bias, num_expert_group, topk_group, topk, **options):
    shared = options.pop("num_fused_shared_experts", 0)
    weights_dtype = options.pop("weights_dtype", torch.float32)
    ids_dtype = options.pop("ids_dtype", torch.int32)
    num_experts = logits.shape[-1]
    expected_shape = (*logits.shape[:-1], topk + shared)
    assert tuple(weights.shape) == expected_shape and tuple(ids.shape) == expected_shape
    assert weights.dtype == weights_dtype and ids.dtype == ids_dtype
    if weights.numel() == 0:
        return

    ref = gate_reference(logits.cpu(), None if bias is None else bias.cpu(), num_expert_group, topk_group, topk,
                         **options)
    ids2 = ids.cpu().reshape(-1, topk + shared).long()
    weights2 = weights.cpu().reshape(-1, topk + shared).float()
    routed_ids = ids2[:, :topk]

    assert (ids2 != POISON_ID).all(), "unwritten ids"
    assert ((routed_ids >= 0) & (routed_ids < num_experts)).all(), "routed id out of range"
    assert (routed_ids.sort(-1).values.diff(dim=-1) != 0).all(), "an expert chosen twice"

    compute_dtype = options.get("compute_dtype")
    atol = _SCORE_ATOL[compute_dtype]
    ours = ref.masked_selection.gather(1, routed_ids)
    theirs = ref.masked_selection.gather(1, ref.ids)
    both_nan = ours.isnan() & theirs.isnan()
    close = torch.isclose(ours, theirs, rtol=atol, atol=atol) | both_nan
    assert close.all(), (
        f"picks are not a top-{topk} of the reference scores in {int((~close.all(-1)).sum())} of "
        f"{len(close)} tokens; first: ours {ours[~close.all(-1)][0].tolist()} vs reference "
        f"{theirs[~close.all(-1)][0].tolist()}"
    )

    scale = 1.0 if options.get("apply_routed_scaling_factor_on_output") else options.get("routed_scaling_factor", 1.0)
    masked_fill = ref.masked_selection.new_tensor(options.get("masked_score", float("-inf")))
    if compute_dtype not in (None, torch.float32) and bias is None:
        masked_fill = masked_fill.to(compute_dtype).float()
    expected_weights = gate_weights_for_ids(
        ref.scores, ref.kept, routed_ids, masked_fill.item() if options.get("weights_from_masked_scores") else None,
        options.get("renormalize", True), options.get("renormalize_eps", 0.0), scale, compute_dtype or torch.float32,
    ).to(weights_dtype).float()
    rtol = max(_WEIGHT_RTOL[weights_dtype], _WEIGHT_RTOL[compute_dtype or torch.float32])
    torch.testing.assert_close(weights2[:, :topk], expected_weights, rtol=rtol, atol=1e-6, equal_nan=True)

    if shared:
        rsf = options.get("routed_scaling_factor", 1.0)
        shared_weight = 1.0 / rsf if options.get("apply_routed_scaling_factor_on_output") else 1.0
        expected_ids = torch.arange(num_experts, num_experts + shared).expand(len(ids2), -1)
        assert torch.equal(ids2[:, topk:], expected_ids)
        expected = torch.full_like(weights2[:, topk:], shared_weight).to(weights_dtype).float()
        assert torch.equal(weights2[:, topk:], expected)
