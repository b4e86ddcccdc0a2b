"""fused_experts (routed + shared experts in one grouped computation) against what models run today.

DeepSeek-V3 per-GPU shapes, bfloat16, three variants on the same inputs in the same process:

- ours:             ``ops.fused_experts`` with the shared expert as an extra expert slot (one call);
- grouped_mm + MLP: the routed experts as transformers v5 (``grouped_mm`` experts implementation) and
                    torchtitan run them: sort the (token, slot) pairs by expert, offsets by histc +
                    cumsum, ``torch._grouped_mm`` for gate_up and for down, un-permute, weighted sum over
                    K; plus the shared MLP as three ``nn.functional.linear``;
- ours routed + MLP: ``ops.fused_experts`` on the routed experts only, plus the same shared MLP.

Every variant is captured in a CUDA graph and timed by CUDA events around graph replays (median);
each graph runs the variant on 8 input sets with different routing, so that the weights one replay
touches exceed the L2 cache and the replay's launch is spread over 8 calls. The floors are measured in
the same run: the weight bytes a call must read over the device-to-device copy bandwidth, and its FLOPs
over a 8192^3 bf16 ``torch.mm``.
Every variant is checked against the float32 reference first; a mismatch stops the run.

    python benchmarks/bench_experts.py            # TP-8 and EP shapes, T = 1 .. 16384
    python benchmarks/bench_experts.py --quick    # a short sanity run
    python benchmarks/bench_experts.py --tune     # search tiles around ops.triton_experts.tile_config
    python benchmarks/bench_experts.py --decode-paths   # direct vs sorted path at decode sizes
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from bench_gate import copy_bandwidth_gbps, time_in_graph_us
from triton.runtime.errors import OutOfResources

import ops
from ops.reference import fused_experts_reference
from ops.triton_experts import DIRECT_MAX_PAIRS, TileConfig, direct_config, fused_experts_triton, tile_config

# name: (H, I, E, K, S)
SHAPES = {
    "tp8": (7168, 256, 256, 8, 1),  # all 256 experts on every GPU, intermediate dim split 8 ways
    "ep": (7168, 2048, 32, 8, 1),  # 32 local experts per GPU, 8 local picks per token
}
TOKENS = [1, 8, 64, 512, 4096, 16384]
QUICK_TOKENS = [1, 512]
CHECK_TOKENS = 256
# Input sets per CUDA graph: their routings touch more weights than the L2 holds (99 MB of slots even at
# TP8 T=1, against 50-60 MiB), and the replay's own launch is spread over as many calls.
GRAPH_BATCHES = 8


@dataclass
class Weights:
    """The model's parameters in HF transformers v5 layout, and the views the fused op reads."""

    gate_up_proj: torch.Tensor  # [E, 2I, H]
    down_proj: torch.Tensor  # [E, H, I]
    shared_gate: torch.Tensor  # [S*I, H]  (nn.Linear weights of the shared MLP)
    shared_up: torch.Tensor
    shared_down: torch.Tensor  # [H, S*I]

    @property
    def routed_views(self):
        inter = self.down_proj.shape[2]
        return self.gate_up_proj[:, :inter], self.gate_up_proj[:, inter:], self.down_proj


@dataclass
class Batch:
    hidden: torch.Tensor  # [T, H]
    ids: torch.Tensor  # [T, K] routed experts
    weights: torch.Tensor  # [T, K] float32
    fused_ids: torch.Tensor  # [T, K + S]: routed, then the shared slots E .. E+S-1 with weight 1
    fused_weights: torch.Tensor


def make_weights(hidden_size, inter, num_experts, num_shared, device, generator) -> Weights:
    def randn(*shape):
        return (torch.randn(*shape, device=device, generator=generator) * shape[-1] ** -0.5).bfloat16()

    return Weights(randn(num_experts, 2 * inter, hidden_size), randn(num_experts, hidden_size, inter),
                   randn(num_shared * inter, hidden_size), randn(num_shared * inter, hidden_size),
                   randn(hidden_size, num_shared * inter))


def make_batch(tokens, hidden_size, num_experts, topk, num_shared, device, generator) -> Batch:
    hidden = torch.randn(tokens, hidden_size, device=device, generator=generator).bfloat16()
    ids = torch.rand(tokens, num_experts, device=device, generator=generator).argsort(dim=1)[:, :topk]
    weights = torch.rand(tokens, topk, device=device, generator=generator) / topk
    shared_ids = torch.arange(num_experts, num_experts + num_shared, device=device).expand(tokens, -1)
    return Batch(hidden, ids.int(), weights, torch.cat([ids, shared_ids], 1).int(),
                 torch.cat([weights, torch.ones(tokens, num_shared, device=device)], 1))


def shared_mlp(x, w: Weights):
    return F.linear(F.silu(F.linear(x, w.shared_gate)) * F.linear(x, w.shared_up), w.shared_down)


def grouped_mm_experts(hidden, topk_ids, topk_weights, w: Weights):
    """The routed experts as transformers v5 ``grouped_mm_experts_forward`` computes them."""
    tokens, topk = topk_ids.shape
    num_experts = w.gate_up_proj.shape[0]
    expert_ids, perm = torch.sort(topk_ids.reshape(-1))
    x = hidden[perm // topk]
    tokens_per_expert = torch.histc(expert_ids.float(), bins=num_experts, min=0, max=num_experts - 1)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    gate, up = torch._grouped_mm(x, w.gate_up_proj.transpose(-2, -1), offs=offsets).chunk(2, dim=-1)
    out = torch._grouped_mm(F.silu(gate) * up, w.down_proj.transpose(-2, -1), offs=offsets)
    out = out * topk_weights.reshape(-1)[perm].unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=perm.device)
    return out[inv_perm].view(tokens, topk, -1).sum(dim=1).to(hidden.dtype)


def variants(w: Weights):
    gate, up, down = w.routed_views

    def ours(b: Batch):
        return ops.fused_experts(b.hidden, b.fused_weights, b.fused_ids, gate, up, down, w.shared_gate, w.shared_up,
                                 w.shared_down)

    def grouped_mm_plus_mlp(b: Batch):
        return grouped_mm_experts(b.hidden, b.ids, b.weights, w) + shared_mlp(b.hidden, w)

    def ours_routed_plus_mlp(b: Batch):
        return ops.fused_experts(b.hidden, b.weights, b.ids, gate, up, down) + shared_mlp(b.hidden, w)

    return {"ours": ours, "grouped_mm+MLP": grouped_mm_plus_mlp, "ours routed+MLP": ours_routed_plus_mlp}


def relative_error(out, reference) -> float:
    return ((out.float() - reference.float()).norm() / reference.float().norm()).item()


def check(name, fns, w: Weights, batch: Batch, reference=None, tolerance=1e-2) -> None:
    """Fail loudly unless every variant matches the float32 reference (or the given one)."""
    if reference is None:
        gate, up, down = w.routed_views
        reference = fused_experts_reference(batch.hidden, batch.fused_weights, batch.fused_ids, gate, up, down,
                                            w.shared_gate, w.shared_up, w.shared_down)
    for variant, fn in fns.items():
        error = relative_error(fn(batch), reference)
        if not error <= tolerance:
            raise SystemExit(f"MISMATCH: {name} T={batch.hidden.shape[0]} {variant}: relative error {error:.3e}")


def matmul_tflops(dtype: torch.dtype = torch.bfloat16) -> float:
    """The rate of a 8192^3 ``torch.mm`` in `dtype` (float32 as PyTorch runs it by default: no TF32)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / statistics.median(times) / 1e12


def bench(shape_names, tokens_list) -> None:
    props = torch.cuda.get_device_properties(0)
    bandwidth = copy_bandwidth_gbps()
    peak = matmul_tflops()
    print(f"card: {torch.cuda.get_device_name()}, {props.multi_processor_count} SMs, "
          f"L2 {props.L2_cache_size / 2**20:.0f} MiB, torch {torch.__version__}; measured: copy bandwidth "
          f"{bandwidth:.0f} GB/s, bf16 mm {peak:.0f} TFLOP/s", flush=True)
    print("floor: the weights of the touched expert slots read once at the copy bandwidth. "
          "(a) grouped_mm+MLP = transformers v5 / torchtitan routed experts + separate shared MLP; "
          "(b) ours on routed experts + separate shared MLP. Times in us, CUDA graphs, median.")
    header = (f"{'shape':<5} {'T':>6} {'ours':>9} {'floor':>8} {'ours/floor':>10} {'TFLOP/s':>8} {'%mm':>5} "
              f"{'(a)':>9} {'(a)/ours':>8} {'(b)':>9} {'(b)/ours':>8}")
    print(header, flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name in shape_names:
        hidden_size, inter, num_experts, topk, num_shared = SHAPES[name]
        w = make_weights(hidden_size, inter, num_experts, num_shared, "cuda", gen)
        fns = variants(w)
        check(name, fns, w, make_batch(CHECK_TOKENS, hidden_size, num_experts, topk, num_shared, "cuda", gen))
        slot_bytes = 3 * inter * hidden_size * 2
        for tokens in tokens_list:
            first = make_batch(tokens, hidden_size, num_experts, topk, num_shared, "cuda", gen)
            batches = [first] + [make_batch(tokens, hidden_size, num_experts, topk, num_shared, "cuda", gen)
                                 for _ in range(GRAPH_BATCHES - 1)]
            check(name, fns, w, first, reference=fns["grouped_mm+MLP"](first), tolerance=2e-2)
            times = {variant: time_in_graph_us(fn, batches, replays=20) for variant, fn in fns.items()}
            weight_bytes = statistics.mean(b.fused_ids.unique().numel() for b in batches) * slot_bytes
            floor = weight_bytes / (bandwidth * 1e3)
            ours = times["ours"]
            tflops = 6 * tokens * (topk + num_shared) * hidden_size * inter / ours / 1e6
            a, b = times["grouped_mm+MLP"], times["ours routed+MLP"]
            print(f"{name:<5} {tokens:>6} {ours:>9.1f} {floor:>8.1f} {ours / floor:>10.2f} {tflops:>8.0f} "
                  f"{100 * tflops / peak:>5.0f} {a:>9.1f} {a / ours:>8.2f} {b:>9.1f} {b / ours:>8.2f}", flush=True)
            del batches, first
        del w, fns
        torch.cuda.empty_cache()


def fused_call(w: Weights, num_shared: int, cfg: TileConfig):
    """Ours (routed + shared slots) with the tile configuration ``cfg``, as a function of a batch."""
    gate, up, down = w.routed_views
    return lambda b: fused_experts_triton(b.hidden, b.fused_weights, b.fused_ids, gate, up, down, w.shared_gate,
                                          w.shared_up, w.shared_down, None, num_shared, cfg)


# Coordinate search: (field, sub-field or None, values), tried in this order on the best config so far.
TUNED_FIELDS = [("block_m", None, (16, 32, 64, 128)), ("group_m", None, (1, 4, 8, 16))] + [
    (gemm, key, values) for gemm in ("gate_up", "down") for key, values in (
        ("block_n", (16, 32, 64, 128, 256)), ("block_k", (32, 64, 128, 256)), ("num_warps", (4, 8)),
        ("num_stages", (2, 3, 4, 5)))] + [("down", "n_tiles", (1, 14, 28, 56))]


def with_value(cfg: TileConfig, field: str, key: str | None, value: int) -> TileConfig:
    if key is None:
        return cfg._replace(**{field: value})
    return cfg._replace(**{field: getattr(cfg, field)._replace(**{key: value})})


def tune_one(name: str, w: Weights, tokens: int, generator) -> None:
    """Greedy coordinate search over the tiles of the fused call, one field at a time, starting from the
    table's choice; prints the best configuration (to update tile_config by hand)."""
    hidden_size, inter, num_experts, topk, num_shared = SHAPES[name]
    batches = [make_batch(tokens, hidden_size, num_experts, topk, num_shared, "cuda", generator) for _ in range(4)]

    def measure(cfg) -> float:
        try:
            return time_in_graph_us(fused_call(w, num_shared, cfg), batches, replays=10)
        except OutOfResources:  # shared memory of too many stages
            return math.inf

    table = tile_config(tokens * (topk + num_shared), num_experts + num_shared, torch.bfloat16, resident_k=inter,
                        direct=True)
    best, best_time = table, measure(table)
    table_time = best_time
    for field, key, values in TUNED_FIELDS:
        if table.direct and (key is None or key == "n_tiles"):  # the direct path has one row per block
            continue
        for value in values:
            candidate = with_value(best, field, key, value)
            if candidate != best and (elapsed := measure(candidate)) < best_time:
                best, best_time = candidate, elapsed
    error = relative_error(fused_call(w, num_shared, best)(batches[0]), fused_call(w, num_shared, table)(batches[0]))
    if not error <= 1e-2:
        raise SystemExit(f"MISMATCH: {name} T={tokens} {best}: relative error {error:.3e}")
    print(f"{name} T={tokens}: table {table_time:.1f} us, best {best_time:.1f} us ({table_time / best_time:.2f}x)\n"
          f"    table {table}\n    best  {best}", flush=True)


DECODE_PATH_TOKENS = [1, 2, 3, 4, 8]


def over_shapes(shape_names, tokens_list, measure_one) -> None:
    """measure_one(name, weights, tokens, generator) for every shape and token count, one shape's weights
    in memory at a time."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name in shape_names:
        hidden_size, inter, num_experts, _, num_shared = SHAPES[name]
        w = make_weights(hidden_size, inter, num_experts, num_shared, "cuda", gen)
        for tokens in tokens_list:
            measure_one(name, w, tokens, gen)
        del w
        torch.cuda.empty_cache()


def compare_paths(name: str, w: Weights, tokens: int, generator) -> None:
    """One row of decode_paths."""
    hidden_size, inter, num_experts, topk, num_shared = SHAPES[name]
    batches = [make_batch(tokens, hidden_size, num_experts, topk, num_shared, "cuda", generator)
               for _ in range(GRAPH_BATCHES)]
    num_pairs = tokens * (topk + num_shared)
    configs = {"sorted": tile_config(num_pairs, num_experts + num_shared, torch.bfloat16, resident_k=inter),
               "direct": direct_config(torch.bfloat16)}
    fns = {path: fused_call(w, num_shared, cfg) for path, cfg in configs.items()}
    error = relative_error(fns["direct"](batches[0]), fns["sorted"](batches[0]))
    if not error <= 1e-2:
        raise SystemExit(f"MISMATCH: {name} T={tokens} direct vs sorted: relative error {error:.3e}")
    times = {path: time_in_graph_us(fn, batches, replays=20) for path, fn in fns.items()}
    print(f"{name:<5} {tokens:>3} {num_pairs:>5} {times['sorted']:>8.1f} {times['direct']:>8.1f} "
          f"{times['sorted'] / times['direct']:>13.2f}", flush=True)


def decode_paths(shape_names) -> None:
    """The direct path (ops.triton_experts.direct_config) against the sorted path (alignment, GEMMs,
    combine; the table's tiles) at decode sizes, same inputs, same run: where DIRECT_MAX_PAIRS comes from."""
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}; direct path up to "
          f"{DIRECT_MAX_PAIRS} pairs by default. us per call, CUDA graphs, median", flush=True)
    print(f"{'shape':<5} {'T':>3} {'pairs':>5} {'sorted':>8} {'direct':>8} {'sorted/direct':>13}", flush=True)
    over_shapes(shape_names, DECODE_PATH_TOKENS, compare_paths)


def tune(shape_names, tokens_list) -> None:
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    over_shapes(shape_names, tokens_list, tune_one)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"only T in {QUICK_TOKENS}")
    parser.add_argument("--tune", action="store_true", help="search tile configurations instead (minutes)")
    parser.add_argument("--decode-paths", action="store_true",
                        help=f"direct vs sorted path at T in {DECODE_PATH_TOKENS} instead")
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts (default: all, or --quick's)")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_experts needs a CUDA device")
    if args.decode_paths:
        decode_paths(args.shapes)
        return
    (tune if args.tune else bench)(args.shapes, args.tokens or (QUICK_TOKENS if args.quick else TOKENS))


if __name__ == "__main__":
    main()
