"""moe_fusion ops: the compiled kernels (``ops._C``), their fake impls and autograd, the Python API and references."""

import torch  # noqa: F401  (loads libtorch, which ops._C links against)

from . import _C  # noqa: F401  (registers the moe_fusion library and its CPU/CUDA kernels)
from . import _fake  # noqa: F401  (registers the fake impls, once)
from . import gate_autograd  # noqa: F401  (registers the gate's backward, once)
from . import experts_autograd  # noqa: F401  (registers fused_experts' backward and its op, once)
from .experts import fused_experts
from .gate import moe_fused_gate

__all__ = ["fused_experts", "moe_fused_gate"]
