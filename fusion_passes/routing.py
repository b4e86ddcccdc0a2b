"""Routing rewrite: unfused grouped top-k routing becomes one ``moe_fusion::moe_fused_gate``.

The pass does not match a fixed pattern. It reads the post-grad graph forward and gives each node a
*meaning* in the routing contract (``ops.moe_fused_gate``'s docstring): "the scores s of logits L",
"b = s + bias viewed as [T, G, P]", "the sum of the top-2 b of each group", "True for the experts of
dropped groups", "b with dropped experts filled with -inf", "the top-k ids of that", "the weights
s[ids] / (sum + eps) * rsf", ... Each ATen op has a transfer rule that derives the meaning of its
output from the meanings of its inputs and checks every argument (dims, constants, dtypes, shapes).
Because the rules compose, the many ways public code spells the routing (views or unflatten, 2-D or
3-D tokens, topk(2).sum / amax / max, zeros+scatter+expand masks or bool masks on grouped tensors,
masked_fill in place or not, gather or topk values, eps or not, casts) are all covered by a few
rules, and anything no rule explains gets no meaning: a look-alike is never rewritten.

A rewrite replaces only the routing's *outputs* (the ids and the final weights) with the fused op's,
reshaped to the shape in which each leaves the routing; intermediates that other code still uses
(router logits, scores for an aux loss) keep being computed by their original nodes, and the rest
is removed as dead code.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from typing import Any, Union

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
    kwarg_or_arg,
    prims,
    same_shape,
    same_size,
    scalar_constant,
    shape_arg,
    size_sources,
    static_int,
)
from .report import Refusal, Rewrite

PASS_NAME = "routing"
GATE_OP = torch.ops.moe_fusion.moe_fused_gate.default
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------------
# Meanings


@dataclass(frozen=True)
class Root:
    """One scoring of one logits tensor."""

    node: Node  # the scoring node
    logits: Node  # what the fused op reads (before an exact upcast to float32)
    scoring: str  # "sigmoid" | "softmax"
    num_experts: int


@dataclass(frozen=True)
class Sel:
    """The scores s (bias is None) or the selection scores b = s + bias, flat or viewed [.., G, P]."""

    root: Root
    score_dtype: torch.dtype  # dtype s is rounded to
    bias: Node | None
    dtype: torch.dtype  # dtype of this tensor
    group: tuple[int, int] | None

    def flat(self) -> Sel:
        return replace(self, group=None)


@dataclass(frozen=True)
class GroupTopPair:
    sel: Sel
    m: int


@dataclass(frozen=True)
class GroupTop:  # topk(b grouped, m).values
    sel: Sel
    m: int


@dataclass(frozen=True)
class MaxPair:
    sel: Sel


@dataclass(frozen=True)
class GroupScore:  # [.., G]: sum of the top-m of each group
    sel: Sel
    m: int
    how: str


@dataclass(frozen=True)
class GroupIndexPair:
    score: GroupScore
    topk_group: int


@dataclass(frozen=True)
class GroupIndex:  # [.., topk_group] ids of the kept groups
    score: GroupScore
    topk_group: int


@dataclass(frozen=True)
class GroupIndicator:
    """A tensor holding `kept` for experts (or groups) of kept groups and `dropped` for the others."""

    index: GroupIndex
    kept: Any
    dropped: Any
    layout: str  # "G" [.., G] | "G1" [.., G, 1] | "GP" [.., G, P] | "E" [.., E]
    how: tuple[str, ...]


@dataclass(frozen=True)
class Masked:
    """b where the expert's group is kept, else the constant `fill`."""

    sel: Sel  # the unmasked selection, flat
    index: GroupIndex
    fill: float
    grouped: bool  # this tensor is viewed [.., G, P]
    how: tuple[str, ...]


@dataclass(frozen=True)
class ExpertTopk:
    source: Union[Masked, Sel]
    k: int
    sorted: bool
    node: Node


@dataclass(frozen=True)
class ExpertIds:
    topk: ExpertTopk


@dataclass(frozen=True)
class ExpertValues:  # the top-k values of a biased selection: not weights
    topk: ExpertTopk


@dataclass(frozen=True)
class Weights:
    topk: ExpertTopk
    from_masked: bool
    arith_dtype: torch.dtype  # dtype of the weight arithmetic
    dtype: torch.dtype  # dtype of this tensor
    renorm_eps: float | None = None  # None: not renormalised
    scale: float | None = None
    how: tuple[str, ...] = ()


@dataclass(frozen=True)
class WeightSum:
    of: Node
    weights: Weights
    eps: float | None = None


@dataclass(frozen=True)
class Tainted:
    """Derived from routing scores by something the contract does not describe."""

    root: Root
    reason: str


Meaning = Any


def _root_of(meaning: Meaning) -> Root | None:
    for attr in ("root", "sel", "score", "index", "topk", "weights", "source"):
        inner = getattr(meaning, attr, None)
        if isinstance(inner, Root):
            return inner
        if inner is not None:
            return _root_of(inner)
    return None


def _describe(meaning: Meaning) -> str:
    return type(meaning).__name__


# --------------------------------------------------------------------------------------------------
# Analysis


class RoutingAnalysis:
    """Meanings of the nodes of one graph."""

    # Taint only follows tensors that still look like routing (last dim E) for a few ops, so that
    # the model downstream of the routing is not all marked.
    _TAINT_DEPTH = 6

    def __init__(self, graph: Graph) -> None:
        self.meaning: dict[Node, Meaning] = {}
        self.reasons: dict[Node, str] = {}  # why a node that consumes routing values has no meaning
        self._taint_depth: dict[Node, int] = {}
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            meaning = self._interpret(node)
            if meaning is not None:
                self.meaning[node] = meaning

    def of(self, arg: Any) -> Meaning | None:
        return self.meaning.get(arg) if isinstance(arg, Node) else None

    # ---- dispatch

    def _interpret(self, node: Node) -> Meaning | None:
        root = self._scoring_root(node)
        if root is not None:
            return root
        inputs = [self.meaning[a] for a in node.all_input_nodes if a in self.meaning]
        if not inputs:
            return None
        if any(isinstance(m, Tainted) for m in inputs):
            return self._taint(node, next(m for m in inputs if isinstance(m, Tainted)).reason, inputs)
        handler = _HANDLERS.get(node.target)
        result = handler(self, node) if handler is not None else None
        if result is None:
            described = ", ".join(_describe(m) for m in inputs)
            result = (f"{node.target} applied to the routing's {described} is not part of the routing contract "
                      f"(node {node.name})")
        if isinstance(result, str):
            self.reasons[node] = result
            return self._taint(node, result, inputs)
        return result

    def _taint(self, node: Node, reason: str, inputs: list[Meaning]) -> Tainted | None:
        root = next((r for r in map(_root_of, inputs) if r is not None), None)
        out = fake(node)
        if root is None or out is None or out.dim() == 0 or not same_size(out.shape[-1], root.num_experts):
            return None
        depth = 1 + max((self._taint_depth.get(a, 0) for a in node.all_input_nodes), default=0)
        if depth > self._TAINT_DEPTH:
            return None
        self._taint_depth[node] = depth
        return Tainted(root, reason)

    def _upstream_reason(self, node: Any, depth: int = 12) -> str | None:
        """The refusal reason recorded nearest above `node`, if any (why a mask lost its meaning)."""
        frontier = [node] if isinstance(node, Node) else []
        seen = set(frontier)
        for _ in range(depth):
            for current in frontier:
                if current in self.reasons:
                    return self.reasons[current]
            frontier = [a for n in frontier for a in n.all_input_nodes if a not in seen]
            seen.update(frontier)
        return None

    # ---- roots

    def _scoring_root(self, node: Node) -> Sel | None:
        if node.target == aten.sigmoid.default:
            source, scoring = node.args[0], "sigmoid"
        elif node.target == aten._softmax.default and is_last_dim(node.args[1], _ndim(node)):
            source, scoring = node.args[0], "softmax"
        elif node.target == aten.div.Tensor and _softmax_input(node) is not None:
            source, scoring = _softmax_input(node), "softmax"
        else:
            return None
        out = fake(node)
        if out is None or out.dtype not in _FLOATS or out.dim() < 1:
            return None
        num_experts = static_int(out.shape[-1])
        if num_experts is None:
            return None
        logits = source
        if (isinstance(source, Node) and source.target == prims.convert_element_type.default
                and out.dtype == torch.float32 and fake(source.args[0]) is not None
                and fake(source.args[0]).dtype in _FLOATS):
            logits = source.args[0]  # an exact upcast the fused op does itself
        if fake(logits) is None or fake(logits).dtype not in _FLOATS:
            return None
        root = Root(node, logits, scoring, num_experts)
        return Sel(root, out.dtype, None, out.dtype, None)

    # ---- transfer rules (each returns a meaning, a refusal reason, or None)

    def add(self, node: Node):
        a, b = node.args[:2]
        if node.kwargs.get("alpha", 1) != 1:
            return None
        ma, mb = self.of(a), self.of(b)
        if isinstance(ma, WeightSum) or isinstance(mb, WeightSum):
            total, eps = (ma, b) if isinstance(ma, WeightSum) else (mb, a)
            eps = scalar_constant(eps)
            if total.eps is not None or not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
                return "the renormalisation adds something other than one constant epsilon"
            return replace(total, eps=float(eps))
        sel, bias = (ma, b) if isinstance(ma, Sel) else (mb, a)
        if not isinstance(sel, Sel) or sel.bias is not None or sel.group is not None:
            return None
        if self.of(bias) is not None or fake(bias) is None:
            return "the scores are added to a tensor derived from the scores"
        bias_shape, out = fake(bias).shape, fake(node)
        if not (len(bias_shape) >= 1 and same_size(bias_shape[-1], sel.root.num_experts)
                and all(same_size(d, 1) for d in bias_shape[:-1])):
            return f"the tensor added to the scores has shape {list(bias_shape)}, not [E] (a per-expert bias)"
        if not same_shape(out.shape, fake(node.args[0] if sel is ma else node.args[1]).shape):
            return "the bias add broadcasts the scores"
        return Sel(sel.root, sel.score_dtype, bias, out.dtype, None)

    def reshape(self, node: Node):
        m, out, source = self.of(node.args[0]), fake(node), fake(node.args[0])
        if out is None or source is None or not same_size(out.numel(), source.numel()):
            return None
        if isinstance(m, (Sel, Masked)):
            sel = m if isinstance(m, Sel) else m.sel
            current = m.group if isinstance(m, Sel) else (m.index.score.sel.group if m.grouped else None)
            group = _regroup(source.shape, out.shape, sel.root.num_experts, current)
            if group is None:
                return "a reshape that is neither a token reshape nor a [G, E/G] split of the experts"
            if isinstance(m, Sel):
                return replace(m, group=None if group == "flat" else group)
            if group != "flat" and group != m.index.score.sel.group:
                return "the masked scores are viewed with another grouping than the group scores"
            return replace(m, grouped=group != "flat")
        if isinstance(m, GroupIndicator):
            layout = _indicator_reshape(m.layout, source.shape, out.shape, m.index.score.sel.group)
            if layout is None:
                return "the group mask is reshaped to a layout that is not [.., G], [.., G, 1], [.., G, P] or [.., E]"
            return replace(m, layout=layout, how=m.how + ("reshape",))
        if isinstance(m, (ExpertIds, Weights)) and same_size(out.shape[-1], source.shape[-1]):
            return m  # token reshape of an output
        return None

    def identity(self, node: Node):
        return self.of(node.args[0])

    def unsqueeze(self, node: Node):
        m, out = self.of(node.args[0]), fake(node)
        if isinstance(m, GroupIndicator) and m.layout == "G" and is_last_dim(node.args[1], out.dim()):
            return replace(m, layout="G1", how=m.how + ("unsqueeze",))
        return None

    def expand(self, node: Node):
        m, out = self.of(node.args[0]), fake(node)
        if isinstance(m, GroupIndex) and m.topk_group == 1:
            return m  # broadcasting the single kept group's id (Inductor's one-hot scatter)
        if isinstance(m, GroupIndicator) and m.layout == "G1" and _tail(out.shape) == m.index.score.sel.group:
            return replace(m, layout="GP", how=m.how + ("expand",))
        return None

    def convert(self, node: Node):
        m, dtype = self.of(node.args[0]), node.args[1]
        current = fake(node.args[0]).dtype
        if dtype == current:
            return m
        if isinstance(m, Sel) and m.bias is None and m.group is None and dtype in _FLOATS:
            if current == torch.float32 and m.score_dtype == torch.float32:
                return replace(m, score_dtype=dtype, dtype=dtype)  # scores stored rounded to dtype
            if dtype == torch.float32:
                return replace(m, dtype=dtype)  # exact upcast of rounded scores
            return "the scores are cast between 16-bit dtypes"
        if isinstance(m, GroupIndicator):
            cast = {torch.bool: bool}.get(dtype, float if dtype.is_floating_point else int)
            return replace(m, kept=cast(m.kept), dropped=cast(m.dropped), how=m.how + (f"to({dtype})",))
        if isinstance(m, Weights) and dtype in _FLOATS:
            return replace(m, dtype=dtype, how=m.how + (f"to({str(dtype).replace('torch.', '')})",))
        return f"a cast of the routing's {_describe(m)} to {dtype}"

    def negate_mask(self, node: Node):
        m = self.of(node.args[0])
        if isinstance(m, GroupIndicator) and isinstance(m.kept, bool) and isinstance(m.dropped, bool):
            return replace(m, kept=not m.kept, dropped=not m.dropped, how=m.how + ("not",))
        return None

    def compare_mask(self, node: Node):
        m, value = self.of(node.args[0]), scalar_constant(node.args[1])
        if not isinstance(m, GroupIndicator) or value is None:
            return None
        test = operator.eq if node.target == aten.eq.Scalar else operator.ne
        return replace(m, kept=bool(test(m.kept, value)), dropped=bool(test(m.dropped, value)),
                       how=m.how + (f"{'==' if test is operator.eq else '!='}{value}",))

    def one_hot(self, node: Node):
        """eq(kept group id, arange(G)): Inductor's decomposition of a scatter with one index column."""
        a, b = node.args[:2]
        index, other = (self.of(a), b) if isinstance(self.of(a), GroupIndex) else (self.of(b), a)
        if not isinstance(index, GroupIndex) or index.topk_group != 1:
            return None
        groups = index.score.sel.group[0]
        if not _is_arange_row(other, groups) or static_int(fake(node).shape[-1]) != groups:
            return None
        return GroupIndicator(index, True, False, "G", ("one-hot",))

    def topk(self, node: Node):
        m, out_ndim = self.of(node.args[0]), _ndim(node.args[0])
        k = static_int(node.args[1])
        dim = kwarg_or_arg(node, 2, "dim", -1)
        largest = kwarg_or_arg(node, 3, "largest", True)
        is_sorted = kwarg_or_arg(node, 4, "sorted", True)
        if k is None:
            return "top-k with a symbolic k"
        if not largest:
            return "top-k with largest=False"
        if not is_last_dim(dim, out_ndim):
            return "top-k over a dimension that is not the last"
        if isinstance(m, Sel) and m.group is not None:
            return GroupTopPair(m, k)
        if isinstance(m, GroupScore) and out_ndim >= 1:
            return GroupIndexPair(m, k)
        if isinstance(m, Sel) or (isinstance(m, Masked) and not m.grouped):
            return ExpertTopk(m, k, bool(is_sorted), node)
        return None

    def getitem(self, node: Node):
        m, index = self.of(node.args[0]), node.args[1]
        if isinstance(m, GroupTopPair) and index == 0:
            return GroupTop(m.sel, m.m)
        if isinstance(m, MaxPair) and index == 0:
            return GroupScore(m.sel, 1, "max(-1).values")
        if isinstance(m, GroupIndexPair) and index == 1:
            return GroupIndex(m.score, m.topk_group)
        if isinstance(m, ExpertTopk):
            if index == 1:
                return ExpertIds(m)
            source = m.source.sel if isinstance(m.source, Masked) else m.source
            if source.bias is None:  # the values are the (masked) scores: weights
                return Weights(m, isinstance(m.source, Masked), source.dtype, source.dtype, how=("topk values",))
            return ExpertValues(m)
        return None

    def sum(self, node: Node):
        m = self.of(node.args[0])
        dims = node.args[1] if len(node.args) > 1 else None
        keepdim = kwarg_or_arg(node, 2, "keepdim", False)
        if node.kwargs.get("dtype") is not None or dims is None or len(dims) != 1:
            return None
        if not is_last_dim(dims[0], _ndim(node.args[0])):
            return None
        if isinstance(m, GroupTop) and not keepdim:
            return GroupScore(m.sel, m.m, f"topk({m.m}).values.sum(-1)")
        if isinstance(m, Weights) and keepdim and m.renorm_eps is None and m.scale is None:
            return WeightSum(node.args[0], m)
        return None

    def amax(self, node: Node):
        m = self.of(node.args[0])
        dims, keepdim = node.args[1], kwarg_or_arg(node, 2, "keepdim", False)
        if isinstance(m, Sel) and m.group and len(dims) == 1 and is_last_dim(dims[0], _ndim(node.args[0])) and not keepdim:
            return GroupScore(m, 1, "amax(-1)")
        return None

    def mean(self, node: Node):
        m = self.of(node.args[0])
        dims, keepdim = node.args[1], kwarg_or_arg(node, 2, "keepdim", False)
        if not (isinstance(m, Sel) and m.group and len(dims) == 1 and is_last_dim(dims[0], _ndim(node.args[0]))
                and not keepdim and node.kwargs.get("dtype") is None):
            return None
        size = m.group[1]
        if size & (size - 1):
            return (f"the group score is a mean over {size} experts: dividing by a size that is not a power of "
                    f"two rounds, so it may not rank groups as their sum does")
        return GroupScore(m, size, "mean(-1)")  # sum / 2^j ranks exactly as the sum

    def max_dim(self, node: Node):
        m = self.of(node.args[0])
        if isinstance(m, Sel) and m.group and is_last_dim(node.args[1], _ndim(node.args[0])) \
                and not kwarg_or_arg(node, 2, "keepdim", False):
            return MaxPair(m)
        return None

    def squeeze(self, node: Node):
        m = self.of(node.args[0])
        dims = node.args[1] if len(node.args) > 1 else None
        dims = [dims] if isinstance(dims, int) else dims
        if isinstance(m, GroupTop) and m.m == 1 and dims and len(dims) == 1 \
                and is_last_dim(dims[0], _ndim(node.args[0])):
            return GroupScore(m.sel, 1, "topk(1).values.squeeze(-1)")
        return None

    def scatter(self, node: Node):
        base, dim, index = node.args[:3]
        source = node.args[3]
        m = self.of(index)
        if not isinstance(m, GroupIndex) or self.of(base) is not None:
            return None
        if not is_last_dim(dim, _ndim(base)):
            return "the group mask is scattered along a dimension that is not the last"
        fill = _constant_fill(base)
        value = scalar_constant(source) if node.target == aten.scatter.value else _constant_fill(source)
        if fill is None or value is None:
            return "the group mask is not built from constants"
        base_shape, index_shape = fake(base).shape, fake(index).shape
        groups = m.score.sel.group[0]
        if not (same_size(base_shape[-1], groups) and same_shape(base_shape[:-1], index_shape[:-1])):
            return "the group mask does not have one entry per group"
        if value == fill:
            return "the group mask writes the value it was filled with"
        return GroupIndicator(m, value, fill, "G", ("scatter",))

    def where(self, node: Node):
        cond, x, y = node.args[:3]
        mask, if_true, if_false = self.of(cond), scalar_constant(x), scalar_constant(y)
        if isinstance(mask, GroupIndicator) and None not in (if_true, if_false) and isinstance(mask.kept, bool):
            return replace(mask, kept=if_true if mask.kept else if_false,
                           dropped=if_true if mask.dropped else if_false, how=mask.how + ("where",))
        return self._mask(node, cond, x, y)

    def masked_fill(self, node: Node):
        x, cond, value = node.args[:3]
        return self._mask(node, cond, value, x)

    def _mask(self, node: Node, cond: Any, if_true: Any, if_false: Any):
        sel_arg, fill_arg = (if_true, if_false) if isinstance(self.of(if_true), Sel) else (if_false, if_true)
        sel, fill, mask = self.of(sel_arg), scalar_constant(fill_arg), self.of(cond)
        if not isinstance(sel, Sel):
            return None
        if not isinstance(mask, GroupIndicator) or not isinstance(mask.kept, bool) or mask.kept == mask.dropped:
            upstream = self._upstream_reason(cond)
            return ("the scores are masked with a tensor that is not a group mask built from a top-k of group "
                    "scores (the sum of each group's top-m scores, or its max)"
                    + (f"; upstream: {upstream}" if upstream else ""))
        if fill is None or isinstance(fill, bool):
            return "the dropped experts are filled with something that is not one constant"
        if sel.flat() != mask.index.score.sel.flat():
            return "the group mask was computed from other scores than the ones it masks"
        if (sel_arg is if_true) != mask.kept:
            return "the mask keeps the experts of dropped groups"
        expected = {"E": None, "G1": sel.group, "GP": sel.group}.get(mask.layout, "bad")
        if mask.layout == "E" and sel.group is not None or mask.layout != "E" and sel.group is None \
                or expected == "bad" or (sel.group is not None and sel.group != mask.index.score.sel.group):
            return f"the group mask (layout {mask.layout}) does not line up with the scores it masks"
        out = fake(node)
        if out.dtype != sel.dtype or not same_shape(out.shape, fake(sel_arg).shape):
            return "masking changes the scores' dtype or shape"
        how = mask.how + (f"fill {fill} on {'[.., G, P]' if sel.group else '[.., E]'}",)
        return Masked(sel.flat(), mask.index, float(fill), sel.group is not None, how)

    def gather(self, node: Node):
        source, dim, index = node.args[:3]
        ids, m = self.of(index), self.of(source)
        if not isinstance(ids, ExpertIds) or not is_last_dim(dim, _ndim(source)):
            return None
        chosen = ids.topk.source.sel if isinstance(ids.topk.source, Masked) else ids.topk.source
        if isinstance(m, Sel) and m.bias is None and m.group is None and m.root == chosen.root:
            if m.score_dtype != chosen.score_dtype:
                return "the weights are gathered from scores rounded differently from the selected ones"
            return Weights(ids.topk, False, m.dtype, m.dtype, how=("gather(scores)",))
        if isinstance(m, Masked) and m.sel.bias is None and not m.grouped and m.sel.root == chosen.root:
            return Weights(ids.topk, True, m.sel.dtype, m.sel.dtype, how=("gather(masked scores)",))
        return "the weights are gathered from a tensor that is not the routing scores"

    def div(self, node: Node):
        a, b = node.args[:2]
        w, total = self.of(a), self.of(b)
        if isinstance(w, Weights) and isinstance(total, WeightSum):
            if total.of is not a or w.renorm_eps is not None or w.scale is not None or w.dtype != w.arith_dtype:
                return "the weights are divided by the sum of other weights"
            if fake(node).dtype != w.dtype:
                return "the renormalisation changes the weights' dtype"
            eps = total.eps or 0.0
            return replace(w, renorm_eps=eps, how=w.how + (f"/ (sum + {eps})" if eps else "/ sum",))
        return None

    def mul(self, node: Node):
        a, b = node.args[:2]
        if any(isinstance(self.of(x), GroupIndicator) for x in (a, b)):
            return ("the scores are multiplied by the group mask: unlike masking, that gives NaN rather than "
                    "the fill for NaN or infinite scores, which the fused op does not reproduce")
        w, factor = (self.of(a), b) if isinstance(self.of(a), Weights) else (self.of(b), a)
        factor = scalar_constant(factor)
        if not isinstance(w, Weights) or factor is None or isinstance(factor, bool):
            return None
        if w.scale is not None or w.dtype != w.arith_dtype or fake(node).dtype != w.dtype:
            return "the weights are scaled twice or after a cast"
        if factor == 0:
            return "the weights are multiplied by zero"
        return replace(w, scale=float(factor), how=w.how + (f"* {factor}",))


_HANDLERS = {
    aten.add.Tensor: RoutingAnalysis.add,
    aten.topk.default: RoutingAnalysis.topk,
    operator.getitem: RoutingAnalysis.getitem,
    aten.sum.dim_IntList: RoutingAnalysis.sum,
    aten.amax.default: RoutingAnalysis.amax,
    aten.max.dim: RoutingAnalysis.max_dim,
    aten.mean.dim: RoutingAnalysis.mean,
    aten.squeeze.dim: RoutingAnalysis.squeeze,
    aten.squeeze.dims: RoutingAnalysis.squeeze,
    aten.scatter.value: RoutingAnalysis.scatter,
    aten.scatter.src: RoutingAnalysis.scatter,
    aten.unsqueeze.default: RoutingAnalysis.unsqueeze,
    aten.expand.default: RoutingAnalysis.expand,
    prims.convert_element_type.default: RoutingAnalysis.convert,
    aten.bitwise_not.default: RoutingAnalysis.negate_mask,
    aten.logical_not.default: RoutingAnalysis.negate_mask,
    aten.eq.Scalar: RoutingAnalysis.compare_mask,
    aten.eq.Tensor: RoutingAnalysis.one_hot,
    aten.ne.Scalar: RoutingAnalysis.compare_mask,
    aten.where.self: RoutingAnalysis.where,
    aten.masked_fill.Scalar: RoutingAnalysis.masked_fill,
    aten.gather.default: RoutingAnalysis.gather,
    aten.div.Tensor: RoutingAnalysis.div,
    aten.mul.Tensor: RoutingAnalysis.mul,
    **{op: RoutingAnalysis.reshape for op in RESHAPES},
    **{op: RoutingAnalysis.identity for op in IDENTITIES},
}


def _ndim(node: Any) -> int:
    value = fake(node)
    return value.dim() if value is not None else -1


def _softmax_input(div: Node) -> Node | None:
    """x when `div` is the decomposed softmax over the last dim: exp(x - amax(x)) / sum(exp(x - amax(x))),
    or, as Inductor writes it for Triton (CUDA) graphs, exp(x - m) / s with (m, s) =
    prepare_softmax_online(x) (one online reduction for the max and the sum)."""
    numerator, denominator = div.args[:2]
    if not (isinstance(numerator, Node) and numerator.target == aten.exp.default):
        return None
    shifted = numerator.args[0]
    if not (isinstance(shifted, Node) and shifted.target == aten.sub.Tensor):
        return None
    x, row_max = shifted.args[:2]
    last_dims = ([-1], [_ndim(x) - 1])
    online = _online_softmax_parts(x, last_dims)
    if online is not None:
        return x if (row_max, denominator) == online else None
    if not (isinstance(row_max, Node) and row_max.target == aten.amax.default and row_max.args[0] is x
            and list(row_max.args[1]) in last_dims and kwarg_or_arg(row_max, 2, "keepdim", False)):
        return None
    if not (isinstance(denominator, Node) and denominator.target == aten.sum.dim_IntList
            and denominator.args[0] is numerator and list(denominator.args[1]) in last_dims
            and kwarg_or_arg(denominator, 2, "keepdim", False)):
        return None
    return x


def _online_softmax_parts(x: Any, last_dims: tuple) -> tuple[Node, Node] | None:
    """The (max, sum) outputs of Inductor's prepare_softmax_online(x, last dim), if x has them."""
    prepare = getattr(getattr(torch.ops.prims, "prepare_softmax_online", None), "default", None)
    if prepare is None or not isinstance(x, Node):
        return None
    for user in x.users:
        if user.target == prepare and user.args[0] is x and [user.args[1]] in last_dims:
            parts = {u.args[1]: u for u in user.users if u.target is operator.getitem}
            if 0 in parts and 1 in parts:
                return parts[0], parts[1]
    return None


def _tail(shape) -> tuple[int | None, int | None] | None:
    return (static_int(shape[-2]), static_int(shape[-1])) if len(shape) >= 2 else None


def _regroup(source, out, num_experts: int, group: tuple[int, int] | None):
    """How a reshape of a [.., E] (group None) or [.., G, P] tensor lays out the experts: "flat",
    (G, P), or None. With G == 1, [.., 1, E] and [.., E] hold the same data; the unit dim counts as
    the group dim when the reshape inserts it (or keeps it, for a grouped input)."""
    last, tail = static_int(out[-1]), _tail(out)
    if group is None:
        if tail and None not in tail and tail[1] != num_experts and tail[0] * tail[1] == num_experts:
            return tail
        if last == num_experts and tail and tail[0] == 1 and (len(out) > len(source) or static_int(source[-2]) != 1):
            return 1, num_experts
        return "flat" if last == num_experts else None
    if group[0] > 1:
        if tail == group:
            return group
        return "flat" if last == num_experts else None
    if last != num_experts:
        return None
    return group if len(out) == len(source) and tail[0] == 1 else "flat"


def _indicator_reshape(layout: str, source, out, group: tuple[int, int]) -> str | None:
    """The layout of a reshaped group mask (see GroupIndicator.layout), or None. Per-expert layouts
    (GP, E) stay per-expert and per-group ones (G, G1) per-group. Only with G == 1 do [.., 1, E] and
    [.., E] (or [.., 1, 1] and [.., 1]) look alike: then an added dim means the grouped layout."""
    groups, size = group
    tail, last = _tail(out), static_int(out[-1])
    grown = len(out) >= len(source) + (layout in ("E", "G"))
    if layout in ("GP", "E"):
        if tail == group and (groups > 1 or grown):
            return "GP"
        return "E" if last == groups * size else None
    if tail == (groups, 1) and (groups > 1 or grown):
        return "G1"
    return "G" if last == groups else None


def _is_arange_row(node: Any, length: int) -> bool:
    """Whether node is iota(length) (0, 1, .., length-1), possibly reshaped to [1, .., 1, length]."""
    if isinstance(node, Node) and node.target in RESHAPES:
        shape = fake(node).shape
        if any(static_int(d) != 1 for d in shape[:-1]):
            return False
        node = node.args[0]
    return (isinstance(node, Node) and node.target == prims.iota.default and node.args[0] == length
            and node.kwargs.get("start", 0) == 0 and node.kwargs.get("step", 1) == 1)


def _constant_fill(node: Any):
    """The fill value of a constant tensor built in the graph (full / full_like)."""
    if isinstance(node, Node) and node.target in (aten.full.default, aten.full_like.default):
        return node.args[1]
    return None


# --------------------------------------------------------------------------------------------------
# Rewrite


@dataclass
class _Plan:
    topk: ExpertTopk
    ids_nodes: list[Node]
    weights_nodes: list[Node]
    weights: Weights
    sel: Sel
    params: dict[str, Any]
    spelling: str


def rewrite_routing(graph: Graph, options: Any = None) -> tuple[list[Rewrite], list[Refusal]]:
    analysis = RoutingAnalysis(graph)
    rewrites, refusals = [], []
    for node in list(graph.nodes):
        meaning = analysis.meaning.get(node)
        location = describe_location(node)
        if isinstance(meaning, ExpertTopk):
            try:
                plan = _plan(analysis, meaning)
            except Exception as err:  # a bug here must not break the user's compile
                plan = f"internal error while analysing this routing ({type(err).__name__}: {err})"
            if isinstance(plan, str):
                refusals.append(Refusal(PASS_NAME, location, plan))
                continue
            try:
                _emit(graph, plan)
            except _Unsupported as err:
                refusals.append(Refusal(PASS_NAME, location, str(err)))
                continue
            rewrites.append(Rewrite(PASS_NAME, location, plan.spelling, plan.params))
        elif node.target == aten.topk.default and isinstance(analysis.of(node.args[0]), Tainted):
            refusals.append(Refusal(PASS_NAME, location, analysis.of(node.args[0]).reason))
    if rewrites:
        graph.eliminate_dead_code()
        graph.lint()
    return rewrites, refusals


def _plan(analysis: RoutingAnalysis, topk: ExpertTopk) -> _Plan | str:
    derived = [n for n, m in analysis.meaning.items()
               if isinstance(m, (ExpertIds, ExpertValues, Weights)) and m.topk is topk
               or isinstance(m, WeightSum) and m.weights.topk is topk]
    derived_set = set(derived)
    escaping = [n for n in derived if any(u not in derived_set for u in n.users)]
    ids_nodes = [n for n in escaping if isinstance(analysis.meaning[n], ExpertIds)]
    weight_nodes = [n for n in escaping if isinstance(analysis.meaning[n], Weights)]
    # The sum of weights that leave the routing may leave it too (a renormalisation the contract does
    # not describe, such as ERNIE-4.5's w / clamp(sum(w), min)): it stays, reading the fused weights.
    kept_sums = [n for n in escaping if isinstance(analysis.meaning[n], WeightSum)
                 and analysis.meaning[n].eps is None and analysis.meaning[n].of in weight_nodes]
    others = [n for n in escaping if n not in ids_nodes and n not in weight_nodes and n not in kept_sums]
    if others:
        return (f"{_describe(analysis.meaning[others[0]])} of the routing (node {others[0].name}) is used outside "
                f"the routing; the fused op cannot produce it")
    if not weight_nodes:
        users = sorted({u.name for n in derived for u in n.users if u not in derived_set})
        reasons = {analysis.reasons[u] for n in derived for u in n.users if u in analysis.reasons}
        detail = f": {'; '.join(sorted(reasons))}" if reasons else f" (the picks are used by {', '.join(users)})"
        return f"no routing weights computed by the contract leave the subgraph{detail}"
    if len({analysis.meaning[n] for n in weight_nodes}) > 1:
        return "the routing weights are used in more than one state (e.g. before and after scaling)"
    weights = analysis.meaning[weight_nodes[0]]
    if not topk.sorted:
        positional = _order_dependent_use([*weight_nodes, *ids_nodes], topk.k)
        if positional is not None:
            return (f"the top-k is unsorted (sorted=False) and {positional.target} (node {positional.name}) reads "
                    f"its outputs by position: eager's order is unspecified and may differ from the fused op's "
                    f"descending order")

    source = topk.source
    sel = source.sel if isinstance(source, Masked) else source
    if isinstance(source, Masked):
        score = source.index.score
        groups, group_size = score.sel.group
        topk_group, group_score_topk, masked_score = source.index.topk_group, score.m, source.fill
    else:
        groups, group_size, topk_group, group_score_topk, masked_score = 1, sel.root.num_experts, 1, 1, float("-inf")
    if weights.arith_dtype != sel.score_dtype:
        return (f"the weight arithmetic runs in {weights.arith_dtype} but the scores are stored in "
                f"{sel.score_dtype}; the fused op does both in one dtype")
    bias_dtype = fake(sel.bias).dtype if sel.bias is not None else None
    expected_sel_dtype = sel.score_dtype if bias_dtype in (None, sel.score_dtype) else torch.float32
    if sel.dtype != expected_sel_dtype:
        return f"the selection scores are {sel.dtype}, but scores in {sel.score_dtype} plus a {bias_dtype} bias " \
               f"give {expected_sel_dtype}"

    params = dict(
        num_expert_group=groups,
        topk_group=topk_group,
        topk=topk.k,
        scoring_func=sel.root.scoring,
        group_score_topk=group_score_topk,
        masked_score=masked_score,
        renormalize=weights.renorm_eps is not None,
        renormalize_eps=weights.renorm_eps or 0.0,
        routed_scaling_factor=weights.scale if weights.scale is not None else 1.0,
        weights_from_masked_scores=weights.from_masked,
        compute_dtype=None if sel.score_dtype == torch.float32 else sel.score_dtype,
        weights_dtype=weights.dtype,
        has_bias=sel.bias is not None,
    )
    error = _op_rejects(sel, params)
    if error:
        return error
    spelling = "; ".join(filter(None, [
        f"{sel.root.scoring}({str(sel.score_dtype).removeprefix('torch.')})",
        "+ bias" if sel.bias is not None else "",
        f"groups {groups}x{group_size}: {source.index.score.how}" if isinstance(source, Masked) else "no groups",
        " -> ".join(source.how) if isinstance(source, Masked) else "",
        f"topk(k={topk.k}, sorted={topk.sorted})",
        " ".join(weights.how),
        "their sum left to the graph" if kept_sums else "",
    ]))
    return _Plan(topk, ids_nodes, weight_nodes, weights, sel, params, spelling)


_POSITIONAL = {aten.slice.Tensor, aten.select.int, aten.narrow.default, aten.split.Tensor,
               aten.split_with_sizes.default, aten.unbind.int, aten.cumsum.default, aten.flip.default,
               aten.roll.default}


def _order_dependent_use(outputs: list[Node], k: int, depth: int = 8) -> Node | None:
    """An op within `depth` uses of the routing outputs that reads positions along a dim of size k."""
    seen: set[Node] = set()
    frontier = list(outputs)
    for _ in range(depth):
        following = []
        for node in frontier:
            for user in node.users:
                if user in seen:
                    continue
                seen.add(user)
                following.append(user)
                if user.target not in _POSITIONAL or fake(user.args[0]) is None:
                    continue
                shape = fake(user.args[0]).shape
                dim = kwarg_or_arg(user, 1, "dim", 0)
                if not isinstance(dim, int) or not -len(shape) <= dim < len(shape) or static_int(shape[dim]) != k:
                    continue
                if user.target == aten.slice.Tensor:
                    start, end = kwarg_or_arg(user, 2, "start", None), kwarg_or_arg(user, 3, "end", None)
                    step = kwarg_or_arg(user, 4, "step", 1)
                    if start in (None, 0) and (end is None or (isinstance(end, int) and end >= k)) and step == 1:
                        continue  # the whole dim
                return user
        frontier = following
    return None


def _op_rejects(sel: Sel, params: dict[str, Any]) -> str | None:
    from ops.gate import check_gate_args

    bias = fake(sel.bias).reshape(-1) if sel.bias is not None else None
    try:
        check_gate_args(fake(sel.root.logits), bias,
                        params["num_expert_group"], params["topk_group"], params["topk"], params["scoring_func"],
                        params["group_score_topk"], params["masked_score"], params["renormalize"],
                        params["renormalize_eps"], params["routed_scaling_factor"], 0, False,
                        params["weights_from_masked_scores"], params["compute_dtype"], params["weights_dtype"],
                        torch.int64)
    except ValueError as err:
        return f"the fused op does not support this configuration: {err}"
    return None


class _Unsupported(Exception):
    pass


def _emit(graph: Graph, plan: _Plan) -> None:
    sel, params = plan.sel, plan.params
    num_experts = sel.root.num_experts
    logits, bias = sel.root.logits, sel.bias
    # The gate routes [T, E] logits to [T, K] outputs, the layout the experts rewrites read. Each node
    # that leaves the routing gets them reshaped to its own shape (its token layout: [K] in a graph
    # specialised to one token, [B, L, K], [T, 1, K] for a bmm over the picks), so the weights and the
    # ids may leave in different shapes. A reshape keeps the token-major order of the (token, pick) pairs.
    flat_logits = fake(logits).dim() == 2
    tokens = fake(logits).shape[0] if flat_logits else fake(logits).numel() // num_experts
    readers = [(node, 0) for node in plan.weights_nodes] + [(node, 1) for node in plan.ids_nodes]
    size_holders = [logits, *(n for n in graph.nodes if n.op == "placeholder")]
    reader_sizes = {node: _reshape_sizes(fake(node).shape, size_holders) for node, _ in readers
                    if not same_shape(fake(node).shape, (tokens, params["topk"]))}
    build = GraphBuilder(graph, logits)
    with graph.inserting_before(plan.topk.node.next):  # the inputs precede the final top-k
        gate_input = logits if flat_logits else build.call(aten.reshape.default, (logits, [-1, num_experts]))
        gate_bias = bias
        if bias is not None and fake(bias).dim() != 1:
            gate_bias = build.call(aten.reshape.default, (bias, [num_experts]))
        fused = build.call(GATE_OP, (
            gate_input, gate_bias, params["num_expert_group"], params["topk_group"], params["topk"],
            params["scoring_func"], params["group_score_topk"], params["masked_score"], params["renormalize"],
            params["renormalize_eps"], params["routed_scaling_factor"], 0, False,
            params["weights_from_masked_scores"], params["compute_dtype"], params["weights_dtype"], torch.int64))
        outputs = [build.call(operator.getitem, (fused, index)) for index in (0, 1)]
        replacements = {node: build.reshape_like(outputs[index], reader_sizes[node]) if node in reader_sizes
                        else outputs[index] for node, index in readers}
    for node, replacement in replacements.items():
        node.replace_all_uses_with(replacement)


def _reshape_sizes(shape, size_holders: list[Node]) -> list:
    """Sizes to reshape a gate output to `shape`: symbolic ones read from the logits or the graph's
    inputs (a [B, L, K] reader of routing on flattened tokens), or -1 for one merged symbolic size."""
    sources = size_sources(shape, size_holders)
    if sources is not None:
        return sources
    try:
        return shape_arg(shape)
    except ValueError as err:
        raise _Unsupported(f"a routing output has a token layout the gate's outputs cannot be reshaped to ({err})")
