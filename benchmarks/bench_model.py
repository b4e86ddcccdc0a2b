"""HF transformers DeepseekV3 under torch.compile: the default Inductor backend vs ``moe_fusion``.

A DeepseekV3ForCausalLM with a few decoder layers (all MoE) at the per-GPU sizes of DeepSeek-V3
under tensor parallelism 8 (16 attention heads, expert intermediate 2048 / 8 = 256, dense
intermediate and vocabulary split 8 ways; hidden size, 256 experts, top-8 of 8 groups as the real
model), random weights, bfloat16, the ``grouped_mm`` experts implementation (transformers' default).

Both backends compile the same model, with the token dimension of the inputs marked dynamic (one
compile serves the prefill sizes, one the decode sizes), and run the same inputs in the same process:

- prefill: one sequence of T = 512, 4096, 16384 tokens;
- decode-sized batches: T = 1, 8, 64 sequences of one token each (no KV cache: the MoE and
  projection work of a decode step; attention over one position);
- the MoE block alone (``model.model.layers[0].mlp``) at every T.

Each call is captured in a CUDA graph and timed by CUDA events around graph replays (median), so
decode sizes are not launch-bound for either backend. The MoE block's rows also give its floor, from
rates measured in the run: the router's float32 GEMM at the float32 matmul rate, then the experts'
weights that the inputs' routing touches read once at the device-to-device copy bandwidth or their
FLOPs at the bf16 matmul rate, whichever is longer. The default compile's time over the floor bounds
the speedup any implementation of the block can show.

Before timing, both compiled models' logits are compared with eager's: in bfloat16 a near-tie in
routing flips an expert choice now and then (in the default compile as well), so the check is on the
mean difference, which must be no larger than the default compile's (within 2x).

    python benchmarks/bench_model.py              # 3 layers, every size
    python benchmarks/bench_model.py --quick      # 1 layer, T = 1 and 4096
    python benchmarks/bench_model.py --tokens 8 512   # 3 layers, these sizes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from bench_experts import matmul_tflops
from bench_gate import copy_bandwidth_gbps, time_in_graph_us

import fusion_passes  # noqa: F401  (registers the "moe_fusion" backend)
import ops
from fusion_passes.hf_examples import hf_moe
from fusion_passes.report import collector

# DeepSeek-V3 per GPU under tensor parallelism 8 (the rest of the config: the HF defaults, which are
# DeepSeek-V3's).
TP8 = dict(num_attention_heads=16, num_key_value_heads=16, moe_intermediate_size=2048 // 8,
           intermediate_size=18432 // 8, vocab_size=129280 // 8, first_k_dense_replace=0,
           max_position_embeddings=32768)
PREFILL = [512, 4096, 16384]
DECODE = [1, 8, 64]
BACKENDS = ("inductor", "moe_fusion")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def token_dynamic(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """The tensor with its token dimension marked dynamic (a size of 1 is always specialised)."""
    if tensor.shape[dim] > 1:
        torch._dynamo.mark_dynamic(tensor, dim)
    return tensor


def model_inputs(tokens: int, prefill: bool, vocab: int, copies: int = 2) -> list[torch.Tensor]:
    shape = (1, tokens) if prefill else (tokens, 1)
    generator = torch.Generator(device="cuda").manual_seed(tokens)
    return [token_dynamic(torch.randint(0, vocab, shape, device="cuda", generator=generator), 1 if prefill else 0)
            for _ in range(copies)]


def check_against_eager(model, compiled: dict, vocab: int) -> None:
    """The fused model's logits vs eager, beside the default compile's difference from eager."""
    ids = model_inputs(64, True, vocab, copies=1)[0]
    with torch.no_grad():
        eager = model(ids).logits.float()
        diffs = {name: (fn(ids).logits.float() - eager).abs() for name, fn in compiled.items()}
    print(f"|logits - eager| (mean |logits| {eager.abs().mean().item():.3g}): " + ", ".join(
        f"{name} mean {diff.mean().item():.3g} max {diff.max().item():.3g}" for name, diff in diffs.items()))
    if not diffs["moe_fusion"].mean() <= 2 * diffs["inductor"].mean():
        raise SystemExit("moe_fusion differs from eager more than the default compile does; not timing it")


class BlockFloor:
    """The MoE block's floor on given inputs (see the module docstring)."""

    def __init__(self, block, config) -> None:
        self.block, self.config = block, config
        self.bandwidth_gbps = copy_bandwidth_gbps()
        self.bf16_tflops, self.fp32_tflops = matmul_tflops(torch.bfloat16), matmul_tflops(torch.float32)

    def experts_read(self, x: torch.Tensor) -> int:
        """Routed experts the block's router picks for the tokens of x (shared ones are read always)."""
        gate, config = self.block.gate, self.config
        logits = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]).float(), gate.weight.float())
        _, ids = ops.moe_fused_gate(logits, gate.e_score_correction_bias, config.n_group, config.topk_group,
                                    config.num_experts_per_tok)
        return ids.unique().numel()

    def us(self, x: torch.Tensor, experts: int) -> float:
        """The router's float32 GEMM (HF runs it in float32), then the experts, each at its own bound: the
        weights it reads (bf16) at the copy bandwidth or its FLOPs at the matmul rate of its dtype."""
        config = self.config
        hidden, inter, tokens = config.hidden_size, config.moe_intermediate_size, x.numel() // x.shape[-1]

        def bound_us(weight_bytes, flops, tflops):
            return max(weight_bytes / (self.bandwidth_gbps * 1e3), flops / (tflops * 1e6))

        router = bound_us(2 * config.n_routed_experts * hidden, 2 * tokens * hidden * config.n_routed_experts,
                          self.fp32_tflops)
        slots = experts + config.n_shared_experts
        pairs = tokens * (config.num_experts_per_tok + config.n_shared_experts)
        experts_us = bound_us(2 * slots * 3 * inter * hidden, 2 * pairs * 3 * inter * hidden, self.bf16_tflops)
        return router + experts_us


def timing_row(label: str, tokens: int, fns: dict, inputs: list[torch.Tensor], replays: int,
               floor: BlockFloor | None = None) -> str:
    times = {}
    for name, fn in fns.items():
        with torch.no_grad():
            times[name] = time_in_graph_us(fn, inputs, replays)  # per call
    base, ours = times["inductor"], times["moe_fusion"]
    row = f"| {label} | {tokens} | {base:.1f} | {ours:.1f} | {base / ours:.2f}x |"
    if floor is None:
        return row + " | | |"
    experts = [floor.experts_read(x) for x in inputs]
    floor_us = statistics.mean(floor.us(x, n) for x, n in zip(inputs, experts, strict=True))
    return row + f" {statistics.mean(experts):.0f} | {floor_us:.1f} | {base / floor_us:.2f}x |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 layer, T = 1 and 4096")
    parser.add_argument("--tokens", type=int, nargs="+", choices=DECODE + PREFILL,
                        help="only these of the listed sizes")
    args = parser.parse_args()
    layers = 1 if args.quick else args.layers
    prefill, decode = ([4096], [1]) if args.quick else (PREFILL, DECODE)
    if args.tokens:
        prefill, decode = [t for t in PREFILL if t in args.tokens], [t for t in DECODE if t in args.tokens]

    torch._inductor.config.fx_graph_cache = False  # every compile runs the passes (and reports them)
    torch._dynamo.config.recompile_limit = 64  # two backends, size-1 specialisations
    started = time.perf_counter()
    log(f"building DeepseekV3 ({layers} MoE layers, per-GPU TP8 sizes) on the GPU ...")
    # A small score-correction bias: routing close to balanced, as aux-loss-free balancing keeps it.
    model = hf_moe("deepseek_v3", "grouped_mm", device="cuda", bias_std=0.01, num_hidden_layers=layers, **TP8)
    model = model.to(torch.bfloat16)
    vocab = model.config.vocab_size
    block = model.model.layers[0].mlp
    floor = BlockFloor(block, model.config)
    log(f"measured: copy bandwidth {floor.bandwidth_gbps:.0f} GB/s, mm {floor.bf16_tflops:.0f} TFLOP/s bf16, "
        f"{floor.fp32_tflops:.0f} TFLOP/s float32")

    rows = []
    for part, module in (("model", model), ("MoE block", block)):
        compiled = {backend: torch.compile(module, backend=backend) for backend in BACKENDS}
        collector.take()
        if part == "model":
            log(f"[{time.perf_counter() - started:.0f} s] compiling the model with both backends ...")
            check_against_eager(model, compiled, vocab)
        for tokens in decode + prefill:
            is_prefill = tokens in prefill
            log(f"[{time.perf_counter() - started:.0f} s] timing the {part} at T={tokens} (compiling when new) ...")
            if part == "model":
                inputs = model_inputs(tokens, is_prefill, vocab)
                fns = {name: (lambda ids, fn=fn: fn(ids).logits) for name, fn in compiled.items()}
            else:
                generator = torch.Generator(device="cuda").manual_seed(tokens)
                inputs = [token_dynamic(torch.randn(1, tokens, model.config.hidden_size, device="cuda",
                                                    generator=generator, dtype=torch.bfloat16), 1)
                          for _ in range(2)]
                fns = compiled
            label = f"{part}, {'prefill' if is_prefill else 'decode'}"
            rows.append(timing_row(label, tokens, fns, inputs, replays=10 if tokens >= 4096 else 50,
                                   floor=floor if part == "MoE block" else None))
            print(rows[-1], flush=True)
        print(f"moe_fusion on the {part}: {collector.take().tally()}")

    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, DeepseekV3 {layers} MoE layers "
          f"(TP8 per-GPU sizes), bfloat16, median per call inside CUDA graphs; measured copy bandwidth "
          f"{floor.bandwidth_gbps:.0f} GB/s, mm {floor.bf16_tflops:.0f} TFLOP/s bf16, {floor.fp32_tflops:.0f} float32")
    print("| what | T | torch.compile default (us) | moe_fusion (us) | speedup | routed experts read | "
          "floor (us) | default / floor |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
