"""Small helpers for reading post-grad FX graphs: tensor metadata, constants, op identity."""

from __future__ import annotations

from typing import Any

import torch
from torch._guards import detect_fake_mode
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten
prims = torch.ops.prims

RESHAPES = {aten.reshape.default, aten.view.default, aten._unsafe_view.default}
IDENTITIES = {aten.clone.default, aten.alias.default, aten.detach.default}


def fake(node: Any) -> torch.Tensor | None:
    """The fake tensor a node computes, or None (non-tensor or no metadata)."""
    if not isinstance(node, Node):
        return None
    value = node.meta.get("val")
    return value if isinstance(value, torch.Tensor) else None


def static_int(value: Any) -> int | None:
    """A Python int, or a SymInt with a known value; None for anything symbolic."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, torch.SymInt):
        return value.node.maybe_as_int()
    return None


def same_size(a: Any, b: Any) -> bool:
    """Whether two (possibly symbolic) sizes are provably equal."""
    return a == b if isinstance(a, int) and isinstance(b, int) else statically_known_true(a == b)


def same_shape(a: torch.Size | tuple, b: torch.Size | tuple) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def size_sources(shape, likes: list[Node]) -> list[int | tuple[Node, int]] | None:
    """How to build `shape` as a reshape argument: static sizes as ints, each symbolic one as
    (node, dim) of one of `likes` with the same size there (read with aten.sym_size); None if a
    symbolic size has no source."""
    sources: list[int | tuple[Node, int]] = []
    for size in shape:
        value = static_int(size)
        if value is not None:
            sources.append(value)
            continue
        found = next(((like, j) for like in likes if fake(like) is not None
                      for j, other in enumerate(fake(like).shape)
                      if static_int(other) is None and same_size(other, size)), None)
        if found is None:
            return None
        sources.append(found)
    return sources


def shape_arg(shape) -> list[int]:
    """`shape` as a reshape argument: its sizes, with -1 for the one symbolic size (if any).

    Raises ValueError when several sizes are symbolic (the graph would need size nodes)."""
    dims = [static_int(d) for d in shape]
    symbolic = [i for i, d in enumerate(dims) if d is None]
    if len(symbolic) > 1:
        raise ValueError(f"cannot express a shape with {len(symbolic)} symbolic sizes as a reshape argument")
    return [-1 if d is None else d for d in dims]


def is_last_dim(dim: Any, ndim: int) -> bool:
    return dim == -1 or dim == ndim - 1


def strip_views(node: Any, ops: set | None = None) -> Any:
    """The tensor a chain of reshapes and identities (or the given ops) starts from."""
    ops = RESHAPES | IDENTITIES if ops is None else ops
    while isinstance(node, Node) and node.target in ops:
        node = node.args[0]
    return node


def scalar_constant(arg: Any) -> float | int | bool | None:
    """A Python scalar, or the value of a 0-d constant tensor built in the graph (aten.full([]))."""
    if isinstance(arg, (bool, int, float)):
        return arg
    if isinstance(arg, Node) and arg.op == "call_function":
        if arg.target == aten.full.default and list(arg.args[0]) == []:
            return arg.args[1]
        if arg.target == aten.scalar_tensor.default:
            return arg.args[0]
    return None


def silu_core(node: Any) -> Node | None:
    """g when `node` computes silu(g) as silu(g), g * sigmoid(g) or g / (1 + exp(-g))."""
    if not isinstance(node, Node):
        return None
    if node.target == aten.silu.default:
        return node.args[0]
    if node.target == aten.mul.Tensor:
        a, b = node.args[:2]
        for g, s in ((a, b), (b, a)):
            if isinstance(s, Node) and s.target == aten.sigmoid.default and s.args[0] is g:
                return g
    if node.target == aten.div.Tensor:
        g, denominator = node.args[:2]
        if isinstance(denominator, Node) and denominator.target == aten.add.Tensor:
            e, one = denominator.args[:2]
            if scalar_constant(e) == 1:
                e, one = one, e
            if scalar_constant(one) == 1 and isinstance(e, Node) and e.target == aten.exp.default:
                negated = e.args[0]
                if isinstance(negated, Node) and negated.target == aten.neg.default and negated.args[0] is g:
                    return g
    return None


def silu_input(node: Any) -> Node | None:
    """g when `node` computes silu(g), also in the form eager uses for 16-bit g: computed in float32
    and rounded back, convert(silu(convert(g, float32)), g.dtype)."""
    if isinstance(node, Node) and node.target == prims.convert_element_type.default:
        upcast = silu_core(node.args[0])
        if isinstance(upcast, Node) and upcast.target == prims.convert_element_type.default \
                and upcast.args[1] == torch.float32 and fake(upcast.args[0]) is not None \
                and fake(upcast.args[0]).dtype == node.args[1]:
            return upcast.args[0]
        return None
    return silu_core(node)


def kwarg_or_arg(node: Node, position: int, name: str, default: Any) -> Any:
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def describe_location(node: Node) -> str:
    """Where a node came from in user code: module path and source line, as far as known."""
    parts = []
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, _ = list(stack.values())[-1]
        parts.append(str(path))
    trace = node.meta.get("stack_trace")
    if trace:
        lines = [line.strip() for line in trace.strip().splitlines() if line.strip().startswith("File ")]
        if lines:
            parts.append(lines[-1])
    return " | ".join(parts) if parts else node.name


class GraphBuilder:
    """Inserts call_function nodes with their fake values (what Inductor needs to lower them)."""

    def __init__(self, graph: Graph, example: Node) -> None:
        self.graph = graph
        self.fake_mode = detect_fake_mode([fake(example)])

    def call(self, target: Any, args: tuple, kwargs: dict | None = None) -> Node:
        node = self.graph.call_function(target, args, kwargs)
        with self.fake_mode:
            node.meta["val"] = target(*_values(args), **(kwargs or {}))
        return node

    def sizes(self, shape_sources: list) -> list[int | Node]:
        """`shape_sources` (see size_sources) as a size-list argument; symbolic sizes read with aten.sym_size."""
        return [s if isinstance(s, int) else self.call(aten.sym_size.int, s) for s in shape_sources]

    def reshape_like(self, tensor: Node, shape_sources: list) -> Node:
        """tensor reshaped to `shape_sources` (see size_sources)."""
        return self.call(aten.reshape.default, (tensor, self.sizes(shape_sources)))

    def conform(self, tensor: Node, target: torch.Tensor, shape_sources: list | None) -> Node:
        """tensor in the shape and dtype of `target` (shape_sources from size_sources when they differ)."""
        if not same_shape(fake(tensor).shape, target.shape):
            tensor = self.reshape_like(tensor, shape_sources)
        if fake(tensor).dtype != target.dtype:
            tensor = self.call(prims.convert_element_type.default, (tensor, target.dtype))
        return tensor


def _values(args: Any) -> Any:
    if isinstance(args, Node):
        return args.meta["val"]
    if isinstance(args, (list, tuple)):
        return type(args)(_values(a) for a in args)
    return args
