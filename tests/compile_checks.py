"""Helpers for tests that compile models with the moe_fusion backend."""

from __future__ import annotations

import contextlib

import torch

import fusion_passes
from fusion_passes.report import Report, collector


def fused_op_calls(fn, *args) -> dict[str, int]:
    """How many times each moe_fusion op ran during fn(*args), seen by the profiler (independent of
    the passes' own report)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(*args)
    return {e.key: e.count for e in prof.key_averages() if e.key.startswith("moe_fusion::")}


@contextlib.contextmanager
def no_compile_caches():
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def compile_with_report(model, *inputs, rewrites=None, dynamic=None, backend=None, fuse_experts_on_cpu=True):
    """Compiles `model` with the fusion backend (caches off; experts fused on the CPU too, so that the
    tests see the rewrites), runs it on `inputs` under no_grad and returns (compiled, outputs, report)."""
    torch._dynamo.reset()
    collector.take()
    backend = backend or fusion_passes.make_backend(rewrites, fuse_experts_on_cpu=fuse_experts_on_cpu)
    compiled = torch.compile(model, backend=backend, dynamic=dynamic)
    with no_compile_caches(), torch.no_grad():
        outputs = compiled(*inputs)
    return compiled, outputs, collector.take()


def normalized_ops(graph_text: str) -> list[str]:
    """The call_function targets of a printed FX graph, in order, without overloads or getitems."""
    ops = []
    for line in graph_text.splitlines():
        if "call_function[target=" not in line:
            continue
        target = line.split("call_function[target=")[1].split("]")[0]
        if target == "operator.getitem":
            continue
        ops.append(target.removeprefix("torch.ops.").rsplit(".", 1)[0])
    return ops


def internal_errors(report: Report) -> list[str]:
    return [r.reason for r in report.refusals if "internal error" in r.reason]


def assert_same_routing(got, want, **tolerances) -> None:
    """(weights, ids) pairs equal up to the order of the k picks (top-k with sorted=False)."""
    (got_w, got_ids), (want_w, want_ids) = got, want
    got_order, want_order = got_ids.sort(-1), want_ids.sort(-1)
    assert torch.equal(got_order.values, want_order.values)
    torch.testing.assert_close(got_w.gather(-1, got_order.indices), want_w.gather(-1, want_order.indices),
                               **tolerances)
