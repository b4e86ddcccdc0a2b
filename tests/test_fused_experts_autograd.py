"""Autograd of moe_fusion::fused_experts against float64 autograd through ops.reference.fused_experts_reference.

The op's arguments are built from leaves as a model holds them: HF transformers' fused
``gate_up_proj [E, 2I, H]``, passed whole (w_up=None, as the rewrite passes it), and a fused gate_up
Linear for the shared MLP, sliced into the op's shared gate and up views (autograd sums their
gradients into it); or separate gate and up tensors (torchtitan). Gradients are checked on the leaves.
Errors are ||grad - expected|| / ||expected|| per leaf (see routing_term_sizes for the routing weights).
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, requires_cuda
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fused_experts import Case, make_case, poison_cuda_cache
from triton_interpreter import interpreted_only, patch_interpreter_for_numpy_2_4, run_interpreted

from ops import fused_experts
from ops.experts_autograd import fused_experts_grads
from ops.reference import fused_experts_reference, pair_projections

# Measured at most 3e-7 (float32) and 6e-3 (bfloat16: the op rounds its intermediates to bfloat16, the
# reference does not), with the routing weights' errors measured as routing_term_sizes says.
GRAD_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
LAYOUTS = ("gate_up", "separate")
# The op's differentiable inputs, in schema order: what fused_experts_grads returns.
DIFFERENTIABLE = ("hidden", "topk_weights", "w_gate", "w_up", "w_down", "shared_gate", "shared_up", "shared_down",
                  "shared_token_weight")


def leaves_of(case: Case, layout: str) -> dict[str, torch.Tensor]:
    """Copies of the case's tensors as leaves that require grad; "gate_up" fuses gate and up in one
    tensor, as HF transformers holds them (routed [E, 2I, H], shared Linear [2*S*I, H])."""
    tensors = {"hidden": case.hidden, "topk_weights": case.topk_weights}
    if layout == "gate_up":
        tensors["gate_up"] = torch.cat([case.w_gate, case.w_up], dim=1)
        if case.shared_gate is not None:
            tensors["shared_gate_up"] = torch.cat([case.shared_gate, case.shared_up], dim=0)
    else:
        tensors.update(w_gate=case.w_gate, w_up=case.w_up, shared_gate=case.shared_gate, shared_up=case.shared_up)
    tensors.update(w_down=case.w_down, shared_down=case.shared_down, shared_token_weight=case.shared_token_weight)
    return {name: t.detach().clone().requires_grad_() for name, t in tensors.items() if t is not None}


def op_args(leaves: dict[str, torch.Tensor], topk_ids: torch.Tensor, gate_up_views: bool = False) -> tuple:
    """fused_experts' arguments from the leaves: the routed gate_up whole (w_up None), or as its two
    row views with `gate_up_views`; the shared gate_up Linear as its two row views."""
    inter = leaves["w_down"].shape[-1]
    if "gate_up" in leaves:
        gate_up = leaves["gate_up"]
        w_gate, w_up = (gate_up[:, :inter], gate_up[:, inter:]) if gate_up_views else (gate_up, None)
    else:
        w_gate, w_up = leaves["w_gate"], leaves["w_up"]
    if "shared_gate_up" in leaves:
        rows = leaves["shared_gate_up"].shape[0] // 2
        shared_gate, shared_up = leaves["shared_gate_up"][:rows], leaves["shared_gate_up"][rows:]
    else:
        shared_gate, shared_up = leaves.get("shared_gate"), leaves.get("shared_up")
    return (leaves["hidden"], leaves["topk_weights"], topk_ids, w_gate, w_up, leaves["w_down"], shared_gate, shared_up,
            leaves.get("shared_down"), leaves.get("shared_token_weight"))


def projections_of(args) -> torch.Tensor:
    """The projections fused_experts_train returns for fused_experts' `args`, from the float reference
    (ids outside [0, E + S) allowed: the CPU op rejects them) rounded to hidden's dtype."""
    hidden, _, topk_ids, w_gate, w_up, w_down, shared_gate, shared_up, *_ = args
    return pair_projections(hidden.detach(), topk_ids, w_gate.detach(), None if w_up is None else w_up.detach(),
                            w_down, None if shared_gate is None else shared_gate.detach(),
                            None if shared_up is None else shared_up.detach()).to(hidden.dtype)


def random_upstream(shape, dtype, device, seed) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def expected_grads(leaves, topk_ids, upstream) -> list[torch.Tensor]:
    """Float64 autograd through the reference, for each leaf."""
    leaves64 = {name: leaf.detach().double().requires_grad_() for name, leaf in leaves.items()}
    out = fused_experts_reference(*op_args(leaves64, topk_ids))
    return list(torch.autograd.grad(out, list(leaves64.values()), upstream.double()))


@torch.no_grad()
def routing_term_sizes(leaves, topk_ids, upstream) -> dict[str, torch.Tensor]:
    """The routing weights' gradients are dot products <g_t, y_tj> over H (times the pair's other weight
    factor) of rounded vectors, which may cancel: their error is measured against the size of the
    products, ||g_t|| ||y_tj||, rather than against the result."""
    hidden, topk_weights, _, *weights, token_weight = op_args(
        {name: leaf.double() for name, leaf in leaves.items()}, topk_ids)
    ones = torch.ones_like(topk_weights[:, :1])
    pair_outputs = torch.stack([fused_experts_reference(hidden, ones, topk_ids[:, j:j + 1], *weights)
                                for j in range(topk_ids.shape[1])], dim=1)  # y_tj, [T, K, H]
    sizes = upstream.double().norm(dim=1, keepdim=True) * pair_outputs.norm(dim=2)
    if token_weight is None:
        return {"topk_weights": sizes}
    shared = topk_ids >= leaves["w_down"].shape[0]
    return {"topk_weights": torch.where(shared, sizes * token_weight[:, None].abs(), sizes),
            "shared_token_weight": torch.where(shared, sizes * topk_weights.abs(), 0.0).sum(1)}


def check_grads(case: Case, layout: str, seed: int = 0) -> None:
    leaves = leaves_of(case, layout)
    out = fused_experts(*op_args(leaves, case.topk_ids))
    upstream = random_upstream(out.shape, out.dtype, out.device, seed)
    grads = torch.autograd.grad(out, list(leaves.values()), upstream)
    expected = expected_grads(leaves, case.topk_ids, upstream)
    term_sizes = routing_term_sizes(leaves, case.topk_ids, upstream)
    for (name, leaf), grad, want in zip(leaves.items(), grads, expected, strict=True):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape and grad.device == leaf.device, name
        assert want.norm() > 0, f"{name}: the case must give it a gradient"
        error = ((grad.double() - want).norm() / term_sizes.get(name, want).norm()).item()
        assert error <= GRAD_TOLERANCE[case.hidden.dtype], f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("device", DEVICES)
def test_fused_gate_up_gets_the_gradient_of_its_two_views(device):
    """w_up=None writes gate_up's gradient as one tensor; autograd through two row views sums two
    gradients into it: the same numbers, bit for bit."""
    case = make_case(tokens=40, num_experts=6, topk=3, num_shared=1, dtype=torch.bfloat16, device=device)
    leaves = leaves_of(case, "gate_up")
    upstream = random_upstream(case.hidden.shape, torch.bfloat16, device, seed=11)
    fused, views = (torch.autograd.grad(fused_experts(*op_args(leaves, case.topk_ids, gate_up_views=views)),
                                        leaves["gate_up"], upstream)[0] for views in (False, True))
    assert fused.abs().max() > 0
    assert torch.equal(fused, views)



@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 37, 1000])
def test_training_forward_returns_the_output_and_the_projections(device, dtype, tokens):
    """fused_experts_train's output is fused_experts' bit for bit, and row t*K + j of its projections
    is that pair's gate and up projections (on CUDA written into NaN-poisoned memory)."""
    case = make_case(tokens=tokens, hidden_size=96, inter=40, num_experts=6, topk=3, num_shared=2, dtype=dtype,
                     device=device, token_weight=True)
    if device == "cuda":
        poison_cuda_cache()
    out, projections = torch.ops.moe_fusion.fused_experts_train(*case.args())
    assert torch.equal(out, fused_experts(*case.args()))
    assert projections.shape == (case.topk_ids.numel(), 80) and projections.dtype == dtype
    want = pair_projections(case.hidden, case.topk_ids, case.w_gate, case.w_up, case.w_down, case.shared_gate,
                            case.shared_up)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(projections.float(), want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("device", DEVICES)
def test_projections_are_saved_only_when_a_gradient_is_needed(device):
    """fused_experts runs as fused_experts_train under autograd, and as itself otherwise."""
    from compile_checks import fused_op_calls

    case = make_case(tokens=9, num_experts=4, num_shared=1, dtype=torch.bfloat16, device=device)
    leaves = leaves_of(case, "gate_up")
    frozen = {name: leaf.detach() for name, leaf in leaves.items()}
    train, plain = "moe_fusion::fused_experts_train", "moe_fusion::fused_experts"
    assert fused_op_calls(lambda: fused_experts(*op_args(leaves, case.topk_ids))).get(train) == 1
    for run in (lambda: fused_experts(*op_args(frozen, case.topk_ids)),
                lambda: torch.no_grad()(fused_experts)(*op_args(leaves, case.topk_ids))):
        assert fused_op_calls(run) == {plain: 1}



@pytest.mark.parametrize("device", DEVICES)
def test_activation_checkpointing_gives_the_same_gradients(device):
    """torch.utils.checkpoint (as torchtitan and HF gradient checkpointing wrap a block): the forward
    runs without saving, the backward reruns it (fused_experts_train again) and gets the same gradients."""
    case = make_case(tokens=13, num_experts=6, topk=3, num_shared=1, dtype=torch.bfloat16, device=device,
                     token_weight=True)
    upstream = random_upstream(case.hidden.shape, torch.bfloat16, device, seed=13)
    grads = []
    for checkpointed in (False, True):
        leaves = leaves_of(case, "gate_up")

        def block(*tensors, names=tuple(leaves)):
            return fused_experts(*op_args(dict(zip(names, tensors, strict=True)), case.topk_ids))

        out = (torch.utils.checkpoint.checkpoint(block, *leaves.values(), use_reentrant=False) if checkpointed
               else block(*leaves.values()))
        grads.append(torch.autograd.grad(out, list(leaves.values()), upstream))
    for name, plain, checkpointed in zip(leaves, *grads, strict=True):
        assert plain.abs().max() > 0, name
        assert torch.equal(plain, checkpointed), name

# The backward op's rules, each broken on its own: (name, change of the arguments, message).
BAD_BACKWARD_ARGS = [
    ("grad_out_shape", lambda a: {**a, "grad_out": a["grad_out"][:-1]}, "grad_out must be like hidden"),
    ("grad_out_dtype", lambda a: {**a, "grad_out": a["grad_out"].double()}, "grad_out must be like hidden"),
    ("projections_rows", lambda a: {**a, "projections": a["projections"][1:]},
     r"projections must be \[T\*K, 2I\] = \[20, 32\]"),
    ("projections_dtype", lambda a: {**a, "projections": a["projections"].float()}, "projections must be"),
    ("needs_grad_length", lambda a: {**a, "needs_grad": [True] * 8}, "needs_grad must have 9 flags"),
    ("forward_rule", lambda a: {**a, "topk_ids": a["topk_ids"][:, :1]}, "topk_weights must have topk_ids' shape"),
]


@pytest.mark.parametrize("device", [*DEVICES, "meta"])
@pytest.mark.parametrize("name, corrupt, message", BAD_BACKWARD_ARGS, ids=[b[0] for b in BAD_BACKWARD_ARGS])
def test_backward_op_rejects_bad_arguments(device, name, corrupt, message):
    case = make_case(tokens=5, hidden_size=32, inter=16, num_experts=4, topk=3, num_shared=1, dtype=torch.bfloat16,
                     device="cpu", token_weight=True)
    names = ("grad_out", "projections", "hidden", "topk_weights", "topk_ids", "w_gate", "w_up", "w_down",
             "shared_gate", "shared_up", "shared_down", "shared_token_weight")
    values = (random_upstream(case.hidden.shape, torch.bfloat16, "cpu", seed=12), projections_of(case.args()),
              *case.args())
    args = corrupt({**dict(zip(names, (v.to(device) if torch.is_tensor(v) else v for v in values), strict=True)),
                    "needs_grad": [True] * 9})
    with pytest.raises(ValueError, match=message):
        torch.ops.moe_fusion.fused_experts_backward(*args.values())

# (tokens, E, K, S, shared_token_weight, topk_weights' dtype: None for hidden's); K > E repeats ids in a row.
GRAD_CASES = {
    "T1_routed": (1, 8, 2, 0, False, torch.float32),
    "T1_E64_K8_gated": (1, 64, 8, 1, True, torch.float32),
    "T7_S2_gated": (7, 16, 4, 2, True, torch.float32),
    "T13_E64_K8_S2": (13, 64, 8, 2, False, None),
    "T33_repeated_ids_gated": (33, 5, 6, 1, True, None),
    "T9_K1": (9, 4, 1, 0, False, torch.float32),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_grads_match_float64_reference(device, dtype, layout, name):
    tokens, num_experts, topk, num_shared, token_weight, weights_dtype = GRAD_CASES[name]
    case = make_case(tokens, hidden_size=48, inter=24, num_experts=num_experts, topk=topk, num_shared=num_shared,
                     dtype=dtype, device=device, layout="torchtitan", weights_dtype=weights_dtype,
                     token_weight=token_weight, seed=len(name))
    check_grads(case, layout)


@st.composite
def grad_configurations(draw, dtypes=(torch.float32, torch.bfloat16, torch.float16)):
    """make_case's arguments (T = 1 or odd; E up to 60; K up to 8, repeating ids when K > E; S = 0..2;
    H and I off the tile sizes; every layout, dtype and ids dtype) and the leaves' layout. T = 0 has
    its own test (every gradient zero)."""
    num_shared = draw(st.sampled_from([0, 1, 2]))
    arguments = dict(
        tokens=draw(st.sampled_from([1, 5, 33])), hidden_size=draw(st.sampled_from([24, 40, 64])),
        inter=draw(st.sampled_from([8, 24, 48])), num_experts=draw(st.sampled_from([1, 3, 8, 60])),
        topk=draw(st.sampled_from([1, 2, 6, 8])), num_shared=num_shared, dtype=draw(st.sampled_from(dtypes)),
        layout=draw(st.sampled_from(["hf", "torchtitan", "transposed"])),
        ids_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        weights_dtype=draw(st.sampled_from([torch.float32, None])),
        token_weight=num_shared > 0 and draw(st.booleans()), seed=draw(st.integers(0, 2**16)))
    return arguments, draw(st.sampled_from(LAYOUTS))


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40)
@given(configuration=grad_configurations())
def test_grads_match_float64_reference_over_configurations(device, configuration):
    arguments, layout = configuration
    check_grads(make_case(**arguments, device=device), layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("needed", [("hidden",), ("topk_weights",), ("w_down", "shared_gate"),
                                    ("shared_token_weight", "w_up")])
def test_only_the_needed_gradients(device, needed):
    """Frozen inputs (requires_grad=False) get no gradient; the others get what they get when all are needed."""
    case = make_case(tokens=11, num_experts=6, topk=3, num_shared=2, dtype=torch.bfloat16, device=device,
                     layout="torchtitan", token_weight=True)
    leaves = leaves_of(case, "separate")
    upstream = random_upstream(case.hidden.shape, torch.bfloat16, device, seed=1)
    fused_experts(*op_args(leaves, case.topk_ids)).backward(upstream)
    all_grads = {name: leaf.grad for name, leaf in leaves.items()}
    for name, leaf in leaves.items():
        leaf.grad = None
        leaf.requires_grad_(name in needed)
    fused_experts(*op_args(leaves, case.topk_ids)).backward(upstream)
    for name, leaf in leaves.items():
        if name in needed:
            assert torch.equal(leaf.grad, all_grads[name]), name
        else:
            assert leaf.grad is None, name


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_range_ids_add_nothing_and_get_zero_gradient(device):
    """The CUDA forward ignores ids outside [0, E + S) (the CPU one rejects them); the backward,
    which runs on both, leaves them out too."""
    case = make_case(tokens=6, hidden_size=32, inter=16, num_experts=4, topk=3, num_shared=1, device=device,
                     layout="torchtitan", ids_dtype=torch.int64, token_weight=True)
    bad = case.topk_ids.clone()
    bad[0, 0], bad[2, 1], bad[3, 3], bad[5, 2] = -1, 5, 2**33 + 1, 4  # 4 = E is the shared slot: valid
    case = case.replace(topk_ids=bad)
    leaves = leaves_of(case, "separate")
    upstream = random_upstream(case.hidden.shape, torch.float32, device, seed=2)
    args = op_args(leaves, bad)
    grads = dict(zip(DIFFERENTIABLE, fused_experts_grads(upstream, projections_of(args), *args, [True] * 9),
                     strict=True))
    for name, want in zip(leaves, expected_grads(leaves, bad, upstream), strict=True):
        torch.testing.assert_close(grads[name].double(), want, rtol=1e-5, atol=1e-6, msg=name)
    out_of_range = (bad < 0) | (bad >= 5)
    assert out_of_range.sum() == 3 and (grads["topk_weights"][out_of_range] == 0).all()


class ReferenceWithOpBackward(torch.autograd.Function):
    """fused_experts_reference in float64, differentiated by the op's backward formula (fused_experts_grads)."""

    @staticmethod
    def forward(ctx, hidden, topk_weights, topk_ids, *weights_and_token_weight):
        args = (hidden, topk_weights, topk_ids, *weights_and_token_weight)
        ctx.save_for_backward(projections_of(args), *args)
        return fused_experts_reference(*args)

    @staticmethod
    def backward(ctx, grad_out):
        needs_grad = [needed for i, needed in enumerate(ctx.needs_input_grad) if i != 2]  # 2: topk_ids
        grad_hidden, grad_topk_weights, *others = fused_experts_grads(grad_out, *ctx.saved_tensors, needs_grad)
        return grad_hidden, grad_topk_weights, None, *others


# (tokens, E, K, S, shared_token_weight, out-of-range ids)
GRADCHECK_CASES = {
    "routed_repeated_ids": (3, 3, 4, 0, False, False),
    "shared_gated_out_of_range": (4, 3, 3, 2, True, True),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(GRADCHECK_CASES))
def test_backward_formula_passes_gradcheck_in_float64(layout, name):
    """The CPU kernel takes no float64 (float32, bfloat16 and float16 only), so gradcheck runs on the
    float64 reference differentiated by the op's backward function; test_grads_match_float64_reference
    checks the op itself."""
    tokens, num_experts, topk, num_shared, token_weight, out_of_range = GRADCHECK_CASES[name]
    case = make_case(tokens, hidden_size=6, inter=4, num_experts=num_experts, topk=topk, num_shared=num_shared,
                     layout="torchtitan", ids_dtype=torch.int64, token_weight=token_weight, seed=3)
    ids = case.topk_ids.clone()
    if out_of_range:
        ids[0, 1], ids[2, 0] = -1, num_experts + num_shared
    leaves = {name: leaf.detach().double().requires_grad_() for name, leaf in leaves_of(case, layout).items()}
    names = list(leaves)
    torch.autograd.gradcheck(
        lambda *tensors: ReferenceWithOpBackward.apply(*op_args(dict(zip(names, tensors, strict=True)), ids)),
        tuple(leaves.values()))


OPCHECK_CASES = {
    "routed_fp32": dict(num_shared=0),
    "shared_gated_bf16": dict(num_shared=2, dtype=torch.bfloat16, weights_dtype=None, token_weight=True),
    "shared_int64_no_tokens": dict(tokens=0, num_shared=1, ids_dtype=torch.int64, token_weight=True),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(OPCHECK_CASES))
@pytest.mark.parametrize("op", ["fused_experts", "fused_experts_train"])
def test_opcheck_with_requires_grad(device, layout, name, op):
    """Schema, fake tensor, autograd registration and AOT dispatch with dynamic shapes, forward and
    backward (opcheck skips the backward of an op without one, hence the first assert), for the op and
    its training variant."""
    case = make_case(**{"tokens": 5, **OPCHECK_CASES[name]}, hidden_size=32, inter=16, num_experts=4, device=device,
                     layout="torchtitan")
    args = op_args(leaves_of(case, layout), case.topk_ids)
    overload = getattr(torch.ops.moe_fusion, op).default
    out = overload(*args)
    assert (out[0] if op == "fused_experts_train" else out).requires_grad
    torch.library.opcheck(overload, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_of_the_backward_op(device):
    case = make_case(tokens=5, hidden_size=32, inter=16, num_experts=4, num_shared=1, dtype=torch.bfloat16,
                     device=device, token_weight=True)
    upstream = random_upstream(case.hidden.shape, torch.bfloat16, device, seed=4)
    projections = torch.ops.moe_fusion.fused_experts_train(*case.args())[1]
    for needs_grad in ([True] * 9, [True, False, False, True, False, False, True, False, True]):
        torch.library.opcheck(torch.ops.moe_fusion.fused_experts_backward.default,
                              (upstream, projections, *case.args(), needs_grad))


def test_compiled_backward_matches_eager():
    """Inductor on the CPU, dynamic token count: the backward op stays opaque in the compiled graph."""
    torch._dynamo.reset()

    def loss_of(leaves, topk_ids, upstream):
        return (fused_experts(*op_args(leaves, topk_ids)).float() * upstream).sum()

    compiled = torch.compile(loss_of, backend="inductor", fullgraph=True, dynamic=True)
    for tokens in (5, 12):
        case = make_case(tokens=tokens, num_experts=8, topk=3, num_shared=1, dtype=torch.bfloat16,
                         layout="torchtitan", token_weight=True, seed=tokens)
        upstream = random_upstream(case.hidden.shape, torch.float32, "cpu", seed=5)
        grads = []
        for run in (loss_of, compiled):
            leaves = leaves_of(case, "gate_up")
            run(leaves, case.topk_ids, upstream).backward()
            grads.append({name: leaf.grad for name, leaf in leaves.items()})
        for name, grad in grads[0].items():
            assert grad.abs().max() > 0, name
            torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_tokens_give_zero_gradients(device, layout):
    case = make_case(tokens=0, hidden_size=32, inter=16, num_experts=4, num_shared=2, dtype=torch.bfloat16,
                     device=device, layout="torchtitan", token_weight=True)
    leaves = leaves_of(case, layout)
    fused_experts(*op_args(leaves, case.topk_ids)).sum().backward()
    for name, leaf in leaves.items():
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape and leaf.grad.dtype == leaf.dtype, name
        assert (leaf.grad == 0).all(), name


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_raises(device):
    case = make_case(tokens=3, num_experts=4, num_shared=1, device=device)
    leaves = leaves_of(case, "separate")
    out = fused_experts(*op_args(leaves, case.topk_ids))
    grads = torch.autograd.grad(out.square().sum(), list(leaves.values()), create_graph=True)
    with pytest.raises(ValueError, match=r"^fused_experts: double backward \(create_graph=True\) is not supported"):
        sum(g.square().sum() for g in grads).backward()


# ---------------------------------------------------------------- the Triton backward (CUDA kernels)


def test_triton_backward_interpreted():
    run_interpreted(__file__, "test_triton_backward_interpreted_body")


@interpreted_only
def test_triton_backward_interpreted_body(monkeypatch):
    """The CUDA backward's kernels on the CPU: the CPU forward, then the Triton backward, against float64."""
    import ops.experts_autograd

    patch_interpreter_for_numpy_2_4()
    monkeypatch.setattr(ops.experts_autograd, "_runs_triton", lambda hidden: True)
    # The interpreter has no bfloat16 tl.dot (it multiplies the raw bits), so float32 and float16 only.
    cases = [
        (make_case(tokens=1, hidden_size=32, inter=16, num_experts=8, topk=2, num_shared=0), "separate"),
        (make_case(tokens=13, hidden_size=48, inter=40, num_experts=6, topk=3, num_shared=2, token_weight=True,
                   ids_dtype=torch.int64, layout="torchtitan"), "gate_up"),
        (make_case(tokens=9, hidden_size=40, inter=24, num_experts=4, topk=6, num_shared=1, dtype=torch.float16,
                   weights_dtype=None, token_weight=True, layout="torchtitan"), "separate"),  # repeated ids
        # > 16 rows per slot: the second tile row (32-row blocks, several blocks per slot).
        (make_case(tokens=70, hidden_size=32, inter=16, num_experts=3, topk=2, num_shared=1, dtype=torch.float16,
                   layout="torchtitan"), "gate_up"),
    ]
    for case, layout in cases:
        check_grads(case, layout)
    test_out_of_range_ids_add_nothing_and_get_zero_gradient("cpu")

    # Any strides (the op's contract): a column view of hidden, a transposed upstream gradient, and
    # transposed weights give the gradients of their contiguous copies.
    case = make_case(tokens=7, hidden_size=32, inter=16, num_experts=4, topk=2, num_shared=1, layout="transposed")
    assert case.hidden.stride(1) != 1
    upstream = random_upstream((32, 7), torch.float32, "cpu", seed=10).T
    needs_grad = [True] * 8 + [False]  # no shared_token_weight in this case
    projections = projections_of(case.args())
    strided = fused_experts_grads(upstream, projections, *case.args(), needs_grad)
    contiguous = fused_experts_grads(upstream.contiguous(), projections, *(t.contiguous() if torch.is_tensor(t)
                                                                           else t for t in case.args()), needs_grad)
    for got, want in zip(strided[:-1], contiguous[:-1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # The configuration space (no bfloat16: see above).
    settings(max_examples=15)(given(configuration=grad_configurations(dtypes=(torch.float32, torch.float16)))(
        lambda configuration: check_grads(make_case(**configuration[0]), configuration[1])))()


def _backward_case(tokens, dtype=torch.bfloat16, **sizes):
    sizes = {"hidden_size": 96, "inter": 48, "num_experts": 60, "topk": 6, "num_shared": 2, **sizes}
    return make_case(tokens=tokens, dtype=dtype, device="cuda", layout="torchtitan", token_weight=True,
                     weights_dtype=None, seed=tokens, **sizes)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 64, 1000])
def test_cuda_backward_on_poisoned_memory(dtype, tokens):
    """Every tile configuration's rows (1, 64 and 1000 tokens over 62 slots), every gradient written:
    the caching allocator's free memory is NaN when the backward allocates its outputs."""
    case = _backward_case(tokens, dtype)
    leaves = leaves_of(case, "gate_up")
    out = fused_experts(*op_args(leaves, case.topk_ids))
    upstream = random_upstream(out.shape, dtype, "cuda", seed=6)
    expected = expected_grads(leaves, case.topk_ids, upstream)
    term_sizes = routing_term_sizes(leaves, case.topk_ids, upstream)
    poison_cuda_cache()
    grads = torch.autograd.grad(out, list(leaves.values()), upstream)
    for name, grad, want in zip(leaves, grads, expected, strict=True):
        error = ((grad.double() - want).norm() / term_sizes.get(name, want).norm()).item()
        assert error <= GRAD_TOLERANCE[dtype], f"{name}: relative error {error:.2e}"


@requires_cuda
@pytest.mark.cuda
def test_cuda_backward_large_segments():
    """Thousands of rows per slot (the largest tiles, weight gradients reduced over many row blocks)."""
    check_grads(_backward_case(3000, hidden_size=128, inter=64, num_experts=4, topk=2, num_shared=1), "gate_up")


@requires_cuda
@pytest.mark.cuda
def test_cuda_backward_never_synchronises_and_is_deterministic():
    case = _backward_case(500)
    leaves = leaves_of(case, "gate_up")
    upstream = random_upstream(case.hidden.shape, torch.bfloat16, "cuda", seed=7)
    runs = []
    for _ in range(3):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = fused_experts(*op_args(leaves, case.topk_ids))
            runs.append(torch.autograd.grad(out, list(leaves.values()), upstream))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for grads in runs[1:]:
        for name, grad, first in zip(leaves, grads, runs[0], strict=True):
            assert torch.equal(grad, first), name


@requires_cuda
@pytest.mark.cuda
def test_cuda_backward_graph_capture_and_replay():
    case = _backward_case(48)
    upstream = random_upstream(case.hidden.shape, torch.bfloat16, "cuda", seed=8)
    static = [upstream.clone(), projections_of(case.args()), *(t.clone() if torch.is_tensor(t) else t
                                                              for t in case.args())]

    def backward():
        return torch.ops.moe_fusion.fused_experts_backward(*static, [True] * 9)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = backward()

    fresh = _backward_case(48).replace(hidden=case.hidden.flip(0))
    fresh_args = [random_upstream(case.hidden.shape, torch.bfloat16, "cuda", seed=9), projections_of(fresh.args()),
                  *fresh.args()]
    for buffer, value in zip(static, fresh_args, strict=True):
        if torch.is_tensor(buffer):
            buffer.copy_(value)
    graph.replay()
    expected = torch.ops.moe_fusion.fused_experts_backward(*fresh_args, [True] * 9)
    for replayed, want in zip(captured, expected, strict=True):
        assert torch.equal(replayed, want)
