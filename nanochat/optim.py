"""Optimizer builders and training schedules.

Hydra configs point at a builder with `_partial_: true`; the trainer calls `builder(model)` and
always gets a list of torch optimizers back. Every param group carries `initial_lr` (its lr at
build time), and the schedule is applied with `apply_schedule(optimizers, step, lr_multiplier(...))`
without the trainer knowing which builder made them.

- `adamw`: one AdamW over everything; weight decay only on 2-D matrices other than the token
  embedding.
- `adamw_muon`: nanochat's split. AdamW for the token embedding and the lm_head, with their lrs
  scaled by (n_embd / 768) ** -0.5 (the base lrs were tuned at width 768); Muon for every matrix
  inside the transformer blocks, with its momentum warmed up over the first steps.
"""

from collections.abc import Sequence

import torch
import torch.nn as nn

from nanochat.muon import Muon

REFERENCE_WIDTH = 768  # n_embd at which nanochat's AdamW learning rates were tuned


def adamw(
    model: nn.Module,
    lr: float = 3e-3,
    betas: Sequence[float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> list[torch.optim.Optimizer]:
    embedding = model.transformer.wte.weight
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim >= 2 and p is not embedding else no_decay).append(p)
    groups = [
        dict(params=decay, weight_decay=weight_decay, name="decay"),
        dict(params=no_decay, weight_decay=0.0, name="no_decay"),
    ]
    optimizers = [torch.optim.AdamW(groups, lr=lr, betas=_as_pair(betas), eps=eps)]
    return _finalise(model, optimizers)


def adamw_muon(
    model: nn.Module,
    embedding_lr: float = 0.2,
    unembedding_lr: float = 0.004,
    matrix_lr: float = 0.02,
    weight_decay: float = 0.0,
    adam_betas: Sequence[float] = (0.8, 0.95),
    adam_eps: float = 1e-10,
    momentum: float = 0.95,
    momentum_start: float = 0.85,
    momentum_warmup_steps: int = 300,
    ns_steps: int = 5,
    ns_dtype: str = "bfloat16",
) -> list[torch.optim.Optimizer]:
    width_scale = (model.config.n_embd / REFERENCE_WIDTH) ** -0.5
    adam_groups = [
        dict(params=list(model.lm_head.parameters()), lr=unembedding_lr * width_scale, name="unembedding"),
        dict(params=list(model.transformer.wte.parameters()), lr=embedding_lr * width_scale, name="embedding"),
    ]
    adam = torch.optim.AdamW(adam_groups, betas=_as_pair(adam_betas), eps=adam_eps, weight_decay=weight_decay)
    # Only the 2-D block parameters go to Muon; anything else in the blocks stays in no group, and
    # the coverage check below reports it rather than leaving it silently untrained.
    matrices = [p for p in model.transformer.h.parameters() if p.ndim == 2]
    muon_group = dict(
        params=matrices,
        lr=matrix_lr,
        name="matrix",
        momentum=muon_momentum(0, momentum_start, momentum, momentum_warmup_steps),
        momentum_start=momentum_start,
        momentum_end=momentum,
        momentum_warmup_steps=momentum_warmup_steps,
    )
    muon = Muon([muon_group], ns_steps=ns_steps, ns_dtype=ns_dtype)
    return _finalise(model, [adam, muon])


def _as_pair(betas: Sequence[float]) -> tuple[float, float]:
    beta1, beta2 = betas  # also accepts an OmegaConf ListConfig
    return float(beta1), float(beta2)


def _finalise(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> list[torch.optim.Optimizer]:
    check_groups_cover_model(model, optimizers)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def check_groups_cover_model(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Raise ValueError unless every model parameter is in exactly one param group overall."""
    times_seen = {id(p): 0 for p in model.parameters()}
    foreign = 0
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in times_seen:
                    times_seen[id(p)] += 1
                else:
                    foreign += 1
    names = {id(p): name for name, p in model.named_parameters()}
    missing = [names[i] for i, count in times_seen.items() if count == 0]
    repeated = [names[i] for i, count in times_seen.items() if count > 1]
    problems = []
    if missing:
        problems.append(f"not in any param group: {', '.join(missing)}")
    if repeated:
        problems.append(f"in more than one param group: {', '.join(repeated)}")
    if foreign:
        problems.append(f"{foreign} optimised tensor(s) are not parameters of the model")
    if problems:
        raise ValueError("Optimizer param groups must hold every model parameter exactly once; " + "; ".join(problems))


def lr_multiplier(
    step: int, num_iterations: int, warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float
) -> float:
    """nanochat's trapezoid: linear warmup, constant, linear warmdown to `final_lr_frac`.

    With N = num_iterations, warmup W = round(warmup_ratio * N), warmdown D = round(warmdown_ratio * N):
    (step + 1) / W for step < W; 1.0 for W <= step <= N - D; then (N - step) / D of the way from
    final_lr_frac back to 1, i.e. exactly final_lr_frac at step N. The optimizer steps are 0..N-1,
    so the last update uses final_lr_frac + (1 - final_lr_frac) / D.
    """
    warmup_iters = round(warmup_ratio * num_iterations)
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if step < warmup_iters:
        return (step + 1) / warmup_iters
    if step <= num_iterations - warmdown_iters:
        return 1.0
    remaining = (num_iterations - step) / warmdown_iters
    return remaining + (1 - remaining) * final_lr_frac


def muon_momentum(step: int, start: float, end: float, warmup_steps: int) -> float:
    """Linear from `start` at step 0 to `end` at `warmup_steps`, then constant."""
    if step >= warmup_steps:
        return end
    frac = step / warmup_steps
    return (1 - frac) * start + frac * end


def apply_schedule(optimizers: Sequence[torch.optim.Optimizer], step: int, lr_mult: float) -> None:
    """Set this step's lr (initial_lr * lr_mult) and, where a group warms up its momentum, its momentum."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult
            if "momentum_warmup_steps" in group:
                group["momentum"] = muon_momentum(
                    step, group["momentum_start"], group["momentum_end"], group["momentum_warmup_steps"]
                )
