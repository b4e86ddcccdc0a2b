"""Random inputs for the gate tests and the hypothesis strategy over gate configurations."""

from __future__ import annotations

import torch
from hypothesis import strategies as st


def random_logits(shape, dtype, device, generator, scale=2.0):
    return (torch.randn(shape, generator=generator) * scale).to(dtype).to(device)


def random_bias(num_experts, dtype, device, generator):
    # Both signs, large enough that biased scores are sometimes negative.
    return (torch.randn(num_experts, generator=generator) * 0.7).to(dtype).to(device)


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def gate_cases(draw):
    num_experts = draw(st.sampled_from([8, 12, 64, 72, 96, 128, 160, 256, 384, 512, 1024]) | st.integers(1, 300))
    groups = draw(st.sampled_from(divisors(num_experts)))
    group_size = num_experts // groups
    topk_group = draw(st.integers(1, groups))
    topk = draw(st.integers(1, min(64, topk_group * group_size)))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    bias_dtype = draw(st.sampled_from([None, torch.float32, torch.bfloat16, torch.float16]))
    options = dict(
        scoring_func=draw(st.sampled_from(["sigmoid", "softmax"])),
        group_score_topk=draw(st.integers(1, min(group_size, 4))),
        masked_score=draw(st.sampled_from([float("-inf"), 0.0, -3.5])),
        renormalize=draw(st.booleans()),
        renormalize_eps=draw(st.sampled_from([0.0, 1e-20, 1e-3])),
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5, 16.0])),
        num_fused_shared_experts=draw(st.integers(0, 3)),
        apply_routed_scaling_factor_on_output=draw(st.booleans()),
        weights_from_masked_scores=bias_dtype is None and draw(st.booleans()),
        compute_dtype=draw(st.sampled_from([None, torch.float32, torch.bfloat16, torch.float16])),
        weights_dtype=draw(st.sampled_from([torch.float32, dtype])),
        ids_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
    )
    tokens = draw(st.sampled_from([0, 1, 2, 7, 33, 130]))
    layout = draw(st.sampled_from(["2d", "3d", "strided_rows", "transposed"]))
    return dict(
        num_experts=num_experts, groups=groups, topk_group=topk_group, topk=topk, dtype=dtype, bias_dtype=bias_dtype,
        tokens=tokens, layout=layout, seed=draw(st.integers(0, 2**31 - 1)), options=options,
    )


def make_logits(case, device):
    gen = torch.Generator().manual_seed(case["seed"])
    tokens, num_experts, dtype = case["tokens"], case["num_experts"], case["dtype"]
    layout = case["layout"]
    if layout == "3d" and tokens % 2 == 0:
        return random_logits((2, tokens // 2, num_experts), dtype, device, gen)
    if layout == "strided_rows":  # unit stride along E, rows padded: no 16-byte row alignment
        return random_logits((tokens, num_experts + 3), dtype, device, gen)[:, 1 : num_experts + 1]
    if layout == "transposed":  # stride along E != 1
        return random_logits((num_experts, tokens), dtype, device, gen).t()
    return random_logits((tokens, num_experts), dtype, device, gen)
