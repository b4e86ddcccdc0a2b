"""Graph passes that put moe_fusion's fused ops into unchanged models under torch.compile.

    torch.compile(model, backend="moe_fusion")        # registered on import
    fusion_passes.install()                            # or: add the rewrites to the default backend
    fusion_passes.explain(model, *inputs)              # what was rewritten, what was refused and why

Rewrites, in order: ``routing`` (grouped top-k routing -> moe_fused_gate), ``experts`` (routed
experts -> fused_experts) and ``shared_experts`` (routed + shared MLP -> one fused_experts).
``MOE_FUSION_LOG=1`` logs the rewrites of ordinary compiles (``debug`` adds the graphs);
``MOE_FUSION_DISABLE=experts,shared_experts`` switches rewrites off, as does
``make_backend(rewrites=[...])``.
"""

import ops  # noqa: F401  (the fused ops the rewrites emit)
from torch._dynamo import register_backend

from .inductor_backend import FusionOptions, FusionPass, backend, enabled_rewrites, install, make_backend
from .explain import explain
from .report import GraphReport, Refusal, Report, Rewrite

register_backend(name="moe_fusion")(backend)

__all__ = [
    "FusionOptions", "FusionPass", "GraphReport", "Refusal", "Report", "Rewrite", "backend", "enabled_rewrites", "explain", "install",
    "make_backend",
]
