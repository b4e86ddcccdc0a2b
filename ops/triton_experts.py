"""Triton kernels of ``moe_fusion::fused_experts`` and ``fused_experts_train`` (the CUDA implementation).

Two, four or five launches, no host synchronisation (every size is an upper bound computed from shapes, so
the whole op can be captured in a CUDA graph):

1. ``_align_kernel`` sorts the T*K (token, slot) pairs by expert slot and pads each slot's segment to a
   multiple of BLOCK_M (the "moe_align_block_size" idea of vLLM/SGLang): a block table says which
   expert slot each BLOCK_M rows belong to and how many of them are real. One launch up to 2048 pairs
   (decode); above, ``_align_count_kernel`` first histograms each program's range of pairs.
2. ``_gate_up_kernel``: grouped GEMM over the blocks, one program per (block, N tile of I). It gathers
   the token rows of ``hidden``, multiplies by the gate and up tiles of the block's expert (routed
   weights, or the shared tensors at the slot's row offset) and writes ``silu(gate) * up``; for
   ``fused_experts_train`` also gate and up themselves, to the row of the pair (the backward's input).
3. ``_down_kernel``: grouped GEMM of that intermediate with the down projection, one program per
   (block, N tile of H), or per (block, n_tiles N tiles) with the block's intermediate rows held
   resident where the intermediate size is short (I <= 256); each output row goes to the row of its
   (token, slot) pair.
4. ``_combine_kernel``: per token, the weighted sum over its K pairs in float32, in a fixed order.

Decode calls of at most DIRECT_MAX_PAIRS pairs whose intermediate size fits one K tile (batch-1 decode at
TP8) take the direct path instead, two launches: every pair is its own block (no alignment), and ``_direct_down_kernel`` runs the down GEMM of a token's pairs one
after the other and sums them in registers, in the combine's order (no combine launch, no [T*K, H]
buffer).

Why a separate, deterministic combine rather than float32 atomics into a [T, H] buffer: the K rows of
a token are produced by K different experts at unrelated times, so with atomics every contribution
is a read-modify-write of an HBM-resident line (about 2 x 4 B per element per pair, plus zeroing the
buffer and a final cast pass), against 2 B written by the down GEMM and 2 B read back here for 16-bit
dtypes. At T=16384, H=7168, K=9 that is ~8 GB of atomic traffic against ~4 GB for this combine, and
the sum order (hence the result) would change from run to run. The price is a [T*K, H] buffer in
hidden's dtype (2.1 GB at that size).

Positions inside one expert's segment come from atomics in the forward and may differ between runs;
the result does not, because each output row of a GEMM tile depends only on its own input row. The
backward sums over a segment's rows (weight gradients), so its alignment is stable: rows in pair
order, the same on every run.

Integer arguments that follow the token count (pairs, blocks) are not specialised
(``do_not_specialize``): Triton would otherwise compile a variant per value class (1, a multiple of
16, other) of each, where they only bound loops and masks; one variant serves every token count.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources


class GemmTiles(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    # N tiles per program of the down GEMM when all of K (the intermediate size) fits in one BLOCK_K: the
    # program loads its activation tile once and multiplies it by n_tiles weight tiles in turn (see
    # resident_down_tiles); 1: one N tile per program, K in a loop.
    n_tiles: int = 1


class TileConfig(NamedTuple):
    block_m: int  # rows per block, shared by both GEMMs (the alignment pads to it)
    group_m: int  # blocks that walk the N tiles together, for L2 reuse of the weight tiles
    gate_up: GemmTiles
    down: GemmTiles
    # Decode: every (token, slot) pair is its own block (row 0 of BLOCK_M), so no alignment kernel runs,
    # and the down GEMM sums each token's pairs in registers, so no combine kernel runs (see
    # _direct_down_kernel). The forward only.
    direct: bool = False


# Chosen for H100/H200 by the average number of rows per active expert slot. Few rows (decode): the
# GEMMs only stream weights, so tiles are thin along M and narrow along N to spread each expert's
# weights over many programs (occupancy and bytes in flight), with deep K tiles. Many rows (prefill):
# large tiles and 3-4 pipeline stages for tensor-core throughput. Rows are (max rows, BLOCK_M, GROUP_M,
# gate_up tiles, down tiles, resident down tiles); tiles are (BLOCK_N, BLOCK_K, num_warps, num_stages
# [, n_tiles]). The resident down tiles replace the down tiles in the forward where the intermediate
# size fits their BLOCK_K: at DeepSeek-V3 TP8 (I=256, T=16384) on an H100 they took the down GEMM from
# 2466 to 1529 us (best of a 12-point search over BLOCK_N, n_tiles, warps and stages).
_TILES_16BIT = (
    (16, 16, 1, GemmTiles(32, 128, 4, 4), GemmTiles(64, 128, 4, 4), None),
    (48, 32, 4, GemmTiles(64, 128, 4, 3), GemmTiles(64, 128, 4, 4), None),
    (128, 64, 8, GemmTiles(64, 64, 4, 4), GemmTiles(128, 64, 4, 4), None),
    (None, 128, 8, GemmTiles(128, 64, 8, 3), GemmTiles(128, 64, 8, 4), GemmTiles(64, 256, 8, 4, n_tiles=28)),
)
# float32 runs tl.dot in IEEE precision (FMA, no tensor cores): correct, not fast; small tiles keep the
# register use of the FMA dot in check.
_TILES_FP32 = (
    (16, 16, 1, GemmTiles(32, 32, 4, 2), GemmTiles(64, 32, 4, 2), None),
    (None, 64, 8, GemmTiles(32, 32, 4, 2), GemmTiles(64, 32, 4, 2), None),
)


# The direct path (TileConfig.direct) for forward calls of at most this many pairs whose intermediate size
# fits the direct down tile (all of K resident): batch-1 decode (DeepSeek-V3: 8 routed + 1 shared pairs).
# Measured on an H100 with the tiles below (bench_experts.py --decode-paths, TP8, sorted path / direct
# path, same run): 1.26x at T=1 (51.0 -> 40.6 us), 0.97x at T=2, 1.02x at T=3, 0.95x at T=4; EP (I=2048, a
# K loop per pair) 0.98x at T=1 with the first tiles and worse above. Each pair reads its slot's weights
# itself, so a slot picked by several tokens is read several times (from L2 after the first), which is
# what loses above one token.
DIRECT_MAX_PAIRS = 16
# (gate_up, down) tiles of the direct path (bench_experts.py --tune at TP8 T=1: 46.1 -> 40.6 us from
# (32, 128, 4, 4) and (32, 256, 4, 3)). The down tiles' BLOCK_K is capped at resident_k_tile(I); an I
# above it takes a K loop per pair (direct_config forced on such shapes: tests, benchmarks).
_DIRECT_16BIT = (GemmTiles(32, 256, 4, 4), GemmTiles(32, 256, 4, 5))
_DIRECT_FP32 = (GemmTiles(32, 32, 4, 2), GemmTiles(32, 32, 4, 2))


def direct_config(dtype: torch.dtype) -> TileConfig:
    """The direct path's configuration (tile_config picks it for small forward calls)."""
    return TileConfig(16, 1, *(_DIRECT_FP32 if dtype == torch.float32 else _DIRECT_16BIT), direct=True)


def tile_config(num_pairs: int, num_slots: int, dtype: torch.dtype, resident_k: int | None = None,
                direct: bool = False) -> TileConfig:
    """The launch configuration for ``num_pairs`` (token, slot) pairs over ``num_slots`` expert slots;
    with ``resident_k`` (the down GEMM's K, one input) the row's resident down tiles where they hold it;
    with ``direct`` (the caller runs the forward; needs ``resident_k``) the direct path up to
    DIRECT_MAX_PAIRS pairs where the intermediate size fits its down tile."""
    if direct and num_pairs <= DIRECT_MAX_PAIRS and resident_k is not None:
        config = direct_config(dtype)
        if resident_k <= config.down.block_k:
            return config
    rows_per_slot = num_pairs / max(1, min(num_slots, num_pairs))
    table = _TILES_FP32 if dtype == torch.float32 else _TILES_16BIT
    for max_rows, block_m, group_m, gate_up, down, resident_down in table:
        if max_rows is None or rows_per_slot <= max_rows:
            if resident_k is not None and resident_down is not None and resident_k <= resident_down.block_k:
                down = resident_down
            return TileConfig(block_m, group_m, gate_up, down)
    raise AssertionError("unreachable: the last row of each table has no limit")


@triton.jit
def _slot_histogram(ids_ptr, start, end, num_slots, NUM_BINS: tl.constexpr, CHUNK: tl.constexpr):
    """The pairs of each slot among ids[start:end]; ids outside [0, num_slots) are left out."""
    offs = tl.arange(0, CHUNK)
    counts = tl.zeros([NUM_BINS], dtype=tl.int32)
    for chunk_start in range(start, end, CHUNK):
        idx = chunk_start + offs
        ids = tl.load(ids_ptr + idx, mask=idx < end, other=-1)
        valid = (idx < end) & (ids >= 0) & (ids < num_slots)
        # The validity test runs on the original (possibly int64) ids; the histogram needs int32.
        counts += tl.histogram(ids.to(tl.int32), NUM_BINS, mask=valid)
    return counts


@triton.jit(do_not_specialize=["num_pairs", "pairs_per_program"])
def _align_count_kernel(ids_ptr, program_counts_ptr, num_pairs, num_slots, pairs_per_program,
                        NUM_BINS: tl.constexpr, CHUNK: tl.constexpr):
    """program_counts[p] = the slot histogram of program p's range of pairs (the first of the two
    launches of a multi-program alignment)."""
    pid = tl.program_id(0)
    first = pid * pairs_per_program
    last = tl.minimum(first + pairs_per_program, num_pairs)
    counts = _slot_histogram(ids_ptr, first, last, num_slots, NUM_BINS, CHUNK)
    tl.store(program_counts_ptr + pid * NUM_BINS + tl.arange(0, NUM_BINS), counts)


@triton.jit(do_not_specialize=["num_pairs", "num_blocks", "pairs_per_program"])  # token counts: see the docstring
def _align_kernel(
    ids_ptr, sorted_pairs_ptr, block_expert_ptr, block_rows_ptr, scratch_ptr, program_counts_ptr, slot_start_ptr,
    slot_rows_ptr, num_pairs, num_slots, num_blocks, pairs_per_program,
    BLOCK_M: tl.constexpr, NUM_BINS: tl.constexpr, CHUNK: tl.constexpr, COUNTS_CHUNK: tl.constexpr,
    PRECOUNTED: tl.constexpr, STABLE: tl.constexpr,
):
    """Expert-sorted, BLOCK_M-padded layout of the pairs.

    Every program needs every slot's total (the segment starts) and how many pairs of each slot
    precede its own range. PRECOUNTED: they come from the per-program histograms of
    _align_count_kernel (launched first); else this is the only program and counts all pairs itself,
    so that decode sizes take one launch. Each program then places its range, chunk by chunk, through
    a private scratch row (STABLE: each slot's pairs in pair order; else in any order, which the
    forward's results do not depend on). Ids outside [0, num_slots) are left out everywhere. Program 0
    also writes each slot's first row and number of pairs (the backward's weight gradients walk
    segments).
    """
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    first = pid * pairs_per_program
    offs = tl.arange(0, CHUNK)
    slots = tl.arange(0, NUM_BINS)

    if PRECOUNTED:
        counts = tl.zeros([NUM_BINS], dtype=tl.int32)
        before = tl.zeros([NUM_BINS], dtype=tl.int32)
        for q0 in range(0, num_programs, COUNTS_CHUNK):
            q = q0 + tl.arange(0, COUNTS_CHUNK)
            rows = tl.load(program_counts_ptr + q[:, None] * NUM_BINS + slots[None, :],
                           mask=(q < num_programs)[:, None], other=0)
            counts += tl.sum(rows, axis=0)
            before += tl.sum(tl.where((q < pid)[:, None], rows, 0), axis=0)
    else:
        counts = _slot_histogram(ids_ptr, 0, num_pairs, num_slots, NUM_BINS, CHUNK)
        before = tl.zeros([NUM_BINS], dtype=tl.int32)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    seg_end = tl.cumsum(padded, 0)
    seg_start = seg_end - padded
    if pid == 0:
        tl.store(slot_start_ptr + slots, seg_start, mask=slots < num_slots)
        tl.store(slot_rows_ptr + slots, counts, mask=slots < num_slots)

    # Block table, slot by slot: slot s owns blocks seg_start[s] / BLOCK_M onwards, its j-th block
    # holding min(BLOCK_M, counts[s] - j * BLOCK_M) real rows; the blocks past the last segment get slot
    # -1. The programs share the j steps. (Searching each block's segment instead costs blocks x slots:
    # 40 us of an 850 us call at T=64, TP8, on an H100.)
    first_block = seg_start // BLOCK_M
    slot_blocks = padded // BLOCK_M
    for j in range(pid, tl.max(slot_blocks, 0), num_programs):
        owned = j < slot_blocks
        tl.store(block_expert_ptr + first_block + j, slots, mask=owned)
        tl.store(block_rows_ptr + first_block + j, tl.minimum(counts - j * BLOCK_M, BLOCK_M), mask=owned)
    # At most min(num_slots, num_pairs) <= NUM_BINS unused blocks when every id is valid (num_blocks' bound): one step.
    for b0 in range(tl.sum(slot_blocks, 0) + pid * NUM_BINS, num_blocks, num_programs * NUM_BINS):
        blocks = b0 + slots
        tl.store(block_expert_ptr + blocks, -1, mask=blocks < num_blocks)
        tl.store(block_rows_ptr + blocks, 0, mask=blocks < num_blocks)

    scratch = scratch_ptr + pid * NUM_BINS  # this program's row: each slot's next free row
    tl.store(scratch + slots, seg_start + before)
    tl.debug_barrier()  # the row is complete before any thread of this program reads it
    last = tl.minimum(first + pairs_per_program, num_pairs)
    if STABLE:
        # A pair's row is its slot's next free row plus its rank among the chunk's pairs of that slot.
        # The ranks come from sorting the chunk by (slot, pair), not from atomics: every run puts every
        # pair on the same row, each slot's rows in pair order (the backward's weight gradients sum
        # over those rows in that order, so they are the same on every run).
        next_row = seg_start + before
        for start in range(first, last, CHUNK):
            idx = start + offs
            ids = tl.load(ids_ptr + idx, mask=idx < last, other=-1)
            valid = (idx < last) & (ids >= 0) & (ids < num_slots)
            slot_of = tl.where(valid, ids.to(tl.int32), NUM_BINS)  # invalid pairs sort last
            keys = tl.sort(slot_of * CHUNK + offs)
            sorted_slot = keys // CHUNK
            hist = tl.histogram(slot_of, NUM_BINS, mask=valid)
            tl.debug_barrier()  # the previous chunk's reads of the row are done
            # The j-th sorted pair's row: next_row[slot] + j - (the chunk's pairs of smaller slots).
            tl.store(scratch + slots, next_row - (tl.cumsum(hist, 0) - hist))
            tl.debug_barrier()
            placed = sorted_slot < num_slots
            row = tl.load(scratch + sorted_slot, mask=placed, other=0) + offs
            tl.store(sorted_pairs_ptr + row, start + keys % CHUNK, mask=placed)
            next_row += hist
    else:
        # The forward's rows are independent of their order: atomics on the row, no sort.
        for start in range(first, last, CHUNK):
            idx = start + offs
            ids = tl.load(ids_ptr + idx, mask=idx < last, other=-1)
            valid = (idx < last) & (ids >= 0) & (ids < num_slots)
            row = tl.atomic_add(scratch + ids, 1, mask=valid, sem="relaxed")
            tl.store(sorted_pairs_ptr + row, idx, mask=valid)


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
def slot_tile_ptrs(
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


# What expert_tile computes besides A @ W^T (the values of its SECOND argument).
ONE = tl.constexpr(0)  # A @ W^T alone
GATE_UP = tl.constexpr(1)  # also A @ V^T, in a second accumulator (gate and up of the same rows)
SUM = tl.constexpr(2)  # A @ W^T + B @ V^T in one accumulator (two inputs, two weights)


@triton.jit
def expert_tile(
    a_ptrs, b_ptrs, stride_ak, row_mask, w_ptrs, stride_wk, v_ptrs, stride_vk, n_mask, k_size,
    SECOND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """float32 [BLOCK_M, BLOCK_N] tiles (first, second) of the products SECOND selects (see above).

    ``a_ptrs``/``b_ptrs`` [BLOCK_M, 1] point at the rows of A and B (B is read for SUM only), ``w_ptrs``/
    ``v_ptrs`` at [BLOCK_K, BLOCK_N] tiles of W^T and V^T (V for GATE_UP and SUM only).
    """
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptrs + offs_k[None, :] * stride_ak
    b_ptrs = b_ptrs + offs_k[None, :] * stride_ak
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
        if SECOND != ONE:
            v = tl.load(v_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            v_ptrs += BLOCK_K * stride_vk
            if SECOND == GATE_UP:
                acc_v = tl.dot(a, v, acc_v, input_precision="ieee")
            else:
                b = tl.load(b_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                acc_w = tl.dot(b, v, acc_w, input_precision="ieee")
                b_ptrs += BLOCK_K * stride_ak
    return acc_w, acc_v


@triton.jit
def program_block(num_blocks, num_n, block_expert_ptr, block_rows_ptr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's expert slot (< 0: nothing to do), its block's rows, their mask, its N tile and the
    tile's offsets."""
    block, tile_n = _block_tile(num_blocks, num_n, GROUP_M)
    expert = tl.load(block_expert_ptr + block)
    offs_m = tl.arange(0, BLOCK_M)
    row_mask = offs_m < tl.load(block_rows_ptr + block)
    return expert, block * BLOCK_M + offs_m, row_mask, tile_n, tile_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def pair_block(num_n, ids_ptr, num_slots, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """program_block of the direct path: block b is pair b alone, in row 0 of BLOCK_M rows (the tensor
    cores' minimum; the others are masked), of slot ids[b] (-1 outside [0, num_slots)). Returns (slot,
    rows = pair + offsets, row mask, N tile, the tile's offsets)."""
    pid = tl.program_id(0)
    pair = pid // num_n
    tile_n = pid % num_n
    slot = tl.load(ids_ptr + pair)
    offs_m = tl.arange(0, BLOCK_M)
    return (tl.where((slot >= 0) & (slot < num_slots), slot, -1), pair + offs_m, offs_m == 0, tile_n,
            tile_n * BLOCK_N + tl.arange(0, BLOCK_N))


@triton.jit
def gathered_gate_up(
    x_ptr, stride_xt, stride_xh, pairs, row_mask, offs_n, expert, topk, num_experts, inter, hidden_size,
    gate_ptr, stride_ge, stride_gn, stride_gk, up_ptr, stride_ue, stride_un, stride_uk,
    shared_gate_ptr, stride_sgn, stride_sgk, shared_up_ptr, stride_sun, stride_suk,
    WITH_UP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """float32 tiles (x[token] @ gate_e^T, x[token] @ up_e^T) of a block's rows, token = pair // topk; the
    second is zeros unless WITH_UP. Routed or shared slot weights as slot_tile_ptrs reads them."""
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + (pairs // topk).to(tl.int64)[:, None] * stride_xt
    gate_ptrs, gate_k = slot_tile_ptrs(expert, num_experts, inter, gate_ptr, stride_ge, stride_gn, stride_gk,
                                       shared_gate_ptr, stride_sgn, stride_sgk, offs_n, offs_k, True)
    n_mask = offs_n < inter
    if WITH_UP:
        up_ptrs, up_k = slot_tile_ptrs(expert, num_experts, inter, up_ptr, stride_ue, stride_un, stride_uk,
                                       shared_up_ptr, stride_sun, stride_suk, offs_n, offs_k, True)
        gate, up = expert_tile(x_rows, x_rows, stride_xh, row_mask, gate_ptrs, gate_k, up_ptrs, up_k, n_mask,
                               hidden_size, GATE_UP, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        gate, up = expert_tile(x_rows, x_rows, stride_xh, row_mask, gate_ptrs, gate_k, gate_ptrs, gate_k, n_mask,
                               hidden_size, ONE, BLOCK_M, BLOCK_N, BLOCK_K)
    return gate, up


@triton.jit(do_not_specialize=["num_blocks"])
def _gate_up_kernel(
    x_ptr, act_ptr, proj_ptr, sorted_pairs_ptr, block_expert_ptr, block_rows_ptr,
    gate_ptr, up_ptr, shared_gate_ptr, shared_up_ptr,
    num_blocks, hidden_size, inter, topk, num_experts, num_slots,
    stride_xt, stride_xh,
    stride_ge, stride_gn, stride_gk, stride_ue, stride_un, stride_uk,
    stride_sgn, stride_sgk, stride_sun, stride_suk,
    stride_act, stride_proj,
    SAVE: tl.constexpr, DIRECT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """act[row] = silu(gate_e @ x[token]) * (up_e @ x[token]) for the rows of each expert-aligned block.
    SAVE (training): also proj[pair] = [gate, up], rounded to hidden's dtype, for the backward.
    DIRECT: block b is pair b (pair_block; block_expert_ptr is the ids) and act's row is the pair."""
    num_n = tl.cdiv(inter, BLOCK_N)
    if DIRECT:
        expert, rows, row_mask, _, offs_n = pair_block(num_n, block_expert_ptr, num_slots, BLOCK_M, BLOCK_N)
    else:
        expert, rows, row_mask, _, offs_n = program_block(num_blocks, num_n, block_expert_ptr, block_rows_ptr,
                                                          BLOCK_M, BLOCK_N, GROUP_M)
    if expert < 0:
        return
    if DIRECT:
        pairs = rows
    else:
        pairs = tl.load(sorted_pairs_ptr + rows, mask=row_mask, other=0)
    gate, up = gathered_gate_up(
        x_ptr, stride_xt, stride_xh, pairs, row_mask, offs_n, expert, topk, num_experts, inter, hidden_size,
        gate_ptr, stride_ge, stride_gn, stride_gk, up_ptr, stride_ue, stride_un, stride_uk,
        shared_gate_ptr, stride_sgn, stride_sgk, shared_up_ptr, stride_sun, stride_suk,
        True, BLOCK_M, BLOCK_N, BLOCK_K)
    mask = row_mask[:, None] & (offs_n < inter)[None, :]
    if SAVE:
        saved = proj_ptr + pairs.to(tl.int64)[:, None] * stride_proj + offs_n[None, :]
        tl.store(saved, gate.to(proj_ptr.dtype.element_ty), mask=mask)
        tl.store(saved + inter, up.to(proj_ptr.dtype.element_ty), mask=mask)
    act = gate / (1.0 + tl.exp(-gate)) * up  # silu(gate) * up
    act_ptrs = act_ptr + rows.to(tl.int64)[:, None] * stride_act + offs_n[None, :]
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=mask)


@triton.jit
def resident_down_tiles(a_rows, row_mask, y_rows, w_ptrs, step_n, offs_n, k_size, n_size,
                        N_TILES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[row, n] = A[row] @ W^T[:, n] for N_TILES consecutive N tiles from ``offs_n``, all of K
    (``k_size`` <= BLOCK_K) in one tile: the [BLOCK_M, K] tile of A is loaded once and the loop runs over
    the weight tiles (``w_ptrs``, ``step_n`` apart), which the compiler pipelines. With the K loop of
    expert_tile, a short K (I=256 at DeepSeek-V3 TP8: four 64-wide steps) leaves the pipeline mostly in
    its prologue, and each N tile re-reads the same A tile."""
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < k_size
    a = tl.load(a_rows + offs_k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
    for _ in range(N_TILES):
        n_mask = offs_n < n_size
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        y = tl.dot(a, w, input_precision="ieee")
        tl.store(y_rows + offs_n[None, :], y.to(y_rows.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])
        offs_n += BLOCK_N
        w_ptrs += step_n


@triton.jit(do_not_specialize=["num_blocks"])
def _down_kernel(
    act_ptr, act2_ptr, y_ptr, sorted_pairs_ptr, block_expert_ptr, block_rows_ptr,
    down_ptr, down2_ptr, shared_down_ptr, shared_down2_ptr,
    num_blocks, hidden_size, inter, num_experts,
    stride_act, stride_de, stride_dn, stride_dk, stride_d2e, stride_d2n, stride_d2k,
    stride_sdn, stride_sdk, stride_sd2n, stride_sd2k, stride_y,
    TWO_INPUTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    N_TILES: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[pair] = down_e @ act[row] for the rows of each expert-aligned block; plus down2_e @ act2[row]
    when TWO_INPUTS (the backward's hidden-state gradient: gate_e^T @ da + up_e^T @ db). N_TILES > 1:
    each program covers N_TILES N tiles with all of K resident (resident_down_tiles; one input only)."""
    num_n = tl.cdiv(tl.cdiv(hidden_size, BLOCK_N), N_TILES)
    expert, rows, row_mask, tile_n, _ = program_block(num_blocks, num_n, block_expert_ptr, block_rows_ptr, BLOCK_M,
                                                      BLOCK_N, GROUP_M)
    if expert < 0:
        return
    offs_n = tile_n * (N_TILES * BLOCK_N) + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    act_rows = act_ptr + rows.to(tl.int64)[:, None] * stride_act
    down_ptrs, down_k = slot_tile_ptrs(expert, num_experts, inter, down_ptr, stride_de, stride_dn, stride_dk,
                                       shared_down_ptr, stride_sdn, stride_sdk, offs_n, offs_k, False)
    pairs = tl.load(sorted_pairs_ptr + rows, mask=row_mask, other=0)
    y_rows = y_ptr + pairs.to(tl.int64)[:, None] * stride_y
    if N_TILES > 1:
        tl.static_assert(not TWO_INPUTS, "resident K tiles take one input")
        step_n = tl.where(expert >= num_experts, stride_sdn, stride_dn) * BLOCK_N
        resident_down_tiles(act_rows, row_mask, y_rows, down_ptrs, step_n, offs_n, inter, hidden_size, N_TILES,
                            BLOCK_N, BLOCK_K)
        return
    n_mask = offs_n < hidden_size
    if TWO_INPUTS:
        act2_rows = act2_ptr + rows.to(tl.int64)[:, None] * stride_act
        down2_ptrs, down2_k = slot_tile_ptrs(expert, num_experts, inter, down2_ptr, stride_d2e, stride_d2n,
                                             stride_d2k, shared_down2_ptr, stride_sd2n, stride_sd2k, offs_n, offs_k,
                                             False)
        y, _ = expert_tile(act_rows, act2_rows, 1, row_mask, down_ptrs, down_k, down2_ptrs, down2_k, n_mask, inter,
                           SUM, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        y, _ = expert_tile(act_rows, act_rows, 1, row_mask, down_ptrs, down_k, down_ptrs, down_k, n_mask, inter,
                           ONE, BLOCK_M, BLOCK_N, BLOCK_K)
    tl.store(y_rows + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _combine_kernel(
    y_ptr, out_ptr, ids_ptr, weights_ptr, token_weight_ptr,
    hidden_size, num_experts, num_slots, stride_y, stride_out,
    TOPK: tl.constexpr, WEIGHTED: tl.constexpr, HAS_TOKEN_WEIGHT: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[t] = sum_j w[t, j] * y[t*K + j] over j in order, in float32 (w = 1 when not WEIGHTED), pairs with
    out-of-range ids left out. The loop over the K pairs is unrolled, so their K row loads are in flight
    together (a [next_power_of_2(K), BLOCK_H] tile reduced along K reached 56 % of the copy bandwidth
    at DeepSeek-V3 TP8 T=16384 on an H100, this 97 %)."""
    token = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < hidden_size
    token_weight = load_token_weight(token_weight_ptr, token, HAS_TOKEN_WEIGHT)
    out = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        pair = token * TOPK + j
        slot = tl.load(ids_ptr + pair)
        valid = (slot >= 0) & (slot < num_slots)
        y = tl.load(y_ptr + pair.to(tl.int64) * stride_y + offs_h, mask=h_mask & valid, other=0.0).to(tl.float32)
        if WEIGHTED:
            y = y * pair_weight(weights_ptr, pair, slot, valid, num_experts, token_weight, HAS_TOKEN_WEIGHT)
        out += y
    tl.store(out_ptr + token.to(tl.int64) * stride_out + offs_h, out.to(out_ptr.dtype.element_ty), mask=h_mask)


@triton.jit
def load_token_weight(token_weight_ptr, token, HAS_TOKEN_WEIGHT: tl.constexpr):
    """The token's weight on the shared slots (1 without a per-token shared weight)."""
    if HAS_TOKEN_WEIGHT:
        return tl.load(token_weight_ptr + token).to(tl.float32)
    return 1.0


@triton.jit
def pair_weight(weights_ptr, pair, slot, valid, num_experts, token_weight, HAS_TOKEN_WEIGHT: tl.constexpr):
    """A pair's weight in its token's sum: topk_weights[pair] (0 for an invalid pair), times the token's
    shared weight on shared slots."""
    weight = tl.load(weights_ptr + pair, mask=valid, other=0.0).to(tl.float32)
    if HAS_TOKEN_WEIGHT:
        weight = tl.where(slot >= num_experts, weight * token_weight, weight)
    return weight


@triton.jit
def _direct_down_kernel(
    act_ptr, out_ptr, ids_ptr, weights_ptr, token_weight_ptr, down_ptr, shared_down_ptr,
    hidden_size, inter, num_experts, num_slots,
    stride_act, stride_de, stride_dn, stride_dk, stride_sdn, stride_sdk, stride_out,
    TOPK: tl.constexpr, HAS_TOKEN_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, K_TILES: tl.constexpr,
):
    """The direct path's down GEMM and combine in one: out[t] = sum_j w[t, j] * (down_e @ act[t*K + j]),
    e the slot of pair t*K + j, for one N tile of one token per program.

    One pipelined loop runs over the token's (pair, K tile) steps, K_TILES = cdiv(I, BLOCK_K) per pair;
    each pair's row sits in row 0 of a BLOCK_M tile. After a pair's last K tile its row is rounded to
    hidden's dtype, weighted and added in pair order, as _combine_kernel adds the rows the sorted path
    stores, so both paths give a token the same sum of the same rounded rows."""
    num_n = tl.cdiv(hidden_size, BLOCK_N)
    token = tl.program_id(0) // num_n
    offs_n = (tl.program_id(0) % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hidden_size
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    token_weight = load_token_weight(token_weight_ptr, token, HAS_TOKEN_WEIGHT)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    out = tl.zeros([BLOCK_N], dtype=tl.float32)
    for step in range(TOPK * K_TILES):
        pair = token * TOPK + step // K_TILES
        k0 = (step % K_TILES) * BLOCK_K
        slot = tl.load(ids_ptr + pair)
        valid = (slot >= 0) & (slot < num_slots)
        w_ptrs, w_k = slot_tile_ptrs(tl.where(valid, slot, 0), num_experts, inter, down_ptr, stride_de, stride_dn,
                                     stride_dk, shared_down_ptr, stride_sdn, stride_sdk, offs_n, offs_k, False)
        k_mask = (offs_k < inter - k0) & valid
        a_ptrs = act_ptr + pair.to(tl.int64) * stride_act + k0 + offs_k[None, :] + offs_m[:, None] * 0
        a = tl.load(a_ptrs, mask=(offs_m == 0)[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs + k0 * w_k, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision="ieee")
        if step % K_TILES == K_TILES - 1:
            y = tl.sum(tl.where(offs_m[:, None] == 0, acc, 0.0), axis=0).to(out_ptr.dtype.element_ty).to(tl.float32)
            out += y * pair_weight(weights_ptr, pair, slot, valid, num_experts, token_weight, HAS_TOKEN_WEIGHT)
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    tl.store(out_ptr + token.to(tl.int64) * stride_out + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_mask)


def _align_launch(num_pairs: int, num_slots: int) -> tuple[int, int, int, int, int]:
    """(num_bins, chunk, programs, pairs_per_program, num_warps) of the alignment kernels."""
    num_bins = max(32, triton.next_power_of_2(num_slots))  # the GPU histogram wants >= one bin per lane
    chunk = min(2048, max(128, triton.next_power_of_2(num_pairs)))
    # Up to 64 programs: each reads every program's histogram (64 x bins integers, from L2).
    programs = min(64, triton.cdiv(num_pairs, chunk))
    pairs_per_program = triton.cdiv(triton.cdiv(num_pairs, programs), chunk) * chunk
    programs = triton.cdiv(num_pairs, pairs_per_program)
    return num_bins, chunk, programs, pairs_per_program, 4 if num_pairs <= 1024 else 8


# The pipeline depth that fits each (kernel, meta-parameters) on this process's GPU (see launch_gemm).
_FITTING_STAGES: dict = {}


def launch_gemm(kernel, grid, *args, num_stages: int, **meta) -> None:
    """``kernel[grid](*args, **meta)`` with `num_stages` pipeline stages, or the most that fit: each stage
    holds one set of operand tiles in shared memory, and a tile configuration chosen for an H100/H200
    (228 KB per SM) may need fewer stages on another card or with a larger epilogue. The launch raises
    before running anything when the buffers do not fit, so retrying with one stage fewer is safe; the
    depth that fits is remembered."""
    key = (kernel, tuple(sorted(meta.items())), num_stages)
    stages = _FITTING_STAGES.get(key, num_stages)
    while True:
        try:
            kernel[grid](*args, num_stages=stages, **meta)
            break
        except OutOfResources:
            if stages == 1:
                raise
            stages -= 1
    _FITTING_STAGES[key] = stages


class Alignment(NamedTuple):
    """The pairs sorted by expert slot, in segments padded to BLOCK_M rows (see _align_kernel)."""

    sorted_pairs: torch.Tensor  # [num_blocks * BLOCK_M] pair index t*K + j of each row (padding rows: unset)
    block_expert: torch.Tensor  # [num_blocks] the slot of each block, -1 past the last segment
    block_rows: torch.Tensor  # [num_blocks] real rows of each block
    slot_start: torch.Tensor  # [num_slots] first row of each slot's segment
    slot_rows: torch.Tensor  # [num_slots] pairs of each slot
    num_blocks: int  # an upper bound computed from shapes: launches never wait on the device
    block_m: int


def align(ids: torch.Tensor, num_slots: int, block_m: int, stable: bool = False) -> Alignment:
    """Sorts the pairs of contiguous ``ids`` [T, K] by slot; ids outside [0, num_slots) are left out.
    `stable`: each slot's pairs in pair order (a sort per chunk), else in any order (atomics)."""
    num_pairs = ids.numel()
    # Each slot's padded segment adds < BLOCK_M rows, and at most min(slots, pairs) slots are active.
    num_blocks = num_pairs // block_m + min(num_slots, num_pairs)
    num_bins, chunk, programs, pairs_per_program, num_warps = _align_launch(num_pairs, num_slots)
    precounted = programs > 1
    counts_size = programs * num_bins if precounted else 0
    scratch = torch.empty(num_blocks * block_m + 2 * num_blocks + programs * num_bins + counts_size + 2 * num_slots,
                          dtype=torch.int32, device=ids.device)
    sorted_pairs, block_expert, block_rows, program_rows, program_counts, slot_start, slot_rows = scratch.split(
        [num_blocks * block_m, num_blocks, num_blocks, programs * num_bins, counts_size, num_slots, num_slots])
    if precounted:
        _align_count_kernel[(programs,)](ids, program_counts, num_pairs, num_slots, pairs_per_program,
                                         NUM_BINS=num_bins, CHUNK=chunk, num_warps=num_warps)
    _align_kernel[(programs,)](
        ids, sorted_pairs, block_expert, block_rows, program_rows, program_counts, slot_start, slot_rows,
        num_pairs, num_slots, num_blocks, pairs_per_program,
        BLOCK_M=block_m, NUM_BINS=num_bins, CHUNK=chunk, COUNTS_CHUNK=max(1, 8192 // num_bins),
        PRECOUNTED=precounted, STABLE=stable, num_warps=num_warps,
    )
    return Alignment(sorted_pairs, block_expert, block_rows, slot_start, slot_rows, num_blocks, block_m)


class PairBlocks(NamedTuple):
    """The direct path's blocks: pair b of ``ids`` [T, K] is block b, alone in row 0 of ``block_m`` rows
    (see pair_block); ids outside [0, num_slots) are left out."""

    ids: torch.Tensor
    num_slots: int
    block_m: int


def gathered_gate_up_gemm(x, act, projections, blocks: Alignment | PairBlocks, topk, gate, up, shared_gate,
                          shared_up, tiles: GemmTiles, group_m: int) -> None:
    """act[row] = silu(gate_e @ x[token]) * (up_e @ x[token]) for every row of the blocks (token =
    pair // topk, e its slot; weights [E, I, H], shared [S*I, H]; PairBlocks: row = pair), and with
    `projections` [T*K, 2I] also projections[pair] = [gate_e @ x[token], up_e @ x[token]]."""
    num_experts, inter, hidden_size = gate.shape
    save = projections is not None
    direct = isinstance(blocks, PairBlocks)
    if direct:  # the kernel reads the slots from the ids and nothing else of an alignment
        tables, num_blocks, num_slots = (blocks.ids,) * 3, blocks.ids.numel(), blocks.num_slots
    else:
        tables = blocks.sorted_pairs, blocks.block_expert, blocks.block_rows
        num_blocks, num_slots = blocks.num_blocks, blocks.slot_start.numel()
    launch_gemm(
        _gate_up_kernel, (num_blocks * triton.cdiv(inter, tiles.block_n),),
        x, act, projections if save else act, *tables, gate, up, shared_gate, shared_up,
        num_blocks, hidden_size, inter, topk, num_experts, num_slots,
        *x.stride(), *gate.stride(), *up.stride(), *shared_gate.stride(), *shared_up.stride(), act.stride(0),
        projections.stride(0) if save else 0,
        SAVE=save, DIRECT=direct, BLOCK_M=blocks.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        GROUP_M=group_m, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )


def resident_k_tile(k_size: int) -> int:
    """The K tile that holds all of a K of ``k_size``: its next power of two, at least tl.dot's smallest K
    (16; Triton's interpreter, which the CPU tests run, does not enforce it)."""
    return max(16, triton.next_power_of_2(k_size))


def scattered_gemm(act, y, alignment: Alignment, down, shared_down, tiles: GemmTiles, group_m: int,
                   act2=None, down2=None, shared_down2=None) -> None:
    """y[pair] = down_e @ act[row] (+ down2_e @ act2[row]) for every row of the alignment; weights
    [E, N, K] and shared [N, S*K]. The slot size along K is act's width. ``tiles.n_tiles`` > 1 holds all of
    K resident (a K tile of resident_k_tile(K) <= ``tiles.block_k``) where K is that short and there is
    one input; elsewhere the K loop runs, one N tile per program."""
    num_experts, hidden_size, inter = down.shape
    two_inputs = act2 is not None
    resident_k = resident_k_tile(inter)
    resident = tiles.n_tiles > 1 and not two_inputs and resident_k <= tiles.block_k
    num_n = triton.cdiv(hidden_size, tiles.block_n)
    # The N tiles spread evenly over a block's programs (no program loops over fully masked tiles).
    n_tiles = triton.cdiv(num_n, triton.cdiv(num_n, tiles.n_tiles)) if resident else 1
    block_k = resident_k if resident else tiles.block_k
    if not two_inputs:  # never dereferenced
        act2, down2, shared_down2 = act, down, shared_down
    launch_gemm(
        _down_kernel, (alignment.num_blocks * triton.cdiv(num_n, n_tiles),),
        act, act2, y, alignment.sorted_pairs, alignment.block_expert, alignment.block_rows,
        down, down2, shared_down, shared_down2,
        alignment.num_blocks, hidden_size, inter, num_experts,
        act.stride(0), *down.stride(), *down2.stride(), *shared_down.stride(), *shared_down2.stride(), y.stride(0),
        TWO_INPUTS=two_inputs, BLOCK_M=alignment.block_m, BLOCK_N=tiles.block_n, BLOCK_K=block_k, N_TILES=n_tiles,
        GROUP_M=group_m, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )


def combine(y, out, ids, num_experts: int, num_slots: int, weights=None, token_weight=None) -> None:
    """out[t] = sum over valid j of weights[t, j] (* token_weight[t] on shared slots) * y[t*K + j];
    an unweighted sum without weights."""
    tokens, hidden_size = out.shape
    block_h = min(triton.next_power_of_2(hidden_size), 1024)
    _combine_kernel[(tokens, triton.cdiv(hidden_size, block_h))](
        y, out, ids, ids if weights is None else weights, ids if token_weight is None else token_weight,
        hidden_size, num_experts, num_slots, y.stride(0), out.stride(0),
        TOPK=ids.shape[1], WEIGHTED=weights is not None, HAS_TOKEN_WEIGHT=token_weight is not None, BLOCK_H=block_h,
        num_warps=4,
    )


def direct_down_combine(act, out, ids, weights, token_weight, down, shared_down, num_slots: int,
                        tiles: GemmTiles, block_m: int) -> None:
    """The direct path after the gate/up GEMM: out[t] = sum over valid j of weights[t, j] (* token_weight[t]
    on shared slots) * down_e @ act[t*K + j] (see _direct_down_kernel)."""
    tokens, hidden_size = out.shape
    num_experts, _, inter = down.shape
    block_k = min(tiles.block_k, resident_k_tile(inter))
    launch_gemm(
        _direct_down_kernel, (tokens * triton.cdiv(hidden_size, tiles.block_n),),
        act, out, ids, weights, ids if token_weight is None else token_weight, down, shared_down,
        hidden_size, inter, num_experts, num_slots,
        act.stride(0), *down.stride(), *shared_down.stride(), out.stride(0),
        TOPK=ids.shape[1], HAS_TOKEN_WEIGHT=token_weight is not None, BLOCK_M=block_m, BLOCK_N=tiles.block_n,
        BLOCK_K=block_k, K_TILES=triton.cdiv(inter, block_k), num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )


def on_device(device: torch.device):
    """Launches go to `device`'s stream (a CPU device here is Triton's interpreter, which the tests use)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def fused_experts_triton(hidden, topk_weights, topk_ids, w_gate, w_up, w_down, shared_gate, shared_up, shared_down,
                         shared_token_weight, num_shared, config: TileConfig | None = None, projections_out=None):
    """Runs the kernels (two on the direct path, else four or five); the arguments are already checked
    (ops.experts.check_experts_args).

    ``config`` overrides ``tile_config`` (for tuning: benchmarks/bench_experts.py --tune);
    ``projections_out`` [T*K, 2I] receives each pair's gate and up projections (training).
    """
    tokens, hidden_size = hidden.shape
    topk = topk_ids.shape[1]
    num_experts, inter, _ = w_gate.shape
    out = torch.empty(tokens, hidden_size, dtype=hidden.dtype, device=hidden.device)
    if tokens == 0:
        return out
    num_slots = num_experts + num_shared
    cfg = config or tile_config(tokens * topk, num_slots, hidden.dtype, resident_k=inter, direct=True)
    ids = topk_ids.contiguous()  # [T, K] is indexed as pairs t*K + j; a no-op for the router's output
    if num_shared == 0:  # never dereferenced: no id selects a shared slot
        shared_gate, shared_up, shared_down = w_gate[0], w_up[0], w_down[0]
    weights = topk_weights.contiguous()
    token_weight = None if shared_token_weight is None else shared_token_weight.contiguous()
    with on_device(hidden.device):
        if cfg.direct:
            act = hidden.new_empty(tokens * topk, inter)
            gathered_gate_up_gemm(hidden, act, projections_out, PairBlocks(ids, num_slots, cfg.block_m), topk, w_gate,
                                  w_up, shared_gate, shared_up, cfg.gate_up, cfg.group_m)
            direct_down_combine(act, out, ids, weights, token_weight, w_down, shared_down, num_slots, cfg.down,
                                cfg.block_m)
            return out
        alignment = align(ids, num_slots, cfg.block_m)
        act = hidden.new_empty(alignment.num_blocks * cfg.block_m, inter)
        gathered_gate_up_gemm(hidden, act, projections_out, alignment, topk, w_gate, w_up, shared_gate, shared_up,
                              cfg.gate_up, cfg.group_m)
        y = hidden.new_empty(tokens * topk, hidden_size)
        scattered_gemm(act, y, alignment, w_down, shared_down, cfg.down, cfg.group_m)
        combine(y, out, ids, num_experts, num_slots, weights, token_weight)
    return out
