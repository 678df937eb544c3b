"""What the rest of the project asks of a model, so that a new architecture is a new class plus a
YAML file in conf/model/ (its `_target_` and its shape keys), with nothing else to edit.

The trainer, the optimizer builders, evaluation and the checkpoint checks use only this interface
(plus what every torch.nn.Module has: parameters(), state_dict(), to_empty(), train()/eval()):

    sequence_len: int          the context length the model trains on
    width: int                 its residual-stream width; nanochat's AdamW lrs scale as (width/768)^-0.5
    init_weights()             initialise every parameter and buffer in place; the model is built on
                               the meta device and materialised with to_empty() first
    param_groups()             {"embedding": [...], "unembedding": [...], "matrices": [...],
                               "other": [...]}: every parameter exactly once, by role. Muon takes
                               "matrices" (2-D weights inside the network); AdamW the rest
    num_params()               parameter count
    estimate_flops()           training FLOPs per token (forward + backward), for MFU and run length
    forward(idx, targets=None, loss_reduction="mean")
                               idx int64 [B, T]; without targets the logits [B, T, vocab]; with
                               targets (-1 = ignore) the cross-entropy in nats, a scalar for "mean"
                               or [B, T] for "none"
    generate(tokens, max_tokens, temperature=1.0, top_k=None, seed=None)
                               the sampled continuation of one prompt, as token ids

Optional, for generating many sequences at once (GPT has them, with a KV cache); without them the
functions generate_stream() and generate_batch() below run generate() on one prompt after another:

    generate_stream(prompts, max_tokens, temperature=1.0, top_k=None, seed=None, stop_token=None)
                               continue a batch of prompts, yielding each step's new tokens as
                               {prompt index: token}; prompt i samples with seed + i; a sequence
                               ends after max_tokens tokens or after emitting stop_token (yielded)
    context_len: int           the most tokens a generated sequence may reach, prompt included

nanochat/model.py's GPT is the reference implementation; tests/toy_models.py holds a second one.
"""

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn

PARAM_GROUPS = ("embedding", "unembedding", "matrices", "other")


@runtime_checkable
class LanguageModel(Protocol):
    sequence_len: int
    width: int

    def init_weights(self) -> None: ...

    def param_groups(self) -> dict[str, list[nn.Parameter]]: ...

    def num_params(self) -> int: ...

    def estimate_flops(self) -> int: ...

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_reduction: str = "mean"
    ) -> torch.Tensor: ...

    def generate(
        self,
        tokens: list[int],
        max_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> list[int]: ...


def grouped_parameters(model: LanguageModel) -> dict[str, list[nn.Parameter]]:
    """model.param_groups(), checked: the four roles, and every parameter in exactly one of them."""
    groups = model.param_groups()
    if set(groups) != set(PARAM_GROUPS):
        raise ValueError(
            f"{type(model).__name__}.param_groups() must return {', '.join(PARAM_GROUPS)}, got {', '.join(groups)}"
        )
    seen: dict[int, str] = {}
    for role, params in groups.items():
        for p in params:
            if id(p) in seen:
                raise ValueError(f"a parameter of {type(model).__name__} is in both {seen[id(p)]} and {role}")
            seen[id(p)] = role
    names = {id(p): name for name, p in model.named_parameters()}
    missing = [name for key, name in names.items() if key not in seen]
    if missing or len(seen) != len(names):
        raise ValueError(
            f"{type(model).__name__}.param_groups() must hold every parameter exactly once; missing: {', '.join(missing)}"
        )
    return groups


def generate_stream(
    model: LanguageModel,
    prompts: list[list[int]],
    max_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    stop_token: int | None = None,
) -> Iterator[dict[int, int]]:
    """model.generate_stream(...) where the model has it; otherwise each prompt in turn through
    model.generate (prompt i with seed + i), its tokens yielded one by one up to stop_token."""
    if hasattr(model, "generate_stream"):
        yield from model.generate_stream(prompts, max_tokens, temperature, top_k, seed, stop_token)
        return
    for index, prompt in enumerate(prompts):
        own_seed = None if seed is None else seed + index
        for token in model.generate(prompt, max_tokens, temperature=temperature, top_k=top_k, seed=own_seed):
            yield {index: token}
            if token == stop_token:
                break


def generate_batch(
    model: LanguageModel,
    prompts: list[list[int]],
    max_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    stop_token: int | None = None,
) -> list[list[int]]:
    """The continuation of each prompt (ending with stop_token where the model emitted it), from
    generate_stream."""
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in generate_stream(model, prompts, max_tokens, temperature, top_k, seed, stop_token):
        for index, token in step.items():
            outputs[index].append(token)
    return outputs
