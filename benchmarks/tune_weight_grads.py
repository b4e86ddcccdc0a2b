"""Tile search for fused_experts' weight-gradient kernel (ops/triton_experts_backward.py), CUDA, bfloat16.

The backward's two weight-gradient launches at DeepSeek-V3 per-GPU shapes (bench_experts.SHAPES), on
an alignment of random near-balanced routing: gate/up (dG_e = da^T x and dU_e = db^T x, two
accumulators, rows of x gathered by token) and down (dD_e = (p g)^T h, the upstream gradient's rows
gathered and scaled). Each candidate tile configuration is timed (CUDA events, median of 10 calls; the
calls take milliseconds, so no CUDA graph) and its gradients compared with the current choice's
(``weight_grad_tiles``, the first row): the kernel sums each slot's rows in the same order whatever
the tiles, so a difference beyond float32 rounding is a bug.

    python benchmarks/tune_weight_grads.py                  # T = 4096, the tp8 shape
    python benchmarks/tune_weight_grads.py --tokens 512 16384 --shape ep
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from bench_experts import SHAPES
from triton.runtime.errors import OutOfResources

from ops.triton_experts import align, tile_config
from ops.triton_experts_backward import WeightGradTiles, weight_grad_tiles, weight_grads

CANDIDATES = [WeightGradTiles(*tiles) for tiles in (
    (64, 128, 32, 8, 3), (64, 128, 64, 8, 3), (128, 128, 32, 8, 3), (128, 128, 64, 8, 3),
    (64, 256, 64, 8, 3), (128, 64, 64, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
)]


def time_us(fn, iters: int = 10) -> float:
    fn()  # compiles
    samples = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3)
    return statistics.median(samples)


def tune(tokens: int, shape: tuple[int, int, int, int, int]) -> None:
    hidden_size, inter, num_experts, topk, num_shared = shape
    dtype, generator = torch.bfloat16, torch.Generator("cuda").manual_seed(tokens)

    def randn(*size):
        return torch.randn(*size, device="cuda", dtype=dtype, generator=generator)

    routed = torch.rand(tokens, num_experts, device="cuda", generator=generator).argsort(1)[:, :topk]
    shared = torch.arange(num_experts, num_experts + num_shared, device="cuda").expand(tokens, -1)
    ids = torch.cat([routed, shared], 1).to(torch.int32).contiguous()
    slots, pairs_per_token = num_experts + num_shared, topk + num_shared
    rows_per_slot = ids.numel() / slots
    alignment = align(ids, slots, tile_config(ids.numel(), slots, dtype).block_m, stable=True)
    rows = alignment.num_blocks * alignment.block_m
    x, upstream = randn(tokens, hidden_size), randn(tokens, hidden_size)
    da, db, h = randn(rows, inter), randn(rows, inter), randn(rows, inter)
    pair_weight = torch.rand(ids.numel(), device="cuda", generator=generator)
    gate_up_grads = [torch.empty(num_experts, inter, hidden_size, device="cuda", dtype=dtype) for _ in range(2)]
    shared_gate_up_grads = [torch.empty(num_shared * inter, hidden_size, device="cuda", dtype=dtype)
                            for _ in range(2)]
    down_grads = [torch.empty(num_experts, hidden_size, inter, device="cuda", dtype=dtype)]
    shared_down_grads = [torch.empty(hidden_size, num_shared * inter, device="cuda", dtype=dtype)]

    def gate_up(tiles):
        weight_grads(da, db, x, None, gate_up_grads, shared_gate_up_grads, alignment, pairs_per_token, num_experts,
                     a_gathered=False, b_gathered=True, slot_along_n2=False, tiles=tiles)
        return gate_up_grads + shared_gate_up_grads

    def down(tiles):
        weight_grads(upstream, None, h, pair_weight, down_grads, shared_down_grads, alignment, pairs_per_token,
                     num_experts, a_gathered=True, b_gathered=False, slot_along_n2=True, tiles=tiles)
        return down_grads + shared_down_grads

    print(f"\n{torch.cuda.get_device_name()}, T={tokens}, H={hidden_size} I={inter} E={num_experts} K={topk} "
          f"S={num_shared}: {rows_per_slot:.0f} rows per slot")
    print("| launch | tiles (N1 x N2, rows per step, warps, stages) | us | vs current | max diff vs current |")
    print("|---|---|---|---|---|")
    for name, launch, two in (("gate/up", gate_up, True), ("down", down, False)):
        current = weight_grad_tiles(dtype, two, rows_per_slot)
        expected, baseline = [g.float() for g in launch(current)], None  # the launches reuse the buffers
        for tiles in [current] + [t for t in CANDIDATES if t != current]:
            label = f"{tiles.block_n1}x{tiles.block_n2}, {tiles.block_r}, {tiles.num_warps}, {tiles.num_stages}"
            try:
                us = time_us(lambda: launch(tiles))  # noqa: B023 (called within the iteration)
            except OutOfResources:
                print(f"| {name} | {label} | does not fit | | |")
                continue
            baseline = baseline or us
            diff = max((g.float() - e).abs().max().item() for g, e in zip(launch(tiles), expected, strict=True))
            mark = " (current)" if tiles == current else ""
            print(f"| {name} | {label}{mark} | {us:.1f} | {baseline / us:.2f}x | {diff:.3g} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tp8")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_weight_grads.py times CUDA kernels: no CUDA device")
    for tokens in args.tokens:
        tune(tokens, SHAPES[args.shape])


if __name__ == "__main__":
    main()
