"""Benchmark: CORE wall time per 100 examples for a d4-sized GPT on the generated eval bundle.

    PYTHONPATH=tests python tests/benchmarks/core_eval_speed.py [--per-task 100] [--device cpu] [--dtype float32]

Builds tests/core_bundle.py's bundle (six tasks, every task type) in a temporary folder, a BPE
fitted to its text, and nanochat's d4 shape at random init (sequence_len 256, vocab 4096, 4 layers,
2 heads, width 256), then times one evaluate_core over every task. The generated prompts are
shorter than the real bundle's (whose 10-shot tasks fill the 256-token context), so the figure
is printed with the average number of rows per example and tokens per row it was measured on.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from core_bundle import bundle_texts, write_bundle

from nanochat.core_eval import EvalBundle, evaluate_core, prepare_example, task_examples
from nanochat.model import GPT
from nanochat.tokenizer import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-task", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = EvalBundle.load(write_bundle(Path(tmp), per_task=args.per_task))
        tokenizer = Tokenizer.train(bundle_texts(bundle.root), 1024)
        torch.manual_seed(0)
        model = GPT(sequence_len=256, vocab_size=4096, n_layer=4, n_head=2, n_kv_head=2, n_embd=256).to(device)
        rows = tokens = examples = 0
        for task in bundle.select():
            data = task_examples(bundle, task)
            for idx in range(len(data)):
                example = prepare_example(task, data, idx, tokenizer, model.sequence_len)
                rows += len(example.tokens)
                tokens += sum(len(row) for row in example.tokens)
            examples += len(data)
        start = time.perf_counter()
        evaluate_core(model, tokenizer, bundle, device, dtype)
        seconds = time.perf_counter() - start
    print(
        f"{examples} examples ({rows / examples:.2f} rows each, {tokens / rows:.0f} tokens per row) in {seconds:.1f} s "
        f"on {device.type} with {torch.get_num_threads()} threads, {args.dtype}: "
        f"{100 * seconds / examples:.2f} s per 100 examples"
    )


if __name__ == "__main__":
    main()
