"""Autograd for ``moe_fusion::fused_experts``: gradients w.r.t. hidden, topk_weights, the routed and
shared expert weights and shared_token_weight; the ids are integers and get none.

For a pair (token t, slot j) of expert slot e = ids[t, j] with pair weight p = topk_weights[t, j]
(times shared_token_weight[t] when e >= E is a shared slot), the forward adds p * y to out[t]:

    a = x_t G_e^T,   b = x_t U_e^T,   h = silu(a) * b,   y = h D_e^T.

For the upstream gradient g_t of out[t], the backward is

    dp  = <g_t, y>       d topk_weights[t, j] = dp (* shared_token_weight[t] on shared slots)
                         d shared_token_weight[t] = sum over the shared slots j of dp * topk_weights[t, j]
    dy  = p * g_t        dD_e += dy^T h
    dh  = dy D_e
    da  = dh * b * silu'(a),   silu'(a) = s * (1 + a * (1 - s)),   s = sigmoid(a)
    db  = dh * silu(a)
    dG_e += da^T x_t,   dU_e += db^T x_t,   dx_t += da G_e + db U_e

A shared slot's G_e, U_e and D_e are rows (columns of D) [s*I, (s+1)*I) of the shared weights, so
its gradients land there. A fused gate_up (w_gate [E, 2I, H], w_up None) gets one gradient whose
halves the backward writes in place; weights passed as views of one tensor get one gradient per
view, which autograd sums into that tensor. Pairs with ids outside [0, E + S) add
nothing (the CPU forward rejects them, the CUDA forward ignores them) and get zero gradients.

Under autograd the forward is ``moe_fusion::fused_experts_train`` (the Autograd kernel of
``fused_experts`` below routes there): the same output, plus each pair's a and b, the projections
[T*K, 2I] in hidden's dtype (row t*K + j: a, then b). The backward reads them instead of recomputing
two GEMMs over the gate and up weights, and recomputes h from them (rounded to hidden's dtype as the
forward rounds it; on CUDA the forward's h comes from float32 a and b, the backward's from the saved,
rounded ones: a difference within the dtype's rounding) and y from h. That keeps 2 * T*K*I values
per MoE layer for the backward, as the unfused model keeps its two projections.

Pairs are sorted by slot (stably: the summation order is fixed) and each active slot runs its
matmuls through ATen on its gathered rows, in the inputs' dtype (float32 accumulation inside the
matmul, as in the forward); the elementwise math, the pair weights and the sums over a token's K
slots are float32. Per-pair rows are written to their own place (a [T*K, H] float32 buffer for the
hidden states' gradient) and summed afterwards: no floating-point atomics, the same gradients on
every run. Gradients come back in each input's dtype.

That is the per-slot loop of CPU (and other non-CUDA) tensors, which reads the slot sizes on the host
once per backward. CUDA tensors run the same formula as Triton grouped GEMMs
(ops/triton_experts_backward.py): no host synchronisation, capturable in a CUDA graph. Both run inside
an op of their own, ``moe_fusion::fused_experts_backward``, so that ``torch.compile`` keeps the
data-dependent slot sizes opaque. That op is not differentiable: a double backward
(``create_graph=True``) raises ValueError.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .experts import check_experts_args, gate_and_up
from .reference import accumulation_dtype, expert_slot_weights, num_expert_slots, pair_weights

# Positions of the op's differentiable inputs (all but topk_ids, 2) in its schema.
_DIFFERENTIABLE = (0, 1, 3, 4, 5, 6, 7, 8, 9)


def fused_experts_grads(
    grad_out: torch.Tensor,
    projections: torch.Tensor,
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    shared_gate: torch.Tensor | None,
    shared_up: torch.Tensor | None,
    shared_down: torch.Tensor | None,
    shared_token_weight: torch.Tensor | None,
    needs_grad: Sequence[bool],
) -> tuple[torch.Tensor | None, ...]:
    """The gradients of ``fused_experts``' differentiable inputs (all but topk_ids, in schema order)
    for the upstream gradient `grad_out` [T, H] and the forward's `projections` [T*K, 2I]
    (``fused_experts_train``'s second output); None where `needs_grad` (one flag per such input) is
    False. See the module docstring for the formula. Float64 inputs are computed in float64.

    CUDA tensors run the Triton grouped GEMMs (ops/triton_experts_backward.py, no synchronisation);
    other devices the per-slot loop (`_grads_per_slot`)."""
    need_hidden, need_topk_weights, *need_weights, need_token_weight = needs_grad
    tokens = hidden.shape[0]
    num_experts = w_down.shape[0]
    num_slots = num_expert_slots(w_down, shared_gate)
    ids = topk_ids.long()
    work = accumulation_dtype(hidden.dtype)
    token_weight = None if shared_token_weight is None else shared_token_weight.to(work)
    pair_weight = pair_weights(topk_weights.to(work), ids, num_experts, token_weight).reshape(-1)
    weights = (*gate_and_up(w_gate, w_up), w_down, shared_gate, shared_up, shared_down)
    runs_triton = _runs_triton(hidden) and tokens > 0
    # A fused gate_up (w_up None) gets one gradient [E, 2I, H], whose halves the paths below fill.
    fused_grad = None
    if w_up is None and need_weights[0]:
        fused_grad = (torch.empty if runs_triton else torch.zeros)(w_gate.shape, dtype=w_gate.dtype,
                                                                    device=w_gate.device)
        need_weights[1] = True
    gate_up_grads = None if fused_grad is None else gate_and_up(fused_grad, None)

    if runs_triton:
        from .triton_experts_backward import experts_grads_triton  # Triton is imported on first CUDA use only

        grad_hidden, grad_pair_weight, grad_weights = experts_grads_triton(
            grad_out, projections, hidden, topk_ids, pair_weight.contiguous(), weights, num_slots - num_experts,
            need_hidden, need_weights, gate_up_grads)
    else:
        grad_hidden, grad_pair_weight, grad_weights = _grads_per_slot(
            grad_out, projections, hidden, ids, pair_weight, weights, num_slots, need_hidden,
            need_topk_weights or need_token_weight, need_weights, gate_up_grads)
    if w_up is None:
        grad_weights = (fused_grad, None, *grad_weights[2:])

    grad_topk_weights = grad_token_weight = None
    if need_topk_weights or need_token_weight:
        grad_pair_weight = grad_pair_weight.view(ids.shape)
    if need_topk_weights:
        # The pair weight is topk_weights times a factor that does not depend on it.
        grad_topk_weights = pair_weights(grad_pair_weight, ids, num_experts, token_weight).to(topk_weights.dtype)
    if need_token_weight:
        shared_terms = torch.where(ids >= num_experts, grad_pair_weight * topk_weights.to(work), 0.0)
        grad_token_weight = shared_terms.sum(1).to(shared_token_weight.dtype)
    return (grad_hidden, grad_topk_weights, *grad_weights, grad_token_weight)


def _runs_triton(hidden: torch.Tensor) -> bool:
    """Whether the Triton backward serves these tensors (the tests also run it on the CPU, interpreted)."""
    return hidden.device.type == "cuda"


def _grads_per_slot(grad_out, projections, hidden, ids, pair_weight, weights, num_slots, need_hidden,
                    need_pair_weight, need_weights, gate_up_grads=None):
    """(grad_hidden or None, grad_pair_weight [T*K] in the accumulation dtype or None, the six weight
    gradients or None) by PyTorch ops over each active slot's rows; `gate_up_grads`, zero-filled
    buffers for the gate and up gradients (views of a fused one), else they are allocated."""
    tokens, hidden_size = hidden.shape
    topk = ids.shape[1]
    num_experts, inter, _ = weights[0].shape
    dtype = hidden.dtype
    work = accumulation_dtype(dtype)
    buffers = [*(gate_up_grads or (None, None)), None, None, None, None]
    grad_weights = [buffer if buffer is not None else torch.zeros(w.shape, dtype=w.dtype, device=w.device)
                    if needed else None for w, needed, buffer in zip(weights, need_weights, buffers, strict=True)]
    # Per-pair gradients of the pair weight and of the token's row, reduced over K after the loop.
    grad_pair_weight = hidden.new_zeros(ids.numel(), dtype=work) if need_pair_weight else None
    grad_pair_hidden = hidden.new_zeros((ids.numel(), hidden_size), dtype=work) if need_hidden else None

    # Out-of-range ids get the key num_slots: sorted last and left out of the loop.
    flat_ids = ids.reshape(-1)
    slot_keys = torch.where((flat_ids >= 0) & (flat_ids < num_slots), flat_ids, num_slots)
    order = torch.argsort(slot_keys, stable=True)
    sizes = torch.bincount(slot_keys, minlength=num_slots + 1).tolist()  # the one host synchronisation
    for slot, pairs in enumerate(order.split(sizes)[:num_slots]):
        if pairs.numel() == 0:
            continue
        gate, up, down = expert_slot_weights(slot, num_experts, inter, weights[:3], weights[3:])
        grad_gate, grad_up, grad_down = expert_slot_weights(slot, num_experts, inter, grad_weights[:3],
                                                            grad_weights[3:])
        token = pairs.div(topk, rounding_mode="floor")
        x = hidden.index_select(0, token)
        a, b = projections.index_select(0, pairs).to(work).split(inter, dim=1)
        sigmoid_a = torch.sigmoid(a)
        silu_a = a * sigmoid_a
        h = (silu_a * b).to(dtype)  # rounded as in the forward
        g = grad_out.index_select(0, token).to(work)
        if grad_pair_weight is not None:
            y = (h @ down.T).to(work)
            grad_pair_weight[pairs] = (g * y).sum(1)
        dy = (g * pair_weight[pairs, None]).to(dtype)
        if grad_down is not None:
            grad_down.copy_(dy.T @ h)
        if need_hidden or grad_gate is not None or grad_up is not None:
            dh = (dy @ down).to(work)
            da = (dh * b * sigmoid_a * (1 + a * (1 - sigmoid_a))).to(dtype)
            db = (dh * silu_a).to(dtype)
            if grad_gate is not None:
                grad_gate.copy_(da.T @ x)
            if grad_up is not None:
                grad_up.copy_(db.T @ x)
            if grad_pair_hidden is not None:
                grad_pair_hidden[pairs] = (da @ gate).to(work) + (db @ up).to(work)
    grad_hidden = None
    if grad_pair_hidden is not None:
        grad_hidden = grad_pair_hidden.view(tokens, topk, hidden_size).sum(1).to(dtype)
    return grad_hidden, grad_pair_weight, grad_weights


def check_experts_backward_args(grad_out, projections, hidden, topk_weights, topk_ids, w_gate, w_up, w_down,
                                shared_gate, shared_up, shared_down, shared_token_weight, needs_grad) -> None:
    """fused_experts_backward's rules (ValueError naming the argument): the forward's, and the upstream
    gradient and projections of its output's and fused_experts_train's shapes. Metadata only."""
    check_experts_args(hidden, topk_weights, topk_ids, w_gate, w_up, w_down, shared_gate, shared_up, shared_down,
                       shared_token_weight)
    dtype = hidden.dtype
    if grad_out.shape != hidden.shape or grad_out.dtype != dtype or grad_out.device != hidden.device:
        raise ValueError(f"fused_experts_backward: grad_out must be like hidden ({list(hidden.shape)}, {dtype}, "
                         f"{hidden.device}), got {list(grad_out.shape)}, {grad_out.dtype}, {grad_out.device}")
    expected = [topk_ids.numel(), 2 * w_down.shape[2]]
    if list(projections.shape) != expected or projections.dtype != dtype or projections.device != hidden.device:
        raise ValueError(f"fused_experts_backward: projections must be [T*K, 2I] = {expected} of hidden's dtype and "
                         f"device ({dtype}, {hidden.device}; fused_experts_train's second output), got "
                         f"{list(projections.shape)}, {projections.dtype}, {projections.device}")
    if len(needs_grad) != len(_DIFFERENTIABLE):
        raise ValueError(f"fused_experts_backward: needs_grad must have {len(_DIFFERENTIABLE)} flags (one per "
                         f"differentiable input), got {len(needs_grad)}")


@torch.library.impl("moe_fusion::fused_experts_backward", "CompositeExplicitAutograd")
def _fused_experts_backward(*args):
    """``fused_experts_grads`` as the op (schema in csrc/registration.cpp): the flagged gradients only."""
    check_experts_backward_args(*args)
    return [grad for grad in fused_experts_grads(*args) if grad is not None]


def _no_double_backward(ctx, *grads):
    raise ValueError("fused_experts: double backward (create_graph=True) is not supported")


torch.library.register_autograd("moe_fusion::fused_experts_backward", _no_double_backward)


def _setup_context(ctx, inputs, output):
    _, projections = output
    ctx.mark_non_differentiable(projections)  # saved for the backward, not a result of the model
    ctx.save_for_backward(projections, *inputs)


def _backward(ctx, grad_out, _grad_projections):
    needs_grad = [ctx.needs_input_grad[i] for i in _DIFFERENTIABLE]
    grads = [None] * len(ctx.needs_input_grad)  # topk_ids and inputs that need none stay None
    if any(needs_grad):
        computed = iter(torch.ops.moe_fusion.fused_experts_backward(grad_out, *ctx.saved_tensors, needs_grad))
        for i, needed in zip(_DIFFERENTIABLE, needs_grad, strict=True):
            if needed:
                grads[i] = next(computed)
    return tuple(grads)


torch.library.register_autograd("moe_fusion::fused_experts_train", _backward, setup_context=_setup_context)

# fused_experts itself: when a gradient is needed, it runs as fused_experts_train (which saves the
# projections for the backward) and returns its first output, so every caller (eager code, the
# rewrites' graphs that AOT autograd differentiates) gets that backward; else it runs as it is.
_LIBRARY = torch.library.Library("moe_fusion", "FRAGMENT")


def _fused_experts_autograd(keyset, *args):
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
        return torch.ops.moe_fusion.fused_experts_train.default(*args)[0]
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.moe_fusion.fused_experts.default.redispatch(keyset & torch._C._after_autograd_keyset, *args)


_LIBRARY.impl("fused_experts", _fused_experts_autograd, "Autograd", with_keyset=True)
