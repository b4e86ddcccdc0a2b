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
decode sizes are not launch-bound for either backend. Before timing, both compiled models' logits
are compared with eager's: in bfloat16 a near-tie in routing flips an expert choice now and then (in
the default compile as well), so the check is on the mean difference, which must be no larger than
the default compile's (within 2x).

    python benchmarks/bench_model.py              # 3 layers, every size
    python benchmarks/bench_model.py --quick      # 1 layer, T = 1 and 4096
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from bench_gate import time_in_graph_us

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


def print_routing_balance(block, config) -> None:
    """How many experts the first MoE layer's router picks for random hidden states (the weights a
    decode step reads grow with it)."""
    gate = block.gate
    for tokens in DECODE + PREFILL[:1]:
        x = torch.randn(tokens, config.hidden_size, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        logits = torch.nn.functional.linear(x, gate.weight.float())
        _, ids = ops.moe_fused_gate(logits, gate.e_score_correction_bias, config.n_group, config.topk_group,
                                    config.num_experts_per_tok)
        print(f"routing balance: T={tokens}: {ids.unique().numel()} of {config.n_routed_experts} experts picked "
              f"(at most {min(tokens * config.num_experts_per_tok, config.n_routed_experts)})")


def timing_row(label: str, tokens: int, fns: dict, inputs: list[torch.Tensor], replays: int) -> str:
    times = {}
    for name, fn in fns.items():
        with torch.no_grad():
            times[name] = time_in_graph_us(fn, inputs, replays) / len(inputs)
    base, ours = times["inductor"], times["moe_fusion"]
    return f"| {label} | {tokens} | {base:.1f} | {ours:.1f} | {base / ours:.2f}x |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 layer, T = 1 and 4096")
    args = parser.parse_args()
    layers = 1 if args.quick else args.layers
    prefill, decode = ([4096], [1]) if args.quick else (PREFILL, DECODE)

    torch._inductor.config.fx_graph_cache = False  # every compile runs the passes (and reports them)
    torch._dynamo.config.recompile_limit = 64  # two backends, size-1 specialisations
    started = time.perf_counter()
    log(f"building DeepseekV3 ({layers} MoE layers, per-GPU TP8 sizes) on the GPU ...")
    # A small score-correction bias: routing close to balanced, as aux-loss-free balancing keeps it.
    model = hf_moe("deepseek_v3", "grouped_mm", device="cuda", bias_std=0.01, num_hidden_layers=layers, **TP8)
    model = model.to(torch.bfloat16)
    vocab = model.config.vocab_size
    block = model.model.layers[0].mlp
    print_routing_balance(block, model.config)

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
            rows.append(timing_row(label, tokens, fns, inputs, replays=10 if tokens >= 4096 else 50))
            print(rows[-1], flush=True)
        print(f"moe_fusion on the {part}: {collector.take().tally()}")

    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, DeepseekV3 {layers} MoE layers "
          f"(TP8 per-GPU sizes), bfloat16, median per call inside CUDA graphs")
    print("| what | T | torch.compile default (us) | moe_fusion (us) | speedup |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
