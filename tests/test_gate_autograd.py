"""Autograd of moe_fused_gate: the gradient w.r.t. the logits against autograd through ops.reference.

The reference side always uses the op's own picks (ids, and the kept groups as the forward chose
them), so a kernel that breaks an ulp-level tie differently from torch cannot make the comparison flaky.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch
from conftest import DEVICES, requires_cuda
from gate_cases import gate_cases, make_logits, random_bias, random_logits
from gate_checks import positional_args
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from triton_interpreter import interpreted_only, patch_interpreter_for_numpy_2_4, run_interpreted

import ops
from ops.gate_autograd import gate_logits_grad
from ops.reference import gate_reference, gate_scores, gate_weights_for_ids

# The op's options that only shape its outputs; gate_reference and gate_logits_grad take the rest.
OUTPUT_OPTIONS = ("num_fused_shared_experts", "weights_dtype", "ids_dtype")

# A masked score above most sigmoid scores: with weights_from_masked_scores, picks from dropped
# groups (constant weights) then sit next to kept picks in the same token.
HIGH_MASKED_SCORE = 0.8

# The API's keyword options at their defaults.
API_DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(ops.moe_fused_gate).parameters.items()
                if parameter.kind is parameter.KEYWORD_ONLY}


def full_options(**changes):
    """Every option of the API, at its default but for `changes`."""
    return {**API_DEFAULTS, **changes}


# (rtol, atol) of the op's gradient against float64 autograd: float32 arithmetic, or one rounding to
# the 16-bit logits' dtype (float16 gradients may be subnormal).
GRAD_TOLERANCE = {
    torch.float32: (1e-5, 0.0),
    torch.bfloat16: (8e-3, 0.0),
    torch.float16: (1e-3, 6e-8),
}
# Where the gradient is a difference of larger terms (renormalisation, softmax), float32 leaves noise
# of a few ulps of those terms, even where the true gradient is zero (topk=1 renormalised).
CANCELLATION_NOISE = 8 * torch.finfo(torch.float32).eps


def routing_options(options):
    return {name: value for name, value in options.items() if name not in OUTPUT_OPTIONS}


def reference_weights(logits, bias, num_expert_group, topk_group, topk, ids, options, work_dtype=torch.float32):
    """The routed weights of the op's `ids` by ops.reference, differentiable w.r.t. `logits`.

    The backward treats compute_dtype's roundings as identities, so the weights are the unrounded
    ones (in `work_dtype`), with the kept groups chosen as the forward chose them (rounded).
    """
    routing = routing_options(options)
    kept = gate_reference(logits.detach(), bias, num_expert_group, topk_group, topk, **routing).kept
    scores = gate_scores(logits.reshape(-1, logits.shape[-1]).to(work_dtype), routing["scoring_func"])
    masked_fill = routing["masked_score"] if routing["weights_from_masked_scores"] else None
    scale = 1.0 if routing["apply_routed_scaling_factor_on_output"] else routing["routed_scaling_factor"]
    routed_ids = ids.reshape(-1, ids.shape[-1])[:, :topk].long()
    # weight_dtype float32: no rounding (float64 scores stay float64).
    return gate_weights_for_ids(scores, kept, routed_ids, masked_fill, routing["renormalize"],
                                routing["renormalize_eps"], scale, torch.float32)


def check_op_grad(logits, bias, num_expert_group, topk_group, topk, options, seed):
    """Checks the op's logits gradient, for a random upstream gradient, against float64 autograd
    through the reference with the op's picks; returns the latter."""
    x = logits.detach().requires_grad_()
    weights, ids = ops.moe_fused_gate(x, bias, num_expert_group, topk_group, topk, **options)
    # Random upstream gradient, in the weights' dtype, shared columns included: they must be ignored.
    upstream = torch.randn(weights.shape, generator=torch.Generator().manual_seed(seed)).to(weights)
    weights.backward(upstream)
    assert x.grad.dtype == logits.dtype and x.grad.shape == logits.shape

    x64 = logits.detach().double().requires_grad_()
    routed_upstream = upstream.reshape(-1, upstream.shape[-1])[:, :topk].double()
    expected_weights = reference_weights(x64, bias, num_expert_group, topk_group, topk, ids, options,
                                         work_dtype=torch.float64)
    (expected,) = torch.autograd.grad(expected_weights, x64, routed_upstream)

    # Per token, the size of the terms that cancel: |g| * scale / denominator.
    unscaled = {**options, "renormalize": False, "routed_scaling_factor": 1.0}
    picked = reference_weights(x64.detach(), bias, num_expert_group, topk_group, topk, ids, unscaled,
                               work_dtype=torch.float64)
    denominator = picked.sum(-1, keepdim=True) + options["renormalize_eps"] if options["renormalize"] else 1.0
    scale = 1.0 if options["apply_routed_scaling_factor_on_output"] else options["routed_scaling_factor"]
    terms = routed_upstream.abs().amax(-1, keepdim=True) * scale / denominator

    rtol, atol = GRAD_TOLERANCE[logits.dtype]
    num_experts = logits.shape[-1]
    error = (x.grad.double() - expected).reshape(-1, num_experts).abs()
    allowed = rtol * expected.reshape(-1, num_experts).abs() + atol + CANCELLATION_NOISE * terms
    if not (error <= allowed).all():
        token, expert = divmod(int((error - allowed).argmax()), num_experts)
        raise AssertionError(f"{int((error > allowed).sum())} of {error.numel()} gradients off; worst at token "
                             f"{token}, expert {expert}: {x.grad.reshape(-1, num_experts)[token, expert].item()} vs "
                             f"{expected.reshape(-1, num_experts)[token, expert].item()}")
    return expected


@st.composite
def autograd_cases(draw):
    case = draw(gate_cases())
    if draw(st.booleans()):
        case["options"]["masked_score"] = HIGH_MASKED_SCORE
    return case


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=120)
@given(case=autograd_cases())
def test_grad_matches_reference_over_configurations(device, case):
    logits = make_logits(case, device)
    bias = None
    if case["bias_dtype"] is not None:
        gen = torch.Generator().manual_seed(case["seed"] + 1)  # the logits use case["seed"]
        bias = random_bias(case["num_experts"], case["bias_dtype"], device, gen)
    check_op_grad(logits, bias, case["groups"], case["topk_group"], case["topk"], case["options"], case["seed"])


# (E, G, topk_group, topk, bias, options): each named option of the contract, on its own.
NAMED_CASES = {
    "sigmoid_groups_bias_renorm": (64, 8, 4, 6, True, full_options(routed_scaling_factor=2.5, renormalize_eps=1e-20)),
    "sigmoid_no_groups_no_renorm": (64, 1, 1, 6, True, full_options(renormalize=False, routed_scaling_factor=2.5)),
    "softmax_groups_renorm": (96, 8, 3, 6, False,
                              full_options(scoring_func="softmax", group_score_topk=1, renormalize_eps=1e-3)),
    "softmax_no_groups_no_renorm": (64, 1, 1, 6, False, full_options(
        scoring_func="softmax", renormalize=False, routed_scaling_factor=16.0)),
    "shared_columns_rsf_on_weights": (64, 8, 4, 6, True,
                                      full_options(routed_scaling_factor=2.5, num_fused_shared_experts=2)),
    "shared_columns_rsf_on_output": (64, 8, 4, 6, True, full_options(
        routed_scaling_factor=2.5, num_fused_shared_experts=2, apply_routed_scaling_factor_on_output=True)),
    "weights_from_masked_scores": (64, 8, 2, 6, False, full_options(
        masked_score=HIGH_MASKED_SCORE, weights_from_masked_scores=True, routed_scaling_factor=2.5)),
    "compute_dtype_bf16": (64, 8, 4, 6, True, full_options(compute_dtype=torch.bfloat16, routed_scaling_factor=2.5)),
    # bf16 rounding ties group maxima, so the kept groups (which decide the constant picks) differ from float32's.
    "weights_from_masked_scores_compute_dtype_bf16": (64, 8, 2, 6, False, full_options(
        group_score_topk=1, masked_score=HIGH_MASKED_SCORE, weights_from_masked_scores=True,
        compute_dtype=torch.bfloat16)),
    "bf16_weights": (64, 8, 4, 6, True, full_options(weights_dtype=torch.bfloat16, ids_dtype=torch.int64)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(NAMED_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens_shape", [(1,), (7,), (3, 5)], ids=["T1", "T7", "3d"])
def test_grad_matches_reference_for_each_option(device, name, dtype, tokens_shape):
    num_experts, groups, topk_group, topk, with_bias, options = NAMED_CASES[name]
    gen = torch.Generator().manual_seed(len(name))
    logits = random_logits((*tokens_shape, num_experts), dtype, device, gen)
    bias = random_bias(num_experts, torch.float32, device, gen) if with_bias else None
    expected = check_op_grad(logits, bias, groups, topk_group, topk, options, seed=1)
    assert expected.abs().max() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_picks_of_dropped_groups_are_constants(device):
    """With weights_from_masked_scores, tokens mix picks of kept groups and constant masked-score picks."""
    num_experts, groups, topk_group, topk, _, options = NAMED_CASES["weights_from_masked_scores"]
    logits = random_logits((33, num_experts), torch.float32, device, torch.Generator().manual_seed(4))
    _, ids = ops.moe_fused_gate(logits, None, groups, topk_group, topk, **options)
    kept = gate_reference(logits.cpu(), None, groups, topk_group, topk, **routing_options(options)).kept
    picks_kept = kept.gather(1, ids.cpu().long())
    mixed = picks_kept.any(-1) & ~picks_kept.all(-1)
    assert mixed.sum() >= 10, "the case must mix constant and differentiable picks in a token"
    check_op_grad(logits, None, groups, topk_group, topk, options, seed=2)


class WeightsOfFixedPicks(torch.autograd.Function):
    """Float64 weights of fixed picks by ops.reference, differentiated by the op's backward formula."""

    @staticmethod
    def forward(ctx, logits, bias, num_expert_group, topk_group, topk, ids, options):
        ctx.save_for_backward(logits, ids)
        ctx.routing = (num_expert_group, topk_group, topk)
        ctx.options = options
        return reference_weights(logits, bias, num_expert_group, topk_group, topk, ids, options,
                                 work_dtype=torch.float64)

    @staticmethod
    def backward(ctx, grad_weights):
        logits, ids = ctx.saved_tensors
        grad = gate_logits_grad(grad_weights, logits, ids, *ctx.routing, **routing_options(ctx.options))
        return grad, None, None, None, None, None, None


GRADCHECK_CASES = {
    "sigmoid_groups_bias_renorm": (16, 4, 2, 3, True, full_options(routed_scaling_factor=2.5, renormalize_eps=1e-3)),
    "sigmoid_no_renorm_rsf_on_output": (16, 1, 1, 4, True, full_options(
        renormalize=False, routed_scaling_factor=2.5, apply_routed_scaling_factor_on_output=True)),
    "softmax_groups_renorm": (16, 4, 2, 3, False, full_options(scoring_func="softmax", group_score_topk=1)),
    "softmax_no_renorm": (12, 1, 1, 5, False, full_options(scoring_func="softmax", renormalize=False)),
    "weights_from_masked_scores": (16, 4, 2, 6, False, full_options(
        masked_score=HIGH_MASKED_SCORE, weights_from_masked_scores=True, routed_scaling_factor=2.5)),
}


@pytest.mark.parametrize("name", sorted(GRADCHECK_CASES))
def test_backward_formula_passes_gradcheck_in_float64(name):
    """The kernels take no float64 logits (csrc/dispatch.h instantiates float, bfloat16 and half only),
    so gradcheck cannot run on the op. Instead: (1) gradcheck, in float64, the backward formula the op
    uses (gate_logits_grad) against finite differences of the reference's weights for the op's picks;
    (2) the op's own backward on float32 logits agrees with float64 autograd through the reference to
    float32 accuracy."""
    num_experts, groups, topk_group, topk, with_bias, options = GRADCHECK_CASES[name]
    gen = torch.Generator().manual_seed(5)
    logits = random_logits((3, num_experts), torch.float32, "cpu", gen)
    bias = random_bias(num_experts, torch.float32, "cpu", gen) if with_bias else None
    _, ids = ops.moe_fused_gate(logits, bias, groups, topk_group, topk, **options)
    logits64 = logits.double().requires_grad_()
    torch.autograd.gradcheck(
        lambda x: WeightsOfFixedPicks.apply(x, bias, groups, topk_group, topk, ids, options), (logits64,))
    check_op_grad(logits, bias, groups, topk_group, topk, options, seed=3)


OPCHECK_CASES = {
    "fp32_bias_shared": ((5, 64), torch.float32, True, full_options(routed_scaling_factor=2.5,
                                                                     num_fused_shared_experts=1)),
    "bf16_3d_softmax_rsf_on_output": ((2, 3, 96), torch.bfloat16, False, full_options(
        scoring_func="softmax", group_score_topk=1, routed_scaling_factor=2.5,
        apply_routed_scaling_factor_on_output=True, num_fused_shared_experts=2)),
    "fp32_masked_scores": ((7, 64), torch.float32, False, full_options(
        masked_score=HIGH_MASKED_SCORE, weights_from_masked_scores=True, renormalize=False)),
    "fp16_empty": ((0, 64), torch.float16, True, full_options(ids_dtype=torch.int64)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(OPCHECK_CASES))
def test_opcheck_with_requires_grad(device, name):
    """Schema, fake tensor, autograd registration and AOT dispatch, forward and backward (opcheck skips
    the backward of an op without one, hence the first assert)."""
    shape, dtype, with_bias, options = OPCHECK_CASES[name]
    logits = torch.randn(shape, device=device).to(dtype).requires_grad_()
    bias = torch.randn(shape[-1], device=device) if with_bias else None
    args = positional_args(logits, bias, 8, 4, 6, **options)
    assert torch.ops.moe_fusion.moe_fused_gate.default(*args)[0].requires_grad
    torch.library.opcheck(torch.ops.moe_fusion.moe_fused_gate.default, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scoring_func", ["sigmoid", "softmax"])
def test_opcheck_of_the_backward_op(device, scoring_func):
    """The backward's own op (the Triton kernel on CUDA): schema, fake tensor and AOT dispatch."""
    logits = random_logits((2, 3, 64), torch.bfloat16, device, torch.Generator().manual_seed(9))
    weights, ids = ops.moe_fused_gate(logits, None, 8, 4, 6, scoring_func=scoring_func, num_fused_shared_experts=1)
    upstream = torch.randn(weights.shape, generator=torch.Generator().manual_seed(10)).to(device)
    torch.library.opcheck(torch.ops.moe_fusion.moe_fused_gate_backward.default,
                          (upstream, logits, ids, 6, scoring_func, True, 1e-20, 2.5))


def _bad_backward(device, **changes):
    """moe_fused_gate_backward's arguments (5 tokens, 64 experts, top 6 + 1 shared) on `device`, with `changes`."""
    args = dict(grad_weights=torch.randn(5, 7, device=device), logits=torch.randn(5, 64, device=device),
                ids=torch.randint(0, 64, (5, 7), dtype=torch.int32, device=device),
                topk=6, scoring_func="sigmoid", renormalize=True, renormalize_eps=0.0, scale=2.5)
    return {**args, **{name: change(args) if callable(change) else change for name, change in changes.items()}}


def _ids_elsewhere(args):
    ids = args["ids"]
    return torch.zeros(ids.shape, dtype=ids.dtype, device="cpu" if ids.is_meta else "meta")


BAD_BACKWARD_ARGS = {
    "logits int": (dict(logits=lambda a: a["logits"].long()), "logits must be float32, bfloat16 or float16"),
    "ids float": (dict(ids=lambda a: a["ids"].float()), "ids must be int32 or int64"),
    "ids rows": (dict(ids=lambda a: a["ids"][1:]), "ids must have shape [..., K] with logits' leading shape [5]"),
    "topk > K": (dict(topk=8), "topk must be in [1, min(64, ids.size(-1) = 7)], got 8"),
    "topk 0": (dict(topk=0), "topk must be in [1, min(64, ids.size(-1) = 7)], got 0"),
    "grad shape": (dict(grad_weights=lambda a: a["grad_weights"][:, :6]), "grad_weights must be a float32"),
    "scoring": (dict(scoring_func="relu"), "scoring_func must be 'sigmoid' or 'softmax', got 'relu'"),
    "eps": (dict(renormalize_eps=-1.0), "renormalize_eps must be finite and >= 0"),
    "scale": (dict(scale=float("nan")), "scale must be finite"),
    "device": (dict(ids=_ids_elsewhere), "ids must be on the logits' device"),
}


@pytest.mark.parametrize("device", [*DEVICES, "meta"])
@pytest.mark.parametrize("name", sorted(BAD_BACKWARD_ARGS))
def test_backward_op_rejects_bad_arguments(device, name):
    """The backward's op (also callable directly) checks what it is given, on every device and at
    trace time (meta: the fake impl)."""
    changes, message = BAD_BACKWARD_ARGS[name]
    with pytest.raises(ValueError, match="^moe_fused_gate_backward: " + re.escape(message)):
        torch.ops.moe_fusion.moe_fused_gate_backward(**_bad_backward(device, **changes))


@pytest.mark.parametrize("device", DEVICES)
def test_bias_and_ids_get_no_gradient(device):
    """The bias only changes the picks: bias.grad stays None (not zeros). The ids are not differentiable."""
    gen = torch.Generator().manual_seed(6)
    logits = random_logits((9, 64), torch.float32, device, gen).requires_grad_()
    bias = random_bias(64, torch.float32, device, gen).requires_grad_()
    weights, ids = ops.moe_fused_gate(logits, bias, 8, 4, 6, routed_scaling_factor=2.5, num_fused_shared_experts=1)
    assert weights.requires_grad
    assert not ids.requires_grad and ids.grad_fn is None
    weights.sum().backward()
    assert bias.grad is None
    assert logits.grad is not None and logits.grad.abs().max() > 0
    again, _ = ops.moe_fused_gate(logits, bias, 8, 4, 6)
    assert torch.autograd.grad(again.sum(), bias, allow_unused=True) == (None,)


COMPILE_CASES = {
    "deepseek_v3_shared": (256, 8, 4, 8, True, full_options(
        routed_scaling_factor=2.5, renormalize_eps=1e-20, num_fused_shared_experts=1)),
    "softmax_masked_scores_rsf_on_output": (64, 8, 2, 6, False, full_options(
        scoring_func="softmax", group_score_topk=1, masked_score=0.025,  # above most softmax scores of 64 experts
        weights_from_masked_scores=True, routed_scaling_factor=16.0, apply_routed_scaling_factor_on_output=True)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(COMPILE_CASES))
def test_compiled_backward_matches_eager(device, name):
    torch._dynamo.reset()
    num_experts, groups, topk_group, topk, with_bias, options = COMPILE_CASES[name]
    gen = torch.Generator().manual_seed(7)
    bias = random_bias(num_experts, torch.float32, device, gen) if with_bias else None

    def loss_of(logits, upstream):
        weights, _ = ops.moe_fused_gate(logits, bias, groups, topk_group, topk, **options)
        return (weights * upstream).sum()

    compiled = torch.compile(loss_of, backend="inductor", fullgraph=True, dynamic=True)
    for shape in ((5, num_experts), (2, 17, num_experts)):
        logits = random_logits(shape, torch.float32, device, gen)
        upstream = torch.randn(*shape[:-1], topk + options["num_fused_shared_experts"], generator=gen).to(device)
        grads = []
        for run in (loss_of, compiled):
            x = logits.clone().requires_grad_()
            run(x, upstream).backward()
            grads.append(x.grad)
        assert grads[0].abs().max() > 0
        torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scoring_func", ["sigmoid", "softmax"])
def test_double_backward_matches_float64_reference(device, scoring_func):
    """create_graph=True: the gradient is itself differentiable (on CUDA the backward then runs the
    formula's ops, not the kernel, whose output autograd could not differentiate)."""
    generator = torch.Generator().manual_seed(12)
    logits = random_logits((5, 64), torch.float32, device, generator).requires_grad_()
    bias = random_bias(64, torch.float32, device, generator) if scoring_func == "sigmoid" else None
    options = full_options(scoring_func=scoring_func, routed_scaling_factor=2.5, num_fused_shared_experts=1)
    weights, ids = ops.moe_fused_gate(logits, bias, 8, 4, 6, **options)
    upstream = torch.randn(weights.shape, generator=generator).to(device)
    (grad,) = torch.autograd.grad(weights, logits, upstream, create_graph=True)
    (second,) = torch.autograd.grad(grad.square().sum(), logits)

    x64 = logits.detach().double().requires_grad_()
    weights64 = reference_weights(x64, bias, 8, 4, 6, ids, options, work_dtype=torch.float64)
    (grad64,) = torch.autograd.grad(weights64, x64, upstream[:, :6].double(), create_graph=True)
    (second64,) = torch.autograd.grad(grad64.square().sum(), x64)
    assert second64.abs().max() > 0
    torch.testing.assert_close(second.double(), second64, rtol=1e-4, atol=1e-6)


# ------------------------------------------------- the CUDA backward kernel (ops/triton_gate_backward.py)


def _formula_and_kernel_grads(case, device):
    """gate_logits_grad and the Triton kernel on the same upstream gradient of the op's weights."""
    from ops.triton_gate_backward import gate_logits_grad_triton

    options = case["options"]
    logits = make_logits(case, device)
    bias = None
    if case["bias_dtype"] is not None:
        bias = random_bias(case["num_experts"], case["bias_dtype"], device, torch.Generator().manual_seed(case["seed"]))
    groups_and_topk = (case["groups"], case["topk_group"], case["topk"])
    weights, ids = ops.moe_fused_gate(logits, bias, *groups_and_topk, **options)
    upstream = torch.randn(weights.shape, generator=torch.Generator().manual_seed(case["seed"] + 2)).to(device)
    formula = gate_logits_grad(upstream, logits, ids, *groups_and_topk, **routing_options(options))
    scale = 1.0 if options["apply_routed_scaling_factor_on_output"] else options["routed_scaling_factor"]
    kernel = gate_logits_grad_triton(upstream, logits, ids, case["topk"], options["scoring_func"],
                                     options["renormalize"], options["renormalize_eps"], scale)
    return formula, kernel


def _check_kernel_matches_formula(case, device):
    formula, kernel = _formula_and_kernel_grads(case, device)
    assert kernel.shape == formula.shape and kernel.dtype == formula.dtype and kernel.device == formula.device
    # Both differentiate in float32; the kernel's exp and sums round differently: a few float32 ulps of
    # the terms (up to routed_scaling_factor), then one rounding to the logits' dtype.
    ulp = {torch.float32: 0.0, torch.bfloat16: 2**-8, torch.float16: 2**-11}[formula.dtype]
    torch.testing.assert_close(kernel.float(), formula.float(), rtol=ulp + 1e-5,
                               atol=16 * CANCELLATION_NOISE * case["options"]["routed_scaling_factor"])


def test_triton_gate_backward_interpreted():
    run_interpreted(__file__, "test_triton_gate_backward_interpreted_body")


@interpreted_only
def test_triton_gate_backward_interpreted_body():
    """The kernel on the CPU against the formula (itself checked against float64 autograd above) over
    the configuration space but weights_from_masked_scores (the PyTorch formula serves that mode)."""
    patch_interpreter_for_numpy_2_4()

    @settings(max_examples=60)
    @given(case=autograd_cases())
    def kernel_matches_formula(case):
        assume(not case["options"]["weights_from_masked_scores"] and case["dtype"] != torch.bfloat16)
        _check_kernel_matches_formula(case, "cpu")

    kernel_matches_formula()


@requires_cuda
@pytest.mark.cuda
@settings(max_examples=100)
@given(case=autograd_cases())
def test_cuda_gate_backward_kernel_matches_formula(case):
    assume(not case["options"]["weights_from_masked_scores"])
    _check_kernel_matches_formula(case, "cuda")
