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

nanochat/model.py's GPT is the reference implementation; tests/toy_models.py holds a second one.
"""

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
