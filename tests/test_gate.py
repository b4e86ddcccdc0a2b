"""moe_fused_gate on CPU and CUDA against the reference contract."""

from __future__ import annotations

import os
import re

import pytest
import torch
from conftest import DEVICES, requires_cuda
from gate_cases import gate_cases, make_logits, random_bias, random_logits
from gate_checks import call_poisoned, check_gate_result, positional_args
from hypothesis import given, settings

import ops
from ops.reference import deepseek_v3_routing, gate_reference


def run_case(case, device):
    logits = make_logits(case, device)
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    bias = None
    if case["bias_dtype"] is not None:
        bias = random_bias(case["num_experts"], case["bias_dtype"], device, gen)
    args = (logits, bias, case["groups"], case["topk_group"], case["topk"])
    weights, ids = call_poisoned(*args, **case["options"])
    check_gate_result(weights, ids, *args, **case["options"])
    # The functional op and the Python API give the same result as the out= overload.
    api_weights, api_ids = ops.moe_fused_gate(*args, **case["options"])
    assert torch.equal(api_ids, ids)
    torch.testing.assert_close(api_weights, weights, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=150)
@given(case=gate_cases())
def test_matches_reference_over_configurations(device, case):
    run_case(case, device)


# Real configurations (DESIGN.md section 2): E, G, topk_group, topk, scoring, bias, m, rsf, renormalize.
REAL_CONFIGS = {
    "deepseek_v3": dict(E=256, G=8, tg=4, k=8, scoring_func="sigmoid", bias=True, m=2, rsf=2.5, renorm=True),
    "deepseek_v2": dict(E=160, G=8, tg=3, k=6, scoring_func="softmax", bias=False, m=1, rsf=16.0, renorm=False),
    "deepseek_v2_lite": dict(E=64, G=1, tg=1, k=6, scoring_func="softmax", bias=False, m=1, rsf=1.0, renorm=False),
    "kimi_k2": dict(E=384, G=1, tg=1, k=8, scoring_func="sigmoid", bias=True, m=2, rsf=2.827, renorm=True),
    "glm_4_5": dict(E=160, G=1, tg=1, k=8, scoring_func="sigmoid", bias=True, m=2, rsf=2.5, renorm=True),
    "glm_4_5_air": dict(E=128, G=1, tg=1, k=8, scoring_func="sigmoid", bias=True, m=2, rsf=1.0, renorm=True),
    "nemotron": dict(E=512, G=1, tg=1, k=22, scoring_func="sigmoid", bias=True, m=2, rsf=2.5, renorm=True),
}


def check_real_configuration(name, dtype, tokens, device, seed):
    """The gate on random logits of a real configuration (one fused shared column), poisoned outputs,
    against the reference."""
    c = REAL_CONFIGS[name]
    gen = torch.Generator().manual_seed(seed)
    logits = random_logits((tokens, c["E"]), dtype, device, gen)
    bias = random_bias(c["E"], torch.float32, device, gen) if c["bias"] else None
    options = dict(scoring_func=c["scoring_func"], group_score_topk=c["m"], routed_scaling_factor=c["rsf"],
                   renormalize=c["renorm"], renormalize_eps=1e-20, num_fused_shared_experts=1)
    weights, ids = call_poisoned(logits, bias, c["G"], c["tg"], c["k"], **options)
    check_gate_result(weights, ids, logits, bias, c["G"], c["tg"], c["k"], **options)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 7, 515])
def test_real_configurations(device, name, dtype, tokens):
    check_real_configuration(name, dtype, tokens, device, seed=tokens)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["warp", "segmented"])
@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 7, 515, 2500])
def test_both_cuda_kernels_on_real_configurations(monkeypatch, kernel, name, dtype, tokens):
    """Each CUDA kernel forced in turn (MOE_FUSION_GATE_KERNEL); 515 and 2500 tokens take the
    segmented kernel's two lane layouts. DeepSeek-V2's groups of 20 fit no segmented layout."""
    if kernel == "segmented" and name == "deepseek_v2":
        pytest.skip("groups of 20 experts: the warp kernel's configuration")
    monkeypatch.setenv("MOE_FUSION_GATE_KERNEL", kernel)
    check_real_configuration(name, dtype, tokens, "cuda", seed=tokens + 1)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("name", ["deepseek_v3", "kimi_k2", "deepseek_v2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [2047, 2048, 20001])
def test_default_kernel_choice(monkeypatch, name, dtype, tokens):
    """Unset, MOE_FUSION_GATE_KERNEL picks the segmented kernel where it applies and the warp kernel
    elsewhere (DeepSeek-V2), on both sides of the size where the segmented kernel changes its lane
    layout (2048 tokens)."""
    monkeypatch.delenv("MOE_FUSION_GATE_KERNEL", raising=False)
    check_real_configuration(name, dtype, tokens, "cuda", seed=tokens)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["warp", "segmented"])
@settings(max_examples=200)
@given(case=gate_cases())
def test_each_cuda_kernel_over_configurations(kernel, case):
    """The hypothesis sweep with one kernel forced; the segmented kernel skips what it refuses."""
    before = os.environ.get("MOE_FUSION_GATE_KERNEL")
    os.environ["MOE_FUSION_GATE_KERNEL"] = kernel
    try:
        run_case(case, "cuda")
    except ValueError as error:
        if "does not take this call" not in str(error):
            raise
    finally:
        if before is None:
            del os.environ["MOE_FUSION_GATE_KERNEL"]
        else:
            os.environ["MOE_FUSION_GATE_KERNEL"] = before


@requires_cuda
@pytest.mark.cuda
def test_unknown_kernel_choice_is_rejected(monkeypatch):
    monkeypatch.setenv("MOE_FUSION_GATE_KERNEL", "fastest")  # neither auto, warp nor segmented
    with pytest.raises(ValueError, match="MOE_FUSION_GATE_KERNEL must be auto, warp or segmented"):
        ops.moe_fused_gate(torch.randn(4, 64, device="cuda"), None, 8, 4, 8)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("scoring_func", ["sigmoid", "softmax"])
def test_segmented_kernel_exact_rounds_on_hard_tokens(monkeypatch, scoring_func):
    """Tokens that leave the threshold path (NaN scores, masked experts that beat kept ones, ties
    overflowing the candidates) mixed with ordinary tokens in the same warps."""
    monkeypatch.setenv("MOE_FUSION_GATE_KERNEL", "segmented")
    gen = torch.Generator().manual_seed(21)
    logits = random_logits((300, 256), torch.float32, "cpu", gen)
    logits[5, 17] = float("nan")
    logits[40:44] = 0.5  # every expert tied
    logits[77, ::3] = -30.0
    bias = random_bias(256, torch.float32, "cpu", gen)
    bias[128:] -= 2.0  # negative biased scores: masked_score 0.0 beats them
    logits, bias = logits.cuda(), bias.cuda()
    for fill in (0.0, float("-inf")):
        options = dict(scoring_func=scoring_func, masked_score=fill, routed_scaling_factor=2.5)
        weights, ids = call_poisoned(logits, bias, 8, 4, 8, **options)
        check_gate_result(weights, ids, logits, bias, 8, 4, 8, **options)
        assert ids[5, 0] == 17 or scoring_func == "softmax"


@pytest.mark.parametrize("device", DEVICES)
def test_matches_the_unfused_deepseek_v3_routing(device):
    """Independent of the reference: the HF-style unfused code picks the same experts and weights."""
    gen = torch.Generator().manual_seed(0)
    logits = random_logits((300, 256), torch.float32, device, gen)
    bias = random_bias(256, torch.float32, device, gen)
    weights, ids = ops.moe_fused_gate(logits, bias, 8, 4, 8, routed_scaling_factor=2.5, renormalize_eps=1e-20)
    hf_weights, hf_ids = deepseek_v3_routing(logits, bias, 8, 4, 8, routed_scaling_factor=2.5)
    order = hf_ids.sort(-1)
    ours = ids.long().sort(-1)
    assert torch.equal(ours.values, order.values)
    torch.testing.assert_close(weights.gather(1, ours.indices), hf_weights.gather(1, order.indices))


@pytest.mark.parametrize("device", DEVICES)
def test_masked_score_zero_and_minus_inf_differ_when_biased_scores_are_negative(device):
    # Every biased score is negative: with masked_score=0.0 the experts of dropped groups (all tied
    # at 0.0) beat the kept ones, so the picks come from dropped groups, lowest index first.
    gen = torch.Generator().manual_seed(1)
    logits = random_logits((64, 64), torch.float32, device, gen)
    bias = torch.full((64,), -3.0, device=device)
    results = {}
    for fill in (0.0, float("-inf")):
        weights, ids = call_poisoned(logits, bias, 8, 2, 4, masked_score=fill)
        check_gate_result(weights, ids, logits, bias, 8, 2, 4, masked_score=fill)
        results[fill] = ids.long()
    kept = gate_reference(logits.cpu(), bias.cpu(), 8, 2, 4).kept.to(device)
    assert kept.gather(1, results[float("-inf")]).all()
    assert not kept.gather(1, results[0.0]).any()
    assert not torch.equal(results[0.0], results[float("-inf")])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scoring_func", ["sigmoid", "softmax"])
def test_nan_logits_rank_first_and_ids_stay_in_range(device, scoring_func):
    gen = torch.Generator().manual_seed(2)
    logits = random_logits((5, 64), torch.float32, device, gen)
    logits[1, 37] = float("nan")
    logits[3] = float("nan")
    weights, ids = call_poisoned(logits, None, 8, 4, 6, scoring_func=scoring_func, group_score_topk=1)
    check_gate_result(weights, ids, logits, None, 8, 4, 6, scoring_func=scoring_func, group_score_topk=1)
    assert ((ids >= 0) & (ids < 64)).all()
    assert weights[1].isnan().all() and weights[3].isnan().all()
    assert not weights[[0, 2, 4]].isnan().any()
    assert ids[3].tolist() == list(range(6))  # all NaN: lowest indices first
    if scoring_func == "sigmoid":
        assert ids[1, 0] == 37  # the NaN expert ranks first (softmax spreads NaN to the whole row)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_experts, groups, topk_group, topk", [(256, 8, 4, 8), (384, 1, 1, 8), (512, 1, 1, 22)])
def test_many_tied_scores(device, num_experts, groups, topk_group, topk):
    """Logits and bias from a few values: far more keys tie at the k-th place than the CUDA kernel's
    threshold top-k ranks, so it falls back to exact rounds; ties go to the lower index."""
    gen = torch.Generator().manual_seed(11)
    logits = (torch.randint(-1, 2, (67, num_experts), generator=gen) * 0.75).to(device)
    bias = (torch.randint(0, 2, (num_experts,), generator=gen) * 0.25).to(device)
    weights, ids = call_poisoned(logits, bias, groups, topk_group, topk, routed_scaling_factor=2.5)
    check_gate_result(weights, ids, logits, bias, groups, topk_group, topk, routed_scaling_factor=2.5)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_go_to_the_lower_expert_index(device):
    logits = torch.zeros(3, 32, device=device)
    logits[:, [5, 9, 20, 30]] = 1.0  # four tied winners
    weights, ids = ops.moe_fused_gate(logits, None, 4, 2, 3, group_score_topk=1)
    # groups of 8: scores tie between groups 0, 1, 2 (3 has 30): groups 0 and 1 kept.
    assert ids.tolist() == [[5, 9, 0]] * 3


@pytest.mark.parametrize("device", DEVICES)
def test_shared_columns_reproduce_the_unfused_block(device):
    """rsf * sum(w_i E_i(x)) + Shared(x) == sum over fused columns (routed and shared)."""
    gen = torch.Generator().manual_seed(3)
    tokens, hidden, inter, num_experts, shared_slots, rsf = 9, 16, 8, 32, 2, 2.5
    x = torch.randn(tokens, hidden, generator=gen).to(device)
    logits = random_logits((tokens, num_experts), torch.float32, device, gen)
    bias = random_bias(num_experts, torch.float32, device, gen)
    w_gate = torch.randn(num_experts + shared_slots, inter, hidden, generator=gen).to(device)
    w_up = torch.randn(num_experts + shared_slots, inter, hidden, generator=gen).to(device)
    w_down = torch.randn(num_experts + shared_slots, hidden, inter, generator=gen).to(device)

    def expert(e, h):
        return (torch.nn.functional.silu(h @ w_gate[e].T) * (h @ w_up[e].T)) @ w_down[e].T

    def shared_mlp(h):  # one MLP of intermediate size S*I built from the S slots' weights
        gate = torch.cat([w_gate[num_experts + j] for j in range(shared_slots)])
        up = torch.cat([w_up[num_experts + j] for j in range(shared_slots)])
        down = torch.cat([w_down[num_experts + j] for j in range(shared_slots)], dim=1)
        return (torch.nn.functional.silu(h @ gate.T) * (h @ up.T)) @ down.T

    def combine(weights, ids):
        return torch.stack([sum(weights[t, j] * expert(int(ids[t, j]), x[t]) for j in range(ids.shape[1]))
                            for t in range(tokens)])

    plain_w, plain_ids = ops.moe_fused_gate(logits, bias, 8, 4, 6, routed_scaling_factor=rsf)
    unfused = combine(plain_w, plain_ids) + shared_mlp(x)
    for on_output in (False, True):
        weights, ids = ops.moe_fused_gate(logits, bias, 8, 4, 6, routed_scaling_factor=rsf,
                                          num_fused_shared_experts=shared_slots,
                                          apply_routed_scaling_factor_on_output=on_output)
        fused = combine(weights, ids) * (rsf if on_output else 1.0)
        torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-3)


def _base_args(device="cpu"):
    logits = torch.randn(4, 64, device=device)
    return dict(logits=logits, bias=torch.randn(64, device=device), num_expert_group=8, topk_group=4, topk=8)


BAD_ARGUMENTS = [
    (dict(num_expert_group=7), "num_expert_group (7) must divide"),
    (dict(num_expert_group=0), "num_expert_group must be >= 1"),
    (dict(topk_group=9), "topk_group must be in [1, num_expert_group=8]"),
    (dict(topk_group=0), "topk_group must be in"),
    (dict(topk=0), "topk must be >= 1"),
    (dict(topk_group=1, topk=9), "topk (9) must not exceed the experts of the kept groups"),
    (dict(group_score_topk=9), "group_score_topk must be in [1, experts per group=8]"),
    (dict(scoring_func="tanh"), "scoring_func must be 'sigmoid' or 'softmax'"),
    (dict(masked_score=float("nan")), "masked_score must not be NaN"),
    (dict(renormalize_eps=-1.0), "renormalize_eps must be finite and >= 0"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor must be finite and non-zero"),
    (dict(num_fused_shared_experts=-1), "num_fused_shared_experts must be >= 0"),
    (dict(bias=torch.randn(63)), "bias must have shape [E] = [64]"),
    (dict(bias=torch.randn(64, dtype=torch.float64)), "bias must be float32, bfloat16 or float16"),
    (dict(logits=torch.randint(0, 5, (4, 64))), "logits must be float32, bfloat16 or float16"),
    (dict(weights_from_masked_scores=True), "weights_from_masked_scores requires bias=None"),
    (dict(compute_dtype=torch.float64), "compute_dtype must be None, float32, bfloat16 or float16"),
    (dict(ids_dtype=torch.int16), "ids_dtype must be int32 or int64"),
    (dict(weights_dtype=torch.float64), "weights_dtype must be float32, bfloat16 or float16"),
]


def _call_with(changes, via):
    args = _base_args()
    args.update({k: v for k, v in changes.items() if k in args})
    options = {k: v for k, v in changes.items() if k not in args}
    if via == "api":
        return ops.moe_fused_gate(*args.values(), **options)
    if via == "op":  # the C++ checks, bypassing the Python ones
        return torch.ops.moe_fusion.moe_fused_gate(*positional_args(*args.values(), **options))
    compiled = torch.compile(lambda x: ops.moe_fused_gate(x, *list(args.values())[1:], **options), fullgraph=True)
    return compiled(args["logits"])


@pytest.mark.parametrize("changes, message", BAD_ARGUMENTS, ids=[m for _, m in BAD_ARGUMENTS])
@pytest.mark.parametrize("via", ["api", "op"])
def test_bad_arguments_raise_value_error_naming_the_rule(changes, message, via):
    with pytest.raises(ValueError, match=re.escape(message)):
        _call_with(changes, via)


@pytest.mark.parametrize("changes, message", BAD_ARGUMENTS[:4], ids=[m for _, m in BAD_ARGUMENTS[:4]])
def test_bad_arguments_are_reported_at_compile_time(changes, message):
    torch._dynamo.reset()
    with pytest.raises(Exception, match=re.escape(message)):
        _call_with(changes, "compile")


@requires_cuda
def test_bias_on_another_device_is_rejected():
    with pytest.raises(ValueError, match="bias must be on the logits' device"):
        ops.moe_fused_gate(torch.randn(4, 64, device="cuda"), torch.randn(64), 8, 4, 8)


@requires_cuda
def test_cuda_rejects_more_than_1024_experts_clearly():
    with pytest.raises(ValueError, match="on CUDA the number of experts"):
        ops.moe_fused_gate(torch.randn(4, 2048, device="cuda"), None, 1, 1, 8)


@pytest.mark.parametrize("device", DEVICES)
def test_out_overload_checks_its_outputs(device):
    logits = torch.randn(4, 64, device=device)
    args = positional_args(logits, None, 8, 4, 8)
    with pytest.raises(ValueError, match="weights_out and ids_out must have shape"):
        torch.ops.moe_fusion.moe_fused_gate.out(*args, weights_out=torch.empty(4, 7, device=device),
                                                ids_out=torch.empty(4, 7, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="ids_out must have dtype int32"):
        torch.ops.moe_fusion.moe_fused_gate.out(*args, weights_out=torch.empty(4, 8, device=device),
                                                ids_out=torch.empty(4, 8, dtype=torch.int64, device=device))


OPCHECK_CASES = [
    dict(shape=(5, 64), dtype=torch.float32, bias=True, options=dict(routed_scaling_factor=2.5)),
    dict(shape=(2, 3, 96), dtype=torch.bfloat16, bias=False,
         options=dict(scoring_func="softmax", group_score_topk=1, num_fused_shared_experts=2)),
    dict(shape=(0, 64), dtype=torch.float16, bias=True, options=dict(ids_dtype=torch.int64)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=["fp32", "bf16_3d_shared", "fp16_empty"])
def test_opcheck(device, case):
    logits = torch.randn(case["shape"], device=device).to(case["dtype"])
    bias = torch.randn(case["shape"][-1], device=device) if case["bias"] else None
    args = positional_args(logits, bias, 8, 4, 6, **case["options"])
    torch.library.opcheck(torch.ops.moe_fusion.moe_fused_gate.default, args)
    k = 6 + case["options"].get("num_fused_shared_experts", 0)
    out = dict(weights_out=torch.empty(*case["shape"][:-1], k, device=device),
               ids_out=torch.empty(*case["shape"][:-1], k, dtype=case["options"].get("ids_dtype", torch.int32),
                                   device=device))
    torch.library.opcheck(torch.ops.moe_fusion.moe_fused_gate.out, args, out)


@pytest.mark.parametrize("device", DEVICES)
def test_compiles_with_dynamic_token_count(device):
    torch._dynamo.reset()
    bias = torch.randn(256, device=device)

    def route(logits):
        return ops.moe_fused_gate(logits, bias, 8, 4, 8, routed_scaling_factor=2.5, num_fused_shared_experts=1)

    compiled = torch.compile(route, dynamic=True, fullgraph=True)
    for tokens in (3, 17, 64):
        logits = torch.randn(tokens, 256, device=device)
        for got, want in zip(compiled(logits), route(logits)):
            assert torch.equal(got, want)


@requires_cuda
@pytest.mark.cuda
def test_cuda_graph_capture_and_replay():
    logits = torch.randn(40, 256, device="cuda")
    bias = torch.randn(256, device="cuda")
    static_out = ops.moe_fused_gate(logits, bias, 8, 4, 8)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = ops.moe_fused_gate(logits, bias, 8, 4, 8)
    for seed in range(3):
        logits.copy_(torch.randn(40, 256, generator=torch.Generator().manual_seed(seed)).cuda())
        graph.replay()
        want = ops.moe_fused_gate(logits, bias, 8, 4, 8)
        assert torch.equal(static_out[1], want[1]) and torch.equal(static_out[0], want[0])


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("tokens", [40000, 131072])
def test_cuda_large_token_counts(tokens):
    """Grid-stride loop: more tokens than resident warps."""
    gen = torch.Generator().manual_seed(tokens)
    logits = random_logits((tokens, 256), torch.bfloat16, "cuda", gen)
    bias = random_bias(256, torch.float32, "cuda", gen)
    weights, ids = call_poisoned(logits, bias, 8, 4, 8, routed_scaling_factor=2.5)
    check_gate_result(weights, ids, logits, bias, 8, 4, 8, routed_scaling_factor=2.5)


@requires_cuda
@pytest.mark.cuda
def test_cuda_agrees_with_cpu_kernel_bit_for_bit_on_ids():
    gen = torch.Generator().manual_seed(5)
    logits = random_logits((2000, 256), torch.float32, "cpu", gen)
    bias = random_bias(256, torch.float32, "cpu", gen)
    cpu = ops.moe_fused_gate(logits, bias, 8, 4, 8)
    cuda = ops.moe_fused_gate(logits.cuda(), bias.cuda(), 8, 4, 8)
    same = (cpu[1] == cuda[1].cpu()).all(-1)
    assert same.float().mean() > 0.999  # only ulp-level ties may differ
    torch.testing.assert_close(cuda[0].cpu()[same], cpu[0][same], rtol=2e-6, atol=1e-7)
