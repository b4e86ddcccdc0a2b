"""The experts and shared-expert rewrites: a DeepSeek-style MoE block compiles to one fused gate and
one fused_experts call (shared expert included) per layer, computes what eager computes, and the
blocks that are not that function are left alone with a reason."""

from __future__ import annotations

import expecttest
import pytest
import torch
import torch.nn.functional as F
from compile_checks import compile_with_report, fused_op_calls, internal_errors, normalized_ops
from conftest import DEVICES
from moe_blocks import (HandWrittenBlock, TorchtitanDispatcherStyleBlock, TorchtitanMainStyleBlock,
                        TorchtitanStyleBlock)

from fusion_passes.example_model import ExampleConfig

GATE, EXPERTS = "moe_fusion::moe_fused_gate", "moe_fusion::fused_experts"


class EarlyTransformersV5Block(HandWrittenBlock):
    """The experts as the first transformers v5 releases write them: pairs indexed by an arange-based
    token index, argsort (stable) by expert for grouped_mm with its inverse argsort, and index_add_
    into zeros; or the same token index with batched bmm."""

    def __init__(self, implementation: str, dtype=torch.float32) -> None:
        super().__init__("plain", dtype)
        self.implementation = implementation

    def routed(self, flat: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(flat)
        tokens, topk = ids.shape
        out = torch.zeros_like(flat)
        expert_ids = ids.reshape(-1)
        token_idx = torch.arange(tokens, device=flat.device).unsqueeze(1).expand(-1, topk).reshape(-1)
        sample_weights = weights.reshape(-1)
        rows = flat[token_idx]
        if self.implementation == "grouped_mm":
            perm = torch.argsort(expert_ids, stable=True)
            inv_perm = torch.argsort(perm, stable=True)
            counts = torch.histc(expert_ids[perm].float(), bins=self.cfg.num_experts, min=0,
                                 max=self.cfg.num_experts - 1)
            offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
            gate_up = torch._grouped_mm(rows[perm], self.gate_up_proj.transpose(-2, -1), offs=offsets)
            gate, up = gate_up.chunk(2, dim=-1)
            down = torch._grouped_mm(F.silu(gate) * up, self.down_proj.transpose(-2, -1), offs=offsets)
            per_pair = (down * sample_weights[perm].unsqueeze(-1))[inv_perm]
        else:
            gate_up = torch.bmm(self.gate_up_proj[expert_ids], rows.unsqueeze(-1)).squeeze(-1)
            gate, up = gate_up.chunk(2, dim=-1)
            down = torch.bmm(self.down_proj[expert_ids], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
            per_pair = down * sample_weights.unsqueeze(-1)
        return out.index_add_(0, token_idx, per_pair.to(out.dtype))


# torch._grouped_mm's fake impl takes bf16 only.
@pytest.mark.parametrize("implementation, dtype", [("grouped_mm", torch.bfloat16), ("batched_mm", torch.float32),
                                                   ("batched_mm", torch.bfloat16)])
def test_early_transformers_v5_experts_spellings(implementation, dtype):
    block = EarlyTransformersV5Block(implementation, dtype).eval()
    x = torch.randn(2, 5, block.cfg.hidden_size, generator=torch.Generator().manual_seed(3)).to(dtype)
    _, outputs, _ = _compile_to_one_gate_and_experts(block, x)
    with torch.no_grad():
        _compare(outputs, block(x), dtype)


class SentinelGuardedBlock(HandWrittenBlock):
    """The experts as transformers 5.17 writes them: guarded against expert-parallel sentinel ids
    (ids >= E), with the ids clamped and the rows masked where `ids >= bound` (bound = E is the
    sentinel test; a smaller bound masks real experts and must not be taken for it)."""

    def __init__(self, implementation: str, bound: int, dtype=torch.float32) -> None:
        super().__init__("plain", dtype)
        self.implementation, self.bound = implementation, bound

    def routed(self, flat: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(flat)
        topk, experts = ids.shape[-1], self.cfg.num_experts
        expert_ids, sample_weights = ids.reshape(-1), weights.reshape(-1)
        if self.implementation == "batched_mm":
            rows = flat.repeat_interleave(topk, dim=0)
            masked = (expert_ids >= self.bound).unsqueeze(-1)
            expert_ids = expert_ids.clamp(0, experts - 1)
            gate_up = torch.bmm(self.gate_up_proj[expert_ids], rows.unsqueeze(-1)).squeeze(-1)
            gate, up = gate_up.chunk(2, dim=-1)
            down = torch.bmm(self.down_proj[expert_ids], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
            per_pair = down.masked_fill(masked, 0.0) * sample_weights.unsqueeze(-1).to(down.dtype)
        else:
            sorted_ids, perm = torch.sort(expert_ids)
            rows = flat[perm // topk]
            masked = (sorted_ids >= self.bound).unsqueeze(-1)
            sorted_ids.clamp_(max=experts - 1)
            counts = torch.histc(sorted_ids.float(), bins=experts, min=0, max=experts - 1)
            offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
            rows.masked_fill_(masked, 0.0)
            gate_up = torch._grouped_mm(rows, self.gate_up_proj.transpose(-2, -1), offs=offsets)
            gate, up = gate_up.masked_fill(masked, 0.0).chunk(2, dim=-1)
            down = torch._grouped_mm(F.silu(gate) * up, self.down_proj.transpose(-2, -1), offs=offsets)
            down = down.masked_fill(masked, 0.0) * sample_weights[perm].unsqueeze(-1)
            per_pair = torch.empty_like(down)
            per_pair[perm] = down
        return per_pair.view(-1, topk, flat.shape[-1]).sum(dim=1).to(flat.dtype)


@pytest.mark.parametrize("implementation, dtype", [("grouped_mm", torch.bfloat16), ("batched_mm", torch.float32)])
def test_expert_parallel_sentinel_guards_are_identities_for_fused_gate_ids(implementation, dtype):
    block = SentinelGuardedBlock(implementation, bound=ExampleConfig().num_experts, dtype=dtype).eval()
    x = torch.randn(2, 5, block.cfg.hidden_size, generator=torch.Generator().manual_seed(4)).to(dtype)
    _, outputs, _ = _compile_to_one_gate_and_experts(block, x)
    with torch.no_grad():
        _compare(outputs, block(x), dtype)


@pytest.mark.parametrize("implementation, dtype", [("grouped_mm", torch.bfloat16), ("batched_mm", torch.float32)])
def test_a_mask_over_real_experts_is_not_taken_for_a_sentinel_guard(implementation, dtype):
    block = SentinelGuardedBlock(implementation, bound=ExampleConfig().num_experts - 2, dtype=dtype).eval()
    x = torch.randn(2, 5, block.cfg.hidden_size, generator=torch.Generator().manual_seed(4)).to(dtype)
    compiled, outputs, report = compile_with_report(block, x)
    assert report.count("experts") == 0
    assert any("not recognized" in r.reason for r in report.refusals if r.pass_name == "experts")
    with torch.no_grad():
        assert fused_op_calls(compiled, x) == {GATE: 1}
        _compare(outputs, block(x), dtype)


def _assert_load_counts_read_the_fused_gate(block, x):
    """Two compiled runs so far: the router's load-balancing counts read the one fused gate's ids."""
    ids = block.router(x.view(-1, x.shape[-1]))[1]
    counts = torch.bincount(ids.view(-1), minlength=block.cfg.num_experts).float()
    torch.testing.assert_close(block.tokens_per_expert, 2 * counts, rtol=0, atol=0)


def _torchtitan_input(block: TorchtitanStyleBlock) -> torch.Tensor:
    return torch.randn(2, 5, block.cfg.hidden_size, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)


def test_torchtitan_routed_experts_and_shared_expert_become_one_fused_experts():
    block = TorchtitanStyleBlock(shared_experts=2).eval()
    x = _torchtitan_input(block)
    _, outputs, report = _compile_to_one_gate_and_experts(block, x)
    assert next(r for r in report.rewrites if r.pass_name == "shared_experts").params["shared_slots"] == 2
    with torch.no_grad():
        _assert_load_counts_read_the_fused_gate(block, x)
        _compare(outputs, block(x), torch.bfloat16)


@pytest.mark.parametrize("histc_max", [ExampleConfig().num_experts, ExampleConfig().num_experts - 1],
                         ids=["max_E", "max_E-1"])
def test_torchtitan_routed_experts_without_shared_expert(histc_max):
    block = TorchtitanStyleBlock(shared_experts=0, histc_max=histc_max).eval()
    x = _torchtitan_input(block)
    compiled, outputs, report = compile_with_report(block, x)
    assert [report.count(n) for n in ("routing", "experts", "shared_experts")] == [1, 1, 0], \
        [r.reason for r in report.refusals]
    experts = next(r for r in report.rewrites if r.pass_name == "experts")
    assert experts.params["added_to"] is None and "separate gate and up" in experts.spelling
    with torch.no_grad():
        assert fused_op_calls(compiled, x) == {GATE: 1, EXPERTS: 1}
        _compare(outputs, block(x), torch.bfloat16)


@pytest.mark.parametrize("num_experts, rewritten", [(4096, True), (4100, False)])
def test_float_histc_counts_are_trusted_only_while_exact(num_experts, rewritten):
    # float32 histc puts id i in bin i while i * E is exact (E * E <= 2**24); the CPU kernel miscounts
    # from E = 4098 on.
    block = TorchtitanStyleBlock(shared_experts=0, num_experts=num_experts).eval()
    x = _torchtitan_input(block)
    _, outputs, report = compile_with_report(block, x)
    assert [report.count(n) for n in ("routing", "experts")] == [1, int(rewritten)], \
        [r.reason for r in report.refusals]
    if not rewritten:
        assert any("aten.histc" in r.reason for r in report.refusals if r.pass_name == "experts")
    with torch.no_grad():
        _compare(outputs, block(x), torch.bfloat16)


def test_torchtitan_scores_before_experts_are_refused():
    # Weighting the inputs gives w * E(x) only for linear experts; fused_experts weights the outputs.
    block = TorchtitanStyleBlock(score_before_experts=True).eval()
    x = _torchtitan_input(block)
    compiled, outputs, report = compile_with_report(block, x)
    assert [report.count(n) for n in ("routing", "experts", "shared_experts")] == [1, 0, 0]
    assert any("score_before_experts=True" in r.reason for r in report.refusals if r.pass_name == "experts"), \
        [r.reason for r in report.refusals]
    with torch.no_grad():
        assert fused_op_calls(compiled, x) == {GATE: 1}
        _compare(outputs, block(x), torch.bfloat16)


@pytest.mark.parametrize("shared_experts, combine, permutation", [
    (2, "reshape", None), (0, "reshape", None), (1, "unsqueeze", None), (1, "reshape", "one_rank"),
    (0, "reshape", "one_rank")])
def test_torchtitan_main_block_becomes_one_gate_and_one_fused_experts(shared_experts, combine, permutation):
    """permutation="one_rank": the experts inside torchtitan's indices_padding_wrapper, whose row
    index the pass proves to be arange(rows)."""
    block = TorchtitanMainStyleBlock(shared_experts, combine=combine, permutation=permutation).eval()
    x = _torchtitan_input(block)
    _, outputs, report = _compile_to_one_gate_and_experts(block, x, shared_rewrites=int(shared_experts > 0))
    assert not report.refusals, [r.reason for r in report.refusals]
    if shared_experts:
        assert next(r for r in report.rewrites if r.pass_name == "shared_experts").params["shared_slots"] == \
            shared_experts
    with torch.no_grad():
        _assert_load_counts_read_the_fused_gate(block, x)
        _compare(outputs, block(x), torch.bfloat16)


@pytest.mark.parametrize("shared_experts", [0, 1, 2])
def test_torchtitan_dispatcher_block_with_its_scatter_add_op_becomes_one_gate_and_one_fused_experts(shared_experts):
    block = TorchtitanDispatcherStyleBlock(shared_experts).eval()
    x = _torchtitan_input(block)
    _, outputs, report = _compile_to_one_gate_and_experts(block, x, shared_rewrites=int(shared_experts > 0))
    assert not report.refusals, [r.reason for r in report.refusals]
    with torch.no_grad():
        _compare(outputs, block(x), torch.bfloat16)


@pytest.mark.parametrize("score_before_experts, combine, permutation, reason", [
    (True, "reshape", None, "score_before_experts=True"),
    (True, "reshape", "one_rank", "score_before_experts=True"),
    (False, "unweighted_sum", None, "were not recognized"),
    (False, "reshape", "reversed_groups", "were not recognized"),
], ids=["scores_before_experts", "scores_before_permuted_experts", "unweighted_sum", "reversed_groups"])
def test_torchtitan_main_blocks_that_are_not_the_weighted_sum_are_left_alone(score_before_experts, combine,
                                                                              permutation, reason):
    """Including a row permutation that is not the identity: its rows meet other experts."""
    block = TorchtitanMainStyleBlock(score_before_experts=score_before_experts, combine=combine,
                                     permutation=permutation).eval()
    x = _torchtitan_input(block)
    compiled, outputs, report = compile_with_report(block, x)
    assert [report.count(n) for n in ("routing", "experts", "shared_experts")] == [1, 0, 0]
    assert any(reason in r.reason for r in report.refusals if r.pass_name == "experts"), \
        [r.reason for r in report.refusals]
    with torch.no_grad():
        assert fused_op_calls(compiled, x) == {GATE: 1}
        _compare(outputs, block(x), torch.bfloat16)


def _compile_to_one_gate_and_experts(block, x, shared_rewrites=1):
    """Compiles `block` and asserts one routing and one experts rewrite (and `shared_rewrites`
    shared-expert ones), no internal error, and one fused gate + one fused_experts call at run time."""
    compiled, outputs, report = compile_with_report(block, x)
    assert not internal_errors(report)
    assert [report.count(n) for n in ("routing", "experts", "shared_experts")] == [1, 1, shared_rewrites], \
        [r.reason for r in report.refusals]
    with torch.no_grad():
        assert fused_op_calls(compiled, x) == {GATE: 1, EXPERTS: 1}
    return compiled, outputs, report


def _compare(compiled_out, eager_out, dtype):
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    if isinstance(eager_out, tuple):
        for got, want in zip(compiled_out, eager_out):
            torch.testing.assert_close(got, want, **tolerance)
    else:
        torch.testing.assert_close(compiled_out, eager_out, **tolerance)


FUSED_VARIANTS = ["plain", "shared_first", "scaled_output", "gated_shared", "shared_gate_up_chunk",
                  "shared_gate_up_interleaved", "shared_gate_up_strided", "renormalised", "renormalised_scaled_output"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", FUSED_VARIANTS)
def test_routed_plus_shared_becomes_one_fused_experts(variant, dtype):
    block = HandWrittenBlock(variant, dtype).eval()
    x = torch.randn(2, 5, block.cfg.hidden_size, generator=torch.Generator().manual_seed(1)).to(dtype)
    _, outputs, report = _compile_to_one_gate_and_experts(block, x)
    rewrite = next(r for r in report.rewrites if r.pass_name == "shared_experts")
    assert rewrite.params["shared_slots"] == 64 // block.cfg.moe_intermediate_size
    assert rewrite.params["token_gate"] == (variant == "gated_shared")
    # Routed weights renormalised after the gate: the shared columns are appended to them, and a scaling
    # of the routed output multiplies them (inside the gate it would be renormalised away).
    assert (rewrite.params["routed_scale_moved_to_gate"] == 2.5) == (variant == "scaled_output")
    assert (rewrite.params["routed_scale_on_weights"] == 2.5) == (variant == "renormalised_scaled_output")
    assert ("routed weights computed after the gate" in rewrite.spelling) == variant.startswith("renormalised")
    # A fused gate_up Linear is passed as row views: blocks of rows, or every other row.
    expected_gate_up = {"shared_gate_up_chunk": ("[0:64]", "[64:128]"),
                        "shared_gate_up_interleaved": ("[0:128:2]", "[1:128:2]"),
                        "shared_gate_up_strided": ("[0:128:2]", "[1:128:2]")}.get(variant)
    if expected_gate_up is not None:
        assert (rewrite.params["gate"][-len(expected_gate_up[0]):], rewrite.params["up"][-len(expected_gate_up[1]):]) \
            == expected_gate_up, rewrite.params
    after = normalized_ops(report.graphs[-1].graph_after)
    assert "aten.mm" in after and after.count("aten.mm") == 1 + (variant == "gated_shared")  # router (+ shared gate)
    with torch.no_grad():
        _compare(outputs, block(x), dtype)


def test_a_routed_scaling_moved_into_the_gate_leaves_other_weight_readers_unscaled():
    """routed * 2.5 + shared moves the 2.5 into the widened gate's weights; the block also returns the
    routing weights, which must stay unscaled: they keep reading the original gate."""
    block = HandWrittenBlock("scaled_output_weights_returned").eval()
    x = torch.randn(2, 5, block.cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    compiled, outputs, report = compile_with_report(block, x)
    assert [report.count(n) for n in ("routing", "experts", "shared_experts")] == [1, 1, 1], \
        [r.reason for r in report.refusals]
    assert next(r for r in report.rewrites if r.pass_name == "shared_experts").params["routed_scale_moved_to_gate"] \
        == 2.5
    with torch.no_grad():
        assert fused_op_calls(compiled, x) == {GATE: 2, EXPERTS: 1}
        (out, weights), (eager_out, eager_weights) = outputs, block(x)
    _compare(out, eager_out, torch.float32)
    # The router's top-k is unsorted (eager's order is unspecified): the same weights per token.
    _compare(weights.sort(-1).values, eager_weights.sort(-1).values, torch.float32)


REFUSED_VARIANTS = {
    "norm_between": "sits between the routed experts' sum and the add",
    "other_tokens": "does not read the tokens the routed experts read",
    "gelu_shared": "activation is not SiLU",
    "biased_shared": "biases",
    "routed_used_twice": "also used elsewhere",
}


@pytest.mark.parametrize("variant", sorted(REFUSED_VARIANTS))
def test_blocks_that_are_not_routed_plus_shared_are_left_alone(variant):
    block = HandWrittenBlock(variant).eval()
    x = torch.randn(2, 5, block.cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    compiled, outputs, report = compile_with_report(block, x)
    assert not internal_errors(report)
    assert report.count("shared_experts") == 0
    assert any(REFUSED_VARIANTS[variant] in r.reason for r in report.refusals), [r.reason for r in report.refusals]
    with torch.no_grad():
        calls = fused_op_calls(compiled, x)
        _compare(outputs, block(x), torch.float32)
    assert calls.get(EXPERTS, 0) <= 1 and GATE in calls


def test_experts_stay_unfused_on_the_cpu_by_default():
    block = HandWrittenBlock().eval()
    x = torch.randn(2, 5, block.cfg.hidden_size)
    compiled, outputs, report = compile_with_report(block, x, fuse_experts_on_cpu=False)
    assert [report.count(n) for n in ("routing", "experts", "shared_experts")] == [1, 0, 0]
    assert any("on the CPU" in r.reason for r in report.refusals)
    with torch.no_grad():
        assert fused_op_calls(compiled, x) == {GATE: 1}
        _compare(outputs, block(x), torch.float32)


def test_unrecognized_experts_are_reported():
    block = HandWrittenBlock("gelu_routed").eval()  # experts with GELU: not what fused_experts computes
    x = torch.randn(2, 5, block.cfg.hidden_size)
    compiled, outputs, report = compile_with_report(block, x)
    assert [report.count(n) for n in ("routing", "experts", "shared_experts")] == [1, 0, 0]
    assert any("were not recognized" in r.reason and "no rule explains" in r.reason for r in report.refusals), \
        [r.reason for r in report.refusals]
    with torch.no_grad():
        assert fused_op_calls(compiled, x) == {GATE: 1}
        _compare(outputs, block(x), torch.float32)


def test_shared_intermediate_must_split_into_expert_slots():
    block = HandWrittenBlock("plain", shared_intermediate=48).eval()  # not a multiple of 32
    x = torch.randn(2, 5, block.cfg.hidden_size)
    _, outputs, report = compile_with_report(block, x)
    assert report.count("shared_experts") == 0
    assert any("is not a multiple of the experts'" in r.reason for r in report.refusals)
    with torch.no_grad():
        _compare(outputs, block(x), torch.float32)


def test_each_rewrite_can_be_switched_off():
    block = HandWrittenBlock().eval()
    x = torch.randn(2, 5, block.cfg.hidden_size)
    for rewrites, calls in ((["routing"], {GATE: 1}), (["routing", "experts"], {GATE: 1, EXPERTS: 1}), ([], {})):
        compiled, outputs, report = compile_with_report(block, x, rewrites=rewrites)
        with torch.no_grad():
            assert fused_op_calls(compiled, x) == calls
            _compare(outputs, block(x), torch.float32)
        assert report.count("shared_experts") == 0


# Per HF kind (tiny configs of fusion_passes.hf_examples): the shared slots each layer's shared
# expert becomes (None: no shared expert) and whether a per-token sigmoid gates it.
HF_SHARED = {"deepseek_v3": (1, False), "glm4_moe": (1, False), "deepseek_v2": (2, False), "qwen3_moe": (None, False),
             "qwen2_moe": (2, True)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", sorted(HF_SHARED))
@pytest.mark.parametrize("experts_implementation", ["grouped_mm", "batched_mm"])
def test_hf_transformers_models_fuse_routing_experts_and_shared(kind, experts_implementation, device):
    pytest.importorskip("transformers")
    from fusion_passes.hf_examples import tiny_hf_moe

    model = tiny_hf_moe(kind, experts_implementation).to(device)
    tokens = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1)).to(device)
    compiled, outputs, report = compile_with_report(model, tokens)
    layers = model.config.num_hidden_layers
    shared_slots, token_gate = HF_SHARED[kind]
    assert not internal_errors(report) and not report.refusals, [r.reason for r in report.refusals]
    assert [report.count(n) for n in ("routing", "experts", "shared_experts")] == \
        [layers, layers, 0 if shared_slots is None else layers]
    shared = [r.params for r in report.rewrites if r.pass_name == "shared_experts"]
    assert all(p["shared_slots"] == shared_slots and p["token_gate"] == token_gate for p in shared), shared
    # HF's gate_up_proj reaches fused_experts whole (w_up=None): one gradient, no two views.
    assert all("passed whole" in r.spelling for r in report.rewrites if r.pass_name == "experts")
    with torch.no_grad():
        assert fused_op_calls(compiled, tokens) == {GATE: layers, EXPERTS: layers}
        tolerance = 1e-5 if device == "cpu" else 1e-4  # CUDA: other summation orders in float32
        torch.testing.assert_close(outputs.logits, model(tokens).logits, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["deepseek_v3", "deepseek_v2"])
def test_hf_model_at_one_token(kind, device):
    """A graph specialised to one token routes [E] rows rather than [T, E]: still one fused gate and
    one fused_experts per layer."""
    pytest.importorskip("transformers")
    from fusion_passes.hf_examples import tiny_hf_moe

    model = tiny_hf_moe(kind).to(device)
    tokens = torch.tensor([[5]], device=device)
    compiled, outputs, report = compile_with_report(model, tokens)
    layers = model.config.num_hidden_layers
    assert not report.refusals, [r.reason for r in report.refusals]
    assert [report.count(n) for n in ("routing", "experts", "shared_experts")] == [layers] * 3
    with torch.no_grad():
        assert fused_op_calls(compiled, tokens) == {GATE: layers, EXPERTS: layers}
        torch.testing.assert_close(outputs.logits, model(tokens).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("experts_implementation", ["grouped_mm", "batched_mm"])
def test_hf_bf16_model_matches_eager_as_closely_as_default_compile(experts_implementation, device):
    pytest.importorskip("transformers")
    from fusion_passes.hf_examples import tiny_hf_moe

    model = tiny_hf_moe("deepseek_v3", experts_implementation).to(device, torch.bfloat16)
    tokens = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2)).to(device)
    _, outputs, report = compile_with_report(model, tokens)
    _, default_outputs, _ = compile_with_report(model, tokens, backend="inductor")
    assert [report.count(n) for n in ("routing", "experts", "shared_experts")] == [2, 2, 2]
    with torch.no_grad():
        eager = model(tokens).logits.float()
    fused_error = (outputs.logits.float() - eager).abs().max().item()
    default_error = (default_outputs.logits.float() - eager).abs().max().item()
    assert fused_error <= max(2 * default_error, 1e-2 * eager.abs().max().item())


def test_dynamic_token_count():
    block = HandWrittenBlock().eval()
    x = torch.randn(2, 5, block.cfg.hidden_size)
    torch._dynamo.mark_dynamic(x, 1)
    compiled, _, report = compile_with_report(block, x)
    assert report.count("shared_experts") == 1, [r.reason for r in report.refusals]
    for shape in ((2, 7), (2, 1)):
        x = torch.randn(*shape, block.cfg.hidden_size)
        with torch.no_grad():
            _compare(compiled(x), block(x), torch.float32)


def test_torchtitan_expert_major_permutation_with_a_dynamic_token_count():
    """The identity row index of torchtitan's indices_padding_wrapper is arange of a symbolic length."""
    block = TorchtitanMainStyleBlock(permutation="one_rank").eval()
    x = _torchtitan_input(block)
    compiled, outputs, report = compile_with_report(block, x, dynamic=True)
    assert [report.count(n) for n in ("routing", "experts", "shared_experts")] == [1, 1, 1], \
        [r.reason for r in report.refusals]
    with torch.no_grad():
        _compare(outputs, block(x), torch.bfloat16)
        x = torch.randn(3, 7, block.cfg.hidden_size).to(torch.bfloat16)
        assert fused_op_calls(compiled, x) == {GATE: 1, EXPERTS: 1}
        _compare(compiled(x), block(x), torch.bfloat16)


@pytest.mark.parametrize("variant", ["plain", "gated_shared"])
def test_dynamic_floats_scale_the_routed_columns_only(variant):
    # dynamic=True turns the routed scaling factor into a run-time value multiplying the gate's
    # weights: the shared columns the rewrite adds must stay unscaled.
    block = HandWrittenBlock(variant).eval()
    x = torch.randn(2, 5, block.cfg.hidden_size)
    compiled, outputs, report = compile_with_report(block, x, dynamic=True)
    assert [report.count(n) for n in ("routing", "experts", "shared_experts")] == [1, 1, 1], \
        [r.reason for r in report.refusals]
    with torch.no_grad():
        assert fused_op_calls(compiled, x) == {GATE: 1, EXPERTS: 1}
        _compare(outputs, block(x), torch.float32)
        x = torch.randn(3, 4, block.cfg.hidden_size)
        _compare(compiled(x), block(x), torch.float32)


class TestBlockGraph(expecttest.TestCase):
    def test_hf_deepseek_v3_block_after_the_passes(self):
        pytest.importorskip("transformers")
        from fusion_passes.hf_examples import tiny_hf_moe

        block = tiny_hf_moe("deepseek_v3", "grouped_mm", num_hidden_layers=1).model.layers[0].mlp
        _, _, report = compile_with_report(block, torch.randn(2, 5, 64))
        self.assertExpectedInline(str(normalized_ops(report.graphs[0].graph_after)), """\
['aten.reshape', 'aten.permute', 'aten.mm', 'moe_fusion.moe_fused_gate', 'aten.reshape', 'moe_fusion.fused_experts', \
'aten.reshape']""")
