"""Training steps of a DeepSeek-V3-style model compiled with the moe_fusion backend.

The backend rewrites training graphs before autograd: the forward runs the fused gate and
fused_experts, the backward their backwards. The demo runs steps at three sequence lengths (the
second one makes Dynamo recompile with a dynamic length, which the third reuses) and prints the
rewrites, the moe_fusion ops that ran in a step, and each step's loss and largest gradient
difference against eager. ``--install`` uses plain torch.compile after fusion_passes.install().

    python examples/train_demo.py                     # HF transformers tiny DeepseekV3, CPU
    python examples/train_demo.py --device cuda --kind deepseek_v2
"""

from __future__ import annotations

import argparse

import torch

import fusion_passes
from fusion_passes.hf_examples import KINDS, tiny_hf_moe
from fusion_passes.report import collector


def training_step(model, tokens) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    grads = {name.removeprefix("_orig_mod."): p.grad for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="deepseek_v3", choices=KINDS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--install", action="store_true", help="plain torch.compile after fusion_passes.install()")
    args = parser.parse_args()

    model = tiny_hf_moe(args.kind).to(args.device).train()
    # On the CPU the experts are fused only on request (fused_experts is not faster there).
    fuse_experts_on_cpu = args.device == "cpu"
    if args.install:
        fusion_passes.install(fuse_experts_on_cpu=fuse_experts_on_cpu)
        compiled = torch.compile(model)
    else:
        compiled = torch.compile(model, backend=fusion_passes.make_backend(fuse_experts_on_cpu=fuse_experts_on_cpu))
    collector.take()

    matches = True
    # Inductor's caches off, so that every compile goes through the rewrites and reports them.
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        for length in (16, 24, 11):
            matches &= demo_step(model, compiled, length, args.device)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        training_step(compiled, tokens_of(model, 11, args.device))
    calls = {e.key: e.count for e in profile.key_averages() if e.key.startswith("moe_fusion::")}
    print("moe_fusion ops in a compiled step (forward and backward):")
    for name, count in sorted(calls.items()):
        print(f"  {name}: {count}")
    if not matches:
        raise SystemExit("a compiled training step does not match eager")
    print("OK: the fused training steps match eager")


def tokens_of(model, length: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(length)
    return torch.randint(0, model.config.vocab_size, (2, length), generator=generator).to(device)


def demo_step(model, compiled, length: int, device: str) -> bool:
    """One eager and one compiled step on the same tokens: prints what was compiled and the differences."""
    tokens = tokens_of(model, length, device)
    eager_loss, eager_grads = training_step(model, tokens)
    eager_grads = {name: grad.clone() for name, grad in eager_grads.items()}
    loss, grads = training_step(compiled, tokens)  # compiles when Dynamo needs to
    report = collector.take()
    print(f"--- step with {length} tokens per sequence: "
          f"{'compiled: ' + report.tally() if report.graphs else 'no compile (Dynamo reused the dynamic graph)'}")
    if report.graphs:
        print(report)
    worst = max((grads[name] - grad).abs().max().item() for name, grad in eager_grads.items())
    print(f"loss: eager {eager_loss.item():.6f}, compiled {loss.item():.6f}; largest gradient difference "
          f"against eager, over {len(eager_grads)} parameters: {worst:.3g}\n")
    return torch.allclose(loss, eager_loss, rtol=1e-5, atol=1e-6) and worst < 1e-4


if __name__ == "__main__":
    main()
