"""A small DeepSeek-V3-style MoE language model written the way model code writes it (unfused routing,
separate shared expert). The demo, the inspector and the tests compile it when HF transformers is
not wanted; nothing in the passes depends on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ExampleConfig:
    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_experts: int = 32
    num_expert_group: int = 4
    topk_group: int = 2
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 32
    num_shared_experts: int = 1
    routed_scaling_factor: float = 2.5


class Router(nn.Module):
    """DeepSeek-V3 "noaux_tc" routing, as transformers writes it."""

    def __init__(self, cfg: ExampleConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.randn(cfg.num_experts, cfg.hidden_size) * cfg.hidden_size**-0.5)
        self.register_buffer("e_score_correction_bias", torch.randn(cfg.num_experts) * 0.1)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        groups, per_group = cfg.num_expert_group, cfg.num_experts // cfg.num_expert_group
        logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
        scores = logits.sigmoid()
        scores_for_choice = scores + self.e_score_correction_bias
        group_scores = scores_for_choice.view(-1, groups, per_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=cfg.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, groups, per_group).reshape(-1, cfg.num_experts)
        scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), float("-inf"))
        topk_indices = torch.topk(scores_for_choice, k=cfg.num_experts_per_tok, dim=-1, sorted=False)[1]
        topk_weights = scores.gather(1, topk_indices)
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_weights * cfg.routed_scaling_factor, topk_indices


class Experts(nn.Module):
    """Routed experts in the transformers v5 layout, computed per (token, pick) pair with batched
    matmuls on the gathered expert weights (transformers' "batched_mm")."""

    def __init__(self, cfg: ExampleConfig) -> None:
        super().__init__()
        scale = cfg.hidden_size**-0.5
        inter = cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.randn(cfg.num_experts, 2 * inter, cfg.hidden_size) * scale)
        self.down_proj = nn.Parameter(torch.randn(cfg.num_experts, cfg.hidden_size, inter) * inter**-0.5)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        topk = ids.shape[-1]
        rows = x.repeat_interleave(topk, dim=0)  # one row per (token, pick)
        flat_ids = ids.reshape(-1)
        gate_up = torch.bmm(self.gate_up_proj[flat_ids], rows.unsqueeze(-1)).squeeze(-1)
        gate, up = gate_up.chunk(2, dim=-1)
        out = torch.bmm(self.down_proj[flat_ids], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
        out = out * weights.reshape(-1).unsqueeze(-1).to(out.dtype)
        return out.view(-1, topk, x.shape[-1]).sum(dim=1)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    def __init__(self, cfg: ExampleConfig) -> None:
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.view(-1, shape[-1])
        weights, ids = self.gate(flat)
        routed = self.experts(flat, weights, ids).view(shape)
        return routed + self.shared_experts(hidden_states)


class ExampleMoEModel(nn.Module):
    """Embedding, then per layer RMSNorm + MoE with a residual, then a norm and the LM head."""

    def __init__(self, cfg: ExampleConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or ExampleConfig()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.norms = nn.ModuleList(nn.RMSNorm(cfg.hidden_size) for _ in range(cfg.num_layers))
        self.layers = nn.ModuleList(MoE(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.RMSNorm(cfg.hidden_size)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        for norm, layer in zip(self.norms, self.layers):
            hidden = hidden + layer(norm(hidden))
        return self.lm_head(self.final_norm(hidden))
