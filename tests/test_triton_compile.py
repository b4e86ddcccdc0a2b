"""Every Triton kernel (fused_experts forward and backward, the gate's backward) compiles for sm_90 on
any machine.

Triton's interpreter (the CPU tests of the kernels) runs kernels as Python and accepts programs the
compiler rejects (a global that is not a tl.constexpr, an operand of the wrong type); compiling to
PTX/cubin for an H100/H200 target needs no GPU, so a machine without one catches those too. Each
launch configuration is compiled: every row of the tile tables, both dtypes, every flag combination.
"""

from __future__ import annotations

import itertools

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ops import triton_experts as forward  # noqa: E402
from ops import triton_experts_backward as backward  # noqa: E402
from ops import triton_gate_backward as gate_backward  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
INT32_POINTERS = {"sorted_pairs_ptr", "block_expert_ptr", "block_rows_ptr", "slot_start_ptr", "slot_rows_ptr",
                  "scratch_ptr", "program_counts_ptr"}
FLOAT32_POINTERS = {"dp_part_ptr", "pair_weight_ptr", "row_scale_ptr", "weights_ptr", "token_weight_ptr",
                    "grad_weights_ptr"}


def compile_for_hopper(kernel, dtype: str, num_warps: int, num_stages: int = 1, ids: str = "*i32",
                       ids_pointers=("ids_ptr",), **constexprs):
    """Compiles `kernel` with pointers of `dtype` (float data), int32 / float32 where the kernel's
    argument names say so, `ids` for the router's ids (the arguments named in `ids_pointers`), and
    integer scalars."""

    def type_of(name):
        if name in constexprs:
            return "constexpr"
        if not name.endswith("_ptr"):
            return "fp32" if name in FLOAT_SCALARS else "i32"
        if name in ids_pointers:
            return ids
        return "*i32" if name in INT32_POINTERS else "*fp32" if name in FLOAT32_POINTERS else dtype

    signature = {name: type_of(name) for name in kernel.arg_names}
    triton.compile(ASTSource(kernel, signature, constexprs), target=HOPPER,
                   options={"num_warps": num_warps, "num_stages": num_stages})


FLOAT_SCALARS = {"scale", "renormalize_eps"}
TABLES = {"*bf16": forward._TILES_16BIT, "*fp32": forward._TILES_FP32}


@pytest.mark.parametrize("dtype", sorted(TABLES))
def test_gemm_kernels_compile_for_every_tile_row(dtype):
    for _, block_m, group_m, gate_up, down, resident_down in TABLES[dtype]:
        common = dict(BLOCK_M=block_m, GROUP_M=group_m)
        gate_up_meta = dict(common, BLOCK_N=gate_up.block_n, BLOCK_K=gate_up.block_k)
        for save in (True, False):
            compile_for_hopper(forward._gate_up_kernel, dtype, gate_up.num_warps, gate_up.num_stages, SAVE=save,
                               DIRECT=False, **gate_up_meta)
        compile_for_hopper(backward._gate_up_backward_kernel, dtype, gate_up.num_warps, gate_up.num_stages,
                           **gate_up_meta)
        for two_inputs in (True, False):
            compile_for_hopper(forward._down_kernel, dtype, down.num_warps, down.num_stages, TWO_INPUTS=two_inputs,
                               BLOCK_N=down.block_n, BLOCK_K=down.block_k, N_TILES=1, **common)
        if resident_down is not None:
            compile_for_hopper(forward._down_kernel, dtype, resident_down.num_warps, resident_down.num_stages,
                               TWO_INPUTS=False, BLOCK_N=resident_down.block_n, BLOCK_K=resident_down.block_k,
                               N_TILES=resident_down.n_tiles, **common)


@pytest.mark.parametrize("dtype", sorted(TABLES))
@pytest.mark.parametrize("ids", ["*i32", "*i64"])
def test_direct_path_kernels_compile(dtype, ids):
    config = forward.direct_config(torch.float32 if dtype == "*fp32" else torch.bfloat16)
    gate_up, down = config.gate_up, config.down
    for save in (True, False):
        # The direct path passes the ids for the block tables (gathered_gate_up_gemm).
        compile_for_hopper(forward._gate_up_kernel, dtype, gate_up.num_warps, gate_up.num_stages, ids=ids,
                           ids_pointers=("sorted_pairs_ptr", "block_expert_ptr", "block_rows_ptr"), SAVE=save,
                           DIRECT=True, BLOCK_M=config.block_m, GROUP_M=config.group_m, BLOCK_N=gate_up.block_n,
                           BLOCK_K=gate_up.block_k)
    # DeepSeek-V3 TP8 (I=256: one K tile per pair where the tile holds it) and EP (I=2048, a K loop).
    for inter, token_weight in itertools.product((256, 2048), (True, False)):
        block_k = min(down.block_k, triton.next_power_of_2(inter))
        compile_for_hopper(forward._direct_down_kernel, dtype, down.num_warps, down.num_stages, ids=ids, TOPK=9,
                           HAS_TOKEN_WEIGHT=token_weight, BLOCK_M=config.block_m, BLOCK_N=down.block_n,
                           BLOCK_K=block_k, K_TILES=triton.cdiv(inter, block_k))


@pytest.mark.parametrize("dtype", sorted(TABLES))
def test_weight_gradient_kernel_compiles(dtype):
    # The two uses: gate/up (two accumulators, x gathered) and down (scaled upstream gradient gathered).
    # Short and long slots (rows per step) for each.
    for (two, scaled), rows_per_slot in itertools.product(((True, False), (False, True)), (18, 574)):
        tiles = backward.weight_grad_tiles(torch.float32 if dtype == "*fp32" else torch.bfloat16, two, rows_per_slot)
        meta = dict(BLOCK_N1=tiles.block_n1, BLOCK_N2=tiles.block_n2, BLOCK_R=tiles.block_r)
        compile_for_hopper(backward._weight_grad_kernel, dtype, tiles.num_warps, tiles.num_stages, A_GATHERED=scaled,
                           B_GATHERED=two, SCALED=scaled, TWO=two, SLOT_ALONG_N2=scaled, **meta)


@pytest.mark.parametrize("ids", ["*i32", "*i64"])
def test_alignment_and_combine_kernels_compile(ids):
    for num_pairs, num_slots in ((9, 257), (147456, 257), (4096, 513)):
        num_bins, chunk, _, _, num_warps = forward._align_launch(num_pairs, num_slots)
        compile_for_hopper(forward._align_count_kernel, "*i32", num_warps, ids=ids, NUM_BINS=num_bins, CHUNK=chunk)
        for stable, precounted in itertools.product((True, False), (True, False)):
            compile_for_hopper(forward._align_kernel, "*i32", num_warps, ids=ids, BLOCK_M=64, NUM_BINS=num_bins,
                               CHUNK=chunk, COUNTS_CHUNK=max(1, 8192 // num_bins), PRECOUNTED=precounted,
                               STABLE=stable)
    for weighted in (True, False):
        compile_for_hopper(forward._combine_kernel, "*bf16", 4, ids=ids, WEIGHTED=weighted, HAS_TOKEN_WEIGHT=weighted,
                           TOPK=9, BLOCK_H=1024)


@pytest.mark.parametrize("dtype", ["*fp32", "*bf16", "*fp16"])
def test_gate_backward_kernel_compiles(dtype):
    # DeepSeek-V3 (256 experts, top 8), E=512 top 22, and the largest the gate takes (1024, top 64).
    for num_experts, topk in ((256, 8), (512, 22), (1024, 64)):
        block_e, block_k = triton.next_power_of_2(num_experts), triton.next_power_of_2(topk)
        for softmax in (True, False):
            compile_for_hopper(gate_backward._gate_backward_kernel, dtype, 4 if block_e * block_k <= 4096 else 8,
                               ids="*i64", SOFTMAX=softmax, RENORMALIZE=True, BLOCK_E=block_e, BLOCK_K=block_k)
