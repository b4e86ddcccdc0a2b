"""A training step of a DeepSeek-V3-style model compiled with the moe_fusion backend.

The backend rewrites training graphs before autograd: the forward runs the fused gate and
fused_experts, the backward their backwards. The demo prints the rewrites, the moe_fusion ops that
ran in the step, and the loss and the largest gradient difference against eager.

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
    args = parser.parse_args()

    model = tiny_hf_moe(args.kind).to(args.device).train()
    tokens = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(args.device)
    eager_loss, eager_grads = training_step(model, tokens)
    eager_grads = {name: grad.clone() for name, grad in eager_grads.items()}

    # On the CPU the experts are fused only on request (fused_experts is not faster there).
    backend = fusion_passes.make_backend(fuse_experts_on_cpu=args.device == "cpu")
    compiled = torch.compile(model, backend=backend)
    collector.take()
    loss, grads = training_step(compiled, tokens)  # compiles
    print(collector.take())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        training_step(compiled, tokens)
    calls = {e.key: e.count for e in profile.key_averages() if e.key.startswith("moe_fusion::")}
    print("\nmoe_fusion ops in a compiled step (forward and backward):")
    for name, count in sorted(calls.items()):
        print(f"  {name}: {count}")
    worst = max((grads[name] - grad).abs().max().item() for name, grad in eager_grads.items())
    print(f"\nloss: eager {eager_loss.item():.6f}, compiled {loss.item():.6f}")
    print(f"largest gradient difference against eager, over {len(eager_grads)} parameters: {worst:.3g}")
    if not (torch.allclose(loss, eager_loss, rtol=1e-5, atol=1e-6) and worst < 1e-4):
        raise SystemExit("the compiled training step does not match eager")
    print("OK: the fused training step matches eager")


if __name__ == "__main__":
    main()
