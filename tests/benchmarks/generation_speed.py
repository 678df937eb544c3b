"""Benchmark: generation tokens/s with and without the KV cache (CPU, fp32 by default).

    python tests/benchmarks/generation_speed.py [--models d4 d12] [--batch 1 4] [--prompt-tokens 64]
        [--new-tokens 64] [--repeats 2] [--device cpu] [--dtype float32]

d4 is the default run's model (n_layer 4, n_embd 256, 2 heads, vocab 4,096, sequence_len 256);
d12 is nanochat's (n_layer 12, n_embd 768, 6 heads, vocab 65,536, sequence_len 2,048). Both start
from their own init (speed does not depend on the values).

"cached" is GPT.generate_batch: one forward pass over the prompts, then one token per sequence
per step. "recompute" is what generate did before the cache: every step runs the model over the
whole sequence so far and keeps the last position's logits. Both greedy, on a batch of random
prompts of --prompt-tokens tokens; tokens/s counts the new tokens of the whole batch. Each cell is
the best of --repeats timed runs after one warm-up run.
"""

import argparse
import time

import torch

from nanochat.device import autocast, synchronize
from nanochat.model import GPT

MODELS = {
    "d4": dict(sequence_len=256, vocab_size=4096, n_layer=4, n_head=2, n_kv_head=2, n_embd=256),
    "d12": dict(sequence_len=2048, vocab_size=65536, n_layer=12, n_head=6, n_kv_head=6, n_embd=768),
}


@torch.no_grad()
def generate_by_recomputing(model: GPT, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    ids = prompts
    for _ in range(new_tokens):
        logits = model._logits(model._hidden_states(ids)[:, -1])  # the head on the last position only
        ids = torch.cat((ids, logits.argmax(dim=-1, keepdim=True)), dim=1)
    return ids[:, prompts.size(1) :]


def best_seconds(run, device: torch.device, repeats: int) -> float:
    run()  # warm-up: allocator, kernel choice
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["d4", "d12"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    print(
        f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens each, greedy, {device} "
        f"{args.dtype}, {torch.get_num_threads()} threads; new tokens/s over the batch, best of {args.repeats}\n"
    )
    print("| model | params | batch | recompute tok/s | cached tok/s | speed-up |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        with torch.device(device):
            model = GPT(**MODELS[name]).eval()
        for batch in args.batch:
            prompts = torch.randint(0, model.config.vocab_size, (batch, args.prompt_tokens), device=device)
            as_lists = prompts.tolist()
            with autocast(device, dtype):
                recompute = best_seconds(
                    lambda: generate_by_recomputing(model, prompts, args.new_tokens), device, args.repeats
                )
                cached = best_seconds(
                    lambda: model.generate_batch(as_lists, args.new_tokens, temperature=0.0), device, args.repeats
                )
            tokens = batch * args.new_tokens
            print(
                f"| {name} | {model.num_params() / 1e6:.1f}M | {batch} | {tokens / recompute:,.1f} | "
                f"{tokens / cached:,.1f} | {recompute / cached:.1f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
