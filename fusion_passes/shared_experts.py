"""Shared-expert rewrite: ``routed + shared_mlp(x)`` becomes one ``fused_experts`` call.

It runs after the experts rewrite, on each ``fused_experts`` (without shared slots) whose output is
added to a separate shared MLP ``down(silu(gate(x)) * up(x))`` of the same tokens, possibly gated
per token by ``sigmoid(x @ w)`` (Qwen2-MoE). The add may be Inductor's
``addmm(routed, h, W_down.T)``: the shared MLP's down projection folded into it (2-D tokens, as
torchtitan main adds them). A shared MLP of intermediate size ``S*I`` is the sum of ``S`` experts of
the routed size ``I``, so the rewrite asks a copy of the fused gate for ``S`` extra columns (ids
``E..E+S-1``, weight 1) and passes the shared MLP's own Linear weights to ``fused_experts`` as those
slots: nothing is copied. Other readers of the gate's outputs (torchtitan's load-balancing counts)
read the copy's first ``k`` columns, the same picks and weights, so one gate runs. A routed scaling
applied to the routed output (``routed * rsf + shared``) moves into the gate's weights. Routed
weights computed after the gate (times a run-time scalar, a float that ``torch.compile(dynamic=True)``
made a graph input; renormalised by ``clamp(sum, min)``, as ERNIE-4.5 does) keep being computed from
the copy's first ``k`` columns, the shared columns are appended to them, and a routed scaling
multiplies them (inside the gate a renormalisation would undo it).

Anything else between the routed sum and the add (a norm, a projection, an average), a shared MLP
that reads other tokens, another activation or biased Linears: the graph is left as it was and the
report says why.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Graph, Node

from .graph_utils import (
    RESHAPES,
    GraphBuilder,
    aten,
    describe_location,
    fake,
    silu_input,
    same_shape,
    same_size,
    scalar_constant,
    size_sources,
    static_int,
    strip_views,
)
from .report import Refusal, Rewrite

PASS_NAME = "shared_experts"
GATE_OP = torch.ops.moe_fusion.moe_fused_gate.default
EXPERTS_OP = torch.ops.moe_fusion.fused_experts.default
_SHARED_ARG = 11  # num_fused_shared_experts in the gate's schema
_SCALE_ARG = 10  # routed_scaling_factor


@dataclass(frozen=True)
class WeightRows:
    """Rows start:stop:step of a Linear's weight: the gate or the up half of a fused gate_up Linear
    (blocks of rows, or interleaved rows). The rewrite passes them as a view, never a copy."""

    weight: Node
    start: int
    stop: int
    step: int


@dataclass
class Linear:
    """x @ W.T (an nn.Linear without bias), possibly through reshapes for 3-D inputs; or a block of its
    output columns, x @ W[rows].T."""

    x: Node
    weight: Node | WeightRows


def _linear(node: Any) -> Linear | None:
    node = strip_views(node)
    if not (isinstance(node, Node) and node.target == aten.mm.default):
        return None
    return _times_transposed(*node.args[:2])


def _times_transposed(x: Any, transposed: Any) -> Linear | None:
    """x @ W.T when `transposed` is permute(W, [1, 0])."""
    if not (isinstance(transposed, Node) and transposed.target == aten.permute.default
            and list(transposed.args[1]) == [1, 0]):
        return None
    return Linear(strip_views(x), transposed.args[0])


def _weight_value(weight: Node | WeightRows) -> torch.Tensor:
    if isinstance(weight, WeightRows):
        return fake(weight.weight)[weight.start:weight.stop:weight.step]
    return fake(weight)


def _weight_text(weight: Node | WeightRows) -> str:
    if isinstance(weight, WeightRows):
        step = f":{weight.step}" if weight.step != 1 else ""
        return f"{weight.weight.name}[{weight.start}:{weight.stop}{step}]"
    return weight.name


def _columns_of_linear(node: Any) -> Linear | None:
    """`node` as columns start:stop:step of a Linear's output (the gate or up half of a fused gate_up
    Linear: x @ W.T split, chunked, sliced, or unbound from [.., n, m] in the last dimension): the
    Linear of the matching weight rows, or None."""
    if not isinstance(node, Node):
        return None
    if node.target == aten.slice.Tensor:
        source, dim, start, end, step = (list(node.args) + [0, None, None, 1][len(node.args) - 1:])[:5]
        columns = _output_columns(source, dim)
        if columns is None:
            return None
        linear, width = columns
        start, stop = slice(start, end, step).indices(width)[:2]
        return Linear(linear.x, WeightRows(linear.weight, start, stop, step))
    if node.target is not operator.getitem or not isinstance(node.args[0], Node):
        return None
    parts, index = node.args
    if parts.target in (aten.split.Tensor, aten.split_with_sizes.default):
        source, sizes, dim = (list(parts.args) + [0])[:3]
        columns = _output_columns(source, dim)
        if columns is None:
            return None
        linear, width = columns
        sizes = [sizes] * (-(-width // sizes)) if isinstance(sizes, int) else list(sizes)
        start = sum(sizes[:index])
        return Linear(linear.x, WeightRows(linear.weight, start, min(start + sizes[index], width), 1))
    if parts.target == aten.unbind.int and isinstance(parts.args[0], Node):
        grouped = parts.args[0]  # [.., n, m] from the Linear's [.., n*m]: column j*m + index is element (j, index)
        shape = fake(grouped).shape
        dim = parts.args[1] if len(parts.args) > 1 else 0
        if grouped.target not in RESHAPES or dim not in (-1, len(shape) - 1):
            return None
        columns = _output_columns(grouped.args[0], -1)
        group = static_int(shape[-1])
        if columns is None or group is None or static_int(shape[-2]) is None \
                or static_int(shape[-2]) * group != columns[1]:
            return None
        linear, width = columns
        return Linear(linear.x, WeightRows(linear.weight, index, width, group))
    return None


def _output_columns(source: Any, dim: Any) -> tuple[Linear, int] | None:
    """(the Linear, its output width) when `source` is a Linear's output (through token reshapes that
    keep the last dimension) and `dim` its last dimension."""
    linear = _linear(source)
    if linear is None or not isinstance(dim, int):
        return None
    shape = fake(source).shape
    width = static_int(shape[-1])
    if dim not in (-1, len(shape) - 1) or width is None or width != static_int(fake(strip_views(source)).shape[-1]):
        return None
    return linear, width


def _projection(node: Any) -> Linear | None:
    """x @ W.T, or a block of its columns (see _columns_of_linear)."""
    return _linear(node) or _columns_of_linear(strip_views(node))


@dataclass
class SharedMLP:
    x: Node  # the tokens (reshapes stripped)
    gate: Node | WeightRows  # [S*I, H]
    up: Node | WeightRows  # [S*I, H]
    down: Node  # [H, S*I]
    token_gate: Node | None  # sigmoid(x @ w) of a gated shared expert, [.., 1]


def _shared_mlp(node: Any) -> SharedMLP | str | None:
    """The shared MLP computing `node`, a reason it cannot be fused, or None (not an MLP at all)."""
    token_gate = None
    stripped = strip_views(node)
    if isinstance(stripped, Node) and stripped.target == aten.mul.Tensor:  # sigmoid(x @ w) * mlp(x)
        for gate_side, mlp_side in (stripped.args[:2], stripped.args[1::-1]):
            g = strip_views(gate_side)
            if isinstance(g, Node) and g.target == aten.sigmoid.default and _linear(g.args[0]) is not None \
                    and static_int(fake(strip_views(g.args[0])).shape[-1]) == 1:
                token_gate, stripped = gate_side, strip_views(mlp_side)
                break
    down = _linear(stripped)
    if down is None:
        if isinstance(stripped, Node) and stripped.target == aten.addmm.default:
            return "the shared MLP's Linear layers have biases, which fused_experts does not take"
        return None
    return _mlp_below(down, token_gate)


def _mlp_below(down: Linear, token_gate: Node | None) -> SharedMLP | str | None:
    """The shared MLP whose down projection is `down`, a reason it cannot be fused, or None."""
    product = down.x
    if not (isinstance(product, Node) and product.target == aten.mul.Tensor):
        return None
    for act, up_side in (product.args[:2], product.args[1::-1]):
        up = _projection(up_side)
        if up is None or _projection(act) is not None:
            continue
        pre_activation = silu_input(strip_views(act))
        gate = _projection(pre_activation)
        if gate is None:
            return "the shared MLP's activation is not SiLU"
        if gate.x is not up.x:
            return "the shared MLP's gate and up projections read different inputs"
        return SharedMLP(gate.x, gate.weight, up.weight, down.weight, token_gate)
    return None


@dataclass
class _Plan:
    add: Node
    experts: Node
    shared: SharedMLP
    slots: int
    scale: float | None
    shape_sources: list  # how to shape the fused output like the add (graph_utils.size_sources)
    reading: _GateReading  # the fused gate the routed experts read, and their weights


def _routed_side(node: Any, experts_nodes: set[Node]) -> tuple[Node, float | None] | str | None:
    """(fused_experts node, routed scale or None) if `node` is its output (reshaped, maybe scaled by a
    constant); a reason if a fused_experts output reaches `node` through something else; else None."""
    stripped, scale = strip_views(node), None
    if isinstance(stripped, Node) and stripped.target == aten.mul.Tensor:
        a, b = stripped.args[:2]
        for out, factor in ((a, b), (b, a)):
            if strip_views(out) in experts_nodes and isinstance(scalar_constant(factor), (int, float)):
                stripped, scale = strip_views(out), float(scalar_constant(factor))
                break
    if stripped in experts_nodes:
        return stripped, scale
    frontier, seen = [stripped], set()
    for _ in range(4):  # a few ops up: is there a routed output behind something else?
        frontier = [a for n in frontier if isinstance(n, Node) for a in n.all_input_nodes if a not in seen]
        seen.update(frontier)
        if any(n in experts_nodes for n in frontier):
            return f"{stripped.target} (node {stripped.name}) sits between the routed experts' sum and the add"
    return None


def rewrite_shared_experts(graph: Graph, options: Any = None) -> tuple[list[Rewrite], list[Refusal]]:
    experts_nodes = {n for n in graph.nodes if n.target == EXPERTS_OP and n.args[6] is None}
    rewrites, refusals = [], []
    if not experts_nodes:
        return rewrites, refusals
    for node in list(graph.nodes):
        if node.target not in (aten.add.Tensor, aten.addmm.default) \
                or node.kwargs.get("alpha", 1) != 1 or node.kwargs.get("beta", 1) != 1:
            continue
        plan = _plan(node, experts_nodes)
        if plan is None:
            continue
        location = describe_location(node)
        if isinstance(plan, str):
            refusals.append(Refusal(PASS_NAME, location, plan))
            continue
        _emit(graph, plan)
        experts_nodes.discard(plan.experts)
        rewrites.append(Rewrite(PASS_NAME, location, _spelling(plan), dict(
            shared_slots=plan.slots, gate=_weight_text(plan.shared.gate), up=_weight_text(plan.shared.up),
            down=plan.shared.down.name,
            token_gate=plan.shared.token_gate is not None,
            routed_scale_moved_to_gate=plan.scale if plan.reading.derived is None else None,
            routed_scale_on_weights=plan.scale if plan.reading.derived is not None else None)))
    if rewrites:
        graph.eliminate_dead_code()
        graph.lint()
    return rewrites, refusals


def _spelling(plan: _Plan) -> str:
    parts = [f"routed{' * rsf' if plan.scale is not None else ''} + shared MLP",
             f"{plan.slots} shared slot(s) of the routed intermediate size"]
    if plan.shared.token_gate is not None:
        parts.append("sigmoid-gated per token")
    if plan.reading.derived is not None:
        parts.append("routed weights computed after the gate (shared columns appended to them)")
    return "; ".join(parts)


def _plan(add: Node, experts_nodes: set[Node]) -> _Plan | str | None:
    for routed_arg, shared_arg, shared in _readings(add):
        if shared is None:
            continue
        routed = _routed_side(routed_arg, experts_nodes)
        if routed is None:
            continue
        if isinstance(shared, str):
            return shared
        if isinstance(routed, str):
            return routed
        experts, scale = routed
        return _check(add, experts, shared, scale, routed_arg, shared_arg)
    return None


def _readings(add: Node) -> list[tuple[Node, Node | None, SharedMLP | str | None]]:
    """The ways to read `add` as routed + shared: (routed side, shared side, its shared MLP). a + b
    either way round, or addmm(routed, h, W.T): Inductor folds a 2-D add of a Linear's output into the
    Linear (on the CPU always, on CUDA unless only pointwise ops read the sum); the shared output then
    exists only inside the addmm."""
    if add.target == aten.addmm.default:
        routed, h, transposed = add.args[:3]
        down = _times_transposed(h, transposed)
        return [(routed, None, _mlp_below(down, None) if down is not None else None)]
    a, b = add.args[:2]
    return [(a, b, _shared_mlp(b)), (b, a, _shared_mlp(a))]


def _check(add: Node, experts: Node, shared: SharedMLP, scale: float | None, routed_arg: Node,
           shared_arg: Node | None) -> _Plan | str:
    hidden, w_down = experts.args[0], experts.args[5]
    if strip_views(hidden) is not shared.x and shared.x is not hidden:
        return "the shared MLP does not read the tokens the routed experts read"
    x, inter = fake(hidden), static_int(fake(w_down).shape[2])
    gate_shape, down_shape = _weight_value(shared.gate).shape, fake(shared.down).shape
    total = static_int(gate_shape[0])
    if total is None or inter is None or total % inter:
        return f"the shared MLP's intermediate size ({total}) is not a multiple of the experts' ({inter})"
    if not (same_size(gate_shape[1], x.shape[-1]) and same_shape(_weight_value(shared.up).shape, gate_shape)
            and same_shape(down_shape, (x.shape[-1], total))):
        return "the shared MLP's weights do not have the shapes [S*I, H], [S*I, H], [H, S*I]"
    if len({_weight_value(w).dtype for w in (shared.gate, shared.up, shared.down)} | {x.dtype}) != 1:
        return "the shared MLP's weights and the hidden states have different dtypes"
    shared_reused = shared_arg is not None and not _used_once(shared_arg, strip_views(shared_arg))
    if not _used_once(routed_arg, experts) or shared_reused:
        return "the routed or the shared output is also used elsewhere; fusing would compute it twice"
    reading = _gate_of(experts)
    if reading is None:
        return ("the routed experts' ids are not a fused gate's own [T, K] picks, or their weights are not "
                "[T, K], so shared columns cannot be added to them")
    gate_node = reading.gate
    if gate_node.args[12]:
        return "the fused gate leaves the routed scaling to its caller"
    if scale is not None and reading.derived is None and gate_node.args[_SCALE_ARG] != 1.0:
        return "the routed output is scaled after weights that are already scaled"
    if not same_size(fake(add).numel(), x.numel()):
        return "the add broadcasts the expert outputs"
    if shared.token_gate is not None and not same_size(fake(shared.token_gate).numel(), x.shape[0]):
        return "the shared expert's gate is not one value per token"
    sources = size_sources(fake(add).shape, [hidden, strip_views(hidden), shared.x])
    if sources is None:
        return "the block's output shape cannot be rebuilt from the hidden states' sizes"
    return _Plan(add, experts, shared, total // inter, scale, sources, reading)


def _used_once(node: Node, origin: Node) -> bool:
    """Whether every node from `origin` up to `node` (reshapes, identities, a scaling) has one user."""
    while True:
        if len(node.users) != 1:
            return False
        if node is origin:
            return True
        node = next(a for a in node.all_input_nodes if isinstance(fake(a), torch.Tensor) and fake(a).dim() > 0)


@dataclass
class _GateReading:
    gate: Node  # the fused gate whose ids (and weights) the fused_experts node reads
    derived: Node | None  # the [T, K] weights it reads when they are not the gate's own


def _gate_of(experts: Node) -> _GateReading | None:
    """How the fused_experts node reads a fused gate without shared columns: its ids, and its weights or
    [T, K] weights computed after it (times a run-time scalar, such as a float torch.compile(dynamic=True)
    made a graph input; renormalised, as ERNIE-4.5 does: any per-pair weights serve)."""
    weights, ids = experts.args[1:3]
    if not (isinstance(ids, Node) and ids.target is operator.getitem and ids.args[1] == 1):
        return None
    gate = ids.args[0]
    if gate.target != GATE_OP or gate.args[_SHARED_ARG] != 0 or fake(weights) is None:
        return None
    if isinstance(weights, Node) and weights.target is operator.getitem and weights.args == (gate, 0):
        return _GateReading(gate, None)
    return _GateReading(gate, weights) if same_shape(fake(weights).shape, fake(ids).shape) else None


def _emit(graph: Graph, plan: _Plan) -> None:
    experts, shared, reading = plan.experts, plan.shared, plan.reading
    old_gate, topk = reading.gate, reading.gate.args[4]
    build = GraphBuilder(graph, experts.args[0])
    gate_args = list(old_gate.args)
    gate_args[_SHARED_ARG] = plan.slots
    if plan.scale is not None and reading.derived is None:
        gate_args[_SCALE_ARG] = plan.scale
    with graph.inserting_before(old_gate.next):  # before every reader of the old gate
        gate = build.call(GATE_OP, tuple(gate_args))
        weights = build.call(operator.getitem, (gate, 0))
        ids = build.call(operator.getitem, (gate, 1))
        # Contiguous, as the old outputs were: readers may view them (before autograd, views are checked).
        routed_ids, routed_weights = (build.call(aten.clone.default, (build.call(aten.slice.Tensor, (t, -1, 0, topk)),))
                                      for t in (ids, weights))
    # The first k columns are the same picks, and the same weights unless the routed scaling moved into
    # the gate: other readers of the old gate (e.g. torchtitan's load-balancing counts, or the ops
    # computing derived weights) read them, so that one gate runs. Readers of weights the scaling
    # changed keep the old gate.
    same_weights = gate_args[_SCALE_ARG] == old_gate.args[_SCALE_ARG]
    for old_output in list(old_gate.users):
        if old_output.args[1] == 1 or same_weights:
            old_output.replace_all_uses_with(routed_ids if old_output.args[1] == 1 else routed_weights)
    with graph.inserting_before(plan.add):
        if reading.derived is not None:  # computed from the routed columns: the shared ones follow them
            routed = reading.derived
            if plan.scale is not None:  # on the weights, not inside the gate: they may be renormalised
                routed = build.call(aten.mul.Tensor, (routed, plan.scale))
            shared_columns = build.call(aten.slice.Tensor, (weights, -1, topk, topk + plan.slots))
            weights = build.call(aten.cat.default, ([routed, shared_columns], -1))
        token_weight = None
        if shared.token_gate is not None:
            token_weight = build.call(aten.reshape.default, (shared.token_gate, [-1]))
        shared_gate, shared_up = (build.call(aten.slice.Tensor, (w.weight, 0, w.start, w.stop, w.step))
                                  if isinstance(w, WeightRows) else w for w in (shared.gate, shared.up))
        fused = build.call(EXPERTS_OP, (experts.args[0], weights, ids, *experts.args[3:6], shared_gate, shared_up,
                                        shared.down, token_weight))
        result = build.conform(fused, fake(plan.add), plan.shape_sources)
    plan.add.replace_all_uses_with(result)
