"""A training step compiled with the moe_fusion backend gives eager's loss and gradients.

Today the rewrites run on Inductor's post-grad graphs, which in a training compile are the forward
and backward graphs after partitioning: the routing intermediates are saved for the backward there,
so the routing rewrite refuses (its reason is in the report) and the step runs unfused. These tests
keep that path correct until the rewrites move before autograd.
"""

from __future__ import annotations

import pytest
import torch
from compile_checks import internal_errors

import fusion_passes
from fusion_passes.report import collector


def _loss_and_grads(model, tokens):
    model.zero_grad()
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    grads = {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in model.named_parameters()
             if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("experts_implementation", ["grouped_mm", "batched_mm"])
def test_training_step_matches_eager(experts_implementation):
    pytest.importorskip("transformers")
    from fusion_passes.hf_examples import tiny_hf_moe

    model = tiny_hf_moe("deepseek_v3", experts_implementation).train()
    tokens = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    eager_loss, eager_grads = _loss_and_grads(model, tokens)

    torch._dynamo.reset()
    collector.take()
    compiled = torch.compile(model, backend=fusion_passes.make_backend(fuse_experts_on_cpu=True))
    with torch._inductor.config.patch(fx_graph_cache=False):
        loss, grads = _loss_and_grads(compiled, tokens)
    report = collector.take()

    assert not internal_errors(report)
    assert report.count("routing") == 0 and report.refusals, "the routing rewrite now fires in training graphs"
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
