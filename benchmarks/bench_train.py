"""Forward + backward of a DeepSeek-V3 MoE block under torch.compile: default Inductor vs moe_fusion.

The block is HF transformers' DeepseekV3MoE (router, 256 routed experts of intermediate 2048 / 8,
one shared expert) at the per-GPU sizes of tensor parallelism 8, random weights, bfloat16, the
``grouped_mm`` experts implementation, near-balanced routing. Each step is the block's forward, a
mean-square loss and the backward (gradients for the input and every weight). With the moe_fusion
backend the step is rewritten before autograd (fusion_passes/pre_autograd.py): the forward runs
moe_fused_gate and fused_experts, the backward their registered backwards.

Both backends compile with static shapes (the rewrite before autograd needs them) and run the same
inputs in the same process. Timing: CUDA events around whole steps, median after warm-up, no CUDA
graphs (steps of milliseconds are not launch-bound). Before timing, both compiled steps' gradients
are compared with eager's.

    python benchmarks/bench_train.py                         # T = 512, 4096, 16384 tokens per step
    python benchmarks/bench_train.py --profile --tokens 512  # one size, and a moe_fusion step's top kernels
    python benchmarks/bench_train.py --device cpu --tiny     # a few seconds: checks the script runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from bench_model import TP8

import fusion_passes  # noqa: F401  (registers the "moe_fusion" backend)
from fusion_passes.hf_examples import TINY_SIZES, hf_moe
from fusion_passes.report import collector

TOKENS = [512, 4096, 16384]
TINY_TOKENS = [16, 64]
BACKENDS = ("inductor", "moe_fusion")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_step(module, backward: bool = True):
    """A training step: forward, mean-square loss, backward; returns the loss. Without `backward`, the
    step's forward alone (autograd records it, so it saves what the backward needs)."""

    def step(x):
        module.zero_grad(set_to_none=True)
        x.grad = None
        loss = module(x).float().square().mean()
        if backward:
            loss.backward()
        return loss

    return step


def gradients(block, x):
    return [x.grad] + [p.grad for p in block.parameters() if p.grad is not None]


def check_against_eager(block, steps: dict, x) -> None:
    """Every gradient of both compiled steps against eager's: the largest relative difference."""
    make_step(block)(x)
    eager = [g.float().clone() for g in gradients(block, x)]
    diffs = {}
    for name, step in steps.items():
        step(x)
        diffs[name] = max(((g.float() - e).norm() / e.norm().clamp_min(1e-30)).item()
                          for g, e in zip(gradients(block, x), eager, strict=True))
    print("largest relative gradient difference vs eager: "
          + ", ".join(f"{name} {diff:.3g}" for name, diff in diffs.items()))
    if not diffs["moe_fusion"] <= max(2 * diffs["inductor"], 1e-2):
        raise SystemExit("moe_fusion's gradients differ from eager more than the default compile's; not timing it")


def time_step_us(step, inputs, iters: int, device: str) -> float:
    for x in inputs:  # warm-up: compiles, autotuning, allocator
        step(x)
    samples = []
    for _ in range(iters):
        for x in inputs:
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step(x)
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) * 1e3)
            else:
                begin = time.perf_counter()
                step(x)
                samples.append((time.perf_counter() - begin) * 1e6)
    return statistics.median(samples)


def print_top_kernels(step, x, device: str, count: int = 15) -> None:
    """The kernels (or CPU ops) that take the most time in one step, from the profiler."""
    activity = torch.profiler.ProfilerActivity.CUDA if device == "cuda" else torch.profiler.ProfilerActivity.CPU
    step(x)
    with torch.profiler.profile(activities=[activity]) as profile:
        step(x)
    sort_by = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(f"\nmoe_fusion step at T={x.shape[1]}, the {count} most expensive kernels:")
    print(profile.key_averages().table(sort_by=sort_by, row_limit=count, max_name_column_width=70))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny test config (checks that the script runs)")
    parser.add_argument("--profile", action="store_true",
                        help="also print the top kernels of a moe_fusion step (at the last token count)")
    parser.add_argument("--tokens", type=int, nargs="+", help=f"token counts (default {TOKENS})")
    args = parser.parse_args()
    sizes = TINY_SIZES if args.tiny else TP8
    token_counts = args.tokens or (TINY_TOKENS if args.tiny else TOKENS)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16

    model = hf_moe("deepseek_v3", "grouped_mm", device=args.device, bias_std=0.01,
                   **{**sizes, "num_hidden_layers": 1}).to(dtype).train()
    block = model.model.layers[0].mlp
    hidden = model.config.hidden_size
    backend_options = dict(fuse_experts_on_cpu=True) if args.device == "cpu" else {}
    backends = {"inductor": "inductor", "moe_fusion": fusion_passes.make_backend(**backend_options)}
    compiled = {name: torch.compile(block, backend=backend, dynamic=False) for name, backend in backends.items()}
    steps = {name: make_step(module) for name, module in compiled.items()}
    forwards = {name: make_step(module, backward=False) for name, module in compiled.items()}

    def inputs(tokens, copies):
        generator = torch.Generator(args.device).manual_seed(tokens)
        return [torch.randn(1, tokens, hidden, device=args.device, generator=generator, dtype=dtype)
                .requires_grad_() for _ in range(copies)]

    collector.take()
    check_against_eager(block, steps, inputs(token_counts[0], 1)[0])
    rows = []
    for tokens in token_counts:
        log(f"timing T={tokens} (compiling when new) ...")
        xs = inputs(tokens, 2)
        iters = 3 if args.tiny else 10
        step = {name: time_step_us(run, xs, iters, args.device) for name, run in steps.items()}
        forward = {name: time_step_us(run, xs, iters, args.device) for name, run in forwards.items()}
        backward = {name: step[name] - forward[name] for name in step}
        cells = [f"{t['inductor']:.1f} | {t['moe_fusion']:.1f} | {t['inductor'] / t['moe_fusion']:.2f}x"
                 for t in (step, forward, backward)]
        rows.append(f"| {tokens} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    print(f"moe_fusion on the training step: {collector.take().tally()}")
    if args.profile:
        print_top_kernels(steps["moe_fusion"], inputs(token_counts[-1], 1)[0], args.device)

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"\n{device_name}, torch {torch.__version__}, DeepseekV3 MoE block "
          f"({'tiny' if args.tiny else 'TP8 per-GPU sizes'}), {str(dtype).removeprefix('torch.')}, "
          "median per step; backward = step - forward")
    print("| T | step: default (us) | moe_fusion (us) | speedup | forward: default | moe_fusion | speedup "
          "| backward: default | moe_fusion | speedup |")
    print("|---" * 10 + "|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
