"""MoE blocks for the rewrite and training tests: a hand-written DeepSeek-style block with
variations, and torchtitan's formulations, re-expressed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from routing_zoo import TorchtitanMainRouter
from torch import nn

from fusion_passes.example_model import ExampleConfig, Router


class HandWrittenBlock(nn.Module):
    """DeepSeek-V3 routing + per-pick batched experts + a shared MLP, with one variation."""

    def __init__(self, variant: str = "plain", dtype=torch.float32, shared_intermediate: int = 64) -> None:
        super().__init__()
        torch.manual_seed(0)
        cfg = ExampleConfig(routed_scaling_factor=1.0 if variant.startswith("scaled_output") else 2.5)
        self.variant, self.cfg = variant, cfg
        hidden, inter, experts = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        self.gate = Router(cfg)
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * inter, hidden) * hidden**-0.5)
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, inter) * inter**-0.5)
        bias = variant == "biased_shared"
        self.shared_gate = nn.Linear(hidden, shared_intermediate, bias=bias)
        self.shared_up = nn.Linear(hidden, shared_intermediate, bias=bias)
        self.shared_down = nn.Linear(shared_intermediate, hidden, bias=bias)
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
        # The shared MLP's gate and up as one Linear (the shared_gate_up_* variants).
        self.shared_gate_up = nn.Linear(hidden, 2 * shared_intermediate, bias=False)
        self.norm = nn.RMSNorm(hidden)
        self.to(dtype)

    def routed(self, flat: torch.Tensor) -> torch.Tensor:
        return self.experts(flat, *self.gate(flat))

    def experts(self, flat: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.variant.startswith("renormalised"):  # again, as ERNIE-4.5 does: divided by clamp(sum, min)
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        topk = ids.shape[-1]
        rows = flat.repeat_interleave(topk, dim=0)
        gate_up = torch.bmm(self.gate_up_proj[ids.reshape(-1)], rows.unsqueeze(-1)).squeeze(-1)
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.gelu if self.variant == "gelu_routed" else F.silu
        out = torch.bmm(self.down_proj[ids.reshape(-1)], (act(gate) * up).unsqueeze(-1)).squeeze(-1)
        out = out * weights.reshape(-1).unsqueeze(-1).to(out.dtype)
        return out.view(-1, topk, flat.shape[-1]).sum(dim=1)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        act = F.gelu if self.variant == "gelu_shared" else F.silu
        if self.variant.startswith("shared_gate_up_"):
            h = self.shared_gate_up(x)
            gate, up = {
                "shared_gate_up_chunk": lambda: h.chunk(2, dim=-1),  # [gate rows; up rows]
                "shared_gate_up_interleaved": lambda: h.unflatten(-1, (-1, 2)).unbind(-1),  # gate, up alternate
                "shared_gate_up_strided": lambda: (h[..., ::2], h[..., 1::2]),
            }[self.variant]()
            return self.shared_down(act(gate) * up)
        return self.shared_down(act(self.shared_gate(x)) * self.shared_up(x))

    def forward(self, x: torch.Tensor):
        shape = x.shape
        v = self.variant
        if v == "scaled_output_weights_returned":  # the routing weights have a reader besides the experts
            weights, ids = self.gate(x.view(-1, shape[-1]))
            return self.experts(x.view(-1, shape[-1]), weights, ids).view(shape) * 2.5 + self.shared(x), weights
        routed = self.routed(x.view(-1, shape[-1])).view(shape)
        if v == "shared_first":
            return self.shared(x) + routed
        if v in ("scaled_output", "renormalised_scaled_output"):
            return routed * 2.5 + self.shared(x)
        if v == "gated_shared":
            return routed + torch.sigmoid(self.shared_expert_gate(x)) * self.shared(x)
        if v == "norm_between":
            return self.norm(routed) + self.shared(x)
        if v == "other_tokens":
            return routed + self.shared(x.flip(0))
        if v == "routed_used_twice":
            return routed + self.shared(x), routed
        return routed + self.shared(x)


class TorchtitanFeedForward(nn.Module):
    """torchtitan's dense / shared expert: w2(silu(w1(x)) * w3(x)), Linears without bias."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, intermediate, bias=False)
        self.w2 = nn.Linear(intermediate, hidden, bias=False)
        self.w3 = nn.Linear(hidden, intermediate, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TorchtitanStyleBlock(nn.Module):
    """The MoE layer as torchtitan writes it (torchtitan/models/moe/moe.py), re-expressed: experts with
    separate w1, w3 [E, I, H] and w2 [E, H, I]; per-expert counts by histc (torchtitan: max=E), which
    also feed a load-balancing buffer; a stable argsort of the ids; the tokens' rows by gather;
    grouped_mm in bf16; the routing scores applied to the expert outputs, or to their inputs with
    score_before_experts; scatter_add onto the shared expert's output, or onto zeros without one.
    histc gets float ids: its CPU kernel takes no integers."""

    def __init__(self, shared_experts: int = 1, score_before_experts: bool = False, histc_max: int | None = None,
                 num_experts: int = ExampleConfig.num_experts):
        super().__init__()
        torch.manual_seed(0)
        self.cfg = cfg = ExampleConfig(num_experts=num_experts)
        hidden, inter, experts = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        self.router = Router(cfg)
        self.w1 = nn.Parameter(torch.randn(experts, inter, hidden) * hidden**-0.5)
        self.w3 = nn.Parameter(torch.randn(experts, inter, hidden) * hidden**-0.5)
        self.w2 = nn.Parameter(torch.randn(experts, hidden, inter) * inter**-0.5)
        self.shared_experts = TorchtitanFeedForward(hidden, inter * shared_experts) if shared_experts else None
        self.score_before_experts = score_before_experts
        self.histc_max = experts if histc_max is None else histc_max
        self.to(torch.bfloat16)
        self.register_buffer("tokens_per_expert", torch.zeros(experts), persistent=False)

    def grouped_experts(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        hidden = F.silu(torch._grouped_mm(rows.bfloat16(), self.w1.bfloat16().transpose(-2, -1), offs=offsets))
        hidden = hidden * torch._grouped_mm(rows.bfloat16(), self.w3.bfloat16().transpose(-2, -1), offs=offsets)
        return torch._grouped_mm(hidden, self.w2.bfloat16().transpose(-2, -1), offs=offsets).type_as(rows)

    def sorted_pairs(self, x: torch.Tensor):
        """The router's scores and ids, the counts per expert (histc), the pairs' stable order by
        expert and their scores in that order."""
        scores, ids = self.router(x)
        counts = torch.histc(ids.view(-1).float(), bins=self.cfg.num_experts, min=0, max=self.histc_max)
        pair_order = torch.argsort(ids.view(-1), stable=True)
        return scores, ids, counts, pair_order, scores.view(-1)[pair_order]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        x = x.view(-1, hidden)
        scores, ids, counts, pair_order, sorted_scores = self.sorted_pairs(x)
        topk = ids.shape[1]
        with torch.no_grad():
            self.tokens_per_expert.add_(counts)
        row_tokens = (pair_order // topk).reshape(-1, 1).expand(-1, hidden)
        rows = torch.gather(x, dim=0, index=row_tokens)
        if self.score_before_experts:
            rows = (rows.to(torch.float32) * sorted_scores.reshape(-1, 1)).to(x.dtype)
        expert_rows = self.grouped_experts(rows, counts)
        out = self.shared_experts(x) if self.shared_experts is not None else torch.zeros_like(x)
        if not self.score_before_experts:
            expert_rows = (expert_rows.to(torch.float32) * sorted_scores.reshape(-1, 1)).to(x.dtype)
        return out.scatter_add(dim=0, index=row_tokens, src=expert_rows).reshape(batch, seq, hidden)


class TorchtitanMainStyleBlock(TorchtitanStyleBlock):
    """The MoE layer as torchtitan main writes it (torchtitan/models/common/moe/moe.py), re-expressed:
    its router (routing_zoo.TorchtitanMainRouter, DeepSeek-V3 config) whose counts feed a
    load-balancing buffer; counts again and a stable argsort of the ids; the rows x[perm // k]; the
    grouped_mm experts; the outputs un-sorted into zeros by the permutation and viewed [T, K, H]; the
    combine bmm(weights [T, 1, K], outputs in float32) rounded to the hidden dtype; the shared
    expert's output plus that. `combine`: "reshape" (torchtitan's [T, 1, K]), "unsqueeze" (the same
    row spelled weights.unsqueeze(1)), or "unweighted_sum", a look-alike that sums the outputs
    unweighted (as score_before_experts=True does after weighting the inputs) and returns each
    token's largest weight next to the output (say, for logging). histc gets float ids, as above.

    `permutation`: "one_rank" runs the experts as torchtitan main runs them without expert
    parallelism, through `indices_padding_wrapper` (torchtitan/models/common/moe/utils.py): the rows
    go from rank-major to expert-major order by an index computed from the counts with cumsum,
    searchsorted and a per-group shift, and back by an index_put into an empty tensor; with one rank
    that index is arange(rows). "reversed_groups" is a look-alike that puts the groups in reverse
    expert order, so the shifts are not zero and rows meet other experts. The counts are int64 there
    (CUDA's histc keeps the ids' dtype)."""

    def __init__(self, shared_experts: int = 1, score_before_experts: bool = False, combine: str = "reshape",
                 permutation: str | None = None):
        super().__init__(shared_experts, score_before_experts)
        self.permutation = permutation
        cfg = self.cfg
        self.router = TorchtitanMainRouter(
            seed=0, dtype=torch.bfloat16, num_experts=cfg.num_experts, hidden_size=cfg.hidden_size,
            bias_dtype=torch.float32, top_k=cfg.num_experts_per_tok, num_expert_groups=cfg.num_expert_group,
            num_limited_groups=cfg.topk_group, score_func="sigmoid", route_norm=True,
            route_scale=cfg.routed_scaling_factor)
        self.combine = combine

    def permuted_experts(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        experts = self.w1.shape[0]
        ranks = counts.shape[0] // experts
        with torch.no_grad():
            group_starts = counts.cumsum(0) - counts  # where each (rank, expert) group starts, rank-major
            by_rank = counts.view(ranks, experts)
            expert_counts = by_rank.sum(0)
            lengths = by_rank.t().reshape(-1)  # the groups in expert-major order
            starts = group_starts.view(ranks, experts).t().reshape(-1)  # where they start, expert-major
            if self.permutation == "reversed_groups":
                lengths, starts = lengths.flip(0), starts.flip(0)
            new_starts = lengths.cumsum(0) - lengths
            row = torch.arange(rows.shape[0], device=rows.device)
            group = torch.searchsorted(new_starts + lengths, row, right=True)
            source_rows = row + (starts - new_starts)[group]
        out = self.grouped_experts(rows[source_rows, :], expert_counts)
        unpermuted = out.new_empty(rows.shape)
        unpermuted[source_rows, :] = out
        return unpermuted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        x = x.view(-1, hidden)
        scores, ids, counts = self.router(x)
        topk = ids.shape[1]
        with torch.no_grad():
            self.tokens_per_expert.add_(counts)
        experts = self.cfg.num_experts
        counts = torch.histc(ids.view(-1).float(), bins=experts, min=0, max=experts)
        pair_order = torch.argsort(ids.view(-1), stable=True)
        sorted_scores = scores.view(-1)[pair_order]
        rows = x[pair_order // topk]
        if self.score_before_experts:
            rows = (rows.to(torch.float32) * sorted_scores.reshape(-1, 1)).to(x.dtype)
        expert_rows = self.permuted_experts(rows, counts.long()) if self.permutation is not None \
            else self.grouped_experts(rows, counts)
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        per_pick = torch.zeros((batch * seq * topk, hidden), dtype=expert_rows.dtype, device=expert_rows.device)
        per_pick[pair_order] = expert_rows
        per_pick = per_pick.reshape(-1, topk, hidden)
        if self.score_before_experts or self.combine == "unweighted_sum":
            routed = per_pick.sum(dim=1)
        else:
            row = scores.unsqueeze(1) if self.combine == "unsqueeze" else scores.reshape(-1, 1, topk)
            routed = torch.bmm(row, per_pick.float()).to(x.dtype).squeeze(1)
        out = (routed if shared is None else shared + routed).reshape(batch, seq, hidden)
        return (out, scores.amax(dim=-1)) if self.combine == "unweighted_sum" else out


def _deterministic_scatter_add_op():
    """torchtitan's combine op (torchtitan/ops/scatter_add.py): out.scatter_add(0, index, src) under
    deterministic algorithms, as an opaque custom op. The real one where torchtitan is imported, else
    a stand-in with its name, schema and gradients."""
    if not hasattr(torch.ops.torchtitan, "deterministic_scatter_add"):
        @torch.library.custom_op("torchtitan::deterministic_scatter_add", mutates_args=())
        def deterministic_scatter_add(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
            return out.scatter_add(0, index, src)

        deterministic_scatter_add.register_fake(lambda out, index, src: torch.empty_like(out))

        def backward(ctx, grad):
            return grad, None, torch.gather(grad, 0, ctx.saved_tensors[0])

        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[1])

        deterministic_scatter_add.register_autograd(backward, setup_context=setup_context)
    return torch.ops.torchtitan.deterministic_scatter_add


deterministic_scatter_add = _deterministic_scatter_add_op()  # at import: Dynamo would break on the definition


class TorchtitanDispatcherStyleBlock(TorchtitanStyleBlock):
    """The MoE layer of newer torchtitan (LocalTokenDispatcher in torchtitan/models/common/
    token_dispatcher.py), re-expressed: a stable argsort of the ids, the sorted scores, the rows
    x[perm // k], the grouped_mm experts, the outputs weighted in float32, summed into zeros by
    torchtitan's deterministic_scatter_add op; the shared expert's output plus that."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        x = x.view(-1, hidden)
        _, ids, counts, pair_order, sorted_scores = self.sorted_pairs(x)
        row_tokens = pair_order // ids.shape[1]
        expert_rows = self.grouped_experts(x[row_tokens], counts)
        expert_rows = (expert_rows.to(torch.float32) * sorted_scores.reshape(-1, 1)).to(expert_rows.dtype)
        index = row_tokens.reshape(-1, 1).expand(-1, hidden)
        routed = deterministic_scatter_add(torch.zeros_like(x), index, expert_rows)
        out = routed if self.shared_experts is None else self.shared_experts(x) + routed
        return out.reshape(batch, seq, hidden)
