"""Tests of moe_fusion::fused_experts against ops.reference.fused_experts_reference.

Every behavioural test runs on the CPU (C++ kernel) and, where a GPU is present, on CUDA (Triton
kernels). The Triton kernels are also run on the CPU through Triton's interpreter, in a subprocess.
Errors are measured as ||out - ref|| / ||ref|| against the float32 reference.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from conftest import DEVICES, requires_cuda
from hypothesis import given, settings
from hypothesis import strategies as st
from triton_interpreter import interpreted_only, patch_interpreter_for_numpy_2_4, run_interpreted

from ops import fused_experts
from ops.reference import fused_experts_reference, pair_projections

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
LAYOUTS = ("hf", "torchtitan", "transposed")


@dataclasses.dataclass
class Case:
    """The op's arguments, in schema order."""

    hidden: torch.Tensor
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor
    shared_gate: torch.Tensor | None = None
    shared_up: torch.Tensor | None = None
    shared_down: torch.Tensor | None = None
    shared_token_weight: torch.Tensor | None = None

    def args(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def replace(self, **changes) -> Case:
        return dataclasses.replace(self, **changes)


def make_case(tokens=17, hidden_size=64, inter=32, num_experts=8, topk=2, num_shared=1, dtype=torch.float32,
              device="cpu", layout="hf", ids_dtype=torch.int32, weights_dtype=torch.float32, token_weight=False,
              seed=0) -> Case:
    """Random inputs (never zero) with weights laid out as a model holds them:

    - ``hf``: HF transformers v5, ``gate_up_proj [E, 2I, H]`` passed as row views, and a shared MLP
      with a fused gate_up ``nn.Linear`` passed as row slices;
    - ``torchtitan``: separate ``w1, w3 [E, I, H]``, ``w2 [E, H, I]`` and separate shared Linears;
    - ``transposed``: every weight a transposed view (unit stride on the wrong axis) and hidden a
      strided column view, for the any-stride contract.

    Each row of ids holds ``topk`` routed experts (distinct when topk <= E, else with repeats) and the
    ``num_shared`` shared slots, in a random order.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, fan_in):
        return torch.randn(*shape, generator=gen) * fan_in**-0.5

    def weight(rows, cols, *lead):
        """A [*lead, rows, cols] weight (fan-in cols) in the layout's storage."""
        if layout == "transposed":
            return randn(*lead, cols, rows, fan_in=cols).transpose(-1, -2)
        return randn(*lead, rows, cols, fan_in=cols)

    if layout == "hf":
        gate_up = randn(num_experts, 2 * inter, hidden_size, fan_in=hidden_size)
        w_gate, w_up = gate_up[:, :inter], gate_up[:, inter:]
    else:
        w_gate = weight(inter, hidden_size, num_experts)
        w_up = weight(inter, hidden_size, num_experts)
    w_down = weight(hidden_size, inter, num_experts)
    shared = {}
    if num_shared:
        rows = num_shared * inter
        if layout == "hf":
            gate_up = randn(2 * rows, hidden_size, fan_in=hidden_size)
            shared = {"shared_gate": gate_up[:rows], "shared_up": gate_up[rows:]}
        else:
            shared = {"shared_gate": weight(rows, hidden_size), "shared_up": weight(rows, hidden_size)}
        shared["shared_down"] = weight(hidden_size, rows)

    hidden = torch.randn(tokens, 2 * hidden_size if layout == "transposed" else hidden_size, generator=gen)
    if layout == "transposed":
        hidden = hidden[:, ::2]
    if topk <= num_experts:
        routed = torch.rand(tokens, num_experts, generator=gen).argsort(dim=1)[:, :topk]
    else:
        routed = torch.randint(0, num_experts, (tokens, topk), generator=gen)
    ids = torch.cat([routed, torch.arange(num_experts, num_experts + num_shared).expand(tokens, -1)], dim=1)
    ids = ids.gather(1, torch.rand(ids.shape, generator=gen).argsort(dim=1))
    weights = torch.rand(ids.shape, generator=gen) * 0.9 + 0.1
    weights_dtype = weights_dtype or dtype
    if num_shared and token_weight:
        shared["shared_token_weight"] = (torch.rand(tokens, generator=gen) * 0.9 + 0.1).to(device, weights_dtype)

    copies = {}

    def place(t):
        # A dtype cast or device move of a view would lose its strides: rebuild the view on the copy
        # (one copy per base, so that HF's gate and up views still share gate_up_proj's storage).
        base = t._base if t._base is not None else t
        copy = copies.setdefault(id(base), base.to(device, dtype))
        return copy.as_strided(t.shape, t.stride(), t.storage_offset())

    return Case(place(hidden), weights.to(device, weights_dtype), ids.to(device, ids_dtype), place(w_gate),
                place(w_up), place(w_down), **{k: place(v) if k != "shared_token_weight" else v
                                               for k, v in shared.items()})


def assert_matches_reference(out: torch.Tensor, case: Case, reference: torch.Tensor | None = None):
    if reference is None:
        reference = fused_experts_reference(*case.args())
    assert out.dtype == case.hidden.dtype and out.shape == case.hidden.shape
    assert out.device == case.hidden.device
    if reference.numel() == 0:
        return
    assert torch.isfinite(out).all()
    error = ((out.float() - reference).norm() / reference.norm()).item()
    assert error <= TOLERANCE[case.hidden.dtype], f"relative error {error:.2e}"


# ------------------------------------------------------------------------------------------ results


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=100)
@given(
    tokens=st.sampled_from([0, 1, 3, 17, 64, 100]),
    num_experts=st.sampled_from([1, 4, 8, 60]),
    topk=st.sampled_from([1, 2, 6, 8]),
    num_shared=st.sampled_from([0, 1, 2]),
    inter=st.sampled_from([8, 16, 32, 48]),
    hidden_size=st.sampled_from([32, 64, 96]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    layout=st.sampled_from(LAYOUTS),
    ids_dtype=st.sampled_from([torch.int32, torch.int64]),
    weights_dtype=st.sampled_from([torch.float32, None]),  # None: hidden's dtype
    token_weight=st.booleans(),
)
def test_matches_reference(device, tokens, num_experts, topk, num_shared, inter, hidden_size, dtype, layout,
                           ids_dtype, weights_dtype, token_weight):
    case = make_case(tokens, hidden_size, inter, num_experts, topk, num_shared, dtype, device, layout, ids_dtype,
                     weights_dtype, token_weight)
    assert_matches_reference(fused_experts(*case.args()), case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sizes_off_the_tile_grid(device, dtype):
    # H and I that are not multiples of 16, and enough tokens for several alignment programs and the
    # largest tiles on CUDA (T*K > 2048 pairs, > 128 rows per expert).
    case = make_case(tokens=700, hidden_size=40, inter=24, num_experts=3, topk=3, num_shared=2, dtype=dtype,
                     device=device, token_weight=True)
    assert_matches_reference(fused_experts(*case.args()), case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["hf", "transposed"])
def test_views_give_what_copies_give(device, layout):
    """The op reads views of the model's parameters in place: same result as on contiguous copies
    (bit for bit for HF's row views; a transposed view may take another load path on CUDA)."""
    case = make_case(tokens=33, num_experts=6, topk=3, num_shared=2, dtype=torch.bfloat16, device=device,
                     layout=layout, token_weight=True)
    assert not all(t.is_contiguous() for t in case.args()[3:9])
    copies = case.replace(**{f.name: getattr(case, f.name).contiguous() for f in dataclasses.fields(case)})
    views, contiguous = fused_experts(*case.args()), fused_experts(*copies.args())
    if layout == "hf" or device == "cpu":
        assert torch.equal(views, contiguous)
    else:
        torch.testing.assert_close(views, contiguous)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_gate_up_is_read_as_its_two_halves(device, dtype):
    """w_up=None: w_gate is HF's gate_up_proj [E, 2I, H], gate rows then up rows; the same result, bit
    for bit, as passing its two row views."""
    case = make_case(tokens=21, num_experts=6, topk=3, num_shared=1, dtype=dtype, device=device, layout="hf")
    gate_up = case.w_gate._base
    assert gate_up is case.w_up._base and gate_up.shape[1] == 2 * case.w_gate.shape[1]
    fused = fused_experts(*case.replace(w_gate=gate_up, w_up=None).args())
    assert torch.equal(fused, fused_experts(*case.args()))
    assert_matches_reference(fused, case)


@pytest.mark.parametrize("device", DEVICES)
def test_shared_slots_equal_the_shared_mlp(device):
    """Fusing a shared MLP of size S*I as S slots of weight 1 equals adding the MLP's output."""
    case = make_case(tokens=9, num_experts=5, topk=2, num_shared=2, device=device)
    case = case.replace(topk_weights=torch.where(case.topk_ids >= 5, 1.0, case.topk_weights))
    routed_only = (case.topk_ids < 5).nonzero()[:, 1].view(9, 2)
    routed = fused_experts(case.hidden, case.topk_weights.gather(1, routed_only), case.topk_ids.gather(1, routed_only),
                           case.w_gate, case.w_up, case.w_down)
    x = case.hidden
    mlp = (torch.nn.functional.silu(x @ case.shared_gate.T) * (x @ case.shared_up.T)) @ case.shared_down.T
    torch.testing.assert_close(fused_experts(*case.args()), routed + mlp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_shared_token_weight_gates_only_shared_slots(device):
    """Qwen2-MoE style: routed + sigmoid(x @ w_g) * shared(x)."""
    case = make_case(tokens=12, num_experts=4, topk=2, num_shared=1, device=device)
    gate = torch.sigmoid(case.hidden.sum(1))
    ungated = fused_experts(*case.args())
    zero_shared = case.replace(shared_token_weight=torch.zeros_like(gate))
    routed = fused_experts(*zero_shared.args())
    gated = fused_experts(*case.replace(shared_token_weight=gate).args())
    torch.testing.assert_close(gated, routed + gate[:, None] * (ungated - routed), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_repeated_ids_add_up(device):
    case = make_case(tokens=5, num_experts=4, topk=2, num_shared=0, device=device)
    twice = case.replace(topk_ids=case.topk_ids[:, :1].repeat(1, 2), topk_weights=case.topk_weights[:, :1].repeat(1, 2))
    once = case.replace(topk_ids=case.topk_ids[:, :1], topk_weights=2 * case.topk_weights[:, :1])
    torch.testing.assert_close(fused_experts(*twice.args()), fused_experts(*once.args()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_no_tokens(device, dtype):
    case = make_case(tokens=0, dtype=dtype, device=device, token_weight=True)
    out = fused_experts(*case.args())
    assert out.shape == (0, 64) and out.dtype == dtype and out.device.type == device


# ---------------------------------------------------------------------- registration and errors


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["routed", "shared", "gated_int64"])
def test_opcheck(device, variant):
    kwargs = {"routed": dict(num_shared=0),
              "shared": dict(num_shared=2, dtype=torch.bfloat16, weights_dtype=None),
              "gated_int64": dict(num_shared=1, token_weight=True, ids_dtype=torch.int64)}[variant]
    case = make_case(tokens=5, hidden_size=32, inter=16, num_experts=4, device=device, **kwargs)
    torch.library.opcheck(torch.ops.moe_fusion.fused_experts.default, case.args())


def test_compiles_without_graph_breaks():
    case = make_case(tokens=7, num_shared=1, token_weight=True)
    compiled = torch.compile(fused_experts, backend="aot_eager", fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(*case.args()), fused_experts(*case.args()), rtol=0, atol=0)


def _bad(**changes):
    return lambda case: case.replace(**{k: (v(case) if callable(v) else v) for k, v in changes.items()})


BAD_INPUTS = [
    ("hidden 3-D", _bad(hidden=lambda c: c.hidden[None]), "hidden must be 2-D"),
    ("hidden int", _bad(hidden=lambda c: c.hidden.to(torch.int32)), "hidden must be float32, bfloat16 or float16"),
    ("ids rows", _bad(topk_ids=lambda c: c.topk_ids[1:]), "topk_ids must have shape [T, K]"),
    ("ids K=0", _bad(topk_ids=lambda c: c.topk_ids[:, :0]), "topk_ids must have shape [T, K]"),
    ("ids float", _bad(topk_ids=lambda c: c.topk_ids.float()), "topk_ids must be int32 or int64"),
    ("weights shape", _bad(topk_weights=lambda c: c.topk_weights[:, :1]), "topk_weights must have topk_ids' shape"),
    ("weights dtype", _bad(topk_weights=lambda c: c.topk_weights.half()),
     "topk_weights must be float32 or hidden's dtype"),
    ("w_gate H", _bad(w_gate=lambda c: c.w_gate[..., 1:]), "w_gate must have shape [E, I, H]"),
    ("w_gate E=0", _bad(w_gate=lambda c: c.w_gate[:0]), "w_gate must have shape [E, I, H]"),
    ("w_up shape", _bad(w_up=lambda c: c.w_up[:, 1:]), "w_up must have w_gate's shape"),
    ("gate_up odd rows", _bad(w_gate=lambda c: c.w_gate[:, 1:], w_up=None),
     "w_gate must have shape [E, 2I, H] with E, I >= 1 and H = "),
    ("gate_up halves", _bad(w_up=None), "w_down must have shape [E, H, I]"),
    ("w_down shape", _bad(w_down=lambda c: c.w_down.transpose(1, 2)), "w_down must have shape [E, H, I]"),
    ("w_down dtype", _bad(w_down=lambda c: c.w_down.double()), "w_down must have hidden's dtype"),
    ("shared partial", _bad(shared_up=None), "shared_gate, shared_up and shared_down must be given together"),
    ("shared S*I", _bad(shared_gate=lambda c: c.shared_gate[1:], shared_up=lambda c: c.shared_up[1:]),
     "shared_gate must have shape [S*I, H]"),
    ("shared_up shape", _bad(shared_up=lambda c: c.shared_up[:, 1:]), "shared_up must have shared_gate's shape"),
    ("shared_down shape", _bad(shared_down=lambda c: c.shared_down.T), "shared_down must have shape [H, S*I]"),
    ("shared dtype", _bad(shared_gate=lambda c: c.shared_gate.double()), "shared_gate must have hidden's dtype"),
    ("token weight alone", _bad(shared_gate=None, shared_up=None, shared_down=None),
     "shared_token_weight requires shared_gate, shared_up and shared_down"),
    ("token weight shape", _bad(shared_token_weight=lambda c: c.shared_token_weight[1:]),
     "shared_token_weight must have shape [T]"),
    ("token weight dtype", _bad(shared_token_weight=lambda c: c.shared_token_weight.half()),
     "shared_token_weight must be float32 or hidden's dtype"),
    ("device", _bad(topk_ids=lambda c: torch.zeros_like(c.topk_ids, device="cpu" if c.hidden.is_meta else "meta")),
     "topk_ids must be on hidden's device"),
]


@pytest.mark.parametrize("device", [*DEVICES, "meta"])
@pytest.mark.parametrize("name, corrupt, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_value_error(device, name, corrupt, message):
    """Same rules in the C++ checker (CPU) and the Python one (fake/meta and CUDA)."""
    case = make_case(tokens=4, hidden_size=48, inter=16, num_experts=4, num_shared=2, dtype=torch.bfloat16,
                     token_weight=True, device="cpu" if device == "meta" else device)
    if device == "meta":
        case = case.replace(**{f.name: getattr(case, f.name).to("meta") for f in dataclasses.fields(case)})
    with pytest.raises(ValueError, match="^fused_experts: " + re.escape(message)):
        fused_experts(*corrupt(case).args())


@pytest.mark.parametrize("bad_id", [-1, 6, 2**40])
def test_out_of_range_ids_raise_on_cpu(bad_id):
    case = make_case(tokens=4, num_experts=4, num_shared=2, ids_dtype=torch.int64)
    case.topk_ids[2, 1] = bad_id
    with pytest.raises(ValueError, match=r"topk_ids must be in \[0, E \+ S\) = \[0, 6\)"):
        fused_experts(*case.args())


# ------------------------------------------------------------------------------------- zero copy

_COPY_OPS = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::to", "aten::index_select",
             "aten::index", "aten::gather", "aten::cat", "aten::stack", "aten::repeat", "aten::reshape"}


def _largest_copy(fn) -> tuple[int, set[str]]:
    """(largest input numel of any copying aten op run by fn, all op names seen), nested ops included."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    largest = 0
    for event in prof.events():
        if event.name in _COPY_OPS:
            for shape in event.input_shapes:
                if shape and all(isinstance(d, int) for d in shape):
                    largest = max(largest, torch.Size(shape).numel())
    return largest, {event.name for event in prof.events()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["hf", "torchtitan"])
def test_no_weight_is_copied(device, layout):
    # Tokens and activations are far smaller than one expert's [I, H] matrix, so any copy, gather,
    # cast or reshape-copy of a weight (even one expert's slice) shows up as a large copying op.
    case = make_case(tokens=2, hidden_size=512, inter=64, num_experts=4, topk=2, num_shared=1, dtype=torch.bfloat16,
                     device=device, layout=layout)
    one_expert = 64 * 512
    fused_experts(*case.args())  # warm-up: the first CUDA call compiles the Triton kernels
    largest, seen = _largest_copy(lambda: fused_experts(*case.args()))
    assert largest < one_expert, f"a copying op read {largest} elements"
    if device == "cpu":
        assert "aten::mm" in seen  # the profile does see inside the C++ kernel
    # The detector is live: a caller-side cast of one expert's weight is caught.
    assert _largest_copy(lambda: case.w_gate[0].float())[0] >= one_expert
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fused_experts(*case.args())
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - before < one_expert * 2


# ------------------------------------------------------------------------------------ CUDA only


def poison_cuda_cache():
    """Fill the caching allocator's free blocks with NaN, so a row the op never writes shows up."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    blocks = [torch.full((n,), float("nan"), device="cuda") for n in [2**k for k in range(6, 20)] for _ in range(8)]
    blocks += [torch.full((2**24,), float("nan"), device="cuda") for _ in range(4)]
    del blocks


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 64, 1000])
def test_cuda_unwritten_memory_never_leaks(dtype, tokens):
    case = make_case(tokens=tokens, hidden_size=96, inter=48, num_experts=60, topk=6, num_shared=2, dtype=dtype,
                     device="cuda", token_weight=True)
    reference = fused_experts_reference(*case.args())
    poison_cuda_cache()
    assert_matches_reference(fused_experts(*case.args()), case, reference)


def resident_down_config():
    """Tiles whose down GEMM holds all of K (<= 64) resident, three N tiles per program (the prefill
    tiles of shapes with a short intermediate size)."""
    from ops.triton_experts import GemmTiles, TileConfig  # Triton is absent on the CPU CI

    return TileConfig(64, 4, GemmTiles(64, 64, 4, 2), GemmTiles(64, 64, 4, 2, n_tiles=3))


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["hf", "transposed"])
def test_cuda_resident_down_tiles(dtype, layout):
    # N = 200 is not a multiple of the 3 x 64 columns a program covers; routed and shared slots step
    # through N with different strides (the "transposed" layout).
    from ops.triton_experts import fused_experts_triton

    case = make_case(tokens=300, hidden_size=200, inter=40, num_experts=5, topk=3, num_shared=1, dtype=dtype,
                     device="cuda", layout=layout, token_weight=True)
    reference = fused_experts_reference(*case.args())
    poison_cuda_cache()
    assert_matches_reference(fused_experts_triton(*case.args(), 1, config=resident_down_config()), case, reference)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inter", [4, 8])
def test_cuda_intermediate_size_below_the_smallest_dot(dtype, inter):
    """I < 16, the smallest K of tl.dot: the K tiles that hold all of I (the direct path's down GEMM and
    the resident down tiles) are 16 wide, masked (Triton's interpreter accepts the narrower tiles, so
    only the GPU sees this)."""
    from ops.triton_experts import direct_config, fused_experts_triton

    for tokens, config in ((1, direct_config(dtype)), (300, resident_down_config())):
        case = make_case(tokens=tokens, hidden_size=48, inter=inter, num_experts=3, topk=2, num_shared=1,
                         dtype=dtype, device="cuda", seed=inter)
        reference = fused_experts_reference(*case.args())
        poison_cuda_cache()
        assert_matches_reference(fused_experts_triton(*case.args(), 1, config=config), case, reference)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_direct_path(dtype, layout):
    """The direct path (no alignment, the combine inside the down GEMM) against the reference and the
    sorted path, at the sizes the table sends it (T*K <= DIRECT_MAX_PAIRS) and above; with repeated and
    out-of-range ids, two shared slots and a per-token shared weight; I = 300 takes a K loop per pair,
    I = 40 one K tile."""
    from ops.triton_experts import direct_config, fused_experts_triton, tile_config

    for tokens, inter, num_experts in ((1, 40, 16), (3, 300, 5), (40, 40, 16)):
        case = make_case(tokens=tokens, hidden_size=200, inter=inter, num_experts=num_experts, topk=6, num_shared=2,
                         dtype=dtype, device="cuda", layout=layout, ids_dtype=torch.int64, token_weight=True,
                         seed=tokens)
        bad = case.topk_ids.clone()
        bad[0, 1], bad[-1, 2] = -1, 2**33 + 1
        case = case.replace(topk_ids=bad)
        reference = fused_experts_reference(*case.args())
        sorted_config = tile_config(bad.numel(), num_experts + 2, dtype)
        poison_cuda_cache()
        direct = fused_experts_triton(*case.args(), 2, config=direct_config(dtype))
        assert_matches_reference(direct, case, reference)
        sorted_path = fused_experts_triton(*case.args(), 2, config=sorted_config)
        # The same rounded rows summed in the same order: equal up to the two GEMMs' tiles.
        torch.testing.assert_close(direct, sorted_path, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@requires_cuda
@pytest.mark.cuda
def test_cuda_out_of_range_ids_are_ignored():
    case = make_case(tokens=50, num_experts=8, topk=3, num_shared=1, device="cuda", ids_dtype=torch.int64)
    bad = case.topk_ids.clone()
    bad[::3, 0], bad[1::3, 1], bad[2::3, 2] = 9, -1, 2**33 + 1  # 2**33 + 1 wraps to 1 as int32
    case = case.replace(topk_ids=bad)
    reference = fused_experts_reference(*case.args())  # leaves out-of-range ids out, like the kernels
    poison_cuda_cache()
    assert_matches_reference(fused_experts(*case.args()), case, reference)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize(("tokens", "topk", "num_slots", "block_m"), [(1, 9, 257, 16), (3000, 9, 257, 64),
                                                                      (20000, 8, 385, 128)])
@pytest.mark.parametrize("stable", [True, False])
def test_cuda_alignment(tokens, topk, num_slots, block_m, stable):
    generator = torch.Generator().manual_seed(tokens)
    ids = torch.randint(-1, num_slots + 1, (tokens, topk), generator=generator).cuda()
    check_alignment(ids, num_slots, block_m, stable)


@requires_cuda
@pytest.mark.cuda
def test_cuda_runs_are_bitwise_identical():
    case = make_case(tokens=3000, hidden_size=256, inter=64, num_experts=60, topk=6, num_shared=1,
                     dtype=torch.bfloat16, device="cuda")
    first = fused_experts(*case.args())
    for _ in range(3):
        assert torch.equal(fused_experts(*case.args()), first)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("tokens", [1, 48])
def test_cuda_graph_capture_and_replay(tokens):
    case = make_case(tokens=tokens, hidden_size=256, inter=64, num_experts=16, topk=4, num_shared=1,
                     dtype=torch.bfloat16, device="cuda", token_weight=True)
    static = case.replace(hidden=case.hidden.clone(), topk_weights=case.topk_weights.clone(),
                          topk_ids=case.topk_ids.clone(), shared_token_weight=case.shared_token_weight.clone())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        fused_experts(*static.args())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts(*static.args())

    fresh = make_case(tokens=tokens, hidden_size=256, inter=64, num_experts=16, topk=4, num_shared=1,
                      dtype=torch.bfloat16, device="cuda", token_weight=True, seed=1)
    for name in ("hidden", "topk_weights", "topk_ids", "shared_token_weight"):
        getattr(static, name).copy_(getattr(fresh, name))
    graph.replay()
    torch.cuda.synchronize()
    fresh = fresh.replace(w_gate=case.w_gate, w_up=case.w_up, w_down=case.w_down, shared_gate=case.shared_gate,
                          shared_up=case.shared_up, shared_down=case.shared_down)
    assert torch.equal(out, fused_experts(*fresh.args()))
    assert_matches_reference(out, fresh)


# ------------------------------------------------------------------ Triton kernels, interpreted


def test_triton_kernels_interpreted():
    run_interpreted(__file__, "test_triton_interpreted_body")


@interpreted_only
def test_triton_interpreted_body():
    patch_interpreter_for_numpy_2_4()
    from ops.triton_experts import direct_config, fused_experts_triton, tile_config

    # The interpreter has no bfloat16 tl.dot (it multiplies the raw bits), so float32 and float16 only.
    cases = [
        make_case(tokens=3, hidden_size=32, inter=16, num_experts=4, topk=3, num_shared=2, dtype=torch.float16,
                  ids_dtype=torch.int64),
        make_case(tokens=17, hidden_size=64, inter=48, num_experts=60, topk=6, num_shared=1, layout="torchtitan",
                  token_weight=True, weights_dtype=None),
        make_case(tokens=9, hidden_size=40, inter=24, num_experts=4, topk=6, num_shared=1, layout="transposed",
                  token_weight=True),  # repeated ids, no unit strides
        # > 2048 pairs: two alignment programs; > 128 rows per slot: the largest float16 tiles.
        make_case(tokens=1100, hidden_size=32, inter=16, num_experts=3, topk=2, num_shared=0, dtype=torch.float16),
    ]
    for case in cases:
        num_shared = 0 if case.shared_gate is None else case.shared_gate.shape[0] // case.w_gate.shape[1]
        num_pairs, num_slots = case.topk_ids.numel(), case.w_gate.shape[0] + num_shared
        configs = [None, tile_config(num_pairs, num_slots, case.hidden.dtype)]  # the table's, the sorted path
        if case.w_down.shape[2] <= resident_down_config().down.block_k:
            configs.append(resident_down_config())
        if case.hidden.shape[0] < 100:  # the direct path (table: the first case only) at more pairs too
            configs.append(direct_config(case.hidden.dtype))
        for config in configs:
            out = fused_experts_triton(*case.args(), num_shared, config=config)
            assert_matches_reference(out, case)
            # Training: the same output, and every pair's gate and up projections written over NaN.
            projections = torch.full((num_pairs, 2 * case.w_gate.shape[1]), float("nan"), dtype=case.hidden.dtype)
            assert torch.equal(fused_experts_triton(*case.args(), num_shared, config, projections), out)
            want = pair_projections(case.hidden, case.topk_ids, case.w_gate, case.w_up, case.w_down, case.shared_gate,
                                    case.shared_up)
            torch.testing.assert_close(projections.float(), want, rtol=2e-3, atol=2e-3)

    for tokens, topk, num_slots in ((1, 3, 5), (700, 4, 9), (1100, 2, 3)):  # 2800, 2200 pairs: two programs
        ids = torch.randint(-1, num_slots + 1, (tokens, topk), generator=torch.Generator().manual_seed(0))
        for stable in (True, False):
            check_alignment(ids, num_slots, block_m=16, stable=stable)
    # No valid id: every block of the bound (more than one step of the unused-block loop) is unused.
    check_alignment(torch.full((100, 9), 7), num_slots=3, block_m=16, stable=False)

    # Out-of-range ids (including int64 values that wrap to valid int32 ones) contribute nothing.
    bad = cases[0].topk_ids.clone()
    bad[0, 0], bad[1, 1], bad[2, 2] = 6, -3, 2**32 + 1
    case = cases[0].replace(topk_ids=bad)
    for config in (None, tile_config(bad.numel(), 6, torch.float16)):  # direct, sorted
        assert_matches_reference(fused_experts_triton(*case.args(), 2, config=config), case)


def check_alignment(ids: torch.Tensor, num_slots: int, block_m: int, stable: bool) -> None:
    """ops.triton_experts.align: each slot's segment holds its pairs (in pair order when stable), padded
    to block_m rows and described by the block table; out-of-range ids are left out."""
    from ops.triton_experts import align

    alignment = align(ids.contiguous(), num_slots, block_m, stable)
    flat = ids.reshape(-1).cpu()
    block_expert, block_rows = alignment.block_expert.cpu(), alignment.block_rows.cpu()
    row = 0
    for slot in range(num_slots):
        pairs = (flat == slot).nonzero().flatten().int()
        assert alignment.slot_start[slot] == row and alignment.slot_rows[slot] == len(pairs), slot
        segment = alignment.sorted_pairs[row:row + len(pairs)].cpu()
        assert torch.equal(segment if stable else segment.sort().values, pairs), slot
        blocks = range(row // block_m, (row + len(pairs) + block_m - 1) // block_m)
        assert all(block_expert[b] == slot for b in blocks), slot
        assert block_rows[list(blocks)].sum() == len(pairs), slot
        row += len(blocks) * block_m
    assert (block_expert[row // block_m:] == -1).all()


def test_launch_gemm_steps_down_the_pipeline_until_it_fits():
    """A launch whose stages do not fit in shared memory is retried with fewer; the depth is remembered."""
    pytest.importorskip("triton")
    from triton.runtime.errors import OutOfResources

    from ops.triton_experts import launch_gemm

    class Kernel:
        """Records launches like a Triton kernel; more than `fits` stages of 100 KB overflow a 228 KB SM."""

        def __init__(self, fits):
            self.fits, self.launches = fits, []

        def __getitem__(self, grid):
            def run(*args, num_stages, **meta):
                self.launches.append(num_stages)
                if num_stages > self.fits:
                    raise OutOfResources(num_stages * 100_000, 228_000, "shared memory")

            return run

    kernel = Kernel(fits=2)
    launch_gemm(kernel, (1,), "arg", num_stages=4, BLOCK=64)
    launch_gemm(kernel, (1,), "arg", num_stages=4, BLOCK=64)
    assert kernel.launches == [4, 3, 2, 2]
    with pytest.raises(OutOfResources):
        launch_gemm(Kernel(fits=0), (1,), num_stages=2, BLOCK=32)


def test_direct_path_only_for_small_forward_calls():
    """Batch-1 decode of DeepSeek-V3 TP8 (9 pairs, I=256) takes the direct path; more pairs, an
    intermediate size above the direct down tile (EP, I=2048) and the backward (which does not ask for
    it) take the sorted one."""
    pytest.importorskip("triton")
    from ops.triton_experts import DIRECT_MAX_PAIRS, tile_config

    assert tile_config(9, 257, torch.bfloat16, resident_k=256, direct=True).direct
    assert tile_config(DIRECT_MAX_PAIRS, 257, torch.bfloat16, resident_k=256, direct=True).direct
    assert not tile_config(DIRECT_MAX_PAIRS + 1, 257, torch.bfloat16, resident_k=256, direct=True).direct
    assert not tile_config(9, 33, torch.bfloat16, resident_k=2048, direct=True).direct
    assert not tile_config(9, 257, torch.bfloat16, resident_k=256).direct
    assert tile_config(9, 257, torch.float32, resident_k=32, direct=True).direct


def test_resident_down_tiles_only_where_the_intermediate_size_fits():
    """The forward's down GEMM holds K resident at prefill sizes when I fits the resident tile; wider
    I (expert-parallel shapes), decode sizes and the backward (no resident_k) keep the K loop."""
    pytest.importorskip("triton")
    from ops.triton_experts import tile_config

    prefill, decode, slots = 16384 * 9, 9, 257
    resident = tile_config(prefill, slots, torch.bfloat16, resident_k=256).down
    assert resident.n_tiles > 1 and resident.block_k >= 256
    assert tile_config(prefill, slots, torch.bfloat16, resident_k=2048).down.n_tiles == 1
    assert tile_config(prefill, slots, torch.bfloat16).down.n_tiles == 1
    assert tile_config(decode, slots, torch.bfloat16, resident_k=256).down.n_tiles == 1
    assert tile_config(prefill, slots, torch.float32, resident_k=256).down.n_tiles == 1
