"""Compile a DeepSeek-V3-style model with the moe_fusion backend, show what was rewritten, and check
that the compiled model computes what the eager one does.

    python examples/demo.py                       # HF transformers tiny DeepseekV3 (or the built-in model)
    python examples/demo.py --model example       # the project's own small model
    python examples/demo.py --model hf-glm4_moe --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import fusion_passes
from fusion_passes.example_model import ExampleMoEModel
from fusion_passes.hf_examples import KINDS, tiny_hf_moe


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def build_model(name: str) -> tuple[torch.nn.Module, int, str]:
    if name == "example":
        model = ExampleMoEModel().eval()
        return model, model.cfg.vocab_size, "the built-in DeepSeek-V3-style model (fusion_passes.example_model)"
    kind = name.removeprefix("hf-")
    model = tiny_hf_moe(kind)
    return model, model.config.vocab_size, f"HF transformers {type(model).__name__} (tiny random config)"


def logits_of(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def time_forward(fn, inputs, device: torch.device, iters: int) -> float:
    """Median milliseconds per call, after warm-up."""
    for _ in range(3):
        fn(inputs)
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main() -> int:
    default_model = "hf-deepseek_v3" if _has_transformers() else "example"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_model,
                        choices=["example", *(f"hf-{kind}" for kind in KINDS)])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--cpu-experts", action="store_true",
                        help="fuse the experts on the CPU too (by default only CUDA graphs get fused experts)")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model, vocab, description = build_model(args.model)
    model = model.to(device=device, dtype=dtype)
    tokens = torch.randint(0, vocab, (args.batch, args.seq), device=device,
                           generator=torch.Generator(device=device).manual_seed(0))
    print(f"model: {description}\ndevice: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"dtype {args.dtype}, input {args.batch}x{args.seq} tokens, torch {torch.__version__}\n", flush=True)

    print("compiling with backend='moe_fusion' to see what the passes do ...", flush=True)
    report = fusion_passes.explain(model, tokens, fuse_experts_on_cpu=args.cpu_experts)
    print(f"\n== rewrites ({len(report.rewrites)}) ==")
    for rewrite in report.rewrites:
        print(rewrite)
    if report.refusals:
        print(f"\n== refusals ({len(report.refusals)}) ==")
        for refusal in report.refusals:
            print(refusal)
    print("\n== post-grad ops that changed (all graphs) ==")
    print(report.op_count_table())

    print("\nrunning eager, torch.compile (default) and torch.compile(backend='moe_fusion') ...", flush=True)
    with torch.no_grad():
        eager = logits_of(model(tokens))
        torch._dynamo.reset()
        default = torch.compile(model)
        fused = torch.compile(model, backend=fusion_passes.make_backend(fuse_experts_on_cpu=args.cpu_experts))
        out_default, out_fused = logits_of(default(tokens)), logits_of(fused(tokens))
        diff_default = (out_default - eager).abs().max().item()
        diff_fused = (out_fused - eager).abs().max().item()
        timings = {name: time_forward(lambda x, f=f: f(x), tokens, device, args.iters)
                   for name, f in (("eager", model), ("torch.compile (default)", default),
                                   ("torch.compile (moe_fusion)", fused))}

    print(f"\n{'':<28} {'max |out - eager|':>18} {'ms / forward':>13}")
    print(f"{'eager':<28} {'-':>18} {timings['eager']:>13.3f}")
    print(f"{'torch.compile (default)':<28} {diff_default:>18.3e} {timings['torch.compile (default)']:>13.3f}")
    print(f"{'torch.compile (moe_fusion)':<28} {diff_fused:>18.3e} {timings['torch.compile (moe_fusion)']:>13.3f}")

    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    scale = eager.abs().max().item()
    ok = report.count("routing") > 0 and diff_fused <= tolerance * max(1.0, scale)
    counts = ", ".join(f"{report.count(name)} {name}" for name in fusion_passes.enabled_rewrites())
    print(f"\n{'OK' if ok else 'FAILED'}: rewrites: {counts}; the fused model "
          f"{'matches' if diff_fused <= tolerance * max(1.0, scale) else 'does NOT match'} eager "
          f"(tolerance {tolerance:g} relative to max |logit| = {scale:.3g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
