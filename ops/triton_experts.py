"""Triton kernels of ``moe_fusion::fused_experts`` (the CUDA implementation).

Four launches, no host synchronisation (every size is an upper bound computed from shapes, so the
whole op can be captured in a CUDA graph):

1. ``_align_kernel`` sorts the T*K (token, slot) pairs by expert slot and pads each slot's segment to a
   multiple of BLOCK_M (the "moe_align_block_size" idea of vLLM/SGLang, here in one launch): a block
   table says which expert slot each BLOCK_M rows belong to and how many of them are real.
2. ``_gate_up_kernel``: grouped GEMM over the blocks, one program per (block, N tile of I). It gathers
   the token rows of ``hidden``, multiplies by the gate and up tiles of the block's expert (routed
   weights, or the shared tensors at the slot's row offset) and writes ``silu(gate) * up``.
3. ``_down_kernel``: grouped GEMM of that intermediate with the down projection, one program per
   (block, N tile of H); each output row goes to the row of its (token, slot) pair.
4. ``_combine_kernel``: per token, the weighted sum over its K pairs in float32, in a fixed order.

Why a separate, deterministic combine rather than float32 atomics into a [T, H] buffer: the K rows of
a token are produced by K different experts at unrelated times, so with atomics every contribution
is a read-modify-write of an HBM-resident line (about 2 x 4 B per element per pair, plus zeroing the
buffer and a final cast pass), against 2 B written by the down GEMM and 2 B read back here for 16-bit
dtypes. At T=16384, H=7168, K=9 that is ~8 GB of atomic traffic against ~4 GB for this combine, and
the sum order (hence the result) would change from run to run. The price is a [T*K, H] buffer in
hidden's dtype (2.1 GB at that size).

Positions inside one expert's segment come from atomics and may differ between runs; the result does
not, because each output row of a GEMM tile depends only on its own input row.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl


class GemmTiles(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


class TileConfig(NamedTuple):
    block_m: int  # rows per block, shared by both GEMMs (the alignment pads to it)
    group_m: int  # blocks that walk the N tiles together, for L2 reuse of the weight tiles
    gate_up: GemmTiles
    down: GemmTiles


# Chosen for H100/H200 by the average number of rows per active expert slot. Few rows (decode): the
# GEMMs only stream weights, so tiles are thin along M and narrow along N to spread each expert's
# weights over many programs (occupancy and bytes in flight), with deep K tiles. Many rows (prefill):
# large tiles and 3-4 pipeline stages for tensor-core throughput. Rows are (max rows, BLOCK_M, GROUP_M,
# gate_up tiles, down tiles); tiles are (BLOCK_N, BLOCK_K, num_warps, num_stages).
_TILES_16BIT = (
    (16, 16, 1, GemmTiles(32, 128, 4, 4), GemmTiles(64, 128, 4, 4)),
    (48, 32, 4, GemmTiles(64, 128, 4, 3), GemmTiles(64, 128, 4, 4)),
    (128, 64, 8, GemmTiles(64, 64, 4, 4), GemmTiles(128, 64, 4, 4)),
    (None, 128, 8, GemmTiles(128, 64, 8, 3), GemmTiles(128, 64, 8, 4)),
)
# float32 runs tl.dot in IEEE precision (FMA, no tensor cores): correct, not fast; small tiles keep the
# register use of the FMA dot in check.
_TILES_FP32 = (
    (16, 16, 1, GemmTiles(32, 32, 4, 2), GemmTiles(64, 32, 4, 2)),
    (None, 64, 8, GemmTiles(32, 32, 4, 2), GemmTiles(64, 32, 4, 2)),
)


def tile_config(num_pairs: int, num_slots: int, dtype: torch.dtype) -> TileConfig:
    """The launch configuration for ``num_pairs`` (token, slot) pairs over ``num_slots`` expert slots."""
    rows_per_slot = num_pairs / max(1, min(num_slots, num_pairs))
    table = _TILES_FP32 if dtype == torch.float32 else _TILES_16BIT
    for max_rows, block_m, group_m, gate_up, down in table:
        if max_rows is None or rows_per_slot <= max_rows:
            return TileConfig(block_m, group_m, gate_up, down)
    raise AssertionError("unreachable: the last row of each table has no limit")


@triton.jit
def _align_kernel(
    ids_ptr, sorted_pairs_ptr, block_expert_ptr, block_rows_ptr, cursor_ptr,
    num_pairs, num_slots, num_blocks, pairs_per_program,
    BLOCK_M: tl.constexpr, NUM_BINS: tl.constexpr, CHUNK: tl.constexpr, BLOCKS_CHUNK: tl.constexpr,
):
    """Expert-sorted, BLOCK_M-padded layout of the pairs, in one launch.

    Each program counts all ids (a histogram, cheap next to the GEMMs and read from L2 after the first
    program), so every program knows every segment's start and how many pairs of each slot precede
    its own range; it then scatters its range with atomics on a private cursor row. No inter-program
    communication, hence one launch. Ids outside [0, num_slots) are left out everywhere.
    """
    pid = tl.program_id(0)
    first = pid * pairs_per_program
    offs = tl.arange(0, CHUNK)
    slots = tl.arange(0, NUM_BINS)

    counts = tl.zeros([NUM_BINS], dtype=tl.int32)
    before = tl.zeros([NUM_BINS], dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):
        idx = start + offs
        ids = tl.load(ids_ptr + idx, mask=idx < num_pairs, other=-1)
        valid = (idx < num_pairs) & (ids >= 0) & (ids < num_slots)
        # The validity test runs on the original (possibly int64) ids; the histogram needs int32.
        hist = tl.histogram(ids.to(tl.int32), NUM_BINS, mask=valid)
        counts += hist
        before += tl.where(start < first, hist, 0)  # `first` is a multiple of CHUNK
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    seg_end = tl.cumsum(padded, 0)
    seg_start = seg_end - padded

    # Block table: block b starts at row b*BLOCK_M inside exactly one segment, or past the last one.
    for b0 in range(pid * BLOCKS_CHUNK, num_blocks, tl.num_programs(0) * BLOCKS_CHUNK):
        blocks = b0 + tl.arange(0, BLOCKS_CHUNK)
        row0 = blocks[:, None] * BLOCK_M
        inside = (seg_start[None, :] <= row0) & (row0 < seg_end[None, :])
        expert = tl.sum(tl.where(inside, slots[None, :], 0), axis=1)
        rows = tl.sum(tl.where(inside, counts[None, :] - (row0 - seg_start[None, :]), 0), axis=1)
        used = tl.sum(inside.to(tl.int32), axis=1) > 0
        tl.store(block_expert_ptr + blocks, tl.where(used, expert, -1), mask=blocks < num_blocks)
        tl.store(block_rows_ptr + blocks, tl.minimum(rows, BLOCK_M), mask=blocks < num_blocks)

    cursor = cursor_ptr + pid * NUM_BINS
    tl.store(cursor + slots, seg_start + before)
    tl.debug_barrier()  # the cursor row is complete before any thread of this program bumps it
    last = tl.minimum(first + pairs_per_program, num_pairs)
    for start in range(first, last, CHUNK):
        idx = start + offs
        ids = tl.load(ids_ptr + idx, mask=idx < last, other=-1)
        valid = (idx < last) & (ids >= 0) & (ids < num_slots)
        position = tl.atomic_add(cursor + ids, 1, mask=valid, sem="relaxed")
        tl.store(sorted_pairs_ptr + position, idx, mask=valid)


@triton.jit
def _block_tile(num_blocks, num_n, GROUP_M: tl.constexpr):
    """(block, N tile) of this program; GROUP_M consecutive blocks visit each N tile together (the
    grouped ordering of Triton's matmul tutorial), so blocks of one expert share its weight tiles in L2."""
    pid = tl.program_id(0)
    per_group = GROUP_M * num_n
    first_block = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_blocks - first_block, GROUP_M)
    block = first_block + (pid % per_group) % group_size
    tile_n = (pid % per_group) // group_size
    return block, tile_n


@triton.jit
def _weight_ptrs(
    expert, num_experts, slot_size, routed_ptr, stride_e, stride_n, stride_k, shared_ptr, stride_sn, stride_sk,
    offs_n, offs_k, SLOT_ALONG_N: tl.constexpr,
):
    """Pointers to the [BLOCK_K, BLOCK_N] tile of W^T for this block's expert slot, and W's K stride.

    Routed slots read ``routed[expert]`` ([N, K] through strides); shared slots read the shared tensor
    at offset ``(expert - E) * slot_size`` along N (gate/up rows) or along K (down columns). Both
    pointer tiles are formed and one is selected, so that a single K loop (one set of pipeline buffers
    in shared memory) serves both kinds of slot, each tile keeping its own stride specialisation.
    """
    is_shared = expert >= num_experts
    slot_offset = tl.maximum(expert - num_experts, 0).to(tl.int64) * slot_size
    if SLOT_ALONG_N:
        shared_base = shared_ptr + slot_offset * stride_sn
    else:
        shared_base = shared_ptr + slot_offset * stride_sk
    routed = routed_ptr + expert.to(tl.int64) * stride_e + offs_k[:, None] * stride_k + offs_n[None, :] * stride_n
    shared = shared_base + offs_k[:, None] * stride_sk + offs_n[None, :] * stride_sn
    return tl.where(is_shared, shared, routed), tl.where(is_shared, stride_sk, stride_k)


@triton.jit
def _expert_tile(
    a_ptrs, stride_ak, row_mask, w_ptrs, stride_wk, v_ptrs, stride_vk, n_mask, k_size,
    GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """float32 [BLOCK_M, BLOCK_N] tile of A @ W^T, or of silu(A @ W^T) * (A @ V^T) when GATED.

    ``a_ptrs`` [BLOCK_M, 1] point at the rows of A, ``w_ptrs``/``v_ptrs`` at [BLOCK_K, BLOCK_N] tiles.
    """
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptrs + offs_k[None, :] * stride_ak
    acc_w = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_size, BLOCK_K):
        k_mask = offs_k < k_size - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        # IEEE: float32 inputs get float32 products (TF32 would miss the op's float32 accuracy);
        # 16-bit inputs are unaffected by this setting.
        acc_w = tl.dot(a, w, acc_w, input_precision="ieee")
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
        if GATED:
            v = tl.load(v_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc_v = tl.dot(a, v, acc_v, input_precision="ieee")
            v_ptrs += BLOCK_K * stride_vk
    if GATED:
        acc_w = acc_w / (1.0 + tl.exp(-acc_w)) * acc_v  # silu(gate) * up
    return acc_w


@triton.jit
def _gate_up_kernel(
    x_ptr, act_ptr, sorted_pairs_ptr, block_expert_ptr, block_rows_ptr,
    gate_ptr, up_ptr, shared_gate_ptr, shared_up_ptr,
    num_blocks, hidden_size, inter, topk, num_experts,
    stride_xt, stride_xh,
    stride_ge, stride_gn, stride_gk, stride_ue, stride_un, stride_uk,
    stride_sgn, stride_sgk, stride_sun, stride_suk,
    stride_act,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """act[row] = silu(gate_e @ x[token]) * (up_e @ x[token]) for the rows of each expert-aligned block."""
    block, tile_n = _block_tile(num_blocks, tl.cdiv(inter, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:
        return
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_mask = offs_m < tl.load(block_rows_ptr + block)
    rows = block * BLOCK_M + offs_m
    pairs = tl.load(sorted_pairs_ptr + rows, mask=row_mask, other=0)
    x_rows = x_ptr + (pairs // topk).to(tl.int64)[:, None] * stride_xt
    gate_ptrs, gate_k = _weight_ptrs(expert, num_experts, inter, gate_ptr, stride_ge, stride_gn, stride_gk,
                                     shared_gate_ptr, stride_sgn, stride_sgk, offs_n, offs_k, True)
    up_ptrs, up_k = _weight_ptrs(expert, num_experts, inter, up_ptr, stride_ue, stride_un, stride_uk,
                                 shared_up_ptr, stride_sun, stride_suk, offs_n, offs_k, True)
    n_mask = offs_n < inter
    act = _expert_tile(x_rows, stride_xh, row_mask, gate_ptrs, gate_k, up_ptrs, up_k, n_mask, hidden_size,
                       True, BLOCK_M, BLOCK_N, BLOCK_K)
    act_ptrs = act_ptr + rows.to(tl.int64)[:, None] * stride_act + offs_n[None, :]
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _down_kernel(
    act_ptr, y_ptr, sorted_pairs_ptr, block_expert_ptr, block_rows_ptr,
    down_ptr, shared_down_ptr,
    num_blocks, hidden_size, inter, num_experts,
    stride_act, stride_de, stride_dn, stride_dk, stride_sdn, stride_sdk, stride_y,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[pair] = down_e @ act[row] for the rows of each expert-aligned block."""
    block, tile_n = _block_tile(num_blocks, tl.cdiv(hidden_size, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:
        return
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_mask = offs_m < tl.load(block_rows_ptr + block)
    rows = block * BLOCK_M + offs_m
    act_rows = act_ptr + rows.to(tl.int64)[:, None] * stride_act
    down_ptrs, down_k = _weight_ptrs(expert, num_experts, inter, down_ptr, stride_de, stride_dn, stride_dk,
                                     shared_down_ptr, stride_sdn, stride_sdk, offs_n, offs_k, False)
    n_mask = offs_n < hidden_size
    y = _expert_tile(act_rows, 1, row_mask, down_ptrs, down_k, down_ptrs, down_k, n_mask, inter,
                     False, BLOCK_M, BLOCK_N, BLOCK_K)
    pairs = tl.load(sorted_pairs_ptr + rows, mask=row_mask, other=0)
    y_ptrs = y_ptr + pairs.to(tl.int64)[:, None] * stride_y + offs_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _combine_kernel(
    y_ptr, out_ptr, ids_ptr, weights_ptr, token_weight_ptr,
    hidden_size, topk, num_experts, num_slots, stride_y, stride_out,
    HAS_TOKEN_WEIGHT: tl.constexpr, BLOCK_TOPK: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[t] = sum_j w[t, j] * y[t*K + j] in float32, pairs with out-of-range ids left out."""
    token = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_j = tl.arange(0, BLOCK_TOPK)
    pairs = token * topk + offs_j
    ids = tl.load(ids_ptr + pairs, mask=offs_j < topk, other=-1)
    valid = (offs_j < topk) & (ids >= 0) & (ids < num_slots)
    weights = tl.load(weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)
    if HAS_TOKEN_WEIGHT:
        token_weight = tl.load(token_weight_ptr + token).to(tl.float32)
        weights = tl.where(ids >= num_experts, weights * token_weight, weights)
    y_ptrs = y_ptr + pairs.to(tl.int64)[:, None] * stride_y + offs_h[None, :]
    y = tl.load(y_ptrs, mask=valid[:, None] & (offs_h < hidden_size)[None, :], other=0.0).to(tl.float32)
    out = tl.sum(y * weights[:, None], axis=0)
    tl.store(out_ptr + token.to(tl.int64) * stride_out + offs_h, out.to(out_ptr.dtype.element_ty),
             mask=offs_h < hidden_size)


def _align_launch(num_pairs: int, num_slots: int) -> tuple[int, int, int, int, int]:
    """(num_bins, chunk, programs, pairs_per_program, num_warps) of the alignment kernel."""
    num_bins = max(32, triton.next_power_of_2(num_slots))  # the GPU histogram wants >= one bin per lane
    chunk = min(2048, max(128, triton.next_power_of_2(num_pairs)))
    # Up to 64 programs: each reads all ids once, so more programs mean more (L2) reads, fewer scatters each.
    programs = min(64, triton.cdiv(num_pairs, chunk))
    pairs_per_program = triton.cdiv(triton.cdiv(num_pairs, programs), chunk) * chunk
    programs = triton.cdiv(num_pairs, pairs_per_program)
    return num_bins, chunk, programs, pairs_per_program, 4 if num_pairs <= 1024 else 8


def fused_experts_triton(hidden, topk_weights, topk_ids, w_gate, w_up, w_down, shared_gate, shared_up, shared_down,
                         shared_token_weight, num_shared, config: TileConfig | None = None):
    """Runs the four kernels; the arguments are already checked (ops.experts.check_experts_args).

    ``config`` overrides ``tile_config`` (for tuning: benchmarks/bench_experts.py --tune).
    """
    tokens, hidden_size = hidden.shape
    topk = topk_ids.shape[1]
    num_experts, inter, _ = w_gate.shape
    out = torch.empty(tokens, hidden_size, dtype=hidden.dtype, device=hidden.device)
    if tokens == 0:
        return out
    num_pairs = tokens * topk
    num_slots = num_experts + num_shared
    cfg = config or tile_config(num_pairs, num_slots, hidden.dtype)
    block_m = cfg.block_m
    # Each slot's padded segment adds < BLOCK_M rows, and at most min(slots, pairs) slots are active.
    max_blocks = num_pairs // block_m + min(num_slots, num_pairs)
    num_bins, chunk, programs, pairs_per_program, align_warps = _align_launch(num_pairs, num_slots)

    device = hidden.device
    scratch = torch.empty(max_blocks * block_m + 2 * max_blocks + programs * num_bins, dtype=torch.int32,
                          device=device)
    sorted_pairs, block_expert, block_rows, cursor = scratch.split(
        [max_blocks * block_m, max_blocks, max_blocks, programs * num_bins])
    act = torch.empty(max_blocks * block_m, inter, dtype=hidden.dtype, device=device)
    y = torch.empty(num_pairs, hidden_size, dtype=hidden.dtype, device=device)
    ids = topk_ids.contiguous()  # [T, K] is indexed as pairs t*K + j; a no-op for the router's output
    weights = topk_weights.contiguous()
    if num_shared == 0:  # never dereferenced: no id selects a shared slot
        shared_gate, shared_up, shared_down = w_gate[0], w_up[0], w_down[0]
    token_weight = weights if shared_token_weight is None else shared_token_weight.contiguous()
    gate_up, down = cfg.gate_up, cfg.down
    block_topk = triton.next_power_of_2(topk)

    # (A CPU device here is Triton's interpreter, which the tests use.)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _align_kernel[(programs,)](
            ids, sorted_pairs, block_expert, block_rows, cursor,
            num_pairs, num_slots, max_blocks, pairs_per_program,
            BLOCK_M=block_m, NUM_BINS=num_bins, CHUNK=chunk, BLOCKS_CHUNK=max(1, 8192 // num_bins),
            num_warps=align_warps,
        )
        _gate_up_kernel[(max_blocks * triton.cdiv(inter, gate_up.block_n),)](
            hidden, act, sorted_pairs, block_expert, block_rows,
            w_gate, w_up, shared_gate, shared_up,
            max_blocks, hidden_size, inter, topk, num_experts,
            *hidden.stride(), *w_gate.stride(), *w_up.stride(), *shared_gate.stride(),
            *shared_up.stride(), act.stride(0),
            BLOCK_M=block_m, BLOCK_N=gate_up.block_n, BLOCK_K=gate_up.block_k, GROUP_M=cfg.group_m,
            num_warps=gate_up.num_warps, num_stages=gate_up.num_stages,
        )
        _down_kernel[(max_blocks * triton.cdiv(hidden_size, down.block_n),)](
            act, y, sorted_pairs, block_expert, block_rows,
            w_down, shared_down,
            max_blocks, hidden_size, inter, num_experts,
            act.stride(0), *w_down.stride(), *shared_down.stride(), y.stride(0),
            BLOCK_M=block_m, BLOCK_N=down.block_n, BLOCK_K=down.block_k, GROUP_M=cfg.group_m,
            num_warps=down.num_warps, num_stages=down.num_stages,
        )
        block_h = min(triton.next_power_of_2(hidden_size), max(128, 8192 // block_topk))
        _combine_kernel[(tokens, triton.cdiv(hidden_size, block_h))](
            y, out, ids, weights, token_weight,
            hidden_size, topk, num_experts, num_slots, y.stride(0), out.stride(0),
            HAS_TOKEN_WEIGHT=shared_token_weight is not None, BLOCK_TOPK=block_topk, BLOCK_H=block_h,
            num_warps=4,
        )
    return out
