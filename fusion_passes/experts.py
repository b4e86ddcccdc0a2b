"""Experts rewrite: the routed experts computation becomes one ``moe_fusion::fused_experts``.

It runs after the routing rewrite and starts from each fused gate's outputs (the per-token expert
ids and weights). Like the routing rewrite, it reads the post-grad graph forward and gives nodes a
meaning ("the pairs sorted by expert", "x @ W_e^T for each sorted pair", "silu(gate) * up",
"the down projection weighted by the routing weight, back in pair order", "the sum over the k picks")
with one rule per ATen op that checks every argument. Four public implementations are covered:

- transformers v5 ``grouped_mm``: sort the (token, pick) pairs by expert, gather the tokens' rows,
  ``histc`` + ``cumsum`` offsets, ``_grouped_mm`` (or transformers' CPU fallback op) for gate_up and
  down, weight, un-permute with the inverse permutation, sum over the picks;
- transformers v5 ``batched_mm``: replicate each token's row per pick, gather the experts' weight
  matrices by id, ``bmm`` for gate_up and down, weight, sum over the picks;
- torchtitan's grouped experts (torchtitan/models/moe/moe.py): ``histc`` of the ids, ``argsort`` by
  expert, the tokens' rows by ``gather`` with the sorted token index expanded over the hidden size,
  ``_grouped_mm`` with separate w1, w3, w2, weight, ``scatter_add`` at the tokens' rows onto zeros or
  onto the shared expert's output (``base``): the rewrite then gives ``fused_experts(..) + base``,
  which the shared-expert rewrite folds; newer torchtitan takes the rows as ``x[perm // k]`` and
  combines with its custom op ``torchtitan::deterministic_scatter_add`` (a scatter_add);
- torchtitan main's (torchtitan/models/common/moe/moe.py): the same up to the experts, with the rows
  taken as ``x[perm // k]``; the outputs are un-sorted into zeros (``out[perm] = rows``), viewed
  ``[T, K, H]``, and weighted and summed over the picks by ``bmm(weights [T, 1, K], outputs [T, K, H]
  in float32)`` (fused_experts accumulates in float32 too); the shared expert's output is added to
  that (``shared + routed``), which the shared-expert rewrite folds. Without expert parallelism its
  experts run inside ``indices_padding_wrapper`` (torchtitan/models/common/moe/utils.py), which moves
  the rows from rank-major to expert-major order and back by an index built from the counts
  (``cumsum``, ``searchsorted``, a shift per group, ``index_put`` into an empty tensor); with one rank
  every shift is ``(cumsum(c) - c) - (cumsum(c) - c) = 0`` and the index is ``arange(rows)``, which
  the rules prove from the graph and read as an identity.

torchtitan's ``score_before_experts=True`` weights the expert *inputs*; for nonlinear experts that is
another function, so it is refused with that reason.

The transformers ones may guard against expert-parallel sentinels (ids >= E): clamps of the ids
and rows masked where ``ids >= E``. The fused gate's ids are below E, so those clamps and masks
change nothing and are read as identities.

The rewrite replaces the sum with ``fused_experts`` on the model's own weight tensors (views, no
copies); intermediates other code still uses keep being computed.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.fx import Graph, Node

from .graph_utils import (
    IDENTITIES,
    RESHAPES,
    GraphBuilder,
    aten,
    describe_location,
    fake,
    is_last_dim,
    silu_core,
    kwarg_or_arg,
    prims,
    same_shape,
    same_size,
    size_sources,
    static_int,
    strip_views,
)
from .report import Refusal, Rewrite

PASS_NAME = "experts"
GATE_OP = torch.ops.moe_fusion.moe_fused_gate.default
EXPERTS_OP = torch.ops.moe_fusion.fused_experts.default


def _grouped_mm_ops() -> set:
    ops = {aten._grouped_mm.default} if hasattr(aten, "_grouped_mm") else set()
    transformers_ops = getattr(torch.ops, "transformers", None)
    fallback = getattr(transformers_ops, "grouped_mm_fallback", None) if transformers_ops is not None else None
    if fallback is not None:  # registered when transformers is imported
        ops.add(fallback.default)
    return ops


# --------------------------------------------------------------------------------------------------
# Meanings


@dataclass(frozen=True)
class Route:
    """A fused gate: per token, `topk` expert ids and weights."""

    gate: Node
    num_experts: int
    topk: int


@dataclass(frozen=True)
class Ids:
    route: Route
    flat: bool  # [T*K] rather than [T, K]


@dataclass(frozen=True)
class RouteWeights:
    route: Route
    flat: bool
    source: Node  # the [T, K] weights tensor (the gate's, or the gate's rescaled: see _rescaled_weights)


@dataclass(frozen=True)
class SortPair:
    route: Route


@dataclass(frozen=True)
class SortOfPerm:  # sort(perm): its indices are the inverse permutation
    route: Route


@dataclass(frozen=True)
class SortedIds:
    route: Route


@dataclass(frozen=True)
class Perm:  # pair index of each sorted row
    route: Route


@dataclass(frozen=True)
class InversePerm:  # sorted row of each pair
    route: Route


@dataclass(frozen=True)
class RouteWeightsRow:
    """The [T, K] weights viewed [T, 1, K]: bmm with per-pick outputs [T, K, H] weights and sums them
    over each token's picks (torchtitan main's combine)."""

    route: Route
    source: Node


@dataclass(frozen=True)
class SortedTokens:
    """Token of each sorted row: [N], or [N, width] with the token along each row (the index with
    which gather / scatter_add move whole rows)."""

    route: Route
    width: int | None = None


@dataclass(frozen=True)
class SortedRows:  # x[token of each sorted row]
    route: Route
    x: Node


@dataclass(frozen=True)
class SortedWeights:
    route: Route
    source: Node


@dataclass(frozen=True)
class WeightedRows:
    """Sorted rows times their routing weights, before the experts (torchtitan's
    score_before_experts=True): E(w * x) is not w * E(x) for a nonlinear expert, and fused_experts
    computes the latter."""

    route: Route


@dataclass(frozen=True)
class NoPairs:
    """ids >= E (an expert-parallel sentinel test): all false, the gate's ids are below E."""

    route: Route


@dataclass(frozen=True)
class Counts:  # histc of the ids over the experts (as integers or exact floats), [E] or a view of it
    route: Route


@dataclass(frozen=True)
class Offsets:  # cumulative counts: the ends of the experts' groups of rows (grouped_mm's offs in int32)
    route: Route


@dataclass(frozen=True)
class GroupStarts:  # cumsum(counts) - counts: where each expert's group of sorted rows starts
    route: Route


@dataclass(frozen=True)
class NoShift:  # starts - starts of the same counts: zeros (integer arithmetic is exact)
    route: Route


@dataclass(frozen=True)
class GroupOfRow:
    """searchsorted(group ends, arange(pairs)): the expert group of each sorted row, in [0, E) because
    the counts add up to the pairs (every id lands in its own bin)."""

    route: Route


@dataclass(frozen=True)
class RowIdentity:  # arange(pairs) (+ zeros): the index of a row permutation that moves no row
    route: Route


# Per-expert vectors: views that keep their elements in expert order keep the meaning; the rules
# that consume them check that they are 1-D.
_PER_EXPERT = (Counts, Offsets, GroupStarts, NoShift)


@dataclass(frozen=True)
class ExpertMatrices:  # W[ids] for each pair: [T*K, N, H]
    route: Route
    weight: Node


@dataclass(frozen=True)
class Proj:
    """Rows [start, stop) of x @ W_e^T for each pair ("pair" order) or sorted row ("sorted")."""

    route: Route
    x: Node
    space: str
    weight: Node
    start: int
    stop: int
    column: bool = False  # [.., N, 1] before the squeeze of a bmm
    upcast: bool = False  # a 16-bit projection converted to float32 (for a float32 silu)


@dataclass(frozen=True)
class SplitProj:
    proj: Proj
    size: int


@dataclass(frozen=True)
class Activated:  # silu(proj)
    proj: Proj


@dataclass(frozen=True)
class Inter:  # silu(x @ gate_e^T) * (x @ up_e^T)
    route: Route
    x: Node
    space: str
    gate: tuple[Node, int, int]
    up: tuple[Node, int, int]
    column: bool = False


@dataclass(frozen=True)
class ExpertOut:  # Expert_e(x) per pair or sorted row, possibly times the routing weight
    inter: Inter
    down: Node
    space: str
    weights: Node | None  # the [T, K] routing weights it is multiplied by, if any
    column: bool = False
    per_pick: bool = False  # [T, K, H]


@dataclass(frozen=True)
class Routed:  # sum over the picks, [.., H], plus `base` when they are accumulated onto it
    out: ExpertOut
    base: Node | None = None


# --------------------------------------------------------------------------------------------------
# Analysis


def _permuted_weight(node: Any, route: Route) -> Node | None:
    """W when node is permute(W, [0, 2, 1]) of a [E, N, K] tensor (grouped_mm's right operand)."""
    if not (isinstance(node, Node) and node.target == aten.permute.default and list(node.args[1]) == [0, 2, 1]):
        return None
    weight = node.args[0]
    shape = fake(weight).shape if fake(weight) is not None else None
    if shape is None or len(shape) != 3 or static_int(shape[0]) != route.num_experts:
        return None
    return weight


def _spread_over_picks(node: Any, topk: int) -> Node | None:
    """v when node is expand(unsqueeze(v, 1), [T, K, ..]) (identities around it allowed)."""
    node = strip_views(node, IDENTITIES)
    if not (isinstance(node, Node) and node.target == aten.expand.default):
        return None
    unsqueezed = node.args[0]
    shape = fake(node).shape
    if not (isinstance(unsqueezed, Node) and unsqueezed.target == aten.unsqueeze.default and unsqueezed.args[1] == 1
            and len(shape) >= 2 and static_int(shape[1]) == topk):
        return None
    return unsqueezed.args[0]


def _arange_length(node: Any) -> Any:
    """n (an int or a SymInt) when node is arange(n) (prims.iota from 0 by 1), else None."""
    if not (isinstance(node, Node) and node.target == prims.iota.default and node.kwargs.get("start", 0) == 0
            and node.kwargs.get("step", 1) == 1 and fake(node) is not None):
        return None
    return fake(node).shape[0]


def _token_index(node: Any, topk: int) -> bool:
    """Whether node is the token of each (token, pick) pair: arange(T).unsqueeze(1).expand(-1, K).reshape(-1)."""
    tokens = _spread_over_picks(strip_views(node), topk)
    return _arange_length(tokens) is not None and fake(tokens).dim() == 1


def _zeros(node: Any) -> bool:
    return isinstance(node, Node) and (node.target == aten.zeros.default
                                       or node.target == aten.full.default and node.args[1] == 0)


def _pairs(route: Route) -> Any:
    """The number of (token, pick) pairs of a route: tokens times topk (possibly symbolic)."""
    tokens = 1
    for size in fake(route.gate.args[0]).shape[:-1]:
        tokens = tokens * size
    return tokens * route.topk


def _one_dim(node: Any) -> bool:
    return fake(node) is not None and fake(node).dim() == 1


def _keeps_element_order(node: Node) -> bool:
    """Whether a permute or a sum only moves or drops dims of size 1 (the elements keep their order)."""
    shape = fake(node.args[0]).shape
    if node.target == aten.permute.default:
        moved = [d for d in node.args[1] if static_int(shape[d]) != 1]
        return moved == sorted(moved)
    dims = node.args[1] if len(node.args) > 1 else None
    return dims is not None and all(static_int(shape[d]) == 1 for d in dims) \
        and not kwarg_or_arg(node, 2, "keepdim", False) and node.kwargs.get("dtype") is None


def _rows_per_pick(node: Any, topk: int) -> Node | None:
    """x when node holds each token's row once per pick, [T*K, H]: x[token of each pair], or
    repeat_interleave (unsqueeze + expand + clone + reshape as it decomposes)."""
    node = strip_views(node, IDENTITIES)
    if isinstance(node, Node) and node.target == aten.index.Tensor and len(node.args[1]) == 1 \
            and _token_index(node.args[1][0], topk):
        x = node.args[0]
    elif isinstance(node, Node) and node.target in RESHAPES:
        x = _spread_over_picks(node.args[0], topk)
    else:
        return None
    return x if fake(x) is not None and fake(x).dim() == 2 else None


class ExpertsAnalysis:
    def __init__(self, graph: Graph) -> None:
        self.meaning: dict[Node, Any] = {}
        self.grouped_mm = _grouped_mm_ops()
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            meaning = self._interpret(node)
            if meaning is not None:
                self.meaning[node] = meaning

    def of(self, arg: Any) -> Any:
        return self.meaning.get(arg) if isinstance(arg, Node) else None

    def _interpret(self, node: Node):
        if node.target is operator.getitem and isinstance(node.args[0], Node) and node.args[0].target == GATE_OP:
            return self._gate_output(node)
        if not any(a in self.meaning for a in node.all_input_nodes):
            return None
        if node.target in self.grouped_mm:
            return self.grouped_mm_rule(node)
        handler = _HANDLERS.get(node.target)
        if handler is None and isinstance(node.target, torch._ops.OpOverload):
            handler = _HANDLERS_BY_NAME.get(node.target.name())
        return handler(self, node) if handler is not None else None

    def _gate_output(self, node: Node):
        gate = node.args[0]
        topk, shared = gate.args[4], gate.args[11]
        if shared != 0:  # already carries fused shared columns
            return None
        route = Route(gate, int(fake(gate.args[0]).shape[-1]), topk)
        return Ids(route, False) if node.args[1] == 1 else RouteWeights(route, False, node)

    # ---- rules

    def reshape(self, node: Node):
        m, out, source = self.of(node.args[0]), fake(node), fake(node.args[0])
        if isinstance(m, (Ids, RouteWeights)) and not m.flat and out.dim() == 1:
            return replace(m, flat=True)
        if isinstance(m, RouteWeights) and out.dim() == 3 and static_int(out.shape[1]) == 1 \
                and static_int(out.shape[2]) == m.route.topk:
            return RouteWeightsRow(m.route, m.source)  # a reshape keeps the pairs' token-major order
        if isinstance(m, ExpertOut) and m.space == "pair" and not m.per_pick and not m.column and out.dim() == 3 \
                and static_int(out.shape[1]) == m.inter.route.topk and same_size(out.shape[2], source.shape[-1]):
            return replace(m, per_pick=True)
        if isinstance(m, Routed) and same_size(out.shape[-1], source.shape[-1]):
            return m  # token reshape
        if isinstance(m, _PER_EXPERT):
            return m  # a reshape keeps the elements' order
        column = source.dim() == 1 and out.dim() == 2 and static_int(out.shape[1]) == 1
        if isinstance(m, SortedTokens) and m.width is None and column:
            return replace(m, width=1)
        if isinstance(m, SortedWeights) and column:
            return m  # [N, 1] for broadcasting against [N, H]
        return None

    def expand(self, node: Node):
        m, out = self.of(node.args[0]), fake(node)
        width = static_int(out.shape[1]) if out.dim() == 2 else None
        if isinstance(m, SortedTokens) and m.width == 1 and width is not None \
                and same_size(out.shape[0], fake(node.args[0]).shape[0]):
            return replace(m, width=width)
        return None

    def identity(self, node: Node):
        return self.of(node.args[0])

    def convert(self, node: Node):
        m, dtype = self.of(node.args[0]), node.args[1]
        source = fake(node.args[0]).dtype
        if isinstance(m, (RouteWeights, RouteWeightsRow, SortedWeights)):
            return m  # the weights in another dtype
        if isinstance(m, (Ids, SortedIds)) and dtype in (torch.float32, torch.int32):
            return m  # exact for expert ids (histc takes float on the CPU, int on CUDA)
        if isinstance(m, Counts) and dtype in (torch.int32, torch.int64):
            return m  # float counts are whole numbers (histc counts exactly up to 2**24)
        # Eager runs silu on 16-bit tensors in float32 and rounds the result back.
        if isinstance(m, Proj) and not m.upcast and not m.column and dtype == torch.float32 and source != dtype:
            return replace(m, upcast=True)
        if isinstance(m, Activated) and m.proj.upcast and dtype == fake(m.proj.weight).dtype:
            return Activated(replace(m.proj, upcast=False))
        if isinstance(m, ExpertOut) and not m.column and dtype.is_floating_point \
                and (not m.per_pick or dtype == torch.float32):
            return m  # outputs cast before they are weighted or accumulated (per pick: only an exact upcast)
        if isinstance(m, Routed) and dtype == fake(m.out.inter.x).dtype:
            return m  # a sum computed in float32 (float32 routing weights) rounded to the hidden dtype
        return None

    def sort(self, node: Node):
        m = self.of(node.args[0])
        if self._ascending_over_pairs(node, m):
            return SortPair(m.route) if isinstance(m, Ids) else SortOfPerm(m.route)
        return None

    def argsort(self, node: Node):
        m = self.of(node.args[0])
        if self._ascending_over_pairs(node, m):
            return Perm(m.route) if isinstance(m, Ids) else InversePerm(m.route)
        return None

    @staticmethod
    def _ascending_over_pairs(node: Node, m: Any) -> bool:
        """An ascending sort of the flat ids (any order among equal ids does) or of a permutation."""
        dim, descending = kwarg_or_arg(node, 1, "dim", -1), kwarg_or_arg(node, 2, "descending", False)
        if "dim" in node.kwargs or "descending" in node.kwargs:  # the .stable overloads take keywords only
            dim, descending = node.kwargs.get("dim", -1), node.kwargs.get("descending", False)
        return (isinstance(m, Ids) and m.flat or isinstance(m, Perm)) and dim in (0, -1) and not descending

    def getitem(self, node: Node):
        m, index = self.of(node.args[0]), node.args[1]
        if isinstance(m, SortPair):
            return SortedIds(m.route) if index == 0 else Perm(m.route)
        if isinstance(m, SortOfPerm) and index == 1:
            return InversePerm(m.route)
        if isinstance(m, SplitProj) and index in (0, 1):
            start = m.proj.start + index * m.size
            return replace(m.proj, start=start, stop=start + m.size)
        return None

    def floor_divide(self, node: Node):
        m = self.of(node.args[0])
        if isinstance(m, Perm) and node.kwargs.get("rounding_mode") == "floor" and node.args[1] == m.route.topk:
            return SortedTokens(m.route)
        return None

    def index(self, node: Node):
        source, indices = node.args[:2]
        if len(indices) != 1 or not isinstance(indices[0], Node):
            return None
        by, m = self.of(indices[0]), self.of(source)
        if isinstance(by, GroupOfRow) and isinstance(m, NoShift) and _one_dim(source) and m.route == by.route:
            return m  # each row's group's shift: zero
        if isinstance(by, RowIdentity) and isinstance(m, SortedRows) and m.route == by.route \
                and same_size(fake(source).shape[0], _pairs(by.route)):
            return m  # rows[arange(rows)]
        if isinstance(by, SortedTokens) and by.width is None and m is None and fake(source) is not None \
                and fake(source).dim() == 2:
            return SortedRows(by.route, source)
        if isinstance(by, Perm) and m is None:  # x[token of each pair][perm]
            x = _rows_per_pick(source, by.route.topk)
            if x is not None:
                return SortedRows(by.route, x)
        if isinstance(by, Perm) and isinstance(m, Ids) and m.flat and m.route == by.route:
            return SortedIds(by.route)
        if isinstance(by, Perm) and isinstance(m, RouteWeights) and m.flat and m.route == by.route:
            return SortedWeights(by.route, m.source)
        if isinstance(by, Ids) and by.flat and m is None and fake(source) is not None and fake(source).dim() == 3 \
                and static_int(fake(source).shape[0]) == by.route.num_experts:
            return ExpertMatrices(by.route, source)
        if isinstance(by, InversePerm) and isinstance(m, ExpertOut) and m.space == "sorted" \
                and m.weights is not None and m.inter.route == by.route:
            return replace(m, space="pair")
        return None

    def gather(self, node: Node):
        """x.gather(0, token of each sorted row along the row): x[token of each sorted row]
        (sparse_grad only concerns the backward)."""
        source, dim, index = node.args[:3]
        by, x = self.of(index), fake(source)
        if isinstance(by, SortedTokens) and by.width is not None and dim == 0 and self.of(source) is None \
                and x is not None and x.dim() == 2 and same_size(by.width, x.shape[1]):
            return SortedRows(by.route, source)
        return None

    def clamp(self, node: Node):
        m = self.of(node.args[0])
        if not isinstance(m, (Ids, SortedIds)):
            return None
        if node.target == aten.clamp_max.default:
            low, high = None, node.args[1]
        elif node.target == aten.clamp_min.default:
            low, high = node.args[1], None
        else:
            low, high = kwarg_or_arg(node, 1, "min", None), kwarg_or_arg(node, 2, "max", None)
        keeps_ids = (low is None or isinstance(low, (int, float)) and low <= 0) and \
            (high is None or isinstance(high, (int, float)) and high >= m.route.num_experts - 1)
        return m if keeps_ids else None

    def sentinel_test(self, node: Node):
        m, bound = self.of(node.args[0]), node.args[1]
        if not (isinstance(m, (Ids, SortedIds)) and isinstance(bound, (int, float))):
            return None
        limit = m.route.num_experts if node.target == aten.ge.Scalar else m.route.num_experts - 1
        return NoPairs(m.route) if bound >= limit else None

    def where(self, node: Node):
        """where(ids >= E, fill, x) is x."""
        condition, _, otherwise = node.args[:3]
        m, out, kept = self.of(condition), fake(node), fake(otherwise)
        if isinstance(m, NoPairs) and kept is not None and out.shape == kept.shape and out.dtype == kept.dtype:
            return self.of(otherwise)
        return None

    def histc(self, node: Node):
        """Counts per expert of the ids (in any order). With max E - 1 (transformers) or E (torchtitan)
        each id lands in its own bin: exactly with integer ids (CUDA), and with float32 ids while
        id * E is exact, E * E <= 2**24 (the CPU kernel miscounts from E = 4098)."""
        m, ids = self.of(node.args[0]), fake(node.args[0])
        bins, low, high = (kwarg_or_arg(node, 1, "bins", 100), kwarg_or_arg(node, 2, "min", 0),
                           kwarg_or_arg(node, 3, "max", 0))
        if not isinstance(m, (Ids, SortedIds)):
            return None
        experts = m.route.num_experts
        if bins == experts and low == 0 and high in (experts - 1, experts) \
                and (not ids.dtype.is_floating_point or experts * experts <= 2**24):
            return Counts(m.route)
        return None

    def cumsum(self, node: Node):
        m = self.of(node.args[0])
        if isinstance(m, Counts) and _one_dim(node.args[0]) and node.args[1] in (0, -1) \
                and fake(node).dtype in (torch.int32, torch.int64):
            return Offsets(m.route)
        return None

    def permute_or_sum(self, node: Node):
        m = self.of(node.args[0])
        if isinstance(m, _PER_EXPERT) and _keeps_element_order(node):
            return m
        return self.sum(node) if node.target == aten.sum.dim_IntList else None

    def sub(self, node: Node):
        """cumsum(counts) - counts: the groups' starts; starts - starts (of the same counts): zeros."""
        (a, b), (ma, mb) = node.args[:2], (self.of(node.args[0]), self.of(node.args[1]))
        if kwarg_or_arg(node, 2, "alpha", 1) != 1 or not (_one_dim(a) and _one_dim(b)) \
                or getattr(ma, "route", None) != getattr(mb, "route", None):
            return None
        if isinstance(ma, Offsets) and isinstance(mb, Counts):
            return GroupStarts(ma.route)
        if isinstance(ma, GroupStarts) and isinstance(mb, GroupStarts):
            return NoShift(ma.route)
        return None

    def add(self, node: Node):
        """starts + counts: the groups' ends; arange(pairs) + zeros: the identity row index."""
        (a, b), (ma, mb) = node.args[:2], (self.of(node.args[0]), self.of(node.args[1]))
        if kwarg_or_arg(node, 2, "alpha", 1) != 1 or not (_one_dim(a) and _one_dim(b)):
            return None
        for x, y, mx, my in ((a, b, ma, mb), (b, a, mb, ma)):
            if isinstance(mx, GroupStarts) and isinstance(my, Counts) and mx.route == my.route:
                return Offsets(mx.route)
            if isinstance(my, NoShift) and mx is None and _arange_length(x) is not None \
                    and same_size(_arange_length(x), _pairs(my.route)) and same_shape(fake(y).shape, fake(x).shape):
                return RowIdentity(my.route)
        return None

    def searchsorted(self, node: Node):
        ends, rows = node.args[:2]
        m = self.of(ends)
        if isinstance(m, Offsets) and _one_dim(ends) and node.kwargs.get("sorter") is None \
                and _arange_length(rows) is not None and same_size(_arange_length(rows), _pairs(m.route)):
            return GroupOfRow(m.route)
        return None

    def index_put(self, node: Node):
        base, indices, values = node.args[:3]
        accumulate = kwarg_or_arg(node, 3, "accumulate", False)
        if accumulate and len(indices) == 1:  # index_add_ into zeros, as Inductor decomposes it
            return self._accumulate_by_token(base, indices[0], values)
        if len(indices) != 1:
            return None
        by, m = self.of(indices[0]), self.of(values)
        if isinstance(by, RowIdentity) and isinstance(m, ExpertOut) and m.space == "sorted" \
                and m.inter.route == by.route and same_shape(fake(base).shape, fake(values).shape) \
                and same_size(fake(values).shape[0], _pairs(by.route)):
            return m  # out[arange(rows)] = rows writes every row where it was
        if not isinstance(by, Perm):
            return None
        if isinstance(m, ExpertOut) and m.space == "sorted" and m.inter.route == by.route \
                and fake(base).shape == fake(values).shape:
            return replace(m, space="pair")  # out[perm] = sorted rows: a permutation writes every row
        length = _arange_length(values)
        return InversePerm(by.route) if length is not None and same_size(length, fake(base).shape[0]) else None

    def grouped_mm_rule(self, node: Node):
        rows, right = node.args[:2]
        offsets = kwarg_or_arg(node, 2, "offs", None)
        if kwarg_or_arg(node, 3, "bias", None) is not None or kwarg_or_arg(node, 4, "out_dtype", None) is not None:
            return None
        m, groups = self.of(rows), self.of(offsets)
        if not (isinstance(groups, Offsets) and _one_dim(offsets) and fake(offsets).dtype == torch.int32):
            return None
        route = groups.route
        weight = _permuted_weight(right, route)
        if weight is None:
            return None
        if isinstance(m, SortedRows) and m.route == route and same_size(fake(weight).shape[2], fake(m.x).shape[-1]):
            return Proj(route, m.x, "sorted", weight, 0, int(fake(weight).shape[1]))
        if isinstance(m, Inter) and m.space == "sorted" and m.route == route:
            return self._down(m, weight, "sorted")
        return None

    def bmm(self, node: Node):
        left, right = node.args[:2]
        matrices, column = self.of(left), self.of(right)
        if isinstance(matrices, RouteWeightsRow):  # [T, 1, K] @ [T, K, H]: the weighted sum over the picks
            if isinstance(column, ExpertOut) and column.per_pick and column.weights is None \
                    and column.inter.route == matrices.route:
                return Routed(replace(column, weights=matrices.source))
            return None
        if not isinstance(matrices, ExpertMatrices):
            return None
        route, weight = matrices.route, matrices.weight
        if column is None and isinstance(right, Node) and right.target == aten.unsqueeze.default \
                and right.args[1] in (-1, 2):
            x = _rows_per_pick(right.args[0], route.topk)
            if x is not None and same_size(fake(weight).shape[2], fake(x).shape[-1]):
                return Proj(route, x, "pair", weight, 0, int(fake(weight).shape[1]), column=True)
        if isinstance(column, Inter) and column.column and column.space == "pair" and column.route == route:
            return replace(self._down(replace(column, column=False), weight, "pair"), column=True)
        return None

    def _down(self, inter: Inter, weight: Node, space: str):
        shape = fake(weight).shape  # [E, H, I]
        if static_int(shape[2]) != inter.gate[2] - inter.gate[1] or not same_size(shape[1], fake(inter.x).shape[-1]):
            return None
        return ExpertOut(inter, weight, space, weights=None)

    def squeeze(self, node: Node):
        m = self.of(node.args[0])
        dims = node.args[1] if len(node.args) > 1 else None
        if isinstance(m, (Proj, ExpertOut)) and m.column and dims in (-1, 2, [-1], [2]):
            return replace(m, column=False)
        if isinstance(m, Routed) and same_size(fake(node).shape[-1], fake(node.args[0]).shape[-1]):
            return m  # the [T, 1, H] of a bmm over the picks, squeezed: a token reshape
        return None

    def unsqueeze(self, node: Node):
        m = self.of(node.args[0])
        if isinstance(m, Inter) and m.space == "pair" and not m.column and node.args[1] in (-1, 2):
            return replace(m, column=True)
        if isinstance(m, RouteWeights) and not m.flat:  # [T, K]: unsqueeze(1) is the row a bmm sums with
            return RouteWeightsRow(m.route, m.source) if node.args[1] == 1 else None
        if isinstance(m, (SortedWeights, RouteWeights, NoPairs)) and node.args[1] in (-1, 1):
            return m  # [.., 1] for broadcasting against [.., H]
        return None

    def split(self, node: Node):
        m = self.of(node.args[0])
        size, dim = node.args[1], kwarg_or_arg(node, 2, "dim", 0)
        if isinstance(m, Proj) and not m.column and isinstance(size, int) and is_last_dim(dim, 2) \
                and m.stop - m.start == 2 * size:
            return SplitProj(m, size)
        return None

    def activation(self, node: Node):
        proj = self.of(silu_core(node))
        return Activated(proj) if isinstance(proj, Proj) and not proj.column else None

    def mul(self, node: Node):
        a, b = node.args[:2]
        ma, mb = self.of(a), self.of(b)
        if isinstance(ma, Proj) or isinstance(mb, Proj):  # silu as x * sigmoid(x)
            activated = self.activation(node)
            if activated is not None:
                return activated
        for act, up in ((ma, mb), (mb, ma)):
            if isinstance(act, Activated) and not act.proj.upcast and isinstance(up, Proj) and not up.column \
                    and not up.upcast and up.space == act.proj.space and up.x is act.proj.x \
                    and up.route == act.proj.route and up.stop - up.start == act.proj.stop - act.proj.start:
                gate = (act.proj.weight, act.proj.start, act.proj.stop)
                return Inter(up.route, up.x, up.space, gate, (up.weight, up.start, up.stop))
        for out, weights, weights_node in ((ma, mb, b), (mb, ma, a)):
            # [N, 1]: one weight per row (flat [N] weights would broadcast along the hidden size)
            column = fake(weights_node) is not None and fake(weights_node).dim() == 2 \
                and static_int(fake(weights_node).shape[1]) == 1
            if isinstance(out, ExpertOut) and out.weights is None and not out.column and column \
                    and out.inter.route == getattr(weights, "route", None):
                if out.space == "sorted" and isinstance(weights, SortedWeights) \
                        or out.space == "pair" and isinstance(weights, RouteWeights) and weights.flat:
                    return replace(out, weights=weights.source)
        for rows, weights in ((a, mb), (b, ma)):
            rows = self.of(strip_views(rows, {prims.convert_element_type.default}))
            if isinstance(weights, SortedWeights) and isinstance(rows, SortedRows) and rows.route == weights.route:
                return WeightedRows(weights.route)
        for weights, factor in ((ma, b), (mb, a)):
            rescaled = self._rescaled_weights(node, weights, factor)
            if rescaled is not None:
                return rescaled
        return None

    def div(self, node: Node):
        return self.activation(node) or self._rescaled_weights(node, self.of(node.args[0]), node.args[1])

    def _rescaled_weights(self, node: Node, weights: Any, factor: Any) -> RouteWeights | None:
        """The gate's [T, K] weights times (or divided by) one value per token, or one value in all: a
        scaling or renormalisation the gate op did not do (a run-time scalar; ERNIE-4.5's
        w / clamp(sum(w), min)). Still one weight per (token, pick): fused_experts reads `node`."""
        if not isinstance(weights, RouteWeights) or weights.flat or fake(factor) is None or fake(node) is None:
            return None
        tokens, topk = fake(weights.source).shape[0], weights.route.topk
        shape = fake(factor).shape
        per_token = len(shape) == 2 and same_size(shape[0], tokens) and static_int(shape[1]) == 1
        if not (fake(factor).numel() == 1 and self.of(factor) is None or per_token):
            return None
        out = fake(node).shape
        return replace(weights, source=node) if len(out) == 2 and same_size(out[0], tokens) \
            and static_int(out[1]) == topk else None

    def index_add(self, node: Node):
        base, dim, index, source = node.args[:4]
        if kwarg_or_arg(node, 4, "alpha", 1) != 1 or dim != 0:
            return None
        return self._accumulate_by_token(base, index, source)

    def _accumulate_by_token(self, base: Any, index: Any, source: Any):
        """Routed when the weighted pair outputs are added into zeros at their tokens' rows."""
        m = self.of(source)
        if not (isinstance(m, ExpertOut) and m.weights is not None and m.space == "pair" and not m.per_pick):
            return None
        if not _token_index(index, m.inter.route.topk) or not _zeros(base):
            return None
        return Routed(m)

    def scatter_add(self, node: Node):
        return self._scatter_rows(*node.args[:4])

    def deterministic_scatter_add(self, node: Node):
        """torchtitan's combine op (torchtitan/ops/scatter_add.py): out.scatter_add(0, index, src) with
        deterministic algorithms on, opaque to tracing."""
        base, index, source = node.args[:3]
        return self._scatter_rows(base, 0, index, source)

    def _scatter_rows(self, base: Any, dim: Any, index: Any, source: Any):
        """base.scatter_add(0, token of each sorted row along the row, weighted sorted rows): the sum
        over the picks added onto base (zeros, or e.g. the shared expert's output)."""
        by, m = self.of(index), self.of(source)
        if not (dim == 0 and isinstance(by, SortedTokens) and by.width is not None and isinstance(m, ExpertOut)
                and m.space == "sorted" and m.weights is not None and not m.column and m.inter.route == by.route
                and self.of(base) is None):
            return None
        # The index must cover every element of the rows and the base's whole row width.
        if not (same_shape(fake(index).shape, fake(source).shape) and fake(base).dim() == 2
                and same_size(by.width, fake(base).shape[1])):
            return None
        return Routed(m, None if _zeros(base) else base)

    def sum(self, node: Node):
        m = self.of(node.args[0])
        dims = node.args[1] if len(node.args) > 1 else None
        if isinstance(m, ExpertOut) and m.per_pick and m.weights is not None and dims in ([1], [-2]) \
                and not kwarg_or_arg(node, 2, "keepdim", False) and node.kwargs.get("dtype") is None:
            return Routed(m)
        return None


_HANDLERS = {
    operator.getitem: ExpertsAnalysis.getitem,
    aten.sort.default: ExpertsAnalysis.sort,
    aten.sort.stable: ExpertsAnalysis.sort,
    aten.argsort.default: ExpertsAnalysis.argsort,
    aten.argsort.stable: ExpertsAnalysis.argsort,
    aten.index_add.default: ExpertsAnalysis.index_add,
    aten.div.Tensor_mode: ExpertsAnalysis.floor_divide,
    aten.index.Tensor: ExpertsAnalysis.index,
    aten.gather.default: ExpertsAnalysis.gather,
    aten.expand.default: ExpertsAnalysis.expand,
    aten.scatter_add.default: ExpertsAnalysis.scatter_add,
    aten.histc.default: ExpertsAnalysis.histc,
    aten.clamp.default: ExpertsAnalysis.clamp,
    aten.clamp_max.default: ExpertsAnalysis.clamp,
    aten.clamp_min.default: ExpertsAnalysis.clamp,
    aten.ge.Scalar: ExpertsAnalysis.sentinel_test,
    aten.gt.Scalar: ExpertsAnalysis.sentinel_test,
    aten.where.self: ExpertsAnalysis.where,
    aten.cumsum.default: ExpertsAnalysis.cumsum,
    aten.index_put.default: ExpertsAnalysis.index_put,
    aten.bmm.default: ExpertsAnalysis.bmm,
    aten.squeeze.dim: ExpertsAnalysis.squeeze,
    aten.squeeze.dims: ExpertsAnalysis.squeeze,
    aten.unsqueeze.default: ExpertsAnalysis.unsqueeze,
    aten.split.Tensor: ExpertsAnalysis.split,
    aten.silu.default: ExpertsAnalysis.activation,
    aten.div.Tensor: ExpertsAnalysis.div,
    aten.mul.Tensor: ExpertsAnalysis.mul,
    aten.sum.dim_IntList: ExpertsAnalysis.permute_or_sum,
    aten.permute.default: ExpertsAnalysis.permute_or_sum,
    aten.sub.Tensor: ExpertsAnalysis.sub,
    aten.add.Tensor: ExpertsAnalysis.add,
    aten.searchsorted.Tensor: ExpertsAnalysis.searchsorted,
    prims.convert_element_type.default: ExpertsAnalysis.convert,
    **{op: ExpertsAnalysis.reshape for op in RESHAPES},
    **{op: ExpertsAnalysis.identity for op in IDENTITIES},
}

# Other libraries' ops, by name: they exist only where those libraries are imported.
_HANDLERS_BY_NAME = {
    "torchtitan::deterministic_scatter_add": ExpertsAnalysis.deterministic_scatter_add,
}


# --------------------------------------------------------------------------------------------------
# Rewrite


def rewrite_experts(graph: Graph, options: Any) -> tuple[list[Rewrite], list[Refusal]]:
    analysis = ExpertsAnalysis(graph)
    rewrites, refusals = [], []
    done: set[ExpertOut] = set()
    for node in list(graph.nodes):
        meaning = analysis.meaning.get(node)
        if not isinstance(meaning, Routed) or meaning.out in done:
            continue
        # Replace the outermost node that still means this sum (a token reshape of it, if any).
        if any(isinstance(analysis.meaning.get(u), Routed) and analysis.meaning[u].out == meaning.out
               for u in node.users):
            continue
        done.add(meaning.out)
        location = describe_location(node)
        plan = _plan(meaning, node, options)
        if isinstance(plan, str):
            refusals.append(Refusal(PASS_NAME, location, plan))
            continue
        _emit(graph, node, meaning, plan)
        out = meaning.out
        rewrites.append(Rewrite(PASS_NAME, location, _spelling(meaning), dict(
            num_experts=out.inter.route.num_experts, topk=out.inter.route.topk,
            intermediate_size=out.inter.gate[2] - out.inter.gate[1], hidden_size=int(fake(out.inter.x).shape[-1]),
            gate=_slice_text(out.inter.gate), up=_slice_text(out.inter.up), down=out.down.name,
            added_to=meaning.base.name if meaning.base is not None else None)))
    refusals += _unrecognized(analysis, {m.out.inter.route for m in analysis.meaning.values() if isinstance(m, Routed)})
    if rewrites:
        graph.eliminate_dead_code()
        graph.lint()
    return rewrites, refusals


def _route_of(meaning: Any) -> Route | None:
    for path in (("route",), ("inter", "route"), ("out", "inter", "route"), ("proj", "route")):
        value = meaning
        for attr in path:
            value = getattr(value, attr, None)
        if isinstance(value, Route):
            return value
    return None


def _unrecognized(analysis: ExpertsAnalysis, found: set[Route]) -> list[Refusal]:
    """A refusal for each fused gate whose picks feed a computation no rule explains."""
    stuck: dict[Route, list[Node]] = {}
    for node, meaning in analysis.meaning.items():
        route = _route_of(meaning)
        if route is None or route in found:
            continue
        for user in node.users:
            if user.op == "call_function" and user not in analysis.meaning:
                stuck.setdefault(route, []).append(user)
    weighted_inputs = {m.route for m in analysis.meaning.values() if isinstance(m, WeightedRows)}
    refusals = []
    for route, users in stuck.items():
        reason = f"the experts reading the fused gate {route.gate.name} were not recognized; "
        if route in weighted_inputs:
            reason += ("the routing weights scale the experts' input rows (torchtitan's score_before_experts=True), "
                       "which for nonlinear experts is not fused_experts' function (weights applied to the outputs)")
        else:
            reason += "no rule explains " + ", ".join(f"{u.target} (node {u.name})" for u in users[:3])
        refusals.append(Refusal(PASS_NAME, describe_location(route.gate), reason))
    return refusals


def _spelling(meaning: Routed) -> str:
    inter = meaning.out.inter
    layout = "separate gate and up [E, I, H]"
    if _halves_of_one_weight(inter.gate, inter.up):
        layout = "gate_up [E, 2I, H] (passed whole: one gradient)"
    elif inter.gate[0] is inter.up[0]:
        layout = "gate and up rows of one weight"
    way = "sort by expert + grouped_mm" if inter.space == "sorted" else "per-pick bmm"
    total = "weighted sum over the picks" + (" added onto another tensor" if meaning.base is not None else "")
    return f"{way}; {layout}; silu(gate) * up; down [E, H, I]; {total}"


def _slice_text(part: tuple[Node, int, int]) -> str:
    weight, start, stop = part
    return f"{weight.name}[:, {start}:{stop}]"


def _plan(meaning: Routed, node: Node, options: Any) -> list | str:
    """How to shape the fused output like `node` (see size_sources), or why the rewrite is refused."""
    inter = meaning.out.inter
    x = fake(inter.x)
    if x.device.type == "cpu" and not options.fuse_experts_on_cpu:
        return ("on the CPU, fused_experts (per-expert ATen matmuls) is not faster than Inductor's code for "
                "these experts, so they are left as they are (fuse_experts_on_cpu=True fuses them anyway)")
    dtypes = {x.dtype} | {fake(w).dtype for w in (inter.gate[0], inter.up[0], meaning.out.down)}
    if len(dtypes) != 1:
        return f"the hidden states and the expert weights have different dtypes ({sorted(map(str, dtypes))})"
    target = fake(node)
    if not same_size(target.numel(), x.numel()) or not same_size(target.shape[-1], x.shape[-1]):
        return "the routed output does not have the hidden states' shape"
    sources = size_sources(target.shape, [inter.x, strip_views(inter.x)])
    if sources is None:
        return "the routed output's shape cannot be rebuilt from the hidden states' sizes"
    return sources


def _halves_of_one_weight(gate: tuple[Node, int, int], up: tuple[Node, int, int]) -> bool:
    """Whether gate and up are rows [0, I) and [I, 2I) of one [E, 2I, H] weight (fused_experts' w_up=None form)."""
    weight, start, stop = gate
    return start == 0 and up == (weight, stop, 2 * stop) and static_int(fake(weight).shape[1]) == 2 * stop


def _emit(graph: Graph, node: Node, meaning: Routed, shape_sources: list) -> None:
    inter, down = meaning.out.inter, meaning.out.down
    build = GraphBuilder(graph, inter.x)

    def weight_view(part: tuple[Node, int, int]) -> Node:
        weight, start, stop = part
        if start == 0 and stop == fake(weight).shape[1]:
            return weight
        return build.call(aten.slice.Tensor, (weight, 1, start, stop))

    with graph.inserting_before(node):  # every input of the fused op is defined before the sum
        ids = build.call(operator.getitem, (inter.route.gate, 1))
        if _halves_of_one_weight(inter.gate, inter.up):  # one gradient for it, not two views' sum
            gate, up = inter.gate[0], None
        else:
            gate, up = weight_view(inter.gate), weight_view(inter.up)
        fused = build.call(EXPERTS_OP, (inter.x, meaning.out.weights, ids, gate, up, down, None, None, None, None))
        if meaning.base is not None:  # a plain add, which the shared-expert rewrite can fold
            fused = build.call(aten.add.Tensor, (fused, meaning.base))
        result = build.conform(fused, fake(node), shape_sources)
    node.replace_all_uses_with(result)
