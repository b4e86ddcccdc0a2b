"""Fused gate vs the unfused routing (eager and torch.compile), against the memory floor.

CUDA (default): every variant is captured in a CUDA graph and timed by CUDA events around graph
replays (median of many replays); each graph calls the variant on several input buffers in turn so
that the inputs of one replay exceed the L2 cache. The floor is the bytes the gate must move (read
the logits, write weights and ids) over the device-to-device copy bandwidth measured in the same run;
`copy` is a copy of the same logits inside the same graphs, the latency floor where T is small (one
kernel node that reads the rows from memory and writes them back).

    python benchmarks/bench_gate.py                  # all configurations
    python benchmarks/bench_gate.py --quick          # fewer sizes
    python benchmarks/bench_gate.py --tokens 40000   # these sizes only
    python benchmarks/bench_gate.py --cpu            # CPU kernel vs eager PyTorch on the CPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import ops
from ops.reference import deepseek_v3_routing, gate_reference, gate_weights_for_ids

# name: (E, G, topk_group, topk)
CONFIGS = {
    "deepseek_v3": (256, 8, 4, 8),
    "kimi_k2": (384, 1, 1, 8),
    "glm_4_5": (160, 1, 1, 8),
    "e512_k22": (512, 1, 1, 22),
}
TOKENS = [1, 8, 64, 512, 4096, 16384, 40000, 131072]
QUICK_TOKENS = [1, 64, 4096, 40000]
SHORT_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def gate_with(kernel: str):
    """Ours with MOE_FUSION_GATE_KERNEL=kernel: "auto" (the default: the segmented CUDA kernel
    where it applies, else the warp kernel), "warp" (one warp per token) or "segmented" (8-32
    lanes per token)."""

    def gate(logits, bias, groups, topk_group, topk):
        os.environ["MOE_FUSION_GATE_KERNEL"] = kernel
        try:
            return ops.moe_fused_gate(logits, bias, groups, topk_group, topk, routed_scaling_factor=2.5,
                                      renormalize_eps=1e-20)
        finally:
            del os.environ["MOE_FUSION_GATE_KERNEL"]

    return gate


fused = gate_with("auto")
warp_kernel = gate_with("warp")
segmented_kernel = gate_with("segmented")


def unfused(logits, bias, groups, topk_group, topk):
    return deepseek_v3_routing(logits, bias, groups, topk_group, topk, routed_scaling_factor=2.5)


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy bandwidth (bytes read + written) of a 2 GiB buffer."""
    src = torch.empty(2**29, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def time_in_graph_us(fn, buffers, replays: int = 30) -> float:
    """Median microseconds per call of fn(buffer), inside a CUDA graph over all buffers."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for buffer in buffers:  # warm up (compiles, autotuning, allocator) outside the capture
            fn(buffer)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for buffer in buffers:
            fn(buffer)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(buffers))
    del graph
    return statistics.median(times)


def check_once(logits, bias, groups, topk_group, topk) -> None:
    """Fail loudly if ours is not a top-k of the reference's scores with the reference's weights.

    (bf16 logits repeat values, so exact ties are common: the check compares the selection scores
    of the picks, not the ids.)"""
    weights, ids = fused(logits, bias, groups, topk_group, topk)
    ref = gate_reference(logits.cpu(), bias.cpu(), groups, topk_group, topk, routed_scaling_factor=2.5,
                         renormalize_eps=1e-20)
    ids = ids.cpu().long()
    ours, theirs = ref.masked_selection.gather(1, ids), ref.masked_selection.gather(1, ref.ids)
    if not torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6):
        raise SystemExit(f"MISMATCH: picks are not a top-{topk} of the reference scores")
    expected = gate_weights_for_ids(ref.scores, ref.kept, ids, None, True, 1e-20, 2.5, torch.float32)
    torch.testing.assert_close(weights.cpu(), expected, rtol=1e-5, atol=1e-6)


def bench_cuda(tokens_list, config_names) -> None:
    props = torch.cuda.get_device_properties(0)
    l2_bytes = props.L2_cache_size
    bandwidth = copy_bandwidth_gbps()
    print(f"card: {props.name}, {props.multi_processor_count} SMs, L2 {l2_bytes / 2**20:.0f} MiB, "
          f"torch {torch.__version__}, measured copy bandwidth {bandwidth:.0f} GB/s", flush=True)
    header = (f"{'config':<12} {'dtype':<5} {'T':>7} {'ours us':>9} {'floor us':>9} {'ours/floor':>10} "
              f"{'copy us':>8} {'ours/copy':>9} {'GB/s':>6} {'warp us':>8} {'segm. us':>8} {'eager us':>9} "
              f"{'eager/ours':>10} {'compile us':>10} {'compile/ours':>12}")
    print(header)
    for name in config_names:
        num_experts, groups, topk_group, topk = CONFIGS[name]
        bias = torch.randn(num_experts, device="cuda") * 0.3
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator(device="cuda").manual_seed(0)
            check = torch.randn(512, num_experts, device="cuda", generator=gen).to(dtype)
            check_once(check, bias, groups, topk_group, topk)
            torch._dynamo.reset()
            compiled = torch.compile(unfused, dynamic=True)
            for tokens in tokens_list:
                row_bytes = num_experts * torch.finfo(dtype).bits // 8
                moved = tokens * (row_bytes + topk * 8)  # read logits; write fp32 weights + int32 ids
                count = max(1, min(64, -(-3 * l2_bytes // (tokens * row_bytes))))
                buffers = [torch.randn(tokens, num_experts, device="cuda", generator=gen).to(dtype)
                           for _ in range(count)]
                ours = time_in_graph_us(lambda x: fused(x, bias, groups, topk_group, topk), buffers)
                sink = torch.empty_like(buffers[0])
                copy = time_in_graph_us(sink.copy_, buffers)
                warp = time_in_graph_us(lambda x: warp_kernel(x, bias, groups, topk_group, topk), buffers)
                segmented = time_in_graph_us(lambda x: segmented_kernel(x, bias, groups, topk_group, topk), buffers)
                eager = time_in_graph_us(lambda x: unfused(x, bias, groups, topk_group, topk), buffers[:8])
                comp = time_in_graph_us(lambda x: compiled(x, bias, groups, topk_group, topk), buffers[:8])
                floor = moved / (bandwidth * 1e3)
                print(f"{name:<12} {SHORT_DTYPE[dtype]:<5} {tokens:>7} {ours:>9.2f} {floor:>9.2f} "
                      f"{ours / floor:>10.2f} {copy:>8.2f} {ours / copy:>9.2f} {moved / ours / 1e3:>6.0f} {warp:>8.2f} "
                      f"{segmented:>8.2f} {eager:>9.1f} {eager / ours:>10.1f} "
                      f"{comp:>10.1f} {comp / ours:>12.1f}", flush=True)
                del buffers


def bench_cpu(tokens_list) -> None:
    print(f"CPU: {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'config':<12} {'dtype':<5} {'T':>6} {'ours ms':>9} {'eager ms':>9} {'eager/ours':>10}")
    for name, (num_experts, groups, topk_group, topk) in CONFIGS.items():
        bias = torch.randn(num_experts) * 0.3
        for dtype in (torch.float32, torch.bfloat16):
            for tokens in tokens_list:
                logits = torch.randn(tokens, num_experts).to(dtype)
                check_once(logits, bias, groups, topk_group, topk)
                timings = []
                for fn in (fused, unfused):
                    fn(logits, bias, groups, topk_group, topk)
                    samples = []
                    for _ in range(10):
                        start = time.perf_counter()
                        fn(logits, bias, groups, topk_group, topk)
                        samples.append((time.perf_counter() - start) * 1e3)
                    timings.append(statistics.median(samples))
                print(f"{name:<12} {SHORT_DTYPE[dtype]:<5} {tokens:>6} {timings[0]:>9.3f} {timings[1]:>9.3f} "
                      f"{timings[1] / timings[0]:>10.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="time the CPU kernel against eager PyTorch")
    parser.add_argument("--quick", action="store_true", help="fewer token counts")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts (default: all, or --quick's)")
    args = parser.parse_args()
    if args.cpu:
        bench_cpu(args.tokens or ([4096] if args.quick else [64, 512, 4096]))
        return
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --cpu")
    bench_cuda(args.tokens or (QUICK_TOKENS if args.quick else TOKENS), args.configs)


if __name__ == "__main__":
    main()
