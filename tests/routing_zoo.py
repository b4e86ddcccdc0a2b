"""A zoo of grouped top-k routers ("noaux_tc" / group-limited greedy), for testing the routing pass.

Every case is one way that public code writes the routing that ``ops.moe_fused_gate`` computes.
The same sequence of torch operations and methods is kept, reworded. Some cases are look-alikes:
they look like that routing but compute a different function, and the pass must leave them alone.

A case's module takes ``hidden_states`` and routes them with its own router weight ``[E, H]``,
plus ``e_score_correction_bias [E]`` when the spelling has one. Both are random, seeded from the
case name. ``expected`` holds the ``moe_fused_gate`` parameters that the pass must extract, or
``None`` for a look-alike; ``reason`` then says why the function differs. For a look-alike,
``naive`` gives the parameters that a matcher which missed the difference would extract. The
self-check confirms that those give different results on the sample input.

Each module's ``reference_logits(hidden_states)`` recomputes the router logits bit for bit, as
forward does. Those logits are what the fused op would receive, and the self-check feeds them to
``ops.reference.moe_fused_gate_reference``.

Parameters keep requires_grad, as in the public code; run_eager and the self-check run under
torch.no_grad(). Ids are compared as sets per token. Eager and the reference may differ only where
the reference's own selection values tie exactly; that happens with bf16 scores or logits, and among
experts of dropped groups that share a 0.0 fill. Inductor keeps bf16 intermediates in float32
unless ``torch._inductor.config.emulate_precision_casts`` is set. The compute_dtype=bf16 cases
therefore differ from eager when compiled without it; with it set, every case matches eager.

Run ``python tests/routing_zoo.py`` to check every expected case against the reference.
"""

from __future__ import annotations

import functools
import itertools
import math
import sys
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch._inductor.inductor_prims  # noqa: F401  (registers prims.prepare_softmax_online)
import torch.nn as nn
import torch.nn.functional as F

H = 32  # hidden size of every router in the zoo
NEG_INF = float("-inf")

_TRANSFORMERS = "https://github.com/huggingface/transformers/blob/main/src/transformers/models/"
_VLLM = "vllm-project/vllm vllm/model_executor/layers/fused_moe/router/grouped_topk_router.py"
_SGLANG = "sgl-project/sglang python/sglang/srt/layers/moe/topk.py"
_MEGATRON = "NVIDIA/Megatron-LM megatron/core/transformer/moe/moe_utils.py"
_TORCHTITAN = "pytorch/torchtitan torchtitan/models/common/moe.py (formerly torchtitan/models/moe/moe.py)"
_TORCHTITAN_MAIN = "pytorch/torchtitan torchtitan/models/common/moe/moe.py (main)"


@dataclass(frozen=True)
class RoutingCase:
    name: str
    source: str
    make_module: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    dtype: torch.dtype
    outputs: tuple[str, ...]
    expected: dict[str, Any] | None
    reason: str | None = None  # look-alikes: why it is not moe_fused_gate; expected cases: a note
    naive: dict[str, Any] | None = None  # look-alikes: what a matcher blind to the difference would extract


def _expect(
    num_expert_group: int,
    topk_group: int,
    topk: int,
    *,
    scoring_func: str = "sigmoid",
    group_score_topk: int = 2,
    masked_score: float = NEG_INF,
    renormalize: bool = True,
    renormalize_eps: float = 0.0,
    routed_scaling_factor: float = 1.0,
    has_bias: bool = True,
    weights_from_masked_scores: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    return dict(
        num_expert_group=num_expert_group,
        topk_group=topk_group,
        topk=topk,
        scoring_func=scoring_func,
        group_score_topk=group_score_topk,
        masked_score=masked_score,
        renormalize=renormalize,
        renormalize_eps=renormalize_eps,
        routed_scaling_factor=routed_scaling_factor,
        has_bias=has_bias,
        weights_from_masked_scores=weights_from_masked_scores,
        compute_dtype=compute_dtype,
    )


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


# --------------------------------------------------------------------------------------------
# Router base: parameters and the logits the fused op would see
# --------------------------------------------------------------------------------------------


class _Router(nn.Module):
    fp32_router = True  # forward casts hidden states and weight to float32 before the linear
    linear_on_input_shape = False  # forward applies the linear before flattening the tokens

    def __init__(
        self,
        *,
        seed: int,
        dtype: torch.dtype,
        num_experts: int,
        hidden_size: int = H,
        bias_dtype: torch.dtype | None = None,
        bias_is_parameter: bool = False,
        weight_dtype: torch.dtype | None = None,
        bias_scale: float = 0.1,
    ):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.num_experts = num_experts
        self.hidden_dim = hidden_size
        # Logits end up with a standard deviation of about 1.5 for inputs of randn * 2.
        weight = torch.randn(num_experts, hidden_size, generator=gen) * (0.75 / math.sqrt(hidden_size))
        self.weight = nn.Parameter(weight.to(weight_dtype or dtype))
        if bias_dtype is None:
            self.e_score_correction_bias = None
            return
        bias = (bias_scale * torch.randn(num_experts, generator=gen)).to(bias_dtype)
        assert (bias > 0).any() and (bias < 0).any()
        if bias_is_parameter:
            self.e_score_correction_bias = nn.Parameter(bias)
        else:
            self.register_buffer("e_score_correction_bias", bias)

    def reference_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Router logits [T, E], computed bit for bit as forward computes them."""
        x = hidden_states if self.linear_on_input_shape else hidden_states.reshape(-1, self.hidden_dim)
        if self.fp32_router:
            logits = F.linear(x.float(), self.weight.float())
        else:
            logits = F.linear(x, self.weight)
        return logits.reshape(-1, self.num_experts)


# --------------------------------------------------------------------------------------------
# HF transformers
# --------------------------------------------------------------------------------------------


class HFTopkRouter(_Router):
    """transformers v5 DeepseekV3TopkRouter. Glm4Moe, NemotronH, Dots1, SolarOpen and others use
    the same code."""

    def __init__(self, *, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor,
                 bias_dtype=torch.float32, **kw):
        super().__init__(bias_dtype=bias_dtype, **kw)
        self.top_k = top_k
        self.num_group = n_group
        self.topk_group = topk_group
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor

    def forward(self, hidden_states):
        hidden_states = hidden_states.view(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
        scores = router_logits.sigmoid()
        scores_for_choice = scores + self.e_score_correction_bias
        group_scores = (
            scores_for_choice.view(-1, self.num_group, self.num_experts // self.num_group)
            .topk(2, dim=-1)[0]
            .sum(dim=-1)
        )
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = (
            group_mask.unsqueeze(-1)
            .expand(-1, self.num_group, self.num_experts // self.num_group)
            .reshape(-1, self.num_experts)
        )
        scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), float("-inf"))
        topk_indices = torch.topk(scores_for_choice, k=self.top_k, dim=-1, sorted=False)[1]
        topk_weights = scores.gather(1, topk_indices)
        if self.norm_topk_prob:
            denominator = topk_weights.sum(dim=-1, keepdim=True) + 1e-20
            topk_weights /= denominator
        topk_weights = topk_weights * self.routed_scaling_factor
        return router_logits, topk_weights, topk_indices


class HFMistral4Router(_Router):
    """transformers v5 Mistral4TopkRouter: softmax, no bias, and no float32 cast, so a bf16 model
    routes in bf16."""

    fp32_router = False

    def __init__(self, *, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor, **kw):
        super().__init__(**kw)
        self.top_k = top_k
        self.num_group = n_group
        self.topk_group = topk_group
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor

    def forward(self, hidden_states):
        hidden_states = hidden_states.view(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)
        scores = router_logits.softmax(-1)
        group_scores = (
            scores.view(-1, self.num_group, self.num_experts // self.num_group).topk(2, dim=-1)[0].sum(dim=-1)
        )
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = (
            group_mask.unsqueeze(-1)
            .expand(-1, self.num_group, self.num_experts // self.num_group)
            .reshape(-1, self.num_experts)
        )
        scores_for_choice = scores.masked_fill(~score_mask.bool(), 0.0)
        topk_indices = torch.topk(scores_for_choice, k=self.top_k, dim=-1, sorted=False)[1]
        topk_weights = scores.gather(1, topk_indices)
        if self.norm_topk_prob:
            denominator = topk_weights.sum(dim=-1, keepdim=True) + 1e-20
            topk_weights /= denominator
        topk_weights = topk_weights * self.routed_scaling_factor
        return router_logits, topk_weights, topk_indices


class HFDeepseekV2Router(_Router):
    """transformers v5 DeepseekV2TopkRouter: softmax; "greedy" or "group_limited_greedy".
    The weights are the top-k values of the masked scores, and are never renormalised."""

    def __init__(self, *, top_k, topk_method, n_group, topk_group, routed_scaling_factor, **kw):
        super().__init__(**kw)
        self.top_k = top_k
        self.topk_method = topk_method
        self.num_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor

    def forward(self, hidden_states):
        hidden_states = hidden_states.view(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
        scores = router_logits.softmax(dim=-1, dtype=torch.float32)
        if self.topk_method == "greedy":
            topk_weights, topk_indices = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        elif self.topk_method == "group_limited_greedy":
            group_scores = scores.view(-1, self.num_group, self.num_experts // self.num_group).max(dim=-1).values
            group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores)
            group_mask.scatter_(1, group_idx, 1)
            score_mask = (
                group_mask.unsqueeze(-1)
                .expand(-1, self.num_group, self.num_experts // self.num_group)
                .reshape(-1, self.num_experts)
            )
            scores = scores.masked_fill(~score_mask.bool(), 0.0)
            topk_weights, topk_indices = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        topk_weights = topk_weights * self.routed_scaling_factor
        return router_logits, topk_weights, topk_indices


class HFDeepseekV4Router(_Router):
    """transformers v5 DeepseekV4TopKRouter: biased top-k with no groups at all (G=1 semantics).
    The scoring function is a module, ACT2FN["sigmoid"] = nn.Sigmoid."""

    fp32_router = False

    def __init__(self, *, top_k, routed_scaling_factor, **kw):
        super().__init__(bias_dtype=torch.float32, **kw)
        self.top_k = top_k
        self.score_fn = nn.Sigmoid()
        self.routed_scaling_factor = routed_scaling_factor

    def forward(self, hidden_states):
        flat = hidden_states.reshape(-1, self.hidden_dim)
        logits = F.linear(flat, self.weight)
        scores = self.score_fn(logits)
        indices = torch.topk(scores + self.e_score_correction_bias, self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, indices)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, weights * self.routed_scaling_factor, indices


class HFLongcatFlashRouter(_Router):
    """transformers v5 LongcatFlashTopkRouter: softmax scores plus a selection bias, no groups, no
    renormalisation. E counts the zero-computation experts too. The selection runs under
    @torch.no_grad()."""

    def __init__(self, *, top_k, routed_scaling_factor, **kw):
        super().__init__(bias_dtype=torch.float32, **kw)
        self.top_k = top_k
        self.routed_scaling_factor = routed_scaling_factor

    def forward(self, hidden_states):
        hidden_states = hidden_states.view(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
        scores = router_logits.softmax(dim=-1)
        topk_indices = self.get_topk_indices(scores)
        topk_weights = scores.gather(1, topk_indices)
        topk_weights = topk_weights * self.routed_scaling_factor
        return router_logits, topk_weights.to(router_logits.dtype), topk_indices

    @torch.no_grad()
    def get_topk_indices(self, scores):
        scores_for_choice = scores.view(-1, self.num_experts) + self.e_score_correction_bias.unsqueeze(0)
        topk_indices = torch.topk(scores_for_choice, k=self.top_k, dim=-1, sorted=False)[1]
        return topk_indices


class HFLegacyDeepseekV3Router(_Router):
    """transformers v4.5x DeepseekV3TopkRouter. The selection is in a @torch.no_grad() method, the
    bias is added with unsqueeze(0), and dropped groups are filled with 0.0 rather than -inf."""

    def __init__(self, *, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor, **kw):
        super().__init__(bias_dtype=torch.float32, **kw)
        self.top_k = top_k
        self.n_group = n_group
        self.topk_group = topk_group
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor

    @torch.no_grad()
    def get_topk_indices(self, scores):
        scores_for_choice = scores.view(-1, self.num_experts) + self.e_score_correction_bias.unsqueeze(0)
        group_scores = (
            scores_for_choice.view(-1, self.n_group, self.num_experts // self.n_group)
            .topk(2, dim=-1)[0]
            .sum(dim=-1)
        )
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = (
            group_mask.unsqueeze(-1)
            .expand(-1, self.n_group, self.num_experts // self.n_group)
            .reshape(-1, self.num_experts)
        )
        scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), 0.0)
        topk_indices = torch.topk(scores_for_choice, k=self.top_k, dim=-1, sorted=False)[1]
        return topk_indices

    def forward(self, hidden_states):
        hidden_states = hidden_states.view(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
        scores = router_logits.sigmoid()
        topk_indices = self.get_topk_indices(scores)
        topk_weights = scores.gather(1, topk_indices)
        if self.norm_topk_prob:
            denominator = topk_weights.sum(dim=-1, keepdim=True) + 1e-20
            topk_weights /= denominator
        topk_weights = topk_weights * self.routed_scaling_factor
        return topk_indices, topk_weights


class HubDeepseekV3MoEGate(_Router):
    """DeepSeek-V3 HF Hub remote code (modeling_deepseek.py MoEGate, topk_method="noaux_tc").
    The shapes come from (bsz, seq_len), so the input must be 3-D."""

    def __init__(self, *, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor, **kw):
        super().__init__(bias_dtype=torch.float32, **kw)
        self.top_k = top_k
        self.n_group = n_group
        self.topk_group = topk_group
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor

    def forward(self, hidden_states):
        bsz, seq_len, h = hidden_states.shape
        hidden_states = hidden_states.view(-1, h)
        logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32), None)
        scores = logits.sigmoid()
        scores_for_choice = scores.view(bsz * seq_len, -1) + self.e_score_correction_bias.unsqueeze(0)
        group_scores = scores_for_choice.view(bsz * seq_len, self.n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = (
            group_mask.unsqueeze(-1)
            .expand(bsz * seq_len, self.n_group, self.num_experts // self.n_group)
            .reshape(bsz * seq_len, -1)
        )
        tmp_scores = scores_for_choice.masked_fill(~score_mask.bool(), 0.0)
        _, topk_idx = torch.topk(tmp_scores, k=self.top_k, dim=-1, sorted=False)
        topk_weight = scores.gather(1, topk_idx)
        if self.top_k > 1 and self.norm_topk_prob:
            denominator = topk_weight.sum(dim=-1, keepdim=True) + 1e-20
            topk_weight = topk_weight / denominator
        topk_weight = topk_weight * self.routed_scaling_factor
        return topk_idx, topk_weight


class HubDeepseekV2MoEGate(_Router):
    """DeepSeek-V2 HF Hub remote code MoEGate, group_limited_greedy. With norm_topk_prob the
    weights are renormalised and routed_scaling_factor is *not* applied (the else branch)."""

    def __init__(self, *, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor, **kw):
        super().__init__(**kw)
        self.top_k = top_k
        self.n_group = n_group
        self.topk_group = topk_group
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor

    def forward(self, hidden_states):
        bsz, seq_len, h = hidden_states.shape
        hidden_states = hidden_states.view(-1, h)
        logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32), None)
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        group_scores = scores.view(bsz * seq_len, self.n_group, -1).max(dim=-1).values
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = (
            group_mask.unsqueeze(-1)
            .expand(bsz * seq_len, self.n_group, self.num_experts // self.n_group)
            .reshape(bsz * seq_len, -1)
        )
        tmp_scores = scores.masked_fill(~score_mask.bool(), 0.0)
        topk_weight, topk_idx = torch.topk(tmp_scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            denominator = topk_weight.sum(dim=-1, keepdim=True) + 1e-20
            topk_weight = topk_weight / denominator
        else:
            topk_weight = topk_weight * self.routed_scaling_factor
        return topk_idx, topk_weight


# --------------------------------------------------------------------------------------------
# DeepSeek official inference code
# --------------------------------------------------------------------------------------------


class DeepSeekV3Gate(_Router):
    """deepseek-ai/DeepSeek-V3 inference/model.py Gate. The routing runs in the model's dtype
    (bf16); softmax is taken in float32. Dropped groups are masked in place on a view of the
    scores. With no bias, that view aliases original_scores, so the gathered weights are the
    masked scores."""

    fp32_router = False

    def __init__(self, *, topk, n_groups, topk_groups, score_func, route_scale, **kw):
        super().__init__(bias_is_parameter=True, **kw)
        self.topk = topk
        self.n_groups = n_groups
        self.topk_groups = topk_groups
        self.score_func = score_func
        self.route_scale = route_scale

    def forward(self, x):
        scores = F.linear(x, self.weight)
        if self.score_func == "softmax":
            scores = scores.softmax(dim=-1, dtype=torch.float32)
        else:
            scores = scores.sigmoid()
        original_scores = scores
        if self.e_score_correction_bias is not None:
            scores = scores + self.e_score_correction_bias
        if self.n_groups > 1:
            scores = scores.view(x.size(0), self.n_groups, -1)
            if self.e_score_correction_bias is None:
                group_scores = scores.amax(dim=-1)
            else:
                group_scores = scores.topk(2, dim=-1)[0].sum(dim=-1)
            indices = group_scores.topk(self.topk_groups, dim=-1)[1]
            mask = scores.new_ones(x.size(0), self.n_groups, dtype=bool).scatter_(1, indices, False)
            scores = scores.masked_fill_(mask.unsqueeze(-1), float("-inf")).flatten(1)
        indices = torch.topk(scores, self.topk, dim=-1)[1]
        weights = original_scores.gather(1, indices)
        if self.score_func == "sigmoid":
            weights /= weights.sum(dim=-1, keepdim=True)
        weights *= self.route_scale
        return weights.type_as(x), indices


class DeepSeekV32Gate(_Router):
    """deepseek-ai/DeepSeek-V3.2-Exp inference/model.py Gate: float32 routing, and every top-k
    with sorted=False. The weights are returned in float32."""

    def __init__(self, *, topk, n_groups, topk_groups, score_func, route_scale, **kw):
        super().__init__(bias_dtype=torch.float32, bias_is_parameter=True, **kw)
        self.topk = topk
        self.n_groups = n_groups
        self.topk_groups = topk_groups
        self.score_func = score_func
        self.route_scale = route_scale

    def forward(self, x):
        scores = F.linear(x.float(), self.weight.float())
        if self.score_func == "softmax":
            scores = scores.softmax(dim=-1)
        else:
            scores = scores.sigmoid()
        original_scores = scores
        if self.e_score_correction_bias is not None:
            scores = scores + self.e_score_correction_bias
        if self.n_groups > 1:
            scores = scores.view(x.size(0), self.n_groups, -1)
            if self.e_score_correction_bias is None:
                group_scores = scores.amax(dim=-1)
            else:
                group_scores = scores.topk(2, dim=-1, sorted=False)[0].sum(dim=-1)
            indices = group_scores.topk(self.topk_groups, dim=-1, sorted=False)[1]
            mask = scores.new_ones(x.size(0), self.n_groups, dtype=bool).scatter_(1, indices, False)
            scores = scores.masked_fill_(mask.unsqueeze(-1), float("-inf")).flatten(1)
        indices = scores.topk(self.topk, dim=-1, sorted=False)[1]
        weights = original_scores.gather(1, indices)
        if self.score_func == "sigmoid":
            weights /= weights.sum(dim=-1, keepdim=True)
        weights *= self.route_scale
        return weights, indices


class DeepSeekV3ForkGate(_Router):
    """A stored fork revision of DeepSeek-V3 inference/model.py (deepseek-ai/DeepSeek-V3 commit
    013e2213 in the index). The bias is added in place, groups are masked by multiplying with a
    0/1 mask, and the weights are gathered from those biased, masked scores."""

    fp32_router = False

    def __init__(self, *, topk, n_groups, topk_groups, score_func, route_scale, **kw):
        super().__init__(bias_dtype=torch.float32, bias_is_parameter=True, **kw)
        self.topk = topk
        self.n_groups = n_groups
        self.topk_groups = topk_groups
        self.score_func = score_func
        self.route_scale = route_scale

    def reference_logits(self, hidden_states):
        return torch.matmul(hidden_states, self.weight.T)

    def forward(self, x):
        scores = torch.matmul(x, self.weight.T)
        if self.score_func == "softmax":
            scores = scores.softmax(dim=-1, dtype=torch.float32)
        else:
            scores = scores.sigmoid()
        if self.e_score_correction_bias is not None:
            scores += self.e_score_correction_bias
        if self.n_groups > 1:
            scores = scores.view(x.size(0), self.n_groups, -1)
            group_scores = (
                scores.amax(dim=-1) if self.e_score_correction_bias is None else scores.topk(2, dim=-1)[0].sum(dim=-1)
            )
            indices = group_scores.topk(self.topk_groups, dim=-1)[1]
            mask = torch.zeros_like(scores[..., 0]).scatter_(1, indices, 1)
            scores = (scores * mask.unsqueeze(-1)).flatten(1)
        indices = scores.topk(self.topk, dim=-1)[1]
        weights = scores.gather(1, indices)
        if self.score_func == "sigmoid":
            weights /= weights.sum(dim=-1, keepdim=True)
        return (weights * self.route_scale).type_as(x), indices


# --------------------------------------------------------------------------------------------
# vLLM, sglang
# --------------------------------------------------------------------------------------------


class VllmGroupedTopk(_Router):
    """vLLM grouped_topk, the torch fallback, fed by the gate linear in the model's dtype.
    vLLM's e_score_correction_bias is float32. Before PR #13474, dropped groups were filled
    with 0.0."""

    fp32_router = False

    def __init__(self, *, topk, renormalize, num_expert_group, topk_group, scoring_func,
                 routed_scaling_factor=1.0, fill=NEG_INF, **kw):
        super().__init__(**kw)
        self.topk = topk
        self.renormalize = renormalize
        self.num_expert_group = num_expert_group
        self.topk_group = topk_group
        self.scoring_func = scoring_func
        self.routed_scaling_factor = routed_scaling_factor
        self.fill = fill

    def forward(self, hidden_states):
        gating_output = F.linear(hidden_states, self.weight)
        if self.scoring_func == "softmax":
            scores = torch.softmax(gating_output, dim=-1)
        else:
            scores = gating_output.sigmoid()
        num_token = scores.size(0)
        if self.e_score_correction_bias is not None:
            original_scores = scores
            scores = scores + self.e_score_correction_bias.unsqueeze(0)
            group_scores = scores.view(num_token, self.num_expert_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
        else:
            group_scores = scores.view(num_token, self.num_expert_group, -1).max(dim=-1).values
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = (
            group_mask.unsqueeze(-1)
            .expand(num_token, self.num_expert_group, scores.size(-1) // self.num_expert_group)
            .reshape(num_token, -1)
        )
        tmp_scores = scores.masked_fill(~score_mask.bool(), self.fill)
        if self.e_score_correction_bias is not None:
            topk_ids = torch.topk(tmp_scores, k=self.topk, dim=-1, sorted=False)[1]
            topk_weights = original_scores.gather(1, topk_ids)
        else:
            topk_weights, topk_ids = torch.topk(tmp_scores, k=self.topk, dim=-1, sorted=False)
        if self.renormalize:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        if self.routed_scaling_factor != 1.0:
            topk_weights = topk_weights * self.routed_scaling_factor
        return topk_weights.to(torch.float32), topk_ids.to(torch.int32)


class SglangBiasedGroupedTopk(_Router):
    """sglang biased_grouped_topk_impl (no fused shared experts). routed_scaling_factor is
    applied (in place) only when apply_routed_scaling_factor_on_output is set."""

    fp32_router = False

    def __init__(self, *, topk, renormalize, num_expert_group, topk_group, routed_scaling_factor,
                 apply_routed_scaling_factor_on_output, **kw):
        super().__init__(bias_dtype=torch.float32, **kw)
        self.topk = topk
        self.renormalize = renormalize
        self.num_expert_group = num_expert_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.apply_routed_scaling_factor_on_output = apply_routed_scaling_factor_on_output

    def forward(self, hidden_states):
        gating_output = F.linear(hidden_states, self.weight)
        scores = gating_output.sigmoid()
        num_token = scores.shape[0]
        scores_for_choice = scores.view(num_token, -1) + self.e_score_correction_bias.unsqueeze(0)
        group_scores = scores_for_choice.view(num_token, self.num_expert_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = (
            group_mask.unsqueeze(-1)
            .expand(num_token, self.num_expert_group, scores.shape[-1] // self.num_expert_group)
            .reshape(num_token, -1)
        )
        tmp_scores = scores_for_choice.masked_fill(~score_mask.bool(), float("-inf"))
        _, topk_ids = torch.topk(tmp_scores, k=self.topk, dim=-1, sorted=False)
        topk_weights = scores.gather(1, topk_ids)
        if self.renormalize:
            topk_weights_sum = topk_weights.sum(dim=-1, keepdim=True)
            topk_weights = topk_weights / topk_weights_sum
            if self.apply_routed_scaling_factor_on_output:
                topk_weights *= self.routed_scaling_factor
        topk_weights, topk_ids = topk_weights.to(torch.float32), topk_ids.to(torch.int32)
        return topk_weights, topk_ids


class SglangGroupedTopk(_Router):
    """sglang grouped_topk_gpu (the DeepSeek-V2 softmax path, no fused shared experts)."""

    fp32_router = False

    def __init__(self, *, topk, renormalize, num_expert_group, topk_group, **kw):
        super().__init__(**kw)
        self.topk = topk
        self.renormalize = renormalize
        self.num_expert_group = num_expert_group
        self.topk_group = topk_group

    def forward(self, hidden_states):
        gating_output = F.linear(hidden_states, self.weight)
        scores = torch.softmax(gating_output, dim=-1)
        num_token = scores.shape[0]
        group_scores = scores.view(num_token, self.num_expert_group, -1).max(dim=-1).values
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = (
            group_mask.unsqueeze(-1)
            .expand(num_token, self.num_expert_group, scores.shape[-1] // self.num_expert_group)
            .reshape(num_token, -1)
        )
        tmp_scores = scores.masked_fill(~score_mask.bool(), 0.0)
        topk_weights, topk_ids = torch.topk(tmp_scores, k=self.topk, dim=-1, sorted=False)
        if self.renormalize:
            topk_weights_sum = topk_weights.sum(dim=-1, keepdim=True)
            topk_weights = topk_weights / topk_weights_sum
        topk_weights, topk_ids = topk_weights.to(torch.float32), topk_ids.to(torch.int32)
        return topk_weights, topk_ids


class SglangKimiK2BiasedTopk(_Router):
    """sglang kimi_k2_biased_topk_impl: the num_expert_group=1 shortcut, with no group ops, and
    apply_routed_scaling_factor_on_output=True (hence the in-place *= rsf)."""

    fp32_router = False

    def __init__(self, *, topk, renormalize, routed_scaling_factor, **kw):
        super().__init__(bias_dtype=torch.float32, **kw)
        self.topk = topk
        self.renormalize = renormalize
        self.routed_scaling_factor = routed_scaling_factor

    def forward(self, hidden_states):
        gating_output = F.linear(hidden_states, self.weight)
        scores = gating_output.sigmoid()
        num_token = scores.shape[0]
        tmp_scores = scores.view(num_token, -1) + self.e_score_correction_bias.unsqueeze(0)
        _, topk_ids = torch.topk(tmp_scores, k=self.topk, dim=-1, sorted=False)
        topk_weights = scores.gather(1, topk_ids)
        if self.renormalize:
            topk_weights_sum = topk_weights.sum(dim=-1, keepdim=True)
            topk_weights = topk_weights / topk_weights_sum
            topk_weights *= self.routed_scaling_factor
        topk_weights, topk_ids = topk_weights.to(torch.float32), topk_ids.to(torch.int32)
        return topk_weights, topk_ids


# --------------------------------------------------------------------------------------------
# torchtitan, Megatron-Core, Ling (BailingMoeV2)
# --------------------------------------------------------------------------------------------


class TorchtitanRouter(_Router):
    """torchtitan TokenChoiceTopKRouter, which routes on (B, L, E) or (T, E). It builds a
    ones_like bool group mask, masks on the grouped tensor, then flattens. torchtitan passes
    expert_bias into forward; this module owns it. The gate's float32 autocast region is left
    out: it is a no-op for float32 inputs, and CPU autocast does not take float32."""

    fp32_router = False
    linear_on_input_shape = True

    def __init__(self, *, top_k, num_expert_groups, num_limited_groups, score_func, route_norm,
                 route_scale, **kw):
        super().__init__(**kw)
        self.top_k = top_k
        self.num_expert_groups = num_expert_groups
        self.num_limited_groups = num_limited_groups
        self.score_func = score_func
        self.route_norm = route_norm
        self.route_scale = route_scale

    def _get_node_limited_routing_scores(self, scores_for_choice_BLE):
        experts_per_group = self.num_experts // self.num_expert_groups
        scores_grouped = scores_for_choice_BLE.unflatten(-1, (self.num_expert_groups, experts_per_group))
        top2_scores_in_group, _ = scores_grouped.topk(2, dim=-1)
        group_scores = top2_scores_in_group.sum(dim=-1)
        _, group_idx = torch.topk(group_scores, k=self.num_limited_groups, dim=-1, sorted=False)
        group_mask = torch.ones_like(group_scores, dtype=torch.bool)
        group_mask.scatter_(-1, group_idx, False)  # False = selected groups (keep)
        scores_for_choice_BLE = scores_grouped.masked_fill(group_mask.unsqueeze(-1), float("-inf")).flatten(-2)
        return scores_for_choice_BLE

    def forward(self, x_BLD):
        scores_BLE = F.linear(x_BLD, self.weight)
        if self.score_func == "sigmoid":
            scores_BLE = torch.sigmoid(scores_BLE)
        else:
            scores_BLE = F.softmax(scores_BLE, dim=-1)
        expert_bias_E = self.e_score_correction_bias
        scores_for_choice_BLE = scores_BLE if expert_bias_E is None else scores_BLE + expert_bias_E
        if self.num_expert_groups is not None:
            scores_for_choice_BLE = self._get_node_limited_routing_scores(scores_for_choice_BLE)
        _, topk_expert_ids_BLK = torch.topk(scores_for_choice_BLE, k=self.top_k, dim=-1, sorted=False)
        topk_scores_BLK = scores_BLE.gather(dim=-1, index=topk_expert_ids_BLK)
        if self.route_norm:
            denominator = topk_scores_BLK.sum(dim=-1, keepdim=True) + 1e-20
            topk_scores_BLK = topk_scores_BLK / denominator
        topk_scores_BLK = topk_scores_BLK * self.route_scale
        return topk_scores_BLK, topk_expert_ids_BLK, scores_BLE


class TorchtitanMainRouter(TorchtitanRouter):
    """torchtitan main's TokenChoiceTopKRouter on (T, D) tokens. The gate runs in float32 (torchtitan:
    an autocast region to float32, which CPU autocast does not take, so here float32 operands);
    node-limited routing views the selection scores (-1, G, P), scatters False into a ones_like bool
    mask along dim 1 and views the masked scores back (-1, E); the router also counts the tokens per
    expert with histc (of float ids: the CPU kernel takes no integers). With ``bmm_weights`` the
    weights are returned as MoE.forward's combine reads them, top_scores.reshape(-1, 1, K): they
    then leave the routing as [T, 1, K] and the ids as [T, K]."""

    fp32_router = True
    linear_on_input_shape = False

    def __init__(self, *, bmm_weights=False, **kw):
        super().__init__(**kw)
        self.bmm_weights = bmm_weights

    def _get_node_limited_routing_scores(self, scores_for_choice):
        experts_per_group = self.num_experts // self.num_expert_groups
        scores_grouped = scores_for_choice.view(-1, self.num_expert_groups, experts_per_group)
        top2_scores_in_group, _ = scores_grouped.topk(2, dim=-1)
        group_scores = top2_scores_in_group.sum(dim=-1)
        _, group_idx = torch.topk(group_scores, k=self.num_limited_groups, dim=-1, sorted=False)
        group_mask = torch.ones_like(group_scores, dtype=torch.bool)
        group_mask.scatter_(1, group_idx, False)  # False = kept group
        return scores_grouped.masked_fill(group_mask.unsqueeze(-1), float("-inf")).view(-1, self.num_experts)

    def forward(self, x):
        scores = F.linear(x.float(), self.weight.float())
        if self.score_func == "sigmoid":
            scores = torch.sigmoid(scores)
        else:
            scores = F.softmax(scores, dim=1)
        expert_bias = self.e_score_correction_bias
        scores_for_choice = scores if expert_bias is None else scores + expert_bias
        if self.num_expert_groups is not None:
            scores_for_choice = self._get_node_limited_routing_scores(scores_for_choice)
        _, selected_experts_indices = torch.topk(scores_for_choice, k=self.top_k, dim=-1, sorted=False)
        top_scores = scores.gather(dim=1, index=selected_experts_indices)
        if self.route_norm:
            top_scores = top_scores / (top_scores.sum(dim=-1, keepdim=True) + 1e-20)
        top_scores = top_scores * self.route_scale
        num_tokens_per_expert = torch.histc(selected_experts_indices.view(-1).float(), bins=self.num_experts,
                                            min=0, max=self.num_experts)
        if self.bmm_weights:
            top_scores = top_scores.reshape(-1, 1, self.top_k)
        return top_scores, selected_experts_indices, num_tokens_per_expert


class MegatronRouter(_Router):
    """Megatron-Core TopKRouter: gating followed by topk_routing_with_score_function(...,
    dense_output=True) in the unfused path. Input is (seq, batch, hidden). group_limited_topk
    scores a group by the sum of its top (topk // group_topk) scores. Its final top-k is
    sorted, and its probs are the top-k values of the masked scores."""

    fp32_router = False
    linear_on_input_shape = True

    def __init__(self, *, topk, num_groups, group_topk, score_function, use_pre_softmax=False,
                 scaling_factor=None, bias_dtype=None, **kw):
        super().__init__(bias_dtype=bias_dtype, **kw)
        self.topk = topk
        self.num_groups = num_groups
        self.group_topk = group_topk
        self.score_function = score_function
        self.use_pre_softmax = use_pre_softmax
        self.scaling_factor = scaling_factor

    def group_limited_topk(self, scores, topk, num_tokens, num_experts, num_groups, group_topk):
        group_scores = scores.view(num_tokens, num_groups, -1).topk(topk // group_topk, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=group_topk, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = (
            group_mask.unsqueeze(-1)
            .expand(num_tokens, num_groups, num_experts // num_groups)
            .reshape(num_tokens, -1)
        )
        masked_scores = scores.masked_fill(~score_mask.bool(), float("-inf"))
        probs, top_indices = torch.topk(masked_scores, k=topk, dim=-1)
        return probs, top_indices

    def forward(self, hidden_states):
        logits = F.linear(hidden_states, self.weight)
        logits = logits.view(-1, self.num_experts)
        num_tokens, num_experts = logits.shape

        def compute_topk(scores):
            return self.group_limited_topk(scores, self.topk, num_tokens, num_experts, self.num_groups, self.group_topk)

        if self.score_function == "softmax":
            if self.use_pre_softmax:
                scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
                probs, top_indices = compute_topk(scores)
            else:
                scores, top_indices = compute_topk(logits)
                probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        else:
            if self.score_function == "sigmoid":
                scores = torch.sigmoid(logits.float())
            else:  # "sqrtsoftplus"
                scores = torch.nn.functional.softplus(logits.float()).sqrt()
            if self.e_score_correction_bias is not None:
                scores_for_routing = scores + self.e_score_correction_bias.float()
                _, top_indices = compute_topk(scores_for_routing)
                scores = torch.gather(scores, dim=1, index=top_indices)
            else:
                scores, top_indices = compute_topk(scores)
            probs = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20) if self.topk > 1 else scores
        if self.scaling_factor:
            probs = probs * self.scaling_factor
        probs = probs.type_as(logits)
        return probs, top_indices


class BailingMoeV2Gate(_Router):
    """inclusionAI Ling 2.0 remote code (modeling_bailing_moe_v2.py BailingMoeV2Gate). The
    group-limited top-k returns the biased probs, which are discarded, and the weights are
    gathered afterwards with torch.gather."""

    def __init__(self, *, top_k, n_group, topk_group, routed_scaling_factor, **kw):
        super().__init__(bias_dtype=torch.float32, **kw)
        self.top_k = top_k
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor

    def group_limited_topk(self, scores):
        num_tokens, _ = scores.size()
        group_scores = scores.view(num_tokens, self.n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = (
            group_mask.unsqueeze(-1)
            .expand(num_tokens, self.n_group, self.num_experts // self.n_group)
            .reshape(num_tokens, -1)
        )
        masked_scores = scores.masked_fill(~score_mask.bool(), float("-inf"))
        probs, top_indices = torch.topk(masked_scores, k=self.top_k, dim=-1)
        return probs, top_indices

    def forward(self, hidden_states):
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
        scores = torch.sigmoid(logits.float()).type_as(logits)
        scores_for_routing = scores + self.e_score_correction_bias
        _, topk_idx = self.group_limited_topk(scores_for_routing)
        scores = torch.gather(scores, dim=1, index=topk_idx).type_as(logits)
        topk_weight = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20) if self.top_k > 1 else scores
        topk_weight = topk_weight * self.routed_scaling_factor
        return topk_idx, topk_weight, logits


# --------------------------------------------------------------------------------------------
# Spelling variants (DESIGN.md section 4) and look-alikes
# --------------------------------------------------------------------------------------------


class _Variant(_Router):
    """Flat [T, E] routing in the HF style. Each knob is one way that code writes a step. The
    methods are the seams where a look-alike changes exactly one step."""

    def __init__(self, *, n_group, topk_group, top_k, scoring="sigmoid", cast="type", bias_add="plain",
                 grouping="view", group_score=("topk", 2), fill=NEG_INF, fill_inplace=False, mask="scatter",
                 final_sorted=False, renorm="eps", inplace_ops=False, rsf=None,
                 no_grad_selection=False, return_scores=False, bias_dtype=torch.float32, **kw):
        super().__init__(bias_dtype=bias_dtype, **kw)
        self.n_group, self.topk_group, self.top_k = n_group, topk_group, top_k
        self.scoring, self.cast, self.bias_add, self.grouping = scoring, cast, bias_add, grouping
        self.group_score, self.fill, self.fill_inplace, self.mask = group_score, fill, fill_inplace, mask
        self.final_sorted, self.renorm = final_sorted, renorm
        self.inplace_ops, self.rsf = inplace_ops, rsf
        self.no_grad_selection, self.return_scores = no_grad_selection, return_scores
        self.fp32_router = cast is not None

    def forward(self, hidden_states):
        x = hidden_states.view(-1, self.hidden_dim)
        if self.cast == "type":
            logits = F.linear(x.type(torch.float32), self.weight.type(torch.float32))
        elif self.cast == "float":
            logits = F.linear(x.float(), self.weight.float())
        else:
            logits = F.linear(x, self.weight)
        scores = self.score(logits)
        if self.no_grad_selection:
            with torch.no_grad():
                _, ids = self.select(scores)
        else:
            _, ids = self.select(scores)
        weights = self.weights_of(scores, ids, logits)
        weights = self.normalise(weights)
        if self.rsf is not None:
            if self.inplace_ops:
                weights *= self.rsf
            else:
                weights = weights * self.rsf
        return (weights, ids, scores) if self.return_scores else (weights, ids)

    def score(self, logits):
        return logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)

    def with_bias(self, scores):
        if self.e_score_correction_bias is None:
            return scores
        if self.bias_add == "unsqueeze":
            return scores + self.e_score_correction_bias.unsqueeze(0)
        return scores + self.e_score_correction_bias

    def grouped(self, choice):
        if self.grouping == "unflatten":
            return choice.unflatten(-1, (self.n_group, self.num_experts // self.n_group))
        if self.grouping == "view_T":
            return choice.view(choice.shape[0], self.n_group, -1)
        return choice.view(-1, self.n_group, self.num_experts // self.n_group)

    def group_scores(self, grouped):
        kind, m = self.group_score
        if kind == "topk":
            return grouped.topk(m, dim=-1)[0].sum(dim=-1)
        if kind == "topk_values":
            return grouped.topk(m, dim=-1).values.sum(-1)
        if kind == "amax":
            return grouped.amax(dim=-1)
        if kind == "max":
            return grouped.max(dim=-1).values
        return grouped.mean(dim=-1)

    def kept_groups(self, group_scores):
        return torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]

    def expert_mask(self, group_scores, group_idx):
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        return (
            group_mask.unsqueeze(-1)
            .expand(-1, self.n_group, self.num_experts // self.n_group)
            .reshape(-1, self.num_experts)
        )

    def masked(self, choice, score_mask):
        if self.mask == "multiply":
            return choice * score_mask
        if self.fill_inplace:
            return choice.masked_fill_(~score_mask.bool(), self.fill)
        return choice.masked_fill(~score_mask.bool(), self.fill)

    def pick(self, choice):
        return torch.topk(choice, k=self.top_k, dim=-1, sorted=self.final_sorted)

    def select(self, scores):
        choice = self.with_bias(scores)
        group_scores = self.group_scores(self.grouped(choice))
        score_mask = self.expert_mask(group_scores, self.kept_groups(group_scores))
        return self.pick(self.masked(choice, score_mask))

    def weights_of(self, scores, ids, logits):
        return scores.gather(1, ids)

    def normalise(self, weights):
        if self.renorm is None:
            return weights
        if self.renorm == "eps":
            denominator = weights.sum(dim=-1, keepdim=True) + 1e-20
        else:
            denominator = weights.sum(dim=-1, keepdim=True)
        if self.inplace_ops:
            weights /= denominator
            return weights
        return weights / denominator


class _DeadGroupMask(_Variant):
    """The masked scores are computed and dropped: the final top-k reads the unmasked ones."""

    def masked(self, choice, score_mask):
        choice.masked_fill(~score_mask.bool(), self.fill)  # result unused, as in the buggy code
        return choice


class _PerTokenFill(_Variant):
    def masked(self, choice, score_mask):
        return torch.where(score_mask.bool(), choice, choice.mean(dim=-1, keepdim=True))


class _GroupScoreFromUnbiased(_Variant):
    def select(self, scores):
        choice = self.with_bias(scores)
        group_scores = self.group_scores(self.grouped(scores))  # groups ranked without the bias
        score_mask = self.expert_mask(group_scores, self.kept_groups(group_scores))
        return self.pick(self.masked(choice, score_mask))


class _SmallestK(_Variant):
    def pick(self, choice):
        return torch.topk(choice, k=self.top_k, dim=-1, largest=False, sorted=False)


class _WeightsFromLogits(_Variant):
    def weights_of(self, scores, ids, logits):
        return logits.gather(1, ids)


class _RenormOverFirstKMinus1(_Variant):
    def normalise(self, weights):
        return weights / weights[:, :-1].sum(dim=-1, keepdim=True)


class _RenormEpsFromTensor(_Variant):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.register_buffer("renorm_eps", torch.tensor(0.5))

    def normalise(self, weights):
        return weights / (weights.sum(dim=-1, keepdim=True) + self.renorm_eps)


class _RenormClampMin(_Variant):
    def normalise(self, weights):
        return weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)


class _ReluScoring(_Variant):
    def score(self, logits):
        return torch.relu(logits)


class _GroupMaskFromValues(_Variant):
    def kept_groups(self, group_scores):
        return torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[0].long()


class _ScaledBeforeBias(_Variant):
    def with_bias(self, scores):
        return scores * 2 + self.e_score_correction_bias


class _StridedGroups(_Variant):
    """view(-1, E // G, G) with the group reduction over dim=-2: group j is experts j, j+G,
    j+2G, and so on. The mask is expanded the same way, so the code is self-consistent."""

    def grouped(self, choice):
        return choice.view(-1, self.num_experts // self.n_group, self.n_group)

    def group_scores(self, grouped):
        return grouped.topk(2, dim=-2)[0].sum(dim=-2)

    def expert_mask(self, group_scores, group_idx):
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        return (
            group_mask.unsqueeze(1)
            .expand(-1, self.num_experts // self.n_group, self.n_group)
            .reshape(-1, self.num_experts)
        )


class _Variant3DViewBL(_Router):
    """The routing kept on [B, L, E]: group scores through view(B * L, G, -1), the mask reshaped
    back to (B, L, E), and the final top-k and gather on dim=-1 of the 3-D tensor."""

    linear_on_input_shape = True

    def __init__(self, *, n_group, topk_group, top_k, rsf, **kw):
        super().__init__(bias_dtype=torch.float32, **kw)
        self.n_group, self.topk_group, self.top_k, self.rsf = n_group, topk_group, top_k, rsf

    def forward(self, hidden_states):
        B, L, _ = hidden_states.shape
        logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
        scores = logits.sigmoid()
        choice = scores + self.e_score_correction_bias
        group_scores = choice.view(B * L, self.n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = (
            group_mask.unsqueeze(-1)
            .expand(B * L, self.n_group, self.num_experts // self.n_group)
            .reshape(B, L, -1)
        )
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        topk_ids = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
        topk_weights = scores.gather(-1, topk_ids)
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_weights * self.rsf, topk_ids


class _Variant3DUnflatten(_Router):
    """Softmax routing on [B, L, E] through unflatten. The mask is zeros_like(...).scatter_(-1, ...)
    on [B, L, G] and expanded to [B, L, G, P]. The weights are the top-k values."""

    linear_on_input_shape = True

    def __init__(self, *, n_group, topk_group, top_k, rsf, **kw):
        super().__init__(**kw)
        self.n_group, self.topk_group, self.top_k, self.rsf = n_group, topk_group, top_k, rsf

    def forward(self, hidden_states):
        B, L, _ = hidden_states.shape
        per_group = self.num_experts // self.n_group
        logits = F.linear(hidden_states.float(), self.weight.float())
        scores = logits.softmax(dim=-1)
        group_scores = scores.unflatten(-1, (self.n_group, per_group)).amax(dim=-1)
        group_idx = group_scores.topk(self.topk_group, dim=-1)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(-1, group_idx, 1.0)
        score_mask = group_mask.unsqueeze(-1).expand(B, L, self.n_group, per_group).reshape(B, L, self.num_experts)
        tmp_scores = scores.masked_fill(~score_mask.bool(), 0.0)
        topk_weights, topk_ids = torch.topk(tmp_scores, k=self.top_k, dim=-1, sorted=False)
        return topk_weights * self.rsf, topk_ids


class _VariantOnlineSoftmax(HFDeepseekV2Router):
    """HF DeepseekV2 group_limited_greedy with the softmax as Inductor rewrites it for Triton (CUDA)
    graphs: exp(x - m) / s with (m, s) = prepare_softmax_online(x). CPU graphs never get this form,
    so the case spells it out."""

    def forward(self, hidden_states):
        hidden_states = hidden_states.view(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
        row_max, row_sum = torch.ops.prims.prepare_softmax_online(router_logits, -1)
        scores = torch.exp(router_logits - row_max) / row_sum
        per_group = self.num_experts // self.num_group
        group_scores = scores.view(-1, self.num_group, per_group).max(dim=-1).values
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, self.num_group, per_group).reshape(-1, self.num_experts)
        scores = scores.masked_fill(~score_mask.bool(), 0.0)
        topk_weights, topk_indices = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        return router_logits, topk_weights * self.routed_scaling_factor, topk_indices


# --------------------------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------------------------


def _case(name, source, module_cls, *, shape, dtype=torch.float32, outputs=("weights", "ids"),
          expected=None, reason=None, naive=None, **module_kwargs) -> RoutingCase:
    make_module = functools.partial(module_cls, seed=_seed(name), dtype=dtype, **module_kwargs)
    return RoutingCase(name, source, make_module, tuple(shape), dtype, tuple(outputs), expected, reason, naive)


_HF_OUT = ("logits", "weights", "ids")
_V3 = dict(n_group=8, topk_group=4, top_k=8)  # the DeepSeek-V3 shape, at E=64 or E=256

CASES: list[RoutingCase] = [
    # ---- HF transformers v5 ------------------------------------------------------------------
    _case("hf_deepseek_v3_router",
          "transformers v5 DeepseekV3TopkRouter, " + _TRANSFORMERS + "deepseek_v3/modeling_deepseek_v3.py",
          HFTopkRouter, shape=(2, 5, H), outputs=_HF_OUT, num_experts=256, top_k=8, n_group=8, topk_group=4,
          norm_topk_prob=True, routed_scaling_factor=2.5,
          expected=_expect(8, 4, 8, renormalize_eps=1e-20, routed_scaling_factor=2.5)),
    _case("hf_deepseek_v3_router_small",
          "transformers v5 DeepseekV3TopkRouter, " + _TRANSFORMERS + "deepseek_v3/modeling_deepseek_v3.py",
          HFTopkRouter, shape=(7, H), outputs=_HF_OUT, num_experts=64, top_k=6, n_group=8, topk_group=3,
          norm_topk_prob=True, routed_scaling_factor=1.5,
          expected=_expect(8, 3, 6, renormalize_eps=1e-20, routed_scaling_factor=1.5)),
    _case("hf_deepseek_v3_router_no_norm",
          "transformers v5 DeepseekV3TopkRouter with norm_topk_prob=False; the * rsf runs with rsf=1.0",
          HFTopkRouter, shape=(7, H), outputs=_HF_OUT, num_experts=32, top_k=4, n_group=4, topk_group=2,
          norm_topk_prob=False, routed_scaling_factor=1.0,
          expected=_expect(4, 2, 4, renormalize=False)),
    _case("hf_glm4_moe_router_g1",
          "transformers v5 Glm4MoeTopkRouter, GLM-4.5 config (E=160, n_group=1, topk_group=1, k=8): the group "
          "ops still run, " + _TRANSFORMERS + "glm4_moe/modeling_glm4_moe.py",
          HFTopkRouter, shape=(2, 4, H), outputs=_HF_OUT, num_experts=160, top_k=8, n_group=1, topk_group=1,
          norm_topk_prob=True, routed_scaling_factor=2.5,
          expected=_expect(1, 1, 8, renormalize_eps=1e-20, routed_scaling_factor=2.5)),
    _case("hf_nemotron_h_router_e512_k22",
          "transformers v5 NemotronH router (same code as DeepseekV3TopkRouter) at Nemotron-style E=512, k=22, "
          "n_group=1, " + _TRANSFORMERS + "nemotron_h/modeling_nemotron_h.py",
          HFTopkRouter, shape=(5, H), outputs=_HF_OUT, num_experts=512, top_k=22, n_group=1, topk_group=1,
          norm_topk_prob=True, routed_scaling_factor=5.0,
          expected=_expect(1, 1, 22, renormalize_eps=1e-20, routed_scaling_factor=5.0)),
    _case("hf_deepseek_v3_router_bf16_hidden",
          "transformers v5 DeepseekV3TopkRouter in a bf16 model loaded by from_pretrained: gate.weight and the "
          "bias stay float32 (_keep_in_fp32_modules_strict); the .type(torch.float32) casts make routing fp32",
          HFTopkRouter, shape=(2, 5, H), dtype=torch.bfloat16, weight_dtype=torch.float32, outputs=_HF_OUT,
          num_experts=64, norm_topk_prob=True, routed_scaling_factor=2.5, **_V3,
          expected=_expect(8, 4, 8, renormalize_eps=1e-20, routed_scaling_factor=2.5)),
    _case("hf_deepseek_v3_router_bf16_model",
          "transformers v5 DeepseekV3TopkRouter after model.to(torch.bfloat16): weight and bias are bf16, the "
          "routing is float32 (casts), and the bf16 bias is promoted when added to the fp32 scores",
          HFTopkRouter, shape=(7, H), dtype=torch.bfloat16, bias_dtype=torch.bfloat16, outputs=_HF_OUT,
          num_experts=64, top_k=6, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
          expected=_expect(4, 2, 6, renormalize_eps=1e-20, routed_scaling_factor=2.5),
          reason="the bias is bf16 while the logits are float32; check_gate_args accepts only a float32 or "
                 "logits-dtype bias, so the pass must pass bias.float() (exact)"),
    _case("hf_deepseek_v3_router_negative_scores",
          "transformers v5 DeepseekV3TopkRouter with larger biases and k close to the kept experts (2 of 8 groups, "
          "k=12 of 16): some picked kept experts have negative biased scores, so the -inf fill matters",
          HFTopkRouter, shape=(9, H), outputs=_HF_OUT, num_experts=64, top_k=12, n_group=8, topk_group=2,
          norm_topk_prob=True, routed_scaling_factor=2.5, bias_scale=0.5,
          expected=_expect(8, 2, 12, renormalize_eps=1e-20, routed_scaling_factor=2.5)),
    _case("hf_mistral4_router",
          "transformers v5 Mistral4TopkRouter (softmax, group score = top-2 sum of unbiased scores, fill 0.0), "
          + _TRANSFORMERS + "mistral4/modeling_mistral4.py",
          HFMistral4Router, shape=(7, H), outputs=_HF_OUT, num_experts=64, top_k=4, n_group=8, topk_group=2,
          norm_topk_prob=True, routed_scaling_factor=2.0,
          expected=_expect(8, 2, 4, scoring_func="softmax", masked_score=0.0, renormalize_eps=1e-20,
                           routed_scaling_factor=2.0, has_bias=False)),
    _case("hf_mistral4_router_bf16",
          "transformers v5 Mistral4TopkRouter in a bf16 model: no cast, so scores, group sums and weights are bf16",
          HFMistral4Router, shape=(9, H), dtype=torch.bfloat16, outputs=_HF_OUT, num_experts=128, top_k=8,
          n_group=8, topk_group=4, norm_topk_prob=True, routed_scaling_factor=1.0,
          expected=_expect(8, 4, 8, scoring_func="softmax", masked_score=0.0, renormalize_eps=1e-20,
                           has_bias=False, compute_dtype=torch.bfloat16)),
    _case("hf_deepseek_v2_group_limited_greedy",
          "transformers v5 DeepseekV2TopkRouter, topk_method='group_limited_greedy', DeepSeek-V2 config, "
          + _TRANSFORMERS + "deepseek_v2/modeling_deepseek_v2.py",
          HFDeepseekV2Router, shape=(2, 5, H), outputs=_HF_OUT, num_experts=160, top_k=6,
          topk_method="group_limited_greedy", n_group=8, topk_group=3, routed_scaling_factor=16.0,
          expected=_expect(8, 3, 6, scoring_func="softmax", group_score_topk=1, masked_score=0.0, renormalize=False,
                           routed_scaling_factor=16.0, has_bias=False, weights_from_masked_scores=True)),
    _case("hf_deepseek_v2_online_softmax",
          "transformers v5 DeepseekV2TopkRouter as Inductor leaves it in CUDA graphs (softmax through "
          "prepare_softmax_online)",
          _VariantOnlineSoftmax, shape=(2, 5, H), outputs=_HF_OUT, num_experts=160, top_k=6,
          topk_method="group_limited_greedy", n_group=8, topk_group=3, routed_scaling_factor=16.0,
          expected=_expect(8, 3, 6, scoring_func="softmax", group_score_topk=1, masked_score=0.0, renormalize=False,
                           routed_scaling_factor=16.0, has_bias=False, weights_from_masked_scores=True)),
    _case("hf_deepseek_v2_group_limited_greedy_g1",
          "transformers v5 DeepseekV2TopkRouter, group_limited_greedy with n_group=1, topk_group=1 (group ops run)",
          HFDeepseekV2Router, shape=(7, H), outputs=_HF_OUT, num_experts=64, top_k=6,
          topk_method="group_limited_greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
          expected=_expect(1, 1, 6, scoring_func="softmax", group_score_topk=1, masked_score=0.0, renormalize=False,
                           has_bias=False, weights_from_masked_scores=True)),
    _case("hf_deepseek_v2_greedy",
          "transformers v5 DeepseekV2TopkRouter, topk_method='greedy' (DeepSeek-V2-Lite: E=64, k=6): plain top-k "
          "of softmax, G=1 semantics",
          HFDeepseekV2Router, shape=(7, H), outputs=_HF_OUT, num_experts=64, top_k=6, topk_method="greedy",
          n_group=1, topk_group=1, routed_scaling_factor=1.0,
          expected=_expect(1, 1, 6, scoring_func="softmax", group_score_topk=1, renormalize=False, has_bias=False)),
    _case("hf_deepseek_v4_router_ungrouped",
          "transformers v5 DeepseekV4TopKRouter (biased top-k, no group ops), "
          + _TRANSFORMERS + "deepseek_v4/modeling_deepseek_v4.py",
          HFDeepseekV4Router, shape=(7, H), outputs=_HF_OUT, num_experts=256, top_k=6, routed_scaling_factor=1.5,
          expected=_expect(1, 1, 6, group_score_topk=1, renormalize_eps=1e-20, routed_scaling_factor=1.5)),
    _case("hf_longcat_flash_router",
          "transformers v5 LongcatFlashTopkRouter (softmax + selection bias, no groups, no renorm, no_grad "
          "selection), " + _TRANSFORMERS + "longcat_flash/modeling_longcat_flash.py",
          HFLongcatFlashRouter, shape=(2, 3, H), outputs=_HF_OUT, num_experts=96, top_k=12,
          routed_scaling_factor=6.0,
          expected=_expect(1, 1, 12, scoring_func="softmax", group_score_topk=1, renormalize=False,
                           routed_scaling_factor=6.0)),
    # ---- HF transformers v4.5x, HF Hub remote code --------------------------------------------
    _case("hf_v4_deepseek_v3_router_no_grad",
          "transformers v4.5x DeepseekV3TopkRouter (@torch.no_grad() get_topk_indices, bias.unsqueeze(0), fill "
          "0.0); the same body is in stored copies of NemotronHTopkRouter and UTUV1TopkRouter",
          HFLegacyDeepseekV3Router, shape=(2, 5, H), outputs=("ids", "weights"), num_experts=64,
          norm_topk_prob=True, routed_scaling_factor=2.5, **_V3,
          expected=_expect(8, 4, 8, masked_score=0.0, renormalize_eps=1e-20, routed_scaling_factor=2.5)),
    _case("hub_deepseek_v3_moegate",
          "DeepSeek-V3 Hugging Face Hub remote code modeling_deepseek.py MoEGate (noaux_tc), as in stored "
          "public copies: view(bsz * seq_len, ...) shapes, fill 0.0",
          HubDeepseekV3MoEGate, shape=(2, 5, H), outputs=("ids", "weights"), num_experts=64,
          norm_topk_prob=True, routed_scaling_factor=2.5, **_V3,
          expected=_expect(8, 4, 8, masked_score=0.0, renormalize_eps=1e-20, routed_scaling_factor=2.5)),
    _case("hub_deepseek_v2_moegate_norm",
          "DeepSeek-V2 Hugging Face Hub remote code MoEGate, group_limited_greedy with norm_topk_prob=True "
          "(renormalised, routed_scaling_factor skipped)",
          HubDeepseekV2MoEGate, shape=(2, 3, H), outputs=("ids", "weights"), num_experts=32, top_k=4, n_group=4,
          topk_group=2, norm_topk_prob=True, routed_scaling_factor=16.0,
          expected=_expect(4, 2, 4, scoring_func="softmax", group_score_topk=1, masked_score=0.0,
                           renormalize_eps=1e-20, has_bias=False, weights_from_masked_scores=True)),
    # ---- DeepSeek official inference -----------------------------------------------------------
    _case("deepseek_v3_official_gate_bf16",
          "deepseek-ai/DeepSeek-V3 inference/model.py Gate (commit 1ea5a1a7; the bias is float32 in current "
          "revisions), https://github.com/deepseek-ai/DeepSeek-V3/blob/main/inference/model.py",
          DeepSeekV3Gate, shape=(9, H), dtype=torch.bfloat16, bias_dtype=torch.float32, num_experts=256, topk=8,
          n_groups=8, topk_groups=4, score_func="sigmoid", route_scale=2.5,
          expected=_expect(8, 4, 8, routed_scaling_factor=2.5, compute_dtype=torch.bfloat16)),
    _case("deepseek_v3_official_gate_bf16_bias_bf16",
          "deepseek-ai/DeepSeek-V3 inference/model.py Gate as first released: the bias was created in the default "
          "dtype (bf16), so the selection s + bias is bf16 too",
          DeepSeekV3Gate, shape=(16, H), dtype=torch.bfloat16, bias_dtype=torch.bfloat16, num_experts=64, topk=8,
          n_groups=8, topk_groups=4, score_func="sigmoid", route_scale=2.5,
          expected=_expect(8, 4, 8, routed_scaling_factor=2.5, compute_dtype=torch.bfloat16)),
    _case("deepseek_v3_official_gate_softmax",
          "deepseek-ai/DeepSeek-V3 inference/model.py Gate with configs/config_236B.json (softmax, E=160, 8 groups, "
          "3 kept, k=6, route_scale=16): amax groups, masked_fill_ in place on the view of original_scores",
          DeepSeekV3Gate, shape=(9, H), dtype=torch.bfloat16, num_experts=160, topk=6, n_groups=8, topk_groups=3,
          score_func="softmax", route_scale=16.0,
          expected=_expect(8, 3, 6, scoring_func="softmax", group_score_topk=1, renormalize=False,
                           routed_scaling_factor=16.0, has_bias=False, weights_from_masked_scores=True)),
    _case("deepseek_v3_official_gate_g1",
          "deepseek-ai/DeepSeek-V3 inference/model.py Gate with configs/config_16B.json (softmax, E=64, "
          "n_expert_groups=1 so no group ops, k=6, weights *= 1.0)",
          DeepSeekV3Gate, shape=(7, H), num_experts=64, topk=6, n_groups=1, topk_groups=1, score_func="softmax",
          route_scale=1.0,
          expected=_expect(1, 1, 6, scoring_func="softmax", group_score_topk=1, renormalize=False, has_bias=False)),
    _case("deepseek_v32_official_gate",
          "deepseek-ai/DeepSeek-V3.2-Exp inference/model.py Gate (commit 6d8cb70d): linear(x.float(), "
          "weight.float()), every topk sorted=False, fp32 weights returned",
          DeepSeekV32Gate, shape=(9, H), dtype=torch.bfloat16, num_experts=64, topk=8, n_groups=8, topk_groups=4,
          score_func="sigmoid", route_scale=2.5,
          expected=_expect(8, 4, 8, routed_scaling_factor=2.5)),
    # ---- vLLM ----------------------------------------------------------------------------------
    _case("vllm_grouped_topk_sigmoid_bias", _VLLM + " grouped_topk (bias path)",
          VllmGroupedTopk, shape=(9, H), bias_dtype=torch.float32, num_experts=256, topk=8, renormalize=True,
          num_expert_group=8, topk_group=4, scoring_func="sigmoid", routed_scaling_factor=2.5,
          expected=_expect(8, 4, 8, routed_scaling_factor=2.5)),
    _case("vllm_grouped_topk_sigmoid_bias_bf16",
          _VLLM + " grouped_topk on bf16 gating output with vLLM's float32 e_score_correction_bias: bf16 scores, "
          "float32 selection",
          VllmGroupedTopk, shape=(16, H), dtype=torch.bfloat16, bias_dtype=torch.float32, num_experts=64, topk=8,
          renormalize=True, num_expert_group=8, topk_group=4, scoring_func="sigmoid",
          expected=_expect(8, 4, 8, compute_dtype=torch.bfloat16)),
    _case("vllm_grouped_topk_softmax", _VLLM + " grouped_topk, softmax without bias (max group score, topk values)",
          VllmGroupedTopk, shape=(7, H), num_experts=160, topk=6, renormalize=False, num_expert_group=8,
          topk_group=3, scoring_func="softmax",
          expected=_expect(8, 3, 6, scoring_func="softmax", group_score_topk=1, renormalize=False, has_bias=False,
                           weights_from_masked_scores=True)),
    _case("vllm_grouped_topk_softmax_bf16_renorm", _VLLM + " grouped_topk, softmax on bf16 gating output, renormalize",
          VllmGroupedTopk, shape=(16, H), dtype=torch.bfloat16, num_experts=64, topk=6, renormalize=True,
          num_expert_group=8, topk_group=3, scoring_func="softmax", routed_scaling_factor=16.0,
          expected=_expect(8, 3, 6, scoring_func="softmax", group_score_topk=1, routed_scaling_factor=16.0,
                           has_bias=False, weights_from_masked_scores=True, compute_dtype=torch.bfloat16)),
    _case("vllm_grouped_topk_legacy_zero_fill",
          "vllm-project/vllm vllm/model_executor/layers/fused_moe/fused_moe.py grouped_topk before PR #13474 "
          "(v0.7.x): masked_fill(~score_mask.bool(), 0.0)",
          VllmGroupedTopk, shape=(7, H), bias_dtype=torch.float32, num_experts=64, topk=8, renormalize=True,
          num_expert_group=8, topk_group=4, scoring_func="sigmoid", routed_scaling_factor=2.5, fill=0.0,
          expected=_expect(8, 4, 8, masked_score=0.0, routed_scaling_factor=2.5)),
    _case("vllm_grouped_topk_legacy_zero_fill_negative_scores",
          "vllm grouped_topk before PR #13474 with larger biases and k=12 of 16 kept experts: 0.0-filled experts "
          "of dropped groups outrank kept experts with negative biased scores (the bug #13474 fixed)",
          VllmGroupedTopk, shape=(9, H), bias_dtype=torch.float32, bias_scale=0.5, num_experts=64, topk=12,
          renormalize=True, num_expert_group=8, topk_group=2, scoring_func="sigmoid", fill=0.0,
          expected=_expect(8, 2, 12, masked_score=0.0)),
    # ---- sglang --------------------------------------------------------------------------------
    _case("sglang_biased_grouped_topk", _SGLANG + " biased_grouped_topk_impl (commit 000328a8), rsf left to the output",
          SglangBiasedGroupedTopk, shape=(9, H), num_experts=256, topk=8, renormalize=True, num_expert_group=8,
          topk_group=4, routed_scaling_factor=2.5, apply_routed_scaling_factor_on_output=False,
          expected=_expect(8, 4, 8)),
    _case("sglang_biased_grouped_topk_scale_inplace",
          _SGLANG + " biased_grouped_topk_impl with apply_routed_scaling_factor_on_output: topk_weights *= rsf",
          SglangBiasedGroupedTopk, shape=(7, H), num_experts=64, topk=8, renormalize=True, num_expert_group=8,
          topk_group=4, routed_scaling_factor=2.5, apply_routed_scaling_factor_on_output=True,
          expected=_expect(8, 4, 8, routed_scaling_factor=2.5)),
    _case("sglang_grouped_topk_softmax", _SGLANG + " grouped_topk_gpu (softmax, max, fill 0.0, topk values)",
          SglangGroupedTopk, shape=(7, H), num_experts=64, topk=6, renormalize=True, num_expert_group=8,
          topk_group=3,
          expected=_expect(8, 3, 6, scoring_func="softmax", group_score_topk=1, masked_score=0.0, has_bias=False,
                           weights_from_masked_scores=True)),
    _case("sglang_kimi_k2_biased_topk", _SGLANG + " kimi_k2_biased_topk_impl (Kimi-K2: E=384, G=1, k=8, rsf 2.827)",
          SglangKimiK2BiasedTopk, shape=(5, H), num_experts=384, topk=8, renormalize=True,
          routed_scaling_factor=2.827,
          expected=_expect(1, 1, 8, group_score_topk=1, routed_scaling_factor=2.827)),
    # ---- torchtitan ----------------------------------------------------------------------------
    _case("torchtitan_router_node_limited_3d",
          _TORCHTITAN + " TokenChoiceTopKRouter._get_node_limited_routing_scores on (B, L, E); scores returned for "
          "the aux loss",
          TorchtitanRouter, shape=(2, 5, H), outputs=("weights", "ids", "scores"), bias_dtype=torch.float32,
          num_experts=64, top_k=8, num_expert_groups=8, num_limited_groups=4, score_func="sigmoid",
          route_norm=True, route_scale=2.5,
          expected=_expect(8, 4, 8, renormalize_eps=1e-20, routed_scaling_factor=2.5)),
    _case("torchtitan_router_node_limited_softmax",
          _TORCHTITAN + " TokenChoiceTopKRouter, DeepSeek-V2 config (softmax, no bias, route_scale=16) on (T, E); "
          "torchtitan scores groups by the top-2 sum even for softmax",
          TorchtitanRouter, shape=(7, H), outputs=("weights", "ids", "scores"), num_experts=160, top_k=6,
          num_expert_groups=8, num_limited_groups=3, score_func="softmax", route_norm=False, route_scale=16.0,
          expected=_expect(8, 3, 6, scoring_func="softmax", renormalize=False, routed_scaling_factor=16.0,
                           has_bias=False)),
    _case("torchtitan_router_ungrouped_bias",
          _TORCHTITAN + " TokenChoiceTopKRouter with num_expert_groups=None and an expert bias",
          TorchtitanRouter, shape=(2, 3, H), outputs=("weights", "ids", "scores"), bias_dtype=torch.float32,
          num_experts=64, top_k=6, num_expert_groups=None, num_limited_groups=None, score_func="sigmoid",
          route_norm=True, route_scale=1.0,
          expected=_expect(1, 1, 6, group_score_topk=1, renormalize_eps=1e-20)),
    _case("torchtitan_main_router_bmm_weights",
          _TORCHTITAN_MAIN + " TokenChoiceTopKRouter, DeepSeek-V3 config (sigmoid, expert bias, node-limited, "
          "route_norm, route_scale=2.5) in a bf16 model; the weights leave as the combine's bmm reads them, "
          "[T, 1, K], the ids as [T, K]",
          TorchtitanMainRouter, shape=(9, H), dtype=torch.bfloat16, outputs=("weights", "ids", "counts"),
          bias_dtype=torch.float32, num_experts=64, top_k=8, num_expert_groups=8, num_limited_groups=4,
          score_func="sigmoid", route_norm=True, route_scale=2.5, bmm_weights=True,
          expected=_expect(8, 4, 8, renormalize_eps=1e-20, routed_scaling_factor=2.5)),
    _case("torchtitan_main_router_softmax",
          _TORCHTITAN_MAIN + " TokenChoiceTopKRouter with its defaults but softmax and top_k=6 (no groups, no "
          "expert bias, no route_norm)",
          TorchtitanMainRouter, shape=(7, H), outputs=("weights", "ids", "counts"), num_experts=64, top_k=6,
          num_expert_groups=None, num_limited_groups=None, score_func="softmax", route_norm=False,
          route_scale=1.0,
          expected=_expect(1, 1, 6, scoring_func="softmax", group_score_topk=1, renormalize=False, has_bias=False)),
    # ---- Megatron-Core -------------------------------------------------------------------------
    _case("megatron_group_limited_sigmoid_bias",
          _MEGATRON + " group_limited_topk + topk_routing_with_score_function (commit 00611e6e), sigmoid + "
          "expert_bias, m = topk // group_topk = 2",
          MegatronRouter, shape=(5, 2, H), bias_dtype=torch.float32, num_experts=64, topk=8, num_groups=8,
          group_topk=4, score_function="sigmoid", scaling_factor=2.5,
          expected=_expect(8, 4, 8, renormalize_eps=1e-20, routed_scaling_factor=2.5)),
    _case("megatron_group_limited_sigmoid_m3_bf16",
          _MEGATRON + " with a bf16 router: sigmoid(logits.float()) routes in fp32, probs.type_as(logits) is bf16; "
          "m = 6 // 2 = 3, no scaling factor",
          MegatronRouter, shape=(3, 3, H), dtype=torch.bfloat16, bias_dtype=torch.float32, num_experts=64, topk=6,
          num_groups=8, group_topk=2, score_function="sigmoid",
          expected=_expect(8, 2, 6, group_score_topk=3, renormalize_eps=1e-20)),
    _case("megatron_group_limited_softmax_pre_softmax",
          _MEGATRON + " softmax with use_pre_softmax=True: probs are the top-k values of the masked softmax; "
          "m = 8 // 2 = 4",
          MegatronRouter, shape=(5, 2, H), num_experts=64, topk=8, num_groups=8, group_topk=2,
          score_function="softmax", use_pre_softmax=True, scaling_factor=16.0,
          expected=_expect(8, 2, 8, scoring_func="softmax", group_score_topk=4, renormalize=False,
                           routed_scaling_factor=16.0, has_bias=False, weights_from_masked_scores=True)),
    _case("megatron_group_limited_softmax_post_topk_m1",
          _MEGATRON + " softmax with use_pre_softmax=False (the default): group-limited top-k on the raw logits, "
          "then softmax over the k chosen logits; m = 4 // 4 = 1",
          MegatronRouter, shape=(5, 2, H), num_experts=64, topk=4, num_groups=8, group_topk=4,
          score_function="softmax",
          expected=_expect(8, 4, 4, scoring_func="softmax", group_score_topk=1, has_bias=False),
          reason="equivalent, not identical in spelling: softmax is monotonic, so the max logit ranks groups as "
                 "the max softmax score does and top-k over logits picks the top-k softmax experts; softmax over "
                 "the k chosen logits equals their softmax scores divided by their sum (renormalize, eps 0)"),
    # ---- Ling 2.0 ------------------------------------------------------------------------------
    _case("bailing_moe_v2_gate",
          "inclusionAI Ling 2.0 Hub remote code modeling_bailing_moe_v2.py BailingMoeV2Gate (Ling-flash-2.0 "
          "shape: E=256, 8 groups, 4 kept, k=8, rsf 2.5), as in stored public copies",
          BailingMoeV2Gate, shape=(2, 3, H), outputs=("ids", "weights", "logits"), num_experts=256, top_k=8,
          n_group=8, topk_group=4, routed_scaling_factor=2.5,
          expected=_expect(8, 4, 8, renormalize_eps=1e-20, routed_scaling_factor=2.5)),
    # ---- spelling variants (shared/DESIGN.md section 4), written as user code would -------------
    _case("var_unflatten_amax_with_bias",
          "variant: unflatten(-1, (G, E // G)), amax group score on biased scores (m=1), sorted final top-k",
          _Variant, shape=(7, H), num_experts=64, n_group=8, topk_group=2, top_k=4, grouping="unflatten",
          group_score=("amax", 1), final_sorted=True, rsf=2.5,
          expected=_expect(8, 2, 4, group_score_topk=1, renormalize_eps=1e-20, routed_scaling_factor=2.5)),
    _case("var_view_T_topk1_values_sum_zero_fill",
          "variant: view(T, G, -1), topk(1).values.sum(-1), + bias.unsqueeze(0), fill 0.0, plain renorm, no rsf",
          _Variant, shape=(9, H), num_experts=32, n_group=4, topk_group=2, top_k=4, bias_add="unsqueeze",
          grouping="view_T", group_score=("topk_values", 1), fill=0.0, renorm="plain",
          expected=_expect(4, 2, 4, group_score_topk=1, masked_score=0.0)),
    _case("var_topk3_sum_sorted_no_renorm",
          "variant: group score = topk(3)[0].sum(-1), sorted final top-k, no renorm, rsf 2.0",
          _Variant, shape=(7, H), num_experts=64, n_group=4, topk_group=2, top_k=8, group_score=("topk", 3),
          final_sorted=True, renorm=None, rsf=2.0,
          expected=_expect(4, 2, 8, group_score_topk=3, renormalize=False, routed_scaling_factor=2.0)),
    _case("var_float_cast_inplace_ops",
          "variant: .float() casts, masked_fill_ in place on the biased copy, /= (sum + 1e-20), *= rsf",
          _Variant, shape=(2, 5, H), num_experts=64, n_group=8, topk_group=4, top_k=8, cast="float",
          fill_inplace=True, inplace_ops=True, rsf=2.5,
          expected=_expect(8, 4, 8, renormalize_eps=1e-20, routed_scaling_factor=2.5)),
    _case("var_no_grad_selection",
          "variant: the expert selection under `with torch.no_grad():`, weights gathered outside it",
          _Variant, shape=(7, H), num_experts=64, n_group=8, topk_group=3, top_k=6, no_grad_selection=True,
          rsf=2.5,
          expected=_expect(8, 3, 6, renormalize_eps=1e-20, routed_scaling_factor=2.5)),
    _case("var_returns_scores_for_aux",
          "variant: the sigmoid scores are also returned (for an aux loss), so they have a user outside the routing",
          _Variant, shape=(7, H), outputs=("weights", "ids", "scores"), num_experts=64, n_group=8, topk_group=4,
          top_k=8, rsf=2.5, return_scores=True,
          expected=_expect(8, 4, 8, renormalize_eps=1e-20, routed_scaling_factor=2.5)),
    _case("var_bf16_no_cast_bias_bf16",
          "variant: the HF router body with no float32 cast in a bf16 model with a bf16 bias: every step bf16",
          _Variant, shape=(16, H), dtype=torch.bfloat16, bias_dtype=torch.bfloat16, num_experts=64, n_group=8,
          topk_group=4, top_k=8, cast=None, rsf=2.5,
          expected=_expect(8, 4, 8, renormalize_eps=1e-20, routed_scaling_factor=2.5, compute_dtype=torch.bfloat16)),
    _case("var_bf16_no_cast_bias_fp32",
          "variant: no float32 cast, bf16 scores plus a float32 bias (float32 selection, bf16 weights)",
          _Variant, shape=(16, H), dtype=torch.bfloat16, num_experts=64, n_group=8, topk_group=4, top_k=8,
          cast=None, renorm="plain",
          expected=_expect(8, 4, 8, compute_dtype=torch.bfloat16)),
    _case("var_softmax_fill_inplace_gather",
          "variant: softmax without bias, masked_fill_ in place on the scores themselves, then gather: the weights "
          "come from the masked tensor",
          _Variant, shape=(7, H), bias_dtype=None, num_experts=64, n_group=8, topk_group=3, top_k=6,
          scoring="softmax", group_score=("max", 1), fill_inplace=True, renorm=None, rsf=16.0,
          expected=_expect(8, 3, 6, scoring_func="softmax", group_score_topk=1, renormalize=False,
                           routed_scaling_factor=16.0, has_bias=False, weights_from_masked_scores=True)),
    _case("var_multiplicative_mask",
          "variant: dropped groups masked by multiplying with the 0/1 score mask instead of masked_fill, as in a "
          "stored revision of DeepSeek-V3 inference/model.py (commit 013e2213)",
          _Variant, shape=(7, H), num_experts=64, n_group=8, topk_group=4, top_k=8, mask="multiply", rsf=2.5,
          expected=_expect(8, 4, 8, masked_score=0.0, renormalize_eps=1e-20, routed_scaling_factor=2.5),
          reason="x * 0 is the fill 0.0 (-0.0 for negative biased scores, which ranks equal to 0.0)"),
    _case("var_group_mean",
          "variant: group score = mean over the group",
          _Variant, shape=(7, H), num_experts=64, n_group=8, topk_group=4, top_k=8, group_score=("mean", None),
          rsf=2.5,
          expected=_expect(8, 4, 8, group_score_topk=8, renormalize_eps=1e-20, routed_scaling_factor=2.5),
          reason="the mean is the sum of all E/G scores divided by E/G, and ranks groups as the sum of the top "
                 "E/G does: it is group_score_topk = E/G = 8 (exactly so when E/G is a power of two; otherwise "
                 "the division's rounding can reorder near-equal groups)"),
    _case("var_dead_group_mask",
          "variant (a plausible user bug, not a public spelling): the masked scores are computed but the final "
          "top-k reads the unmasked biased scores",
          _DeadGroupMask, shape=(7, H), num_experts=64, n_group=8, topk_group=4, top_k=8, rsf=2.5,
          expected=_expect(1, 1, 8, group_score_topk=1, renormalize_eps=1e-20, routed_scaling_factor=2.5),
          reason="dead code: after DCE the graph is plain biased top-k, which IS the op with G=1; the pass must "
                 "not report num_expert_group=8"),
    _case("var_3d_view_BL",
          "variant: routing kept on [B, L, E]; view(B * L, G, -1) group scores, mask reshaped to (B, L, E), final "
          "topk and gather on dim=-1 of the 3-D tensor",
          _Variant3DViewBL, shape=(2, 5, H), num_experts=64, n_group=8, topk_group=4, top_k=8, rsf=2.5,
          expected=_expect(8, 4, 8, renormalize_eps=1e-20, routed_scaling_factor=2.5)),
    _case("var_3d_unflatten_softmax_values",
          "variant: softmax on [B, L, E], unflatten(-1, (G, E // G)).amax, zeros_like + scatter_(-1) mask, fill "
          "0.0, weights = topk values",
          _Variant3DUnflatten, shape=(3, 4, H), num_experts=64, n_group=8, topk_group=3, top_k=6, rsf=16.0,
          expected=_expect(8, 3, 6, scoring_func="softmax", group_score_topk=1, masked_score=0.0, renormalize=False,
                           routed_scaling_factor=16.0, has_bias=False, weights_from_masked_scores=True)),
]

# ---- look-alikes: these must be left alone -----------------------------------------------------
_LOOK = dict(num_experts=64, n_group=8, topk_group=4, top_k=8, rsf=2.5)
_LOOK_NAIVE = _expect(8, 4, 8, renormalize_eps=1e-20, routed_scaling_factor=2.5)

CASES += [
    _case("lookalike_fill_per_token_mean", "look-alike: the fill value is computed per token",
          _PerTokenFill, shape=(7, H), num_experts=64, n_group=8, topk_group=2, top_k=12, rsf=2.5,
          naive=_expect(8, 2, 12, renormalize_eps=1e-20, routed_scaling_factor=2.5),
          reason="dropped experts take the token's mean biased score instead of a constant, so they compete with "
                 "kept experts below the mean; masked_score is a single constant in the op"),
    _case("lookalike_group_score_unbiased",
          "look-alike: groups ranked on the unbiased scores while experts are picked on biased ones",
          _GroupScoreFromUnbiased, shape=(7, H), **_LOOK, naive=_LOOK_NAIVE,
          reason="the op ranks groups by the top-m *biased* scores; ranking by unbiased scores keeps different "
                 "groups whenever the bias reorders them, and the op has no switch for it"),
    _case("lookalike_topk_smallest", "look-alike: final topk with largest=False",
          _SmallestK, shape=(7, H), **_LOOK, naive=_LOOK_NAIVE,
          reason="largest=False picks the k worst (the -inf filled experts first), the opposite selection"),
    _case("lookalike_weights_from_logits", "look-alike: weights gathered from the router logits",
          _WeightsFromLogits, shape=(7, H), **dict(_LOOK, rsf=None), renorm=None,
          naive=_expect(8, 4, 8, renormalize=False),
          reason="the weights are raw logits, not sigmoid/softmax scores; the op only gathers scores"),
    _case("lookalike_renorm_first_k_minus_1",
          "look-alike: renormalised by the sum of the first k-1 weights (sglang's shared-slot denominator with "
          "no shared slot)",
          _RenormOverFirstKMinus1, shape=(7, H), **_LOOK, naive=_LOOK_NAIVE,
          reason="the denominator leaves out one chosen expert, and which one depends on the top-k order"),
    _case("lookalike_relu_scoring", "look-alike: relu scoring",
          _ReluScoring, shape=(7, H), **_LOOK, naive=_LOOK_NAIVE,
          reason="scores = relu(logits); the op scores with sigmoid or softmax only"),
    _case("lookalike_sqrtsoftplus_scoring",
          _MEGATRON + " score_function='sqrtsoftplus' with expert bias and group-limited top-k",
          MegatronRouter, shape=(5, 2, H), bias_dtype=torch.float32, num_experts=64, topk=8, num_groups=8,
          group_topk=4, score_function="sqrtsoftplus", scaling_factor=2.5, naive=_LOOK_NAIVE,
          reason="scores = sqrt(softplus(logits)); the op scores with sigmoid or softmax only"),
    _case("lookalike_group_mask_from_values",
          "look-alike: the group mask is scattered at the group top-k VALUES (cast to long), not the indices",
          _GroupMaskFromValues, shape=(7, H), **_LOOK, naive=_LOOK_NAIVE,
          reason="scores cast to long are 0, 1 or 2, so the kept groups are those indices, not the best groups"),
    _case("lookalike_scaled_before_bias", "look-alike: scores * 2 + bias (an op between the sigmoid and the bias add)",
          _ScaledBeforeBias, shape=(7, H), **_LOOK, naive=_LOOK_NAIVE,
          reason="selection by 2s + b ranks like s + b/2, not s + b: the op would need bias/2, which is not the "
                 "graph's bias tensor"),
    _case("lookalike_strided_groups",
          "look-alike: view(-1, E // G, G) with the group top-2 over dim=-2, so group j is experts j, j+G, j+2G, ...",
          _StridedGroups, shape=(7, H), **_LOOK, naive=_LOOK_NAIVE,
          reason="the groups are interleaved (expert e belongs to group e % G), while the op's groups are "
                 "contiguous blocks (group e // (E/G)); same shapes, different partition"),
    _case("lookalike_megatron_softmax_post_topk_m2",
          _MEGATRON + " softmax with use_pre_softmax=False and m = 8 // 4 = 2",
          MegatronRouter, shape=(5, 2, H), num_experts=64, topk=8, num_groups=8, group_topk=4,
          score_function="softmax",
          naive=_expect(8, 4, 8, scoring_func="softmax", has_bias=False),
          reason="groups are ranked by the sum of their top-2 raw *logits*; a sum of logits does not rank like "
                 "the sum of the softmax scores (exp is not additive), so the kept groups differ"),
    _case("lookalike_weights_from_biased_scores",
          "deepseek-ai/DeepSeek-V3 inference/model.py Gate as in a stored fork revision (commit 013e2213): "
          "scores += bias in place, multiplicative group mask, weights = scores.gather(...)",
          DeepSeekV3ForkGate, shape=(9, H), num_experts=64, topk=8, n_groups=8, topk_groups=4,
          score_func="sigmoid", route_scale=2.5,
          naive=_expect(8, 4, 8, masked_score=0.0, routed_scaling_factor=2.5),
          reason="the weights are gathered from the biased (s + bias) scores, not from the unbiased s; the op "
                 "never puts the bias into the weights"),
]

# Renormalisations the gate op does not express, applied to weights it does compute: the gate
# computes the weights unnormalised (renormalize=False, no scaling) and the model's renormalisation and
# scaling stay in the graph, reading them (the sum of the weights leaves the routing).
LEFT_IN_GRAPH_CASES: list[RoutingCase] = [
    _case("renorm_eps_tensor", "(sum + eps) where eps is a registered buffer (a graph input, 0.5 here)",
          _RenormEpsFromTensor, shape=(7, H), **_LOOK,
          expected=_expect(8, 4, 8, renormalize=False, routed_scaling_factor=1.0)),
    _case("renorm_clamp_min", "weights / sum.clamp_min(1e-20) (a vLLM-derived fork's grouped_topk, stored copy; "
          "ERNIE-4.5 divides by clamp(sum, min) too)",
          _RenormClampMin, shape=(7, H), **_LOOK,
          expected=_expect(8, 4, 8, renormalize=False, routed_scaling_factor=1.0)),
]


# --------------------------------------------------------------------------------------------
# Running a case
# --------------------------------------------------------------------------------------------


def make_inputs(case: RoutingCase, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + _seed(case.name))
    return (torch.randn(case.input_shape, generator=gen) * 2).to(case.dtype)


def run_eager(case: RoutingCase, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """The module's outputs on make_inputs(case, seed), in the order of case.outputs."""
    module = case.make_module()
    with torch.no_grad():
        outputs = module(make_inputs(case, seed))
    assert len(outputs) == len(case.outputs), case.name
    return tuple(outputs)


def _round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if dtype == torch.float32 else x.to(dtype).float()


def _reference(case, params, module, hidden, weights_dtype):
    from ops.reference import moe_fused_gate_reference

    logits = module.reference_logits(hidden)
    bias = module.e_score_correction_bias if params["has_bias"] else None
    with torch.no_grad():
        return moe_fused_gate_reference(
            logits,
            bias,
            params["num_expert_group"],
            params["topk_group"],
            params["topk"],
            scoring_func=params["scoring_func"],
            group_score_topk=params["group_score_topk"],
            masked_score=params["masked_score"],
            renormalize=params["renormalize"],
            renormalize_eps=params["renormalize_eps"],
            routed_scaling_factor=params["routed_scaling_factor"],
            weights_from_masked_scores=params["weights_from_masked_scores"],
            compute_dtype=params["compute_dtype"],
            weights_dtype=weights_dtype,
            ids_dtype=torch.int64,
        )


def _selection(params, module, hidden):
    """The reference's selection scores b [T, E] and group scores [T, G], rounded as it rounds them."""
    logits = module.reference_logits(hidden).float()
    score_dtype = params["compute_dtype"] or torch.float32
    s = logits.softmax(-1) if params["scoring_func"] == "softmax" else logits.sigmoid()
    b = s = _round(s, score_dtype)
    selection_dtype = score_dtype
    if params["has_bias"]:
        bias = module.e_score_correction_bias
        selection_dtype = score_dtype if bias.dtype == score_dtype else torch.float32
        b = _round(s + bias.float(), selection_dtype)
    best = b.view(b.shape[0], params["num_expert_group"], -1).topk(params["group_score_topk"], dim=-1).values
    group_scores = best[..., 0]
    for j in range(1, best.shape[-1]):  # summed in descending order, as the reference does
        group_scores = group_scores + best[..., j]
    return b, _round(group_scores, selection_dtype)


def compare_with_reference(case, params, module, hidden, outputs):
    """Check a case's outputs on ``hidden`` (eager or compiled) against moe_fused_gate_reference
    called with ``params`` (usually case.expected). Ids are compared as sets per token, and weights
    after aligning by id. Returns (tokens, tokens that differ only at exact ties, problems)."""
    named = dict(zip(case.outputs, outputs))
    k = params["topk"]
    eager_w = named["weights"].reshape(-1, k)
    eager_ids = named["ids"].reshape(-1, k).long()
    ref_w, ref_ids = _reference(case, params, module, hidden, eager_w.dtype)
    ref_w, ref_ids = ref_w.reshape(-1, k).float(), ref_ids.reshape(-1, k)
    low_precision = eager_w.dtype != torch.float32 or params["compute_dtype"] is not None
    rtol, atol = (1.6e-2, 1e-5) if low_precision else (2e-5, 1e-6)  # bf16: two ulps
    eager_w = eager_w.float()

    b = group_scores = None
    problems, ties = [], 0
    for t in range(eager_ids.shape[0]):
        eager_set, ref_set = set(eager_ids[t].tolist()), set(ref_ids[t].tolist())
        if eager_set != ref_set:
            if b is None:
                b, group_scores = _selection(params, module, hidden)
            if _is_tie(params, b[t], group_scores[t], eager_ids[t]):
                ties += 1
                continue
            problems.append(f"token {t}: ids {sorted(eager_set)} vs reference {sorted(ref_set)}")
            continue
        e_order, r_order = eager_ids[t].argsort(), ref_ids[t].argsort()
        if not torch.allclose(eager_w[t, e_order], ref_w[t, r_order], rtol=rtol, atol=atol):
            problems.append(f"token {t}: weights {eager_w[t, e_order].tolist()} vs {ref_w[t, r_order].tolist()}")
    return eager_ids.shape[0], ties, problems


def _is_tie(params, b, group_scores, eager_ids):
    """Whether eager's ids are the reference's result under another tie-breaking: some valid choice
    of kept groups (any of the groups tied at the topk_group boundary) under which every eager
    expert is a valid top-k pick (all experts above the k-th value are in, the rest equal it).
    Only exact equalities in the reference's own selection values are accepted."""
    groups, kept, k = params["num_expert_group"], params["topk_group"], params["topk"]
    per_group = b.numel() // groups
    if kept >= groups:
        candidates = [list(range(groups))]
    else:
        boundary = group_scores.topk(kept).values[-1]
        sure = (group_scores > boundary).nonzero().flatten().tolist()
        tied = (group_scores == boundary).nonzero().flatten().tolist()
        candidates = [sure + list(rest) for rest in itertools.combinations(tied, kept - len(sure))]
    for kept_groups in candidates:
        keep = torch.zeros(groups, dtype=torch.bool)
        keep[kept_groups] = True
        masked = torch.where(keep.repeat_interleave(per_group), b, torch.tensor(params["masked_score"]))
        kth = masked.topk(k).values[-1]
        if (masked[eager_ids] >= kth).all() and int((masked > kth).sum()) <= int((masked[eager_ids] > kth).sum()):
            return True
    return False


def _differs(case, params, module, hidden, outputs):
    named = dict(zip(case.outputs, outputs))
    k = params["topk"]
    eager_w, eager_ids = named["weights"].reshape(-1, k).float(), named["ids"].reshape(-1, k).long()
    ref_w, ref_ids = _reference(case, params, module, hidden, torch.float32)
    ref_w, ref_ids = ref_w.reshape(-1, k), ref_ids.reshape(-1, k)
    for t in range(eager_ids.shape[0]):
        if set(eager_ids[t].tolist()) != set(ref_ids[t].tolist()):
            return True
        e_order, r_order = eager_ids[t].argsort(), ref_ids[t].argsort()
        if not torch.allclose(eager_w[t, e_order], ref_w[t, r_order], rtol=1e-3, atol=1e-5):
            return True
    return False


def _self_check(seeds=(0, 1, 2)) -> int:
    names = [case.name for case in CASES]
    assert len(names) == len(set(names)), "case names must be unique"
    failures = 0
    for case in CASES:
        module = case.make_module()
        tokens = ties = distinguished = 0
        problems = []
        for seed in seeds:
            hidden = make_inputs(case, seed)
            with torch.no_grad():
                outputs = tuple(module(hidden))
            assert len(outputs) == len(case.outputs), f"{case.name}: outputs are {case.outputs}"
            if case.expected is None:
                if case.naive is not None:
                    distinguished += _differs(case, case.naive, module, hidden, outputs)
                continue
            n, t, p = compare_with_reference(case, case.expected, module, hidden, outputs)
            tokens, ties, problems = tokens + n, ties + t, problems + [f"seed {seed} {line}" for line in p]
        if case.expected is None:
            if case.naive is None:
                print(f"look-alike {case.name}: ran (no naive comparison)")
            elif distinguished == len(seeds):
                print(f"look-alike {case.name}: differs from the naive rewrite, as it must")
            else:
                failures += 1
                print(f"LOOK-ALIKE NOT DISTINGUISHED {case.name}: same as the naive rewrite on "
                      f"{len(seeds) - distinguished} of {len(seeds)} inputs")
        elif problems:
            failures += 1
            print(f"MISMATCH {case.name}: {len(problems)} of {tokens} tokens")
            for line in problems[:4]:
                print("    " + line)
        else:
            note = f", {ties} differ only at exact ties" if ties else ""
            print(f"ok {case.name}: {tokens} tokens{note}")
    expected = sum(case.expected is not None for case in CASES)
    print(f"{len(CASES)} cases ({expected} expected, {len(CASES) - expected} look-alikes), {failures} failing")
    return failures


if __name__ == "__main__":
    sys.exit(1 if _self_check() else 0)
