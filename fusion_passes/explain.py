"""``explain``: compile a model with the fusion backend and return what the passes did."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .inductor_backend import make_backend
from .report import Report, collector


def explain(model: Callable, *inputs: Any, rewrites: Sequence[str] | None = None, dynamic: bool | None = None,
            fuse_experts_on_cpu: bool = False, training: bool = False, **kwargs: Any) -> Report:
    """Compiles `model` with the moe_fusion backend, runs it once on `inputs`, and returns the Report.

    ``training=True`` runs it with gradients enabled, as a training step's forward: graphs with
    parameters or inputs that require grad are then rewritten before autograd (pre_autograd.py), and
    the report says what a training compile fuses. Caches are bypassed for this compile so that every
    graph really goes through the passes.
    """
    torch._dynamo.reset()
    collector.take()
    compiled = torch.compile(model, backend=make_backend(rewrites, fuse_experts_on_cpu=fuse_experts_on_cpu),
                             dynamic=dynamic)
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False), torch.set_grad_enabled(training):
        compiled(*inputs, **kwargs)
    report = collector.take()
    torch._dynamo.reset()
    return report
