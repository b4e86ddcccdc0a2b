"""Triton kernels of ``fused_experts``' backward (CUDA): grouped GEMMs, no host synchronisation.

The formula is ops/experts_autograd.py's. For the pair (token t, slot e) with pair weight p and
upstream gradient g = grad_out[t], the backward needs u = g D_e (so that dh = p u and, as
y = h D_e^T, d p = <g, y> = <u, h>); the gate and up projections a, b of the pair are the ones the
training forward saved (projections, row t*K + j), not recomputed:

1. ``align`` (the forward's kernel, stable): the pairs sorted by slot in BLOCK_M-padded segments,
   each slot's rows in pair order.
2. ``_gate_up_backward_kernel``: u = D_e^T g (the forward's gathered GEMM on grad_out, with D_e^T
   read through a transposed view of the down weights: no copy) and, in its epilogue with the
   saved a and b, h = silu(a) * b, da = p u b silu'(a), db = p u silu(a), and the partial sums of
   <u, h> over its I tile (summed over tiles afterwards, in a fixed order).
3. dx[pair] = G_e^T da + U_e^T db: the forward's scattered GEMM with two inputs, then the forward's
   combine (unweighted) sums each token's K rows.
4. ``_weight_grad_kernel``: per slot and output tile, a GEMM that reduces over the slot's rows:
   dD_e = (p g)^T h, and dG_e = da^T x, dU_e = db^T x (one kernel, two accumulators, x read once).

Every size is computed from shapes, sums run in a fixed order (no floating-point atomics): the
gradients are the same on every run and the whole backward can be captured in a CUDA graph.
Each slot's weight gradient is reduced by one program per tile over all of the slot's rows, so a
shared slot (every token) is the longest; its programs start first and the routed slots' run beside them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .triton_experts import (
    Alignment,
    align,
    combine,
    gathered_gate_up,
    launch_gemm,
    on_device,
    program_block,
    scattered_gemm,
    slot_tile_ptrs,
    tile_config,
)


class WeightGradTiles(NamedTuple):
    block_n1: int  # rows of the gradient tile (A's columns)
    block_n2: int  # columns of the gradient tile (B's columns)
    block_r: int  # the slot's rows reduced per step
    num_warps: int
    num_stages: int


# 16-bit, per use and per number of rows a slot reduces: the fastest of the configurations
# benchmarks/tune_weight_grads.py timed on the H200 at DeepSeek-V3 TP8 training shapes
# (benchmarks/RESULTS.md): 64 rows per step, except for short slots (T=512: 18 rows), where a
# 32-row step pads less. Float32 (FMA dots): smaller tiles.
_WEIGHT_GRAD_TILES_GATE_UP = WeightGradTiles(64, 128, 64, 8, 3)  # two [64, 128] accumulators
_WEIGHT_GRAD_TILES_DOWN = WeightGradTiles(128, 128, 64, 8, 3)
_SHORT_SLOT_ROWS = 64  # fewer rows per slot than this: 32 rows per step
_WEIGHT_GRAD_TILES_FP32 = WeightGradTiles(32, 64, 16, 4, 2)


def weight_grad_tiles(dtype: torch.dtype, two: bool, rows_per_slot: float) -> WeightGradTiles:
    """The weight-gradient kernel's tiles for `dtype`, with two accumulators (gate/up) or one (down),
    when the slots hold `rows_per_slot` rows on average."""
    if dtype == torch.float32:
        return _WEIGHT_GRAD_TILES_FP32
    tiles = _WEIGHT_GRAD_TILES_GATE_UP if two else _WEIGHT_GRAD_TILES_DOWN
    return tiles._replace(block_r=32) if rows_per_slot < _SHORT_SLOT_ROWS else tiles


@triton.jit(do_not_specialize=["num_blocks", "num_pairs"])  # token counts (see ops/triton_experts.py)
def _gate_up_backward_kernel(
    grad_out_ptr, proj_ptr, h_ptr, da_ptr, db_ptr, dp_part_ptr, pair_weight_ptr,
    sorted_pairs_ptr, block_expert_ptr, block_rows_ptr, down_ptr, shared_down_ptr,
    num_blocks, num_pairs, hidden_size, inter, topk, num_experts,
    stride_gt, stride_gh, stride_de, stride_dn, stride_dk, stride_sdn, stride_sdk,
    stride_proj, stride_rows,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """u = D_e^T g, then h, da, db (rows of the alignment) and dp_part[tile, pair] = sum over the tile of
    u * h, from the saved projections. The down weights are read as D^T [E, I, H] through strides."""
    expert, rows, row_mask, tile_n, offs_n = program_block(num_blocks, tl.cdiv(inter, BLOCK_N), block_expert_ptr,
                                                           block_rows_ptr, BLOCK_M, BLOCK_N, GROUP_M)
    if expert < 0:
        return
    pairs = tl.load(sorted_pairs_ptr + rows, mask=row_mask, other=0)
    u, _ = gathered_gate_up(
        grad_out_ptr, stride_gt, stride_gh, pairs, row_mask, offs_n, expert, topk, num_experts, inter, hidden_size,
        down_ptr, stride_de, stride_dn, stride_dk, down_ptr, stride_de, stride_dn, stride_dk,
        shared_down_ptr, stride_sdn, stride_sdk, shared_down_ptr, stride_sdn, stride_sdk,
        False, BLOCK_M, BLOCK_N, BLOCK_K)

    mask = row_mask[:, None] & (offs_n < inter)[None, :]
    saved = proj_ptr + pairs.to(tl.int64)[:, None] * stride_proj + offs_n[None, :]
    a = tl.load(saved, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(saved + inter, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(pair_weight_ptr + pairs, mask=row_mask, other=0.0)
    sigmoid_a = 1.0 / (1.0 + tl.exp(-a))
    silu_a = a * sigmoid_a
    h = (silu_a * b).to(h_ptr.dtype.element_ty)  # rounded as the forward rounds it
    tile = rows.to(tl.int64)[:, None] * stride_rows + offs_n[None, :]
    tl.store(h_ptr + tile, h, mask=mask)
    dh = u * p[:, None]
    tl.store(da_ptr + tile, (dh * b * sigmoid_a * (1.0 + a * (1.0 - sigmoid_a))).to(da_ptr.dtype.element_ty),
             mask=mask)
    tl.store(db_ptr + tile, (dh * silu_a).to(db_ptr.dtype.element_ty), mask=mask)
    dp = tl.sum(u * h.to(tl.float32), axis=1)
    tl.store(dp_part_ptr + tile_n.to(tl.int64) * num_pairs + pairs, dp, mask=row_mask)


@triton.jit
def _slot_rows_tile(ptr, rows, pairs, row_mask, offs, size, stride, topk, GATHERED: tl.constexpr):
    """[BLOCK_R, len(offs)] tile of a row-major matrix: rows of the alignment, or (GATHERED) the rows
    of the pairs' tokens."""
    if GATHERED:
        row_index = (pairs // topk).to(tl.int64)
    else:
        row_index = rows.to(tl.int64)
    return tl.load(ptr + row_index[:, None] * stride + offs[None, :], mask=row_mask[:, None] & (offs < size)[None, :],
                   other=0.0)


@triton.jit
def _weight_grad_kernel(
    a_ptr, a2_ptr, b_ptr, row_scale_ptr, grad_ptr, grad2_ptr, shared_grad_ptr, shared_grad2_ptr,
    sorted_pairs_ptr, slot_start_ptr, slot_rows_ptr,
    n1_size, n2_size, slot_size, topk, num_experts, stride_a, stride_b,
    stride_ge, stride_g1, stride_g2, stride_sg1, stride_sg2,
    A_GATHERED: tl.constexpr, B_GATHERED: tl.constexpr, SCALED: tl.constexpr, TWO: tl.constexpr,
    SLOT_ALONG_N2: tl.constexpr,
    BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """grad_e[n1, n2] = sum over slot e's rows r of A[r, n1] B[r, n2] (A scaled by the pair's weight when
    SCALED), and grad2_e from A2 when TWO. Program (tile, slot); a slot without rows writes zeros.

    A, A2 and B are row-major; the gradients have the weights' layouts: routed [E, N1, N2] and shared
    [S*N1, N2] (slot offset along N1) or [N1, S*N2] (along N2), grad and grad2 with the same strides.
    """
    tiles_n2 = tl.cdiv(n2_size, BLOCK_N2)
    # Last slot first: the shared slots (every token's row) are the longest programs; started first,
    # the routed slots' short programs fill in beside them instead of leaving them as the tail.
    slot = tl.num_programs(1) - 1 - tl.program_id(1)
    offs_n1 = (tl.program_id(0) // tiles_n2) * BLOCK_N1 + tl.arange(0, BLOCK_N1)
    offs_n2 = (tl.program_id(0) % tiles_n2) * BLOCK_N2 + tl.arange(0, BLOCK_N2)
    start = tl.load(slot_start_ptr + slot)
    count = tl.load(slot_rows_ptr + slot)
    acc = tl.zeros([BLOCK_N1, BLOCK_N2], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N1, BLOCK_N2], dtype=tl.float32)
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(0, count, BLOCK_R):
        row_mask = offs_r < count - r0
        rows = start + r0 + offs_r
        pairs = tl.load(sorted_pairs_ptr + rows, mask=row_mask, other=0)
        a = _slot_rows_tile(a_ptr, rows, pairs, row_mask, offs_n1, n1_size, stride_a, topk, A_GATHERED)
        if SCALED:
            scale = tl.load(row_scale_ptr + pairs, mask=row_mask, other=0.0)
            a = (a.to(tl.float32) * scale[:, None]).to(a_ptr.dtype.element_ty)
        b = _slot_rows_tile(b_ptr, rows, pairs, row_mask, offs_n2, n2_size, stride_b, topk, B_GATHERED)
        acc = tl.dot(tl.trans(a), b, acc, input_precision="ieee")
        if TWO:
            a2 = _slot_rows_tile(a2_ptr, rows, pairs, row_mask, offs_n1, n1_size, stride_a, topk, A_GATHERED)
            acc2 = tl.dot(tl.trans(a2), b, acc2, input_precision="ieee")

    mask = (offs_n1 < n1_size)[:, None] & (offs_n2 < n2_size)[None, :]
    grad_ptrs, _ = slot_tile_ptrs(slot, num_experts, slot_size, grad_ptr, stride_ge, stride_g2, stride_g1,
                                  shared_grad_ptr, stride_sg2, stride_sg1, offs_n2, offs_n1, SLOT_ALONG_N2)
    tl.store(grad_ptrs, acc.to(grad_ptr.dtype.element_ty), mask=mask)
    if TWO:
        grad2_ptrs, _ = slot_tile_ptrs(slot, num_experts, slot_size, grad2_ptr, stride_ge, stride_g2, stride_g1,
                                       shared_grad2_ptr, stride_sg2, stride_sg1, offs_n2, offs_n1, SLOT_ALONG_N2)
        tl.store(grad2_ptrs, acc2.to(grad_ptr.dtype.element_ty), mask=mask)


def weight_grads(a, a2, b, row_scale, grads, shared_grads, alignment: Alignment, topk: int, num_experts: int,
                 a_gathered: bool, b_gathered: bool, slot_along_n2: bool, tiles: WeightGradTiles) -> None:
    """Fills `grads` (one or two routed [E, N1, N2] tensors) and `shared_grads` (their 2-D shared
    counterparts) by _weight_grad_kernel with `tiles`."""
    num_slots = alignment.slot_rows.numel()
    _, n1_size, n2_size = grads[0].shape
    two = len(grads) == 2
    grad, grad2 = grads if two else (grads[0], grads[0])
    shared_grad, shared_grad2 = shared_grads if two else (shared_grads[0], shared_grads[0])
    slot_size = n2_size if slot_along_n2 else n1_size
    grid = (triton.cdiv(n1_size, tiles.block_n1) * triton.cdiv(n2_size, tiles.block_n2), num_slots)
    launch_gemm(
        _weight_grad_kernel, grid,
        a, a if a2 is None else a2, b, a if row_scale is None else row_scale, grad, grad2, shared_grad, shared_grad2,
        alignment.sorted_pairs, alignment.slot_start, alignment.slot_rows,
        n1_size, n2_size, slot_size, topk, num_experts, a.stride(0), b.stride(0),
        *grad.stride(), *shared_grad.stride(),
        A_GATHERED=a_gathered, B_GATHERED=b_gathered, SCALED=row_scale is not None, TWO=two,
        SLOT_ALONG_N2=slot_along_n2, BLOCK_N1=tiles.block_n1, BLOCK_N2=tiles.block_n2, BLOCK_R=tiles.block_r,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )


def experts_grads_triton(grad_out, projections, hidden, topk_ids, pair_weight, weights, num_shared: int,
                         need_hidden: bool, need_weights, gate_up_grads=None) -> tuple:
    """(grad_hidden or None, grad_pair_weight [T*K] float32, the six weight gradients or None).

    `projections` [T*K, 2I] holds each pair's gate and up projections (the training forward's),
    `pair_weight` the float32 weight of each pair [T*K] (ops.reference.pair_weights), `weights`
    (w_gate, w_up, w_down, shared_gate, shared_up, shared_down), `need_weights` a flag for each.
    Gradients of gate/up/shared gate/shared up are computed together when any of them is needed;
    `gate_up_grads`, buffers of the same strides for the gate and up gradients (views of a fused
    one), else they are allocated.
    """
    w_gate, w_up, w_down, shared_gate, shared_up, shared_down = weights
    tokens, hidden_size = hidden.shape
    topk = topk_ids.shape[1]
    num_experts, inter, _ = w_gate.shape
    num_slots = num_experts + num_shared
    num_pairs = tokens * topk
    ids = topk_ids.contiguous()
    # The weight-gradient kernel reads rows of hidden and grad_out with unit column stride.
    hidden, grad_out = hidden.contiguous(), grad_out.contiguous()
    projections = projections.contiguous()  # read as [gate | up] rows
    if num_shared == 0:  # never dereferenced: no id selects a shared slot
        shared_gate, shared_up, shared_down = w_gate[0], w_up[0], w_down[0]
    cfg = tile_config(num_pairs, num_slots, hidden.dtype)
    need_gate_up = any(need_weights[i] for i in (0, 1, 3, 4))
    need_down = need_weights[2] or need_weights[5]

    with on_device(hidden.device):
        alignment = align(ids, num_slots, cfg.block_m, stable=True)  # weight gradients sum rows in order
        rows = alignment.num_blocks * cfg.block_m
        h, da, db = hidden.new_empty(3, rows, inter).unbind()
        tiles = cfg.gate_up
        tiles_i = triton.cdiv(inter, tiles.block_n)
        dp_part = torch.zeros(tiles_i, num_pairs, dtype=torch.float32, device=hidden.device)
        down_t, shared_down_t = w_down.transpose(1, 2), shared_down.T  # D^T [E, I, H] and [S*I, H], views
        launch_gemm(
            _gate_up_backward_kernel, (alignment.num_blocks * tiles_i,),
            grad_out, projections, h, da, db, dp_part, pair_weight,
            alignment.sorted_pairs, alignment.block_expert, alignment.block_rows, down_t, shared_down_t,
            alignment.num_blocks, num_pairs, hidden_size, inter, topk, num_experts,
            *grad_out.stride(), *down_t.stride(), *shared_down_t.stride(), projections.stride(0), h.stride(0),
            BLOCK_M=cfg.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=cfg.group_m,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )

        grad_hidden = None
        if need_hidden:
            grad_pairs = hidden.new_empty(num_pairs, hidden_size)
            scattered_gemm(da, grad_pairs, alignment, w_gate.transpose(1, 2), shared_gate.T, cfg.down, cfg.group_m,
                           act2=db, down2=w_up.transpose(1, 2), shared_down2=shared_up.T)
            grad_hidden = torch.empty_like(hidden)
            combine(grad_pairs, grad_hidden, ids, num_experts, num_slots)

        buffers = [*(gate_up_grads or (None, None)), None, None, None, None]
        grads = [buffer if buffer is not None else torch.empty(w.shape, dtype=w.dtype, device=w.device)
                 if num_shared or i < 3 else None for i, (w, buffer) in enumerate(zip(weights, buffers, strict=True))]
        # Without shared slots, one routed expert's gradient stands in for the (never written) shared one.
        shared_grads = grads[3:] if num_shared else [grad[0] for grad in grads[:3]]
        rows_per_slot = num_pairs / num_slots
        if need_gate_up:
            weight_grads(da, db, hidden, None, grads[0:2], shared_grads[0:2], alignment, topk, num_experts,
                         a_gathered=False, b_gathered=True, slot_along_n2=False,
                         tiles=weight_grad_tiles(hidden.dtype, True, rows_per_slot))
        if need_down:
            weight_grads(grad_out, None, h, pair_weight, grads[2:3], shared_grads[2:3], alignment, topk,
                         num_experts, a_gathered=True, b_gathered=False, slot_along_n2=True,
                         tiles=weight_grad_tiles(hidden.dtype, False, rows_per_slot))
    grad_weights = tuple(g if needed else None for g, needed in zip(grads, need_weights, strict=True))
    return grad_hidden, dp_part.sum(0), grad_weights
