"""A hand-written DeepSeek-style MoE block with variations, for the rewrite and training tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusion_passes.example_model import ExampleConfig, Router


class HandWrittenBlock(nn.Module):
    """DeepSeek-V3 routing + per-pick batched experts + a shared MLP, with one variation."""

    def __init__(self, variant: str = "plain", dtype=torch.float32, shared_intermediate: int = 64) -> None:
        super().__init__()
        torch.manual_seed(0)
        cfg = ExampleConfig(routed_scaling_factor=1.0 if variant == "scaled_output" else 2.5)
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
        self.norm = nn.RMSNorm(hidden)
        self.to(dtype)

    def routed(self, flat: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(flat)
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
        return self.shared_down(act(self.shared_gate(x)) * self.shared_up(x))

    def forward(self, x: torch.Tensor):
        shape = x.shape
        routed = self.routed(x.view(-1, shape[-1])).view(shape)
        v = self.variant
        if v == "shared_first":
            return self.shared(x) + routed
        if v == "scaled_output":
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
