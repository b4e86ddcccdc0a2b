"""Print what the moe_fusion passes do to a model.

    python -m fusion_passes.inspect                          # the built-in DeepSeek-V3-style model
    python -m fusion_passes.inspect --model hf-deepseek_v2   # a tiny random HF transformers model
    python -m fusion_passes.inspect --graphs                 # also print the graphs before and after
    python -m fusion_passes.inspect --model hf-deepseek_v3 --device cuda --dtype bfloat16
    python -m fusion_passes.inspect --model hf-deepseek_v3 --training --cpu-experts   # a training compile
"""

from __future__ import annotations

import argparse

import torch

from .example_model import ExampleMoEModel
from .explain import explain
from .hf_examples import KINDS, tiny_hf_moe
from .inductor_backend import REWRITES

MODELS = ("example", *(f"hf-{kind}" for kind in KINDS))


def build(name: str) -> tuple[torch.nn.Module, int]:
    if name == "example":
        model = ExampleMoEModel().eval()
        return model, model.cfg.vocab_size
    model = tiny_hf_moe(name.removeprefix("hf-"))
    return model, model.config.vocab_size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="example", choices=MODELS)
    parser.add_argument("--tokens", type=int, nargs=2, default=(2, 16), metavar=("BATCH", "SEQ"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rewrites", nargs="*", default=None, choices=list(REWRITES),
                        help="the rewrites to run (default: all enabled)")
    parser.add_argument("--graphs", action="store_true", help="print each graph before and after the passes")
    parser.add_argument("--cpu-experts", action="store_true",
                        help="also fuse the experts on the CPU (by default only CUDA graphs get fused experts)")
    parser.add_argument("--training", action="store_true",
                        help="compile as a training step does (gradients enabled: rewritten before autograd)")
    args = parser.parse_args(argv)

    model, vocab = build(args.model)
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype))
    tokens = torch.randint(0, vocab, tuple(args.tokens), generator=torch.Generator().manual_seed(0)).to(args.device)
    model.train(args.training)
    report = explain(model, tokens, rewrites=args.rewrites, fuse_experts_on_cpu=args.cpu_experts,
                     training=args.training)
    print(report)
    print()
    print(report.op_count_table())
    if args.graphs:
        for graph in report.graphs:
            print(f"\n== graph {graph.index} before ==\n{graph.graph_before}\n== graph {graph.index} after ==\n"
                  f"{graph.graph_after}")


if __name__ == "__main__":
    main()
