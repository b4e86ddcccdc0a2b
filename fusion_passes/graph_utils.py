"""Small helpers for reading post-grad FX graphs: tensor metadata, constants, op identity."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Node
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


def static_shape(tensor: torch.Tensor) -> tuple[int, ...] | None:
    dims = tuple(static_int(d) for d in tensor.shape)
    return None if any(d is None for d in dims) else dims


def same_size(a: Any, b: Any) -> bool:
    """Whether two (possibly symbolic) sizes are provably equal."""
    return a == b if isinstance(a, int) and isinstance(b, int) else statically_known_true(a == b)


def same_shape(a: torch.Size | tuple, b: torch.Size | tuple) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def numel_of(shape) -> Any:
    total = 1
    for d in shape:
        total = total * d
    return total


def is_last_dim(dim: Any, ndim: int) -> bool:
    return dim == -1 or dim == ndim - 1


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


def getitem_users(node: Node, index: int) -> list[Node]:
    return [u for u in node.users if u.target is operator.getitem and u.args[1] == index]


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
