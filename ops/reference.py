"""Plain-PyTorch references.

``gate_reference`` is the executable contract of ``moe_fused_gate``: it follows the documented
semantics step by step with whole-tensor operations and stable sorts (no kernel code is shared) and
returns its intermediates, which the tests use to check the kernels tie-aware.
``moe_fused_gate_reference`` has the op's signature and outputs.

``deepseek_v3_routing`` is the unfused routing as models write it (the HF transformers DeepseekV3 /
GLM-4.5 router); benchmarks and examples use it as the baseline the fused op replaces.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .experts import gate_and_up


def rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded to `dtype` and held in float32 (the eager code's storage rounding); float32 keeps x as is."""
    return x if dtype == torch.float32 else x.to(dtype).float()


def _order_desc(x: torch.Tensor) -> torch.Tensor:
    """Indices sorting the last dim descending; NaN first, ties by lower index (stable sort)."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices


def gate_scores(x: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """Step 1 of the contract, unrounded: sigmoid or softmax of the logits `x` [T, E]."""
    return torch.softmax(x, dim=-1) if scoring_func == "softmax" else torch.sigmoid(x)


def kept_experts(
    selection: torch.Tensor,
    num_expert_group: int,
    topk_group: int,
    group_score_topk: int,
    selection_dtype: torch.dtype,
) -> torch.Tensor:
    """Step 2 of the contract: bool [T, E], True for the experts of the `topk_group` best groups."""
    tokens, num_experts = selection.shape
    if topk_group == num_expert_group:
        return torch.ones(tokens, num_experts, dtype=torch.bool, device=selection.device)
    group_size = num_experts // num_expert_group
    grouped = selection.view(tokens, num_expert_group, group_size)
    best = torch.gather(grouped, -1, _order_desc(grouped)[..., :group_score_topk])
    group_score = best[..., 0]
    for j in range(1, group_score_topk):  # summed in descending order
        group_score = group_score + best[..., j]
    group_score = rounded(group_score, selection_dtype)
    kept_group_mask = torch.zeros(tokens, num_expert_group, dtype=torch.bool, device=selection.device)
    kept_group_mask.scatter_(1, _order_desc(group_score)[:, :topk_group], True)
    return kept_group_mask.repeat_interleave(group_size, dim=1)


def picked_scores(
    scores: torch.Tensor, kept: torch.Tensor | None, ids: torch.Tensor, masked_fill: float | None
) -> torch.Tensor:
    """The weights of the chosen `ids` [T, k] before renormalisation: their scores, or `masked_fill`
    (given with `kept`) for picks of dropped groups."""
    picked = torch.gather(scores, 1, ids)
    if masked_fill is None:
        return picked
    return torch.where(torch.gather(kept, 1, ids), picked, torch.full_like(picked, masked_fill))


class GateReference(NamedTuple):
    """Intermediates of the reference, float32 on [T, E] / [T, topk] (T = all leading dims)."""

    scores: torch.Tensor  # s, rounded to compute_dtype
    kept: torch.Tensor  # bool: expert belongs to a kept group
    masked_selection: torch.Tensor  # b, or masked_score for experts of dropped groups
    ids: torch.Tensor  # int64 [T, topk], routed picks only
    weights: torch.Tensor  # float32 [T, topk], routed weights only


def gate_reference(
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
    apply_routed_scaling_factor_on_output: bool = False,
    weights_from_masked_scores: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> GateReference:
    num_experts = logits.shape[-1]
    x = logits.reshape(-1, num_experts).float()
    score_dtype = compute_dtype or torch.float32

    scores = rounded(gate_scores(x, scoring_func), score_dtype)
    if bias is None:
        selection_dtype = score_dtype
        selection = scores
    else:
        selection_dtype = score_dtype if bias.dtype == score_dtype else torch.float32
        selection = rounded(scores + bias.float(), selection_dtype)
    fill = rounded(torch.tensor(masked_score, dtype=torch.float32), selection_dtype).item()

    kept = kept_experts(selection, num_expert_group, topk_group, group_score_topk, selection_dtype)
    masked = torch.where(kept, selection, torch.full_like(selection, fill))

    ids = _order_desc(masked)[:, :topk]
    weights = gate_weights_for_ids(
        scores, kept, ids, fill if weights_from_masked_scores else None, renormalize, renormalize_eps,
        1.0 if apply_routed_scaling_factor_on_output else routed_scaling_factor, score_dtype,
    )
    return GateReference(scores, kept, masked, ids, weights)


def gate_weights_for_ids(
    scores: torch.Tensor,
    kept: torch.Tensor,
    ids: torch.Tensor,
    masked_fill: float | None,
    renormalize: bool,
    renormalize_eps: float,
    scale: float,
    weight_dtype: torch.dtype,
) -> torch.Tensor:
    """Routed weights of the chosen `ids` [T, k] (step 4 of the contract)."""
    weights = picked_scores(scores, kept, ids, masked_fill)
    if renormalize:
        denominator = rounded(rounded(weights.sum(-1, keepdim=True), weight_dtype) + renormalize_eps, weight_dtype)
        weights = rounded(weights / denominator, weight_dtype)
    return rounded(weights * scale, weight_dtype)


def moe_fused_gate_reference(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    num_expert_group: int,
    topk_group: int,
    topk: int,
    *,
    num_fused_shared_experts: int = 0,
    weights_dtype: torch.dtype = torch.float32,
    ids_dtype: torch.dtype = torch.int32,
    **options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same arguments and outputs as ``ops.moe_fused_gate``."""
    ref = gate_reference(logits, bias, num_expert_group, topk_group, topk, **options)
    ids, weights = ref.ids, ref.weights
    if num_fused_shared_experts:
        num_experts = logits.shape[-1]
        rsf = options.get("routed_scaling_factor", 1.0)
        shared_weight = 1.0 / rsf if options.get("apply_routed_scaling_factor_on_output", False) else 1.0
        tokens = ids.shape[0]
        shared_ids = torch.arange(num_experts, num_experts + num_fused_shared_experts, device=ids.device)
        ids = torch.cat([ids, shared_ids.expand(tokens, -1)], dim=1)
        shared = torch.full((tokens, num_fused_shared_experts), shared_weight, device=ids.device)
        weights = torch.cat([weights, shared], dim=1)
    out_shape = (*logits.shape[:-1], topk + num_fused_shared_experts)
    return weights.to(weights_dtype).reshape(out_shape), ids.to(ids_dtype).reshape(out_shape)


def deepseek_v3_routing(
    router_logits: torch.Tensor,
    bias: torch.Tensor,
    num_expert_group: int,
    topk_group: int,
    topk: int,
    routed_scaling_factor: float = 2.5,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused DeepSeek-V3 routing as HF transformers writes it: returns (weights fp32, ids int64)."""
    num_experts = router_logits.shape[-1]
    scores = router_logits.reshape(-1, num_experts).float().sigmoid()
    scores_for_choice = scores + bias
    group_scores = scores_for_choice.view(-1, num_expert_group, num_experts // num_expert_group).topk(2, dim=-1)[0].sum(-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = (
        group_mask.unsqueeze(-1)
        .expand(-1, num_expert_group, num_experts // num_expert_group)
        .reshape(-1, num_experts)
    )
    scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), float("-inf"))
    topk_indices = torch.topk(scores_for_choice, k=topk, dim=-1, sorted=False)[1]
    topk_weights = scores.gather(1, topk_indices)
    if renormalize:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_weights * routed_scaling_factor, topk_indices


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float32 and 16-bit inputs; float64 inputs (the tests' gradient checks) stay float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def num_expert_slots(w_down: torch.Tensor, shared_gate: torch.Tensor | None) -> int:
    """E + S: the routed experts of w_down [E, H, I] and the shared slots of shared_gate [S*I, H]."""
    num_experts, _, inter = w_down.shape
    return num_experts + (0 if shared_gate is None else shared_gate.shape[0] // inter)


def expert_slot_weights(
    slot: int,
    num_experts: int,
    inter: int,
    routed: tuple[torch.Tensor | None, ...],
    shared: tuple[torch.Tensor | None, ...],
) -> tuple[torch.Tensor | None, ...]:
    """Views of one expert slot's gate [I, H], up [I, H] and down [H, I] weights.

    `routed` is (w_gate [E, I, H], w_up [E, I, H], w_down [E, H, I]) and slot e < E reads expert e;
    `shared` is (shared_gate [S*I, H], shared_up [S*I, H], shared_down [H, S*I]) and slot E + s reads
    rows [s*I, (s+1)*I) of the first two and those columns of the third. A None weight gives None
    (the backward passes gradient buffers in the same layout, None where no gradient is needed).
    """
    if slot < num_experts:
        return tuple(None if w is None else w[slot] for w in routed)
    start = (slot - num_experts) * inter
    return tuple(None if w is None else w.narrow(dim, start, inter) for w, dim in zip(shared, (0, 0, 1), strict=True))


def pair_weights(
    topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, shared_token_weight: torch.Tensor | None
) -> torch.Tensor:
    """The weight [T, K] of each (token, slot) pair: `topk_weights`, times the token's `shared_token_weight`
    (when given) on shared slots (ids >= E). Linear in `topk_weights`."""
    if shared_token_weight is None:
        return topk_weights
    return torch.where(topk_ids >= num_experts, topk_weights * shared_token_weight[:, None], topk_weights)


def fused_experts_reference(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor | None,
    w_down: torch.Tensor,
    shared_gate: torch.Tensor | None = None,
    shared_up: torch.Tensor | None = None,
    shared_down: torch.Tensor | None = None,
    shared_token_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The contract of ``fused_experts`` as a plain loop over expert slots, in float32 (float64 for float64 inputs).

    Returns float32 (no rounding of the intermediate or of the output), so that tests measure the
    kernels' rounding against exact-as-possible arithmetic; float64 inputs are computed and returned
    in float64 (the tests differentiate it with autograd). Ids outside ``[0, E + S)`` contribute
    nothing, as in the CUDA kernels (the CPU kernel rejects them).
    """
    w_gate, w_up = gate_and_up(w_gate, w_up)
    num_experts, inter, _ = w_gate.shape
    dtype = accumulation_dtype(hidden.dtype)
    x = hidden.to(dtype)
    ids = topk_ids.long()
    token_weight = None if shared_token_weight is None else shared_token_weight.to(dtype)
    weights = pair_weights(topk_weights.to(dtype), ids, num_experts, token_weight)
    out = torch.zeros_like(x)
    for e in range(num_expert_slots(w_down, shared_gate)):
        gate, up, down = expert_slot_weights(e, num_experts, inter, (w_gate, w_up, w_down),
                                             (shared_gate, shared_up, shared_down))
        token, slot = (ids == e).nonzero(as_tuple=True)
        xe = x[token]
        y = (torch.nn.functional.silu(xe @ gate.to(dtype).T) * (xe @ up.to(dtype).T)) @ down.to(dtype).T
        out.index_add_(0, token, y * weights[token, slot, None])
    return out


def pair_projections(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor | None,
    w_down: torch.Tensor,
    shared_gate: torch.Tensor | None = None,
    shared_up: torch.Tensor | None = None,
) -> torch.Tensor:
    """``fused_experts_train``'s second output [T*K, 2I], unrounded, in the accumulation dtype: row
    t*K + j is (gate_e x_t, up_e x_t) for e = topk_ids[t, j]; zeros for ids outside [0, E + S)."""
    w_gate, w_up = gate_and_up(w_gate, w_up)
    num_experts, inter, _ = w_gate.shape
    dtype = accumulation_dtype(hidden.dtype)
    x_all = hidden.to(dtype)
    ids = topk_ids.reshape(-1).long()
    out = hidden.new_zeros((ids.numel(), 2 * inter), dtype=dtype)
    for e in range(num_expert_slots(w_down, shared_gate)):
        gate, up, _ = expert_slot_weights(e, num_experts, inter, (w_gate, w_up, w_down), (shared_gate, shared_up, None))
        pairs = (ids == e).nonzero().squeeze(1)
        x = x_all.index_select(0, pairs.div(topk_ids.shape[1], rounding_mode="floor"))
        out[pairs] = torch.cat([x @ gate.to(dtype).T, x @ up.to(dtype).T], dim=1)
    return out
