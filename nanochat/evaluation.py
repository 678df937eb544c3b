"""Validation bits per byte and text samples.

Bits per byte is tokenizer-independent, so models with different vocabularies compare on one axis:
the summed cross-entropy (nats) of every target token, divided by ln 2 and by the number of UTF-8
bytes those target tokens decode to. Special tokens (BOS) decode to no text: they count zero bytes
and their loss is left out. This is not mean loss x 1.4427, which would be bits per *token*.
Under torchrun each rank evaluates its own stride of the validation data, and the nats and bytes
are summed over ranks before the one division.
"""

import math
from collections.abc import Iterable

import torch

from nanochat.device import autocast
from nanochat.distributed import all_reduce_sum_
from nanochat.interface import generate_batch


@torch.no_grad()
def evaluate_bpb(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    token_bytes: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
) -> float:
    was_training = model.training
    model.eval()
    token_bytes = token_bytes.to(device)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast(device, dtype):
            losses = model(inputs, targets, loss_reduction="none")
        # ignore_index targets (-1) have no bytes either
        nbytes = torch.where(targets >= 0, token_bytes[targets.clamp(min=0)], 0)
        counted = nbytes > 0
        total_nats += losses.double()[counted].sum()
        total_bytes += nbytes.sum()
    model.train(was_training)
    all_reduce_sum_(total_nats, total_bytes)
    if total_bytes.item() == 0:
        raise ValueError("validation batches held no text bytes: bits per byte is undefined")
    return (total_nats / (math.log(2) * total_bytes.double())).item()


def sample_completions(
    model,
    tokenizer,
    prompts: Iterable[str],
    max_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> list[tuple[str, str]]:
    """Continue the prompts in one batch (each BOS first, as in training) with fixed seeds (prompt
    i: seed + i), so samples from different steps of one run differ only because the model did.
    A sample ends where the model starts a new document (BOS)."""
    prompts = list(prompts)
    was_training = model.training
    model.eval()
    bos = tokenizer.bos_id
    with autocast(device, dtype):
        outputs = generate_batch(
            model, [[bos] + tokenizer.encode(p) for p in prompts], max_tokens, temperature, top_k, seed, stop_token=bos
        )
    model.train(was_training)
    return [(prompt, tokenizer.decode(out[:-1] if out[-1:] == [bos] else out)) for prompt, out in zip(prompts, outputs)]
