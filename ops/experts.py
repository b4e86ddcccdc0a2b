"""Python API of the fused MoE experts, the argument rules shared with the fake impl, and the CUDA kernel.

The CPU kernel is C++ (csrc/experts_cpu.cpp) and checks the same rules with the same messages; this copy
runs at trace time (fake impl) and in front of the Triton kernels (ops/triton_experts.py), which are
registered here for the CUDA dispatch key.
"""

from __future__ import annotations

import torch

from .gate import FLOAT_DTYPES


def check_experts_args(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor | None,
    w_down: torch.Tensor,
    shared_gate: torch.Tensor | None,
    shared_up: torch.Tensor | None,
    shared_down: torch.Tensor | None,
    shared_token_weight: torch.Tensor | None,
) -> int:
    """Raises ValueError naming the argument and the rule it breaks; returns S, the shared slots.

    Only metadata is read (never values), so it runs on fake tensors and never synchronises a device.
    """

    def fail(message: str) -> None:
        raise ValueError(f"fused_experts: {message}")

    if hidden.dim() != 2:
        fail(f"hidden must be 2-D [T, H], got shape {list(hidden.shape)}")
    if hidden.dtype not in FLOAT_DTYPES:
        fail(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    tokens, hidden_size = hidden.shape
    dtype = hidden.dtype
    if topk_ids.dim() != 2 or topk_ids.shape[0] != tokens or topk_ids.shape[1] < 1:
        fail(f"topk_ids must have shape [T, K] with T = {tokens} and K >= 1, got {list(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        fail(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if topk_weights.shape != topk_ids.shape:
        fail(f"topk_weights must have topk_ids' shape {list(topk_ids.shape)}, got {list(topk_weights.shape)}")
    if topk_weights.dtype not in (torch.float32, dtype):
        fail(f"topk_weights must be float32 or hidden's dtype ({dtype}), got {topk_weights.dtype}")
    if w_up is None:
        if (w_gate.dim() != 3 or w_gate.shape[0] < 1 or w_gate.shape[1] < 2 or w_gate.shape[1] % 2
                or w_gate.shape[2] != hidden_size):
            fail(f"w_gate must have shape [E, 2I, H] with E, I >= 1 and H = {hidden_size} when w_up is None "
                 f"(a fused gate_up: gate rows, then up rows), got {list(w_gate.shape)}")
        num_experts, inter = w_gate.shape[0], w_gate.shape[1] // 2
    else:
        if w_gate.dim() != 3 or w_gate.shape[0] < 1 or w_gate.shape[1] < 1 or w_gate.shape[2] != hidden_size:
            fail(f"w_gate must have shape [E, I, H] with E, I >= 1 and H = {hidden_size}, got {list(w_gate.shape)}")
        num_experts, inter = w_gate.shape[:2]
        if w_up.shape != w_gate.shape:
            fail(f"w_up must have w_gate's shape {list(w_gate.shape)}, got {list(w_up.shape)}")
    if w_down.shape != (num_experts, hidden_size, inter):
        fail(
            f"w_down must have shape [E, H, I] = {[num_experts, hidden_size, inter]}, got {list(w_down.shape)}"
        )

    shared = (shared_gate, shared_up, shared_down)
    num_shared_given = sum(t is not None for t in shared)
    if num_shared_given not in (0, 3):
        fail("shared_gate, shared_up and shared_down must be given together or not at all")
    num_shared = 0
    if num_shared_given == 3:
        if (shared_gate.dim() != 2 or shared_gate.shape[1] != hidden_size or shared_gate.shape[0] < inter
                or shared_gate.shape[0] % inter != 0):
            fail(
                f"shared_gate must have shape [S*I, H] with S >= 1, I = {inter} and H = {hidden_size}, "
                f"got {list(shared_gate.shape)}"
            )
        num_shared = shared_gate.shape[0] // inter
        if shared_up.shape != shared_gate.shape:
            fail(f"shared_up must have shared_gate's shape {list(shared_gate.shape)}, got {list(shared_up.shape)}")
        if shared_down.shape != (hidden_size, num_shared * inter):
            fail(
                f"shared_down must have shape [H, S*I] = {[hidden_size, num_shared * inter]}, "
                f"got {list(shared_down.shape)}"
            )
    weights = {"w_gate": w_gate, "w_up": w_up, "w_down": w_down, "shared_gate": shared_gate,
               "shared_up": shared_up, "shared_down": shared_down}
    for name, weight in weights.items():
        if weight is not None and weight.dtype != dtype:
            fail(f"{name} must have hidden's dtype ({dtype}), got {weight.dtype}")
    if shared_token_weight is not None:
        if num_shared == 0:
            fail("shared_token_weight requires shared_gate, shared_up and shared_down")
        if shared_token_weight.shape != (tokens,):
            fail(f"shared_token_weight must have shape [T] = [{tokens}], got {list(shared_token_weight.shape)}")
        if shared_token_weight.dtype not in (torch.float32, dtype):
            fail(f"shared_token_weight must be float32 or hidden's dtype ({dtype}), got {shared_token_weight.dtype}")
    others = {"topk_weights": topk_weights, "topk_ids": topk_ids, "shared_token_weight": shared_token_weight}
    for name, tensor in (*others.items(), *weights.items()):
        if tensor is not None and tensor.device != hidden.device:
            fail(f"{name} must be on hidden's device ({hidden.device}), got {tensor.device}")
    return num_shared


def gate_and_up(w_gate: torch.Tensor, w_up: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The [E, I, H] gate and up weights of fused_experts' arguments: themselves, or with w_up None the
    two halves of the fused gate_up w_gate [E, 2I, H] (views: nothing is copied)."""
    if w_up is not None:
        return w_gate, w_up
    inter = w_gate.shape[1] // 2
    return w_gate[:, :inter], w_gate[:, inter:]


def fused_experts(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor | None,
    w_down: torch.Tensor,
    shared_gate: torch.Tensor | None = None,
    shared_up: torch.Tensor | None = None,
    shared_down: torch.Tensor | None = None,
    shared_token_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed experts and shared experts of an MoE block as one grouped computation.

    ``out[t] = sum_j w[t, j] * Expert_{topk_ids[t, j]}(hidden[t])`` with
    ``Expert_e(x) = down_e @ (silu(gate_e @ x) * (up_e @ x))``.

    Args:
        hidden: ``[T, H]`` float32, bfloat16 or float16. The output has this shape and dtype.
        topk_weights: ``[T, K]`` float32 or hidden's dtype.
        topk_ids: ``[T, K]`` int32 or int64 in ``[0, E + S)``. Ids ``e < E`` select routed expert ``e``;
            ids ``e >= E`` select shared slot ``e - E``. An id repeated in a row contributes once per
            occurrence (the router never repeats one).
        w_gate, w_up: ``[E, I, H]``, or w_gate a fused gate_up ``[E, 2I, H]`` (gate rows, then up rows)
            and w_up None; w_down: ``[E, H, I]``; hidden's dtype. Any strides: pass the model's
            parameters or views of them, nothing is copied. HF transformers v5 holds
            ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``: pass ``gate_up_proj, None,
            down_proj`` (its gradient is then one tensor, as autograd would otherwise sum the
            gradients of two views into it). torchtitan holds ``w1, w3 [E, I, H]`` and
            ``w2 [E, H, I]``: pass ``w1, w3, w2``.
        shared_gate, shared_up: ``[S*I, H]``; shared_down: ``[H, S*I]`` (the shared MLP's own
            ``nn.Linear`` weights, or row slices of a fused gate_up Linear), all three or none. The
            intermediate dimension is split into ``S`` slots of the routed experts' size ``I``: slot
            ``s`` reads rows ``[s*I, (s+1)*I)`` of shared_gate/shared_up and those columns of
            shared_down. A shared MLP of intermediate size ``S*I`` equals the sum of its ``S`` slots,
            so it is fused by appending ids ``E .. E+S-1`` with weight 1 to every token's row.
        shared_token_weight: optional ``[T]`` float32 or hidden's dtype; multiplies the contributions
            of shared slots on top of their ``topk_weights`` entry (a sigmoid-gated shared expert,
            Qwen2-MoE style).

    Numerics: float32 accumulation; the SiLU-and-multiply intermediate is rounded to hidden's dtype
    between the two projections (as in the unfused model); float32 inputs are computed in full float32
    (no TF32). The result does not depend on run-to-run scheduling: no floating-point atomics.

    Differentiable w.r.t. every float argument (ops/experts_autograd.py); topk_ids gets no gradient.
    When a gradient is needed it runs as ``moe_fusion::fused_experts_train``, which also keeps each
    (token, slot) pair's gate and up projections ([T*K, 2I], hidden's dtype) for the backward.

    Ids outside ``[0, E + S)`` raise ValueError on the CPU. On CUDA, checking them would need a host
    synchronisation, so such pairs are ignored (they contribute nothing) and nothing is written out of
    bounds. The CUDA path never synchronises with the host and can be captured in a CUDA graph.
    """
    return torch.ops.moe_fusion.fused_experts(
        hidden, topk_weights, topk_ids, w_gate, w_up, w_down, shared_gate, shared_up, shared_down,
        shared_token_weight,
    )


def _run_triton(hidden, topk_weights, topk_ids, w_gate, w_up, w_down, shared_gate, shared_up, shared_down,
                shared_token_weight, with_projections: bool):
    """(out, projections [T*K, 2I] or None) by the Triton kernels, after the argument checks. Rows of
    projections whose pair has an id outside [0, E + S) are left unwritten: the backward never reads them."""
    num_shared = check_experts_args(hidden, topk_weights, topk_ids, w_gate, w_up, w_down, shared_gate,
                                    shared_up, shared_down, shared_token_weight)
    from .triton_experts import fused_experts_triton  # Triton is imported on first CUDA use only

    projections = hidden.new_empty(topk_ids.numel(), 2 * w_down.shape[2]) if with_projections else None
    out = fused_experts_triton(hidden, topk_weights, topk_ids, *gate_and_up(w_gate, w_up), w_down, shared_gate,
                               shared_up, shared_down, shared_token_weight, num_shared, projections_out=projections)
    return out, projections


@torch.library.register_kernel("moe_fusion::fused_experts", "cuda")
def _fused_experts_cuda(*args):
    return _run_triton(*args, with_projections=False)[0]


@torch.library.register_kernel("moe_fusion::fused_experts_train", "cuda")
def _fused_experts_train_cuda(*args):
    return _run_triton(*args, with_projections=True)
