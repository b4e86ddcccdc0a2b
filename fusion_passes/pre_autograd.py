"""Rewrites before autograd, for the graphs of training compiles.

In a compile that needs gradients, Inductor's post-grad graphs are the forward and the backward
graphs AOT autograd's partitioner made: the routing's intermediates are saved there for the
backward, so the rewrites cannot replace them (the routing rewrite refuses) and the fused ops'
backwards are never used. For such graphs the backend rewrites first: it exports the Dynamo graph to
functional ATen (``torch.export``, non-strict, then Inductor's decompositions: the op set the
rewrites read after grad), runs the rewrites there, and hands the rewritten module to Inductor,
whose AOT autograd then differentiates the fused ops through their registered backwards
(``ops/gate_autograd.py``, ``ops/experts_autograd.py``). With ``install()`` (plain torch.compile)
Inductor's pre-grad pass does the same and puts the rewritten graph in place of Dynamo's
(``placeholder_examples``, ``replace_graph``).

Graphs without a top-k (no routing to rewrite) are compiled as they are, without the export.
Dynamic shapes: every size Dynamo made symbolic (a marked dimension, or one automatic dynamic shapes
made symbolic on a recompile) is exported symbolic too (``Dim.AUTO``, symbolic size inputs as
integers), and the rewrites write symbolic sizes as ``aten.sym_size`` reads, never as export's
symbols, so Inductor can retrace the module against Dynamo's. If export made such a size a constant
the graph keeps the post-grad path, as do graphs export cannot trace and graphs with inputs export
does not take; the report says why.

Python floats (an epsilon, a routed scaling factor) are graph inputs under ``dynamic=True``: Dynamo
passes them as 0-dim float64 tensors the graph reads with ``.item()``, and export cannot trace the
model's ops on those symbolic floats. The pass then asks Dynamo to trace the frame again with them
specialised (constants, guarded: a changed value recompiles), as Inductor does for floats it cannot
turn into tensors (``torch/fx/passes/_tensorify_python_scalars.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim
from torch.fx import Graph, GraphModule
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.fx.graph_module import _copy_attr

from .graph_utils import GraphBuilder, aten, fake, prims, size_sources
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
    returns the rewritten graph as a module taking and returning what `gm` does. Raises Dynamo's
    restart (see the module docstring) when `gm` has float inputs to specialise first."""
    if not _has_topk(gm):  # no routing (every spelling ends in a top-k): spare the export
        return BeforeAutograd(None, GraphReport(collector.next_index()), False)
    floats = _float_inputs(gm)
    if floats:
        return BeforeAutograd(None, _specialise_floats(floats), True)
    # Outside Dynamo's tracing context: export would otherwise trace in Dynamo's fake mode and add its
    # own symbols and guards to the shape environment whose guards protect this graph; the rewrites
    # then compute in export's fake mode.
    with torch._guards.tracing(None):
        program = _export(gm, example_inputs)
        if isinstance(program, str):
            return BeforeAutograd(None, _refused(f"{program}; it is rewritten after autograd only, where the "
                                                 "routing is saved for the backward"), True)
        graph = program.graph_module.graph
        # Export's dtype assertions have side effects: they would keep alive what the rewrites leave
        # dead (Inductor drops them anyway).
        for node in graph.find_nodes(op="call_function", target=aten._assert_tensor_metadata.default):
            graph.erase_node(node)
        report = run_rewrites(graph)
        if not report.rewrites:
            return BeforeAutograd(None, report, False)
        _make_differentiable(graph)
        program.graph_module.recompile()
        return BeforeAutograd(_plain_module(program.module()), report, False)


def placeholder_examples(gm: GraphModule) -> list[Any]:
    """Example inputs for `rewrite_before_autograd` where only the graph is at hand (Inductor's pre-grad
    pass): tensors in a fresh fake mode (no memory, none of Dynamo's symbols) of the sizes Dynamo traced
    with, symbolic size inputs as Dynamo's SymInts (rewrite_before_autograd reads their values)."""
    mode = FakeTensorMode(shape_env=ShapeEnv())
    examples = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        traced = node.meta.get("example_value")
        if isinstance(traced, torch.Tensor):
            sizes = [size.node.hint if isinstance(size, torch.SymInt) else size for size in traced.shape]
            with mode:
                example = torch.empty(sizes, dtype=traced.dtype, device=traced.device)
            traced = example.requires_grad_(traced.requires_grad)
        examples.append(traced)
    return examples


def replace_graph(gm: GraphModule, module: GraphModule) -> None:
    """Makes `gm` compute `module` (same inputs and outputs) in place: its nodes, and the attributes
    they read, become `module`'s; the placeholders stay."""
    graph = gm.graph
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    for node in reversed(list(graph.nodes)):
        if node.op != "placeholder":
            graph.erase_node(node)
    inputs = [node for node in module.graph.nodes if node.op == "placeholder"]
    value_map = dict(zip(inputs, placeholders, strict=True))
    graph.output(graph.graph_copy(module.graph, value_map))  # appended after the placeholders
    for node in module.graph.nodes:
        if node.op == "get_attr":
            _copy_attr(module, gm, node.target)
    gm.recompile()


def _export(gm: GraphModule, example_inputs: list[Any]) -> torch.export.ExportedProgram | str:
    """`gm` as functional ATen with Inductor's decompositions, its symbolic sizes kept symbolic; or why not."""
    inputs = _export_inputs(gm, example_inputs)
    if isinstance(inputs, str):
        return inputs
    args, dynamic_shapes = inputs
    # Dynamo's modules take `*args`: the dynamic shapes of that one parameter are the tuple.
    varargs = any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(gm.forward).parameters.values())
    try:
        from torch._inductor.decomposition import select_decomp_table

        program = torch.export.export(gm, args, dynamic_shapes=(dynamic_shapes,) if varargs else dynamic_shapes,
                                      strict=False)
        program = program.run_decompositions(select_decomp_table())
    except Exception as err:  # export cannot trace every graph; the post-grad path still can
        return f"torch.export could not trace the graph ({type(err).__name__}: {err})"
    specialised = _specialised_sizes(program, dynamic_shapes)
    if specialised:
        return f"torch.export made sizes constant that Dynamo keeps symbolic ({specialised})"
    return program


def _export_inputs(gm: GraphModule, example_inputs: list[Any]) -> tuple[tuple, tuple] | str:
    """torch.export's arguments for Dynamo's graph: the example values (a symbolic size input as its
    current value) and dynamic shapes that keep every size Dynamo made symbolic symbolic (Dim.AUTO:
    export relates them as the graph does); or why the graph cannot be exported."""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    args, dynamic_shapes = [], []
    for node, value in zip(placeholders, example_inputs, strict=True):
        traced = node.meta.get("example_value")
        if isinstance(value, torch.SymInt):
            args.append(value.node.hint)
            dynamic_shapes.append(Dim.AUTO)
        elif isinstance(value, torch.Tensor) and isinstance(traced, torch.Tensor):
            args.append(value)
            symbolic = {dim: Dim.AUTO for dim, size in enumerate(traced.shape) if not isinstance(size, int)}
            dynamic_shapes.append(symbolic or None)
        else:
            return f"the graph has an input of type {type(value).__name__} ({node.name}) that export does not take"
    return tuple(args), tuple(dynamic_shapes)


def _specialised_sizes(program: torch.export.ExportedProgram, dynamic_shapes: tuple) -> str:
    """The inputs' sizes marked dynamic that the exported program made constants (export specialises a
    size when the graph's code needs it, where Dynamo would have guarded on it instead), as text."""
    from torch.export.graph_signature import ConstantArgument, InputKind

    values = {node.name: node.meta.get("val") for node in program.graph.nodes if node.op == "placeholder"}
    user_inputs = [spec.arg for spec in program.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT]
    specialised = []
    for position, (arg, dims) in enumerate(zip(user_inputs, dynamic_shapes, strict=True)):
        value = arg.value if isinstance(arg, ConstantArgument) else values[arg.name]
        if dims is Dim.AUTO and isinstance(value, int):
            specialised.append(f"input {position} = {value}")
        elif isinstance(dims, dict):
            specialised += [f"input {position} size({dim}) = {value.shape[dim]}" for dim in dims
                            if isinstance(value.shape[dim], int)]
    return ", ".join(specialised)


def _float_inputs(gm: GraphModule) -> dict[str, str]:
    """Dynamo's float inputs (0-dim tensors that the graph only reads with .item()): the name of each
    one's symbolic float -> the input's name."""
    floats = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        traced = node.meta.get("example_value")
        memo = getattr(traced, "item_memo", None)
        if (memo is not None and node.users and all(user.target == "item" for user in node.users)
                and hasattr(memo.node._expr, "name")):
            floats[memo.node._expr.name] = node.name
    return floats


def _specialise_floats(floats: dict[str, str]) -> GraphReport:
    """Asks Dynamo to trace again with `floats` specialised, by the restart Inductor's float pass raises;
    the refusal to report where Dynamo specialised them already and still passes them."""
    from torch._dynamo.exc import TensorifyScalarRestartAnalysis
    from torch._dynamo.symbolic_convert import TensorifyState

    if not any(TensorifyState.should_specialize(symbol) for symbol in floats):
        for symbol in floats:
            TensorifyState.specialize(symbol)
        raise TensorifyScalarRestartAnalysis
    return _refused(f"Dynamo passes Python floats as graph inputs ({', '.join(floats.values())}; dynamic=True) "
                    "although they were to be specialised; torch.export cannot trace the model's ops on them. "
                    "torch._dynamo.config.specialize_float = True avoids this")


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
                destination, source = node.args[:2]
                out = fake(node)
                converted = build.call(aten._to_copy.default, (source,), {"dtype": out.dtype})
                # Symbolic sizes are read from the destination (same shape), never written as export's symbols.
                sizes = build.sizes(size_sources(out.shape, [destination]))
                value = build.call(aten.clone.default, (build.call(aten.expand.default, (converted, sizes)),))
        node.replace_all_uses_with(value)
        graph.erase_node(node)
