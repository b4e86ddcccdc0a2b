"""The torch.compile backend ("moe_fusion") and the Inductor post-grad pass that runs the rewrites.

Graphs that need gradients are rewritten before autograd instead (pre_autograd.py) when they can be:
by the backend before Inductor, or by ``BeforeAutogradPass``, install()'s pre-grad pass.
Inductor takes one post-grad custom pass (torch 2.11 / 2.12), so ``FusionPass`` runs the enabled
rewrites in order and then any pass that was already configured. Its ``uuid()`` hashes the pass
sources and the enabled rewrites: Inductor's FX graph cache keys on it, so a cached graph is reused
only with the same rewrites, and a graph compiled without them is never served with them. It also
hashes the ops' Python sources and schemas, which Inductor's own key leaves out: compiled code calls
the fused ops by schema, and code compiled against an older moe_fusion must not be served after an
upgrade changed one.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ops
import torch
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from .experts import rewrite_experts
from .pre_autograd import needs_gradients, placeholder_examples, replace_graph, rewrite_before_autograd
from .report import GraphReport, Refusal, collector, logger, op_counts
from .routing import rewrite_routing
from .shared_experts import rewrite_shared_experts

# In order: the experts rewrite starts from the fused gates the routing rewrite made, and the
# shared-expert rewrite from the fused_experts calls the experts rewrite made.
REWRITES: dict[str, Callable] = {
    "routing": rewrite_routing,
    "experts": rewrite_experts,
    "shared_experts": rewrite_shared_experts,
}

_SOURCES = tuple(sorted(path for package in (os.path.dirname(__file__), os.path.dirname(ops.__file__))
                        for path in glob.glob(os.path.join(package, "*.py"))))


def library_key() -> tuple:
    """What a compiled graph depends on besides itself: the hash of the passes' and the ops' Python
    sources, and every moe_fusion op schema."""
    names = {name.split(".")[0] for name in torch._C._dispatch_get_all_op_names() if name.startswith("moe_fusion::")}
    schemas = sorted(str(schema) for name in names for schema in torch._C._jit_get_schemas_for_operator(name))
    return get_hash_for_files(_SOURCES), tuple(schemas)


@dataclass(frozen=True)
class FusionOptions:
    """Settings of the rewrites (part of the pass's cache key).

    fuse_experts_on_cpu: on the CPU, fused_experts runs per-expert ATen matmuls, which is not faster
    than Inductor's code for the unfused experts, so the experts and shared-expert rewrites only
    apply to CUDA graphs unless this is set (tests set it to check the rewrites on the CPU).
    """

    fuse_experts_on_cpu: bool = False


def enabled_rewrites(names: Sequence[str] | None = None) -> tuple[str, ...]:
    """The rewrites to run: `names`, or all minus those listed in MOE_FUSION_DISABLE (comma-separated)."""
    if names is None:
        disabled = {n.strip() for n in os.environ.get("MOE_FUSION_DISABLE", "").split(",") if n.strip()}
        names = [n for n in REWRITES if n not in disabled]
    unknown = [n for n in names if n not in REWRITES]
    if unknown:
        raise ValueError(f"moe_fusion: unknown rewrite(s) {unknown}; known: {sorted(REWRITES)}")
    return tuple(n for n in REWRITES if n in names)


def run_rewrites(graph: torch.fx.Graph, names: Sequence[str], options: FusionOptions) -> GraphReport:
    """Runs the rewrites `names` in order on `graph`; the report of what they did."""
    report = GraphReport(collector.next_index(), graph_before=str(graph), ops_before=op_counts(graph))
    for name in names:
        try:
            rewrites, refusals = REWRITES[name](graph, options)
        except Exception as err:  # a bug in a rewrite must not break the user's compile
            logger.warning("moe_fusion: the %s rewrite failed and was skipped: %r", name, err)
            rewrites, refusals = [], [Refusal(name, "graph", f"internal error: {type(err).__name__}: {err}")]
        report.rewrites += rewrites
        report.refusals += refusals
    report.graph_after = str(graph)
    report.ops_after = op_counts(graph)
    return report


class FusionPass(CustomGraphPass):
    """Runs the enabled rewrites on a post-grad graph, then `chained` (a pass configured before)."""

    def __init__(self, rewrites: Sequence[str] | None = None, chained: Any = None,
                 options: FusionOptions = FusionOptions()) -> None:
        self.rewrites = enabled_rewrites(rewrites)
        self.chained = chained.chained if isinstance(chained, FusionPass) else chained
        self.options = options

    def __call__(self, graph: torch.fx.Graph) -> None:
        report = run_rewrites(graph, self.rewrites, self.options)
        if self.chained is not None:
            self.chained(graph)
        collector.add(report)

    def uuid(self) -> Any:
        chained = None
        if self.chained is not None:
            chained = self.chained.uuid() if hasattr(self.chained, "uuid") else None
            if chained is None:
                return None  # the chained pass cannot be cached: neither can we
        return (library_key(), self.rewrites, self.options, chained)


def _mode_and_option_patches(mode: str | None, options: dict[str, Any] | None) -> dict[str, Any]:
    """Inductor config patches for torch.compile's mode= and options=, as the inductor backend applies them."""
    patches: dict[str, Any] = {}
    if mode and mode != "default":
        patches.update(torch._inductor.list_mode_options(mode))
    known = inductor_config.get_config_copy()
    for key, value in (options or {}).items():
        name = key.replace("-", "_")
        if name not in known:
            raise ValueError(f"moe_fusion: unknown Inductor option {key!r}")
        patches[name] = value
    return patches


def make_backend(rewrites: Sequence[str] | None = None, *, fuse_experts_on_cpu: bool = False) -> Callable:
    """A torch.compile backend running Inductor with the given rewrites (default: all enabled)."""
    names = enabled_rewrites(rewrites)
    fusion_options = FusionOptions(fuse_experts_on_cpu)

    def moe_fusion_backend(gm: torch.fx.GraphModule, example_inputs, mode: str | None = None,
                           options: dict[str, Any] | None = None):
        from torch._inductor.compile_fx import compile_fx

        patches = _mode_and_option_patches(mode, options)
        configured = patches.get("post_grad_custom_post_pass", inductor_config.post_grad_custom_post_pass)
        if needs_gradients(example_inputs):  # a training graph: rewrite before autograd (pre_autograd.py)
            before = rewrite_before_autograd(gm, example_inputs,
                                             lambda graph: run_rewrites(graph, names, fusion_options))
            collector.add(before.report)
            if not before.after_autograd:
                patches["post_grad_custom_post_pass"] = configured
                return compile_fx(before.module or gm, example_inputs, config_patches=patches)
        patches["post_grad_custom_post_pass"] = FusionPass(names, chained=configured, options=fusion_options)
        return compile_fx(gm, example_inputs, config_patches=patches)

    return moe_fusion_backend


backend = make_backend()


class BeforeAutogradPass(FusionPass):
    """install()'s pre-grad pass: rewrites the graphs of training compiles before autograd, in place
    (pre_autograd.py; the backend does the same before handing the graph to Inductor). Graphs that do
    not need gradients, or that cannot be rewritten there, are left to the post-grad pass."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        module = graph.owning_module
        examples = placeholder_examples(module)
        if needs_gradients(examples):
            before = rewrite_before_autograd(module, examples, lambda g: run_rewrites(g, self.rewrites, self.options))
            collector.add(before.report)
            if before.module is not None:
                replace_graph(module, before.module)
        if self.chained is not None:
            self.chained(graph)


def install(rewrites: Sequence[str] | None = None, *, fuse_experts_on_cpu: bool = False) -> Callable[[], None]:
    """Adds the rewrites to the default "inductor" backend, for code that calls plain torch.compile:
    as Inductor's pre-grad pass for training graphs (rewritten before autograd) and as its post-grad
    pass for the others.

    Returns a function that restores the previous passes.
    """
    options = FusionOptions(fuse_experts_on_cpu)
    previous = inductor_config.pre_grad_custom_pass, inductor_config.post_grad_custom_post_pass
    inductor_config.pre_grad_custom_pass = BeforeAutogradPass(rewrites, chained=previous[0], options=options)
    inductor_config.post_grad_custom_post_pass = FusionPass(rewrites, chained=previous[1], options=options)

    def uninstall() -> None:
        inductor_config.pre_grad_custom_pass, inductor_config.post_grad_custom_post_pass = previous

    return uninstall
