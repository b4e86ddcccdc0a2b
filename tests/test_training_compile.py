"""Training compiles with the moe_fusion backend: the rewrites run before autograd
(fusion_passes/pre_autograd.py), the fused ops and their backwards run in the step, and the loss and
gradients are eager's."""

from __future__ import annotations

import pytest
import torch
from compile_checks import fused_op_calls, internal_errors, no_compile_caches
from conftest import DEVICES
from moe_blocks import (HandWrittenBlock, TorchtitanDispatcherStyleBlock, TorchtitanMainStyleBlock,
                        TorchtitanStyleBlock)

import fusion_passes
from fusion_passes.report import collector

# Under autograd fused_experts runs as fused_experts_train, which also returns the projections its
# backward reads: a compiled training step's forward calls that op.
GATE, EXPERTS = "moe_fusion::moe_fused_gate", "moe_fusion::fused_experts_train"
GATE_BACKWARD, EXPERTS_BACKWARD = "moe_fusion::moe_fused_gate_backward", "moe_fusion::fused_experts_backward"


def _loss_and_grads(model, tokens):
    model.zero_grad()
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    grads = {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in model.named_parameters()
             if p.grad is not None}
    return loss.detach(), grads


def _assert_step_matches_eager(loss, grads, eager_loss, eager_grads, atol):
    """A compiled step's loss (rtol 1e-5) and every parameter gradient (rtol 1e-4) against eager's."""
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=atol)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=atol, msg=name)


def _compile(model):
    torch._dynamo.reset()
    collector.take()
    return torch.compile(model, backend=fusion_passes.make_backend(fuse_experts_on_cpu=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, experts_implementation", [
    ("deepseek_v3", "grouped_mm"), ("deepseek_v3", "batched_mm"), ("deepseek_v2", "grouped_mm"),
    ("qwen3_moe", "grouped_mm"), ("qwen2_moe", "batched_mm"),
])
def test_training_step_runs_the_fused_ops_and_matches_eager(kind, experts_implementation, device):
    """On CUDA the experts' backward runs the Triton kernels; on the CPU the per-expert loop."""
    pytest.importorskip("transformers")
    from fusion_passes.hf_examples import tiny_hf_moe

    # Eager attention, which this test does not check: on the H200 (torch 2.11) the compiled
    # memory-efficient attention backward rejected DeepseekV2's padded logsumexp ("LSE is not
    # correctly aligned").
    model = tiny_hf_moe(kind, experts_implementation, attn_implementation="eager").to(device).train()
    layers = model.config.num_hidden_layers
    tokens = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    tokens = tokens.to(device)
    eager_loss, eager_grads = _loss_and_grads(model, tokens)

    compiled = _compile(model)
    with no_compile_caches():
        loss, grads = _loss_and_grads(compiled, tokens)
        report = collector.take()
        calls = fused_op_calls(_loss_and_grads, compiled, tokens)

    assert not internal_errors(report) and not report.refusals, [r.reason for r in report.refusals]
    shared_layers = 0 if kind == "qwen3_moe" else layers  # Qwen3-MoE has no shared expert
    assert [report.count(n) for n in ("routing", "experts", "shared_experts")] == [layers, layers, shared_layers]
    # Forward: one gate and one fused_experts_train per layer; backward: each one's backward op, but
    # DeepseekV2's gate, whose weights come from the masked scores, differentiates through the formula.
    expected = {GATE: layers, EXPERTS: layers, GATE_BACKWARD: layers, EXPERTS_BACKWARD: layers}
    if kind == "deepseek_v2":
        del expected[GATE_BACKWARD]
    assert calls == expected
    _assert_step_matches_eager(loss, grads, eager_loss, eager_grads, atol=1e-6)


@pytest.mark.parametrize("how", ["marked", "automatic"])
def test_dynamic_training_graphs_are_rewritten_before_autograd(how):
    """A token count marked dynamic (or made dynamic by Dynamo's recompile on a new length): one
    compile serves every length, with the fused ops in forward and backward, and each step is eager's."""
    pytest.importorskip("transformers")
    from fusion_passes.hf_examples import tiny_hf_moe

    model = tiny_hf_moe("deepseek_v3").train()
    layers = model.config.num_hidden_layers
    compiled = _compile(model)
    lengths = (9, 13, 6, 11)
    with no_compile_caches():
        for step, length in enumerate(lengths):
            tokens = torch.randint(0, model.config.vocab_size, (2, length),
                                   generator=torch.Generator().manual_seed(length))
            if how == "marked" and step == 0:  # the compiled graph is dynamic from then on
                torch._dynamo.mark_dynamic(tokens, 1)
            eager_loss, eager_grads = _loss_and_grads(model, tokens)
            loss, grads = _loss_and_grads(compiled, tokens)
            report = collector.take()
            assert not report.refusals, [r.reason for r in report.refusals]
            # Marked: the first step compiles the dynamic graph; automatic: the second one recompiles.
            compiles_now = step == 0 or (how == "automatic" and step == 1)
            assert report.count("experts") == (layers if compiles_now else 0), (step, report.tally())
            _assert_step_matches_eager(loss, grads, eager_loss, eager_grads, atol=1e-6)
        calls = fused_op_calls(_loss_and_grads, compiled, tokens)
    assert calls == {GATE: layers, EXPERTS: layers, GATE_BACKWARD: layers, EXPERTS_BACKWARD: layers}


@pytest.mark.parametrize("how", ["backend", "install"])
def test_dynamic_true_floats_are_specialised(how):
    """torch.compile(dynamic=True) makes Python floats (epsilons, the routed scaling factor) graph
    inputs, which export cannot trace: Dynamo traces again with them specialised (guarded constants),
    the graph is rewritten and serves every length; a changed float recompiles, rewritten again."""
    pytest.importorskip("transformers")
    from fusion_passes.hf_examples import tiny_hf_moe

    model = tiny_hf_moe("deepseek_v3").train()
    layers = model.config.num_hidden_layers
    uninstall = fusion_passes.install(fuse_experts_on_cpu=True) if how == "install" else None
    try:
        torch._dynamo.reset()
        collector.take()
        backend = "inductor" if uninstall else fusion_passes.make_backend(fuse_experts_on_cpu=True)
        compiled = torch.compile(model, backend=backend, dynamic=True)
        with no_compile_caches():
            for step, length in enumerate((9, 13, 13)):
                if step == 2:  # the routers' float: a guarded constant now, so the step recompiles
                    for router in (m for m in model.modules() if hasattr(m, "e_score_correction_bias")):
                        router.routed_scaling_factor /= 2
                tokens = torch.randint(0, model.config.vocab_size, (2, length),
                                       generator=torch.Generator().manual_seed(length))
                eager_loss, eager_grads = _loss_and_grads(model, tokens)
                loss, grads = _loss_and_grads(compiled, tokens)
                report = collector.take()
                assert not report.refusals, [r.reason for r in report.refusals]
                assert report.count("experts") == (0 if step == 1 else layers), (step, report.tally())
                _assert_step_matches_eager(loss, grads, eager_loss, eager_grads, atol=1e-6)
            calls = fused_op_calls(_loss_and_grads, compiled, tokens)
    finally:
        if uninstall:
            uninstall()
    assert calls == {GATE: layers, EXPERTS: layers, GATE_BACKWARD: layers, EXPERTS_BACKWARD: layers}


def test_export_that_makes_a_dynamic_size_constant_is_refused(monkeypatch):
    """If export traced a size Dynamo keeps symbolic as a constant, the rewritten graph would be wrong
    for other sizes: the graph keeps the post-grad path instead, and says why."""
    real_export = torch.export.export

    def static_export(module, args, dynamic_shapes=None, **kwargs):
        return real_export(module, args, **kwargs)  # ignores the dynamic shapes: every size constant

    monkeypatch.setattr(torch.export, "export", static_export)
    block = HandWrittenBlock().train()
    compiled = _compile(block)
    with no_compile_caches():
        for tokens in (5, 7):
            x = torch.randn(2, tokens, block.cfg.hidden_size, generator=torch.Generator().manual_seed(tokens))
            if tokens == 5:
                torch._dynamo.mark_dynamic(x, 1)
            eager = block(x).square().mean()
            loss = compiled(x).square().mean()
            torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-7)
            if tokens == 5:
                report = collector.take()
                assert any(r.pass_name == "before_autograd" and "made sizes constant" in r.reason
                           for r in report.refusals), [r.reason for r in report.refusals]
                assert report.count("experts") == 0


@pytest.mark.parametrize("variant", ["plain", "gated_shared", "scaled_output", "shared_gate_up_chunk",
                                     "shared_gate_up_interleaved", "renormalised_scaled_output"])
def test_hand_written_block_gradients_reach_inputs_and_every_weight(variant):
    """Gradients w.r.t. the hidden states, the router, the expert tensors (read through gate/up
    slices) and the shared MLP (with its sigmoid token gate, or one gate_up Linear read through row
    views) through the fused ops' backwards."""
    block = HandWrittenBlock(variant).train()
    x = torch.randn(2, 5, block.cfg.hidden_size, generator=torch.Generator().manual_seed(6))

    def loss_and_grads(module):
        module.zero_grad()
        inputs = x.clone().requires_grad_()
        loss = module(inputs).square().mean()
        loss.backward()
        grads = {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in module.named_parameters()
                 if p.grad is not None}
        return loss.detach(), inputs.grad, grads

    eager_loss, eager_input_grad, eager_grads = loss_and_grads(block)
    compiled = _compile(block)
    with no_compile_caches():
        loss, input_grad, grads = loss_and_grads(compiled)
    report = collector.take()
    assert [report.count(n) for n in ("routing", "experts", "shared_experts")] == [1, 1, 1], \
        [r.reason for r in report.refusals]
    torch.testing.assert_close(input_grad, eager_input_grad, rtol=1e-4, atol=1e-7)
    _assert_step_matches_eager(loss, grads, eager_loss, eager_grads, atol=1e-7)


@pytest.mark.parametrize("model_kind", ["hand_written", "hf_deepseek_v3"])
def test_install_rewrites_training_graphs_before_autograd(model_kind):
    """install() (plain torch.compile, default backend): training graphs are rewritten by Inductor's
    pre-grad pass, with the fused ops in forward and backward, at two lengths (the second one
    recompiles with a dynamic length); uninstall() restores both of Inductor's passes."""
    from torch._inductor import config as inductor_config

    if model_kind == "hf_deepseek_v3":
        pytest.importorskip("transformers")
        from fusion_passes.hf_examples import tiny_hf_moe

        model = tiny_hf_moe("deepseek_v3").train()
        layers = model.config.num_hidden_layers

        def inputs(length):
            return torch.randint(0, model.config.vocab_size, (2, length),
                                 generator=torch.Generator().manual_seed(length))

        run = _loss_and_grads
    else:
        model, layers = HandWrittenBlock().train(), 1

        def inputs(length):
            return torch.randn(2, length, model.cfg.hidden_size, generator=torch.Generator().manual_seed(length))

        def run(module, x):
            module.zero_grad()
            loss = module(x).square().mean()
            loss.backward()
            return loss.detach(), {name.removeprefix("_orig_mod."): p.grad.clone()
                                   for name, p in module.named_parameters() if p.grad is not None}

    passes_before = inductor_config.pre_grad_custom_pass, inductor_config.post_grad_custom_post_pass
    uninstall = fusion_passes.install(fuse_experts_on_cpu=True)
    try:
        torch._dynamo.reset()
        collector.take()
        compiled = torch.compile(model)
        with no_compile_caches():
            for length in (7, 10):
                eager_loss, eager_grads = run(model, inputs(length))
                loss, grads = run(compiled, inputs(length))
                report = collector.take()
                assert [report.count(n) for n in ("routing", "experts", "shared_experts")] == [layers] * 3
                # The post-grad pass sees the rewritten forward and backward: nothing left to refuse there.
                assert not report.refusals, [r.reason for r in report.refusals]
                _assert_step_matches_eager(loss, grads, eager_loss, eager_grads, atol=1e-6)
            calls = fused_op_calls(run, compiled, inputs(10))
        assert calls == {GATE: layers, EXPERTS: layers, GATE_BACKWARD: layers, EXPERTS_BACKWARD: layers}
    finally:
        uninstall()
    assert (inductor_config.pre_grad_custom_pass, inductor_config.post_grad_custom_post_pass) == passes_before


def test_graphs_export_cannot_trace_keep_the_post_grad_path(monkeypatch):
    def failing_export(*args, **kwargs):
        raise RuntimeError("no export for this graph")

    monkeypatch.setattr(torch.export, "export", failing_export)
    block = HandWrittenBlock().train()
    x = torch.randn(2, 5, block.cfg.hidden_size, generator=torch.Generator().manual_seed(7))
    eager = block(x).square().mean()
    compiled = _compile(block)
    with no_compile_caches():
        loss = compiled(x).square().mean()
    report = collector.take()
    assert any(r.pass_name == "before_autograd" and "no export for this graph" in r.reason for r in report.refusals)
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-7)


def test_bf16_training_step_is_as_close_to_eager_as_default_compile():
    pytest.importorskip("transformers")
    from fusion_passes.hf_examples import tiny_hf_moe

    model = tiny_hf_moe("deepseek_v3").to(torch.bfloat16).train()
    tokens = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    _, eager_grads = _loss_and_grads(model, tokens)
    eager_grads = {name: grad.float() for name, grad in eager_grads.items()}

    def largest_relative_error(backend):
        torch._dynamo.reset()
        collector.take()
        with no_compile_caches():
            _, grads = _loss_and_grads(torch.compile(model, backend=backend), tokens)
        return max(((grads[n].float() - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in eager_grads.items())

    default_error = largest_relative_error("inductor")
    fused_error = largest_relative_error(fusion_passes.make_backend(fuse_experts_on_cpu=True))
    assert collector.take().count("experts") == 2
    assert fused_error <= max(2 * default_error, 1e-3), (fused_error, default_error)


@pytest.mark.parametrize("block_class, options", [
    (TorchtitanStyleBlock, {}), (TorchtitanMainStyleBlock, {}),
    (TorchtitanMainStyleBlock, {"permutation": "one_rank"}), (TorchtitanDispatcherStyleBlock, {})],
    ids=["torchtitan", "main", "main_permuted", "dispatcher"])
def test_torchtitan_style_bf16_block_trains_as_close_to_eager_as_default_compile(block_class, options):
    block = block_class(shared_experts=2, **options).train()
    x = torch.randn(2, 5, block.cfg.hidden_size, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)

    def gradients(module):
        module.zero_grad()
        inputs = x.clone().requires_grad_()
        module(inputs).float().square().mean().backward()
        grads = {name.removeprefix("_orig_mod."): p.grad.float() for name, p in module.named_parameters()
                 if p.grad is not None}
        return {"input": inputs.grad.float(), **grads}

    eager = gradients(block)

    def largest_relative_error(backend):
        torch._dynamo.reset()
        collector.take()
        with no_compile_caches():
            grads = gradients(torch.compile(block, backend=backend))
        assert grads.keys() == eager.keys()
        return max(((grads[n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in eager.items())

    default_error = largest_relative_error("inductor")
    fused_error = largest_relative_error(fusion_passes.make_backend(fuse_experts_on_cpu=True))
    report = collector.take()
    assert [report.count(n) for n in ("routing", "experts", "shared_experts")] == [1, 1, 1], \
        [r.reason for r in report.refusals]
    assert fused_error <= max(2 * default_error, 1e-3), (fused_error, default_error)


def test_graphs_without_routing_are_not_exported(monkeypatch):
    def export_must_not_run(*args, **kwargs):
        raise AssertionError("a graph without a top-k was exported")

    monkeypatch.setattr(torch.export, "export", export_must_not_run)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.Linear(32, 16))
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(9))
    eager = mlp(x).square().mean()
    compiled = _compile(mlp)
    with no_compile_caches():
        loss = compiled(x).square().mean()
    report = collector.take()
    assert not report.rewrites and not report.refusals
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-7)



def test_explain_and_inspect_report_a_training_compile(capsys):
    """explain(training=True) compiles with gradients enabled: the graph is rewritten before autograd and
    the report has its rewrites; without it (no_grad) the same block gets the post-grad path."""
    from fusion_passes import inspect

    block = HandWrittenBlock().train()
    x = torch.randn(2, 5, block.cfg.hidden_size, generator=torch.Generator().manual_seed(11))
    report = fusion_passes.explain(block, x, training=True, fuse_experts_on_cpu=True)
    assert [report.count(n) for n in ("routing", "experts", "shared_experts")] == [1, 1, 1]
    # The graph rewritten before autograd is functional ATen with the fused ops and no top-k left.
    after = report.graphs[0].graph_after
    assert "moe_fusion.fused_experts.default" in after and "aten.topk" not in after

    inspect.main(["--model", "hf-deepseek_v3", "--training", "--cpu-experts"])
    printed = capsys.readouterr().out
    # Two layers: a routing, an experts and a shared-experts rewrite each, in the one training graph.
    assert "graph 0: 6 rewrite(s), 0 refusal(s)" in printed and printed.count("[shared_experts]") == 2, printed[:2000]
