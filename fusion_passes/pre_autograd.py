"""Rewrites before autograd, for the graphs of training compiles.

In a compile that needs gradients, Inductor's post-grad graphs are the forward and the backward
graphs AOT autograd's partitioner made: the routing's intermediates are saved there for the
backward, so the rewrites cannot replace them (the routing rewrite refuses) and the fused ops'
backwards are never used. For such graphs the backend rewrites first: it exports the Dynamo graph to
functional ATen (``torch.export``, non-strict, then Inductor's decompositions: the op set the
rewrites read after grad), runs the rewrites there, and hands the rewritten module to Inductor,
whose AOT autograd then differentiates the fused ops through their registered backwards
(``ops/gate_autograd.py``, ``ops/experts_autograd.py``).

Graphs without a top-k (no routing to rewrite) are compiled as they are, without the export. For
now only graphs with static shapes take this path (a Dynamo graph with symbolic sizes would need
export's dynamic shapes built from Dynamo's symbols); the others, and graphs export cannot trace,
keep the post-grad path, and the report says why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Graph, GraphModule

from .graph_utils import GraphBuilder, aten, fake, prims
from .report import GraphReport, Refusal, collector

PASS_NAME = "before_autograd"


def needs_gradients(example_inputs: list[Any]) -> bool:
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


@dataclass
class BeforeAutograd:
    module: GraphModule | None  # the rewritten module; None: compile the Dynamo graph as it is
    report: GraphReport
    after_autograd: bool  # the graph was not rewritten here: the post-grad rewrites should run


def rewrite_before_autograd(gm: GraphModule, example_inputs: list[Any],
                            run_rewrites: Callable[[Graph], GraphReport]) -> BeforeAutograd:
    """Exports `gm` to functional ATen, runs `run_rewrites` on it and, if anything was rewritten,
    returns the rewritten graph as a module taking and returning what `gm` does."""
    if not _has_topk(gm):  # no routing (every spelling ends in a top-k): spare the export
        return BeforeAutograd(None, GraphReport(collector.next_index()), False)
    if not all(type(x) in (torch.Tensor, torch.nn.Parameter) for x in example_inputs):
        return BeforeAutograd(None, _refused("the graph has symbolic sizes or non-tensor inputs (dynamic shapes): "
                                             "it is rewritten after autograd only, where the routing is saved for "
                                             "the backward"), True)
    try:
        from torch._inductor.decomposition import select_decomp_table

        program = torch.export.export(gm, tuple(example_inputs), strict=False)
        program = program.run_decompositions(select_decomp_table())
    except Exception as err:  # export cannot trace every graph; the post-grad path still can
        return BeforeAutograd(None, _refused(f"torch.export could not trace the graph ({type(err).__name__}: "
                                             f"{err}); it is rewritten after autograd only"), True)
    graph = program.graph_module.graph
    report = run_rewrites(graph)
    if not report.rewrites:
        return BeforeAutograd(None, report, False)
    _make_differentiable(graph)
    program.graph_module.recompile()
    return BeforeAutograd(_plain_module(program.module()), report, False)


def _has_topk(gm: GraphModule) -> bool:
    return any(node.target is torch.topk or node.op == "call_method" and node.target == "topk"
               for node in gm.graph.nodes)


def _plain_module(unlifted: GraphModule) -> GraphModule:
    """The exported module's graph in a plain GraphModule, with flat inputs and outputs as Dynamo's
    graph had them, and without export's input-guard submodule (Dynamo guards the inputs already):
    neither can be pickled, which would keep Inductor's FX graph cache from keying the compile."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(unlifted.graph, {}))
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    return GraphModule(unlifted, graph)


def _refused(reason: str) -> GraphReport:
    return GraphReport(collector.next_index(), refusals=[Refusal(PASS_NAME, "graph", reason)])


def _make_differentiable(graph: Graph) -> None:
    """Replaces the two ops of functional ATen that have no derivative by their differentiable
    equivalents (after the rewrites, which read the former): aten.copy(dst, src), which
    functionalisation writes for in-place copies into views, by src converted to dst's dtype and
    broadcast to its shape; prims.convert_element_type (Inductor's decomposition of dtype casts) by
    aten._to_copy."""
    for node in list(graph.nodes):
        if node.target not in (aten.copy.default, prims.convert_element_type.default):
            continue
        build = GraphBuilder(graph, node)
        with graph.inserting_before(node):
            if node.target == prims.convert_element_type.default:
                source, dtype = node.args[:2]
                value = build.call(aten._to_copy.default, (source,), {"dtype": dtype})
            else:
                out = fake(node)
                converted = build.call(aten._to_copy.default, (node.args[1],), {"dtype": out.dtype})
                value = build.call(aten.clone.default, (build.call(aten.expand.default, (converted, list(out.shape))),))
        node.replace_all_uses_with(value)
        graph.erase_node(node)
