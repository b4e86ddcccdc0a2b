"""The routing rewrite: every spelling in the zoo compiled with the backend and compared with the
reference contract (and so with eager), look-alikes left alone, caches, dynamic shapes, HF models."""

from __future__ import annotations

import logging
import os

import expecttest
import pytest
import torch
from compile_checks import (
    assert_same_routing,
    compile_with_report,
    fused_op_calls,
    internal_errors,
    no_compile_caches,
    normalized_ops,
)
from routing_zoo import (
    CASES,
    LEFT_IN_GRAPH_CASES,
    H,
    DeepSeekV3Gate,
    _case,
    _expect,
    compare_with_reference,
    make_inputs,
)

import fusion_passes
from fusion_passes import routing
from fusion_passes.example_model import ExampleConfig, ExampleMoEModel, Router

GATE = "moe_fusion::moe_fused_gate"

# Spellings that compute the routing but that the pass refuses on purpose, with the reason it reports.
DELIBERATE_REFUSALS = {
    # scores * mask gives NaN where masking gives the fill (NaN or infinite scores).
    "var_multiplicative_mask": "multiplied by the group mask",
    # top-k over raw logits then softmax over the k: softmax rounding can tie scores whose logits
    # differ, and ties break differently; no scoring node precedes the selection, so no report.
    "megatron_group_limited_softmax_post_topk_m1": None,
}
# The zoo's bf16 spellings, run in float16.
FP16_CASES = [
    _case("deepseek_v3_official_gate_fp16", "DeepSeek-V3 inference/model.py Gate run in float16",
          DeepSeekV3Gate, shape=(9, H), dtype=torch.float16, bias_dtype=torch.float32, num_experts=256, topk=8,
          n_groups=8, topk_groups=4, score_func="sigmoid", route_scale=2.5,
          expected=_expect(8, 4, 8, routed_scaling_factor=2.5, compute_dtype=torch.float16)),
    _case("deepseek_v3_official_gate_fp16_bias_fp16", "the same with a float16 bias", DeepSeekV3Gate,
          shape=(9, H), dtype=torch.float16, bias_dtype=torch.float16, num_experts=64, topk=6, n_groups=8,
          topk_groups=3, score_func="sigmoid", route_scale=1.5,
          expected=_expect(8, 3, 6, routed_scaling_factor=1.5, compute_dtype=torch.float16)),
]
REWRITTEN = [c for c in CASES + FP16_CASES if c.expected is not None and c.name not in DELIBERATE_REFUSALS]
LOOK_ALIKES = [c for c in CASES if c.expected is None or c.name in DELIBERATE_REFUSALS]


@pytest.mark.parametrize("case", REWRITTEN, ids=[c.name for c in REWRITTEN])
def test_spelling_is_rewritten_and_matches_the_contract(case):
    module = case.make_module()
    hidden = make_inputs(case)
    compiled, outputs, report = compile_with_report(module, hidden)
    assert not internal_errors(report)
    assert report.count("routing") == 1, [r.reason for r in report.refusals]
    params = report.rewrites[0].params
    assert {k: params[k] for k in case.expected} == case.expected
    assert "moe_fusion.moe_fused_gate" in report.graphs[-1].graph_after
    with torch.no_grad():
        assert fused_op_calls(compiled, hidden) == {GATE: 1}
    tokens, ties, problems = compare_with_reference(case, case.expected, module, hidden, tuple(outputs))
    assert not problems, problems[:3]
    with torch.no_grad():
        eager = module(hidden)
    for name, got, want in zip(case.outputs, outputs, eager):
        if name not in ("weights", "ids"):  # other outputs (logits, scores) are left as they were
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("case", LEFT_IN_GRAPH_CASES, ids=[c.name for c in LEFT_IN_GRAPH_CASES])
def test_renormalisation_the_op_lacks_stays_in_the_graph(case):
    """The gate computes the unnormalised weights (its contract); the model's own renormalisation and
    scaling keep running on them in the graph, so the outputs are eager's."""
    module = case.make_module()
    hidden = make_inputs(case)
    compiled, outputs, report = compile_with_report(module, hidden)
    assert not internal_errors(report)  # (the experts rewrite reports that a router alone has no experts)
    assert report.count("routing") == 1 and report.rewrites[0].spelling.endswith("their sum left to the graph")
    assert {k: report.rewrites[0].params[k] for k in case.expected} == case.expected
    with torch.no_grad():
        assert fused_op_calls(compiled, hidden) == {GATE: 1}
        eager = module(hidden)
    # The module's top-k is unsorted (eager's order is unspecified): compare each token's picks by id.
    got, want = (dict(zip(case.outputs, o, strict=True)) for o in (outputs, eager))
    order, eager_order = got["ids"].argsort(-1), want["ids"].argsort(-1)
    assert torch.equal(got["ids"].gather(-1, order), want["ids"].gather(-1, eager_order))
    torch.testing.assert_close(got["weights"].gather(-1, order), want["weights"].gather(-1, eager_order))


@pytest.mark.parametrize("case", LOOK_ALIKES, ids=[c.name for c in LOOK_ALIKES])
def test_look_alike_is_left_alone(case):
    module = case.make_module()
    hidden = make_inputs(case)
    compiled, outputs, report = compile_with_report(module, hidden)
    assert not internal_errors(report)
    assert report.count("routing") == 0
    with torch.no_grad():
        assert GATE not in fused_op_calls(compiled, hidden)
        eager = module(hidden)
    expected_reason = DELIBERATE_REFUSALS.get(case.name)
    if expected_reason:
        assert any(expected_reason in r.reason for r in report.refusals), [r.reason for r in report.refusals]
    for got, want in zip(outputs, eager):
        if got.dtype == torch.float32:  # bf16 look-alikes: Inductor's fp32 intermediates round differently
            torch.testing.assert_close(got, want)


DYNAMIC_CASES = ["hf_deepseek_v3_router", "deepseek_v3_official_gate_bf16", "torchtitan_router_node_limited_3d",
                 "hf_deepseek_v2_group_limited_greedy", "var_3d_unflatten_softmax_values"]


@pytest.mark.parametrize("name", DYNAMIC_CASES)
def test_dynamic_token_count(name):
    case = next(c for c in CASES if c.name == name)
    module = case.make_module()
    first = make_inputs(case)
    compiled, _, report = compile_with_report(module, first, dynamic=True)
    assert report.count("routing") == 1, [r.reason for r in report.refusals]
    for seed, scale in ((1, 3), (2, 1)):
        shape = list(case.input_shape)
        shape[0] = shape[0] * scale + 1  # other token counts, served by the same dynamic graph
        hidden = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2).to(case.dtype)
        with no_compile_caches(), torch.no_grad():
            outputs = compiled(hidden)
        _, _, problems = compare_with_reference(case, case.expected, module, hidden, tuple(outputs))
        assert not problems, problems[:3]


class _RoutingReadInSeveralShapes(torch.nn.Module):
    """The example router on flattened [B, L, H] tokens, its outputs read in several shapes at once:
    the weights as [T, K] and [B, L, K], the ids as [B, L, 1, K]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.router = Router(ExampleConfig())

    def forward(self, hidden):
        batch, length, size = hidden.shape
        weights, ids = self.router(hidden.reshape(-1, size))
        return weights, weights.view(batch, length, -1), ids.view(batch, length, 1, -1)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic_batch_and_length"])
def test_outputs_leaving_in_different_shapes_are_all_read_from_one_gate(dynamic):
    module = _RoutingReadInSeveralShapes()
    hidden = torch.randn(2, 5, ExampleConfig().hidden_size, generator=torch.Generator().manual_seed(2))
    if dynamic:  # the [B, L, K] readers then take B and L from the graph's input
        torch._dynamo.mark_dynamic(hidden, 0)
        torch._dynamo.mark_dynamic(hidden, 1)
    compiled, _, report = compile_with_report(module, hidden)
    assert report.count("routing") == 1, [r.reason for r in report.refusals]
    assert "aten.topk" not in normalized_ops(report.graphs[-1].graph_after)  # no reader is left on the old routing
    if dynamic:  # another batch and length, served by the same graph
        hidden = torch.randn(3, 4, ExampleConfig().hidden_size, generator=torch.Generator().manual_seed(3))
    with no_compile_caches(), torch.no_grad():
        assert fused_op_calls(compiled, hidden) == {GATE: 1}
        weights, weights_by_position, ids = compiled(hidden)
        eager = module(hidden)
    assert [o.shape for o in (weights, weights_by_position, ids)] == [o.shape for o in eager]
    assert torch.equal(weights_by_position.reshape(weights.shape), weights)
    assert_same_routing((weights, ids.reshape(weights.shape)), (eager[0], eager[2].reshape(eager[0].shape)))


def _example_router():
    torch.manual_seed(0)
    return Router(ExampleConfig()), torch.randn(9, ExampleConfig().hidden_size)


class TestGraphs(expecttest.TestCase):
    def test_router_graph_after_the_rewrite(self):
        router, hidden = _example_router()
        _, _, report = compile_with_report(router, hidden)
        self.assertExpectedInline(str(normalized_ops(report.graphs[0].graph_after)),
                                  """['aten.permute', 'aten.mm', 'moe_fusion.moe_fused_gate']""")

    def test_router_graph_without_the_rewrite(self):
        router, hidden = _example_router()
        _, _, report = compile_with_report(router, hidden, rewrites=[])
        self.assertEqual(report.count("routing"), 0)
        self.assertNotIn("moe_fusion.moe_fused_gate", normalized_ops(report.graphs[0].graph_after))
        self.assertIn("aten.topk", normalized_ops(report.graphs[0].graph_after))


def test_fx_graph_cache_hit_serves_the_rewritten_graph_and_never_a_stale_one(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    router, hidden = _example_router()
    counters = torch._dynamo.utils.counters

    def compile_and_count(backend):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(router, backend=backend)
        with torch._inductor.config.patch(fx_graph_cache=True, force_disable_caches=False), torch.no_grad():
            compiled(hidden)
            calls = fused_op_calls(compiled, hidden)
        return calls, counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]

    with torch._inductor.utils.fresh_cache():
        assert compile_and_count(fusion_passes.make_backend()) == ({GATE: 1}, 0, 1)
        # Same graph and same rewrites: a cache hit, and the cached graph has the fused op.
        assert compile_and_count(fusion_passes.make_backend()) == ({GATE: 1}, 1, 0)
        # Rewrites off: the uuid differs, so the rewritten graph is not served.
        assert compile_and_count(fusion_passes.make_backend(rewrites=[])) == ({}, 0, 1)
        # The default backend (no pass at all) does not get it either.
        assert compile_and_count("inductor") == ({}, 0, 1)


def test_cache_key_covers_the_ops_sources_and_schemas():
    """Compiled code calls the fused ops by schema: the pass's cache key changes with any of them (and
    with the ops' Python sources), so an upgrade never gets code compiled against the old ones."""
    from fusion_passes import inductor_backend

    files_hash, schemas = inductor_backend.library_key()
    ops = ("moe_fused_gate", "moe_fused_gate_backward", "fused_experts", "fused_experts_train",
           "fused_experts_backward")
    expected = sorted(str(schema) for op in ops for schema in getattr(torch.ops.moe_fusion, op)._schemas.values())
    assert len(expected) == 6 and list(schemas) == expected  # moe_fused_gate has an .out overload
    assert {"experts_autograd.py", "routing.py"} <= {os.path.basename(path) for path in inductor_backend._SOURCES}
    assert fusion_passes.FusionPass().uuid()[0] == (files_hash, schemas)


def test_install_adds_the_rewrite_to_the_default_backend():
    router, hidden = _example_router()
    uninstall = fusion_passes.install()
    try:
        torch._dynamo.reset()
        with no_compile_caches(), torch.no_grad():
            compiled = torch.compile(router)
            compiled(hidden)
            assert fused_op_calls(compiled, hidden) == {GATE: 1}
    finally:
        uninstall()
    torch._dynamo.reset()
    with no_compile_caches(), torch.no_grad():
        compiled = torch.compile(router)
        compiled(hidden)
        assert fused_op_calls(compiled, hidden) == {}


@pytest.mark.parametrize("settings", [dict(mode="max-autotune-no-cudagraphs"), dict(options={"epilogue_fusion": False})],
                         ids=["mode", "options"])
def test_mode_and_options_are_forwarded(settings):
    router, hidden = _example_router()
    torch._dynamo.reset()
    with no_compile_caches(), torch.no_grad():
        compiled = torch.compile(router, backend="moe_fusion", **settings)
        want = router(hidden)
        got = compiled(hidden)
        assert fused_op_calls(compiled, hidden) == {GATE: 1}
    assert_same_routing(got, want)


def test_unknown_inductor_option_is_a_clear_error():
    router, hidden = _example_router()
    torch._dynamo.reset()
    with pytest.raises(Exception, match="unknown Inductor option 'not_an_option'"):
        torch.compile(router, backend="moe_fusion", options={"not_an_option": 1})(hidden)


def test_unknown_rewrite_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown rewrite"):
        fusion_passes.make_backend(rewrites=["rooting"])


def test_a_bug_in_a_rewrite_does_not_break_the_compile(monkeypatch):
    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(routing, "_plan", broken)
    router, hidden = _example_router()
    _, outputs, report = compile_with_report(router, hidden)
    assert report.count("routing") == 0
    assert any("internal error" in r.reason and "boom" in r.reason for r in report.refusals)
    with torch.no_grad():
        assert_same_routing(outputs, router(hidden))


def test_explain_reports_location_spelling_and_graphs():
    model = ExampleMoEModel().eval()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 7))
    report = fusion_passes.explain(model, tokens, rewrites=["routing"])
    assert report.count("routing") == model.cfg.num_layers
    rewrite = report.rewrites[0]
    assert "layers.0.gate" in rewrite.location
    assert "topk(2).values.sum(-1)" in rewrite.spelling and "gather(scores)" in rewrite.spelling
    assert "moe_fused_gate" not in report.graphs[0].graph_before
    assert "moe_fused_gate" in report.graphs[0].graph_after
    assert "moe_fusion.moe_fused_gate.default" in report.op_count_table()
    assert "1 rewrite" in str(report) or f"{model.cfg.num_layers} rewrite" in str(report)


def test_rewrites_are_logged(caplog):
    router, hidden = _example_router()
    with caplog.at_level(logging.INFO, logger="moe_fusion"):
        compile_with_report(router, hidden)
    assert any("[routing]" in record.getMessage() for record in caplog.records)


def test_example_model_matches_eager_with_one_gate_per_layer():
    model = ExampleMoEModel().eval()
    tokens = torch.randint(0, model.cfg.vocab_size, (3, 5))
    compiled, outputs, report = compile_with_report(model, tokens, rewrites=["routing"])
    assert report.count("routing") == model.cfg.num_layers
    with torch.no_grad():
        assert fused_op_calls(compiled, tokens) == {GATE: model.cfg.num_layers}
        torch.testing.assert_close(outputs, model(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["deepseek_v3", "glm4_moe", "deepseek_v2"])
@pytest.mark.parametrize("experts_implementation", ["grouped_mm", "batched_mm"])
def test_hf_transformers_models(kind, experts_implementation):
    pytest.importorskip("transformers")
    from fusion_passes.hf_examples import tiny_hf_moe

    model = tiny_hf_moe(kind, experts_implementation)
    tokens = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    compiled, outputs, report = compile_with_report(model, tokens, rewrites=["routing"])
    layers = model.config.num_hidden_layers
    assert report.count("routing") == layers, [r.reason for r in report.refusals]
    with torch.no_grad():
        assert fused_op_calls(compiled, tokens) == {GATE: layers}
        torch.testing.assert_close(outputs.logits, model(tokens).logits, rtol=1e-5, atol=1e-5)


class _HandWrittenLookAlike(torch.nn.Module):
    """DeepSeek-V3 routing with one deliberate change that makes it a different function."""

    def __init__(self, change: str) -> None:
        super().__init__()
        self.change = change
        gen = torch.Generator().manual_seed(7)
        self.weight = torch.nn.Parameter(torch.randn(64, 32, generator=gen) * 0.3)
        self.register_buffer("bias", torch.randn(64, generator=gen) * 0.2)

    def forward(self, hidden):
        scores = torch.nn.functional.linear(hidden, self.weight).sigmoid()
        choice = scores + self.bias
        if self.change == "groups_strided":  # groups interleaved: view(-1, P, G), scored over dim 1
            group_scores = choice.view(-1, 8, 8).topk(2, dim=1)[0].sum(dim=1)
        else:
            group_scores = choice.view(-1, 8, 8).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=4, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, 8, 8).reshape(-1, 64)
        if self.change == "inverted_mask":  # fills the experts of the KEPT groups
            choice = choice.masked_fill(score_mask.bool(), float("-inf"))
        elif self.change == "mask_other_scores":  # selects on the unbiased scores
            choice = scores.masked_fill(~score_mask.bool(), float("-inf"))
        else:
            choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        ids = torch.topk(choice, k=8, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        return weights / weights.sum(dim=-1, keepdim=True), ids


@pytest.mark.parametrize("change, reason", [
    ("inverted_mask", "keeps the experts of dropped groups"),
    ("mask_other_scores", "computed from other scores"),
    ("groups_strided", "top-k over a dimension that is not the last"),
])
def test_hand_written_look_alikes_are_refused_with_a_reason(change, reason):
    module = _HandWrittenLookAlike(change)
    hidden = torch.randn(6, 32, generator=torch.Generator().manual_seed(3))
    compiled, outputs, report = compile_with_report(module, hidden)
    assert report.count("routing") == 0
    assert any(reason in r.reason for r in report.refusals), [r.reason for r in report.refusals]
    with torch.no_grad():
        assert GATE not in fused_op_calls(compiled, hidden)
        assert_same_routing(outputs, module(hidden))


def test_inspect_cli_prints_the_report(capsys):
    from fusion_passes import inspect as inspect_cli

    inspect_cli.main(["--model", "example", "--graphs", "--cpu-experts"])
    out = capsys.readouterr().out
    assert "6 rewrite(s), 0 refusal(s)" in out  # per layer: routing, experts, shared experts
    assert "moe_fusion.moe_fused_gate.default" in out and "moe_fusion.fused_experts.default" in out
    assert "== graph 0 after ==" in out
