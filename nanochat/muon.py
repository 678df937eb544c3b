"""Muon: momentum SGD whose update is orthogonalised before it is applied (single process).

Muon (Keller Jordan et al., https://kellerjordan.github.io/posts/muon/) is meant for the 2-D weight
matrices of the hidden layers. Each step it

1. keeps an exponential moving average of the gradient (momentum, optionally Nesterov-style),
2. replaces that update G = U S V^T by (approximately) U V^T, i.e. sets all its singular values to
   about one, using a few Newton-Schulz iterations that run stably in bfloat16 (as nanochat does;
   `ns_dtype="float32"` runs them in fp32, for comparisons that must not see bf16 rounding;
   `ns_dtype="auto"` is bf16 on a GPU and, on a CPU, whichever of the two measures faster at the
   group's shapes when the first step runs: a CPU without native bf16 matmuls runs them dozens of
   times slower than fp32),
3. applies it with a learning rate scaled by sqrt(max(1, rows / cols)).

The Newton-Schulz iterations run batched: every matrix of one shape (a tall matrix counting as its
transpose, which is what the iteration works on anyway) is stacked into one [n, rows, cols] tensor
and orthogonalised by one call, so a d12 step makes 2 calls instead of 72 (`compile()`, called by
the trainer when system.compile is on, also compiles that call). Each matrix's result equals the
one-at-a-time result up to the float rounding of a batched matmul. Under ShardedOptimizers the
param groups hold only the matrices this rank owns, so the batching is over those.

Why: the raw momentum of a transformer weight matrix is dominated by a few directions; equalising
the singular values makes every direction of the update move at the same speed, which trains
faster per token than AdamW on these matrices. Embeddings, the output head and any 0-/1-D
parameters are not matrices in this sense and belong to AdamW (see nanochat/optim.py). There is no
weight decay, as in nanochat's classic recipe.
"""

from collections.abc import Iterable
from typing import Any, Callable

import torch

from nanochat.device import CompiledOrEager, PrecisionChoice, choose_precision
from nanochat.logs import log

# Quintic coefficients chosen to maximise the slope at zero, so small singular values grow fast.
# The price is that the iteration does not converge to exactly one: after 5 steps the singular
# values land roughly in [0.7, 1.2], which trains as well as an exact U V^T.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


NS_DTYPES = ("auto", "bfloat16", "float32")


def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximate U V^T for G = U S V^T (over the last two dims), computed in `dtype`."""
    assert G.ndim >= 2
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype)
    # Iterate on the wide orientation so X @ X^T is the smaller of the two Gram matrices.
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    # The Frobenius norm bounds the spectral norm, so afterwards every singular value is <= 1,
    # inside the region where the iteration converges.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = X @ X.mT
        X = a * X + (b * gram + c * gram @ gram) @ X  # odd polynomial a*x + b*x^3 + c*x^5 of X
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters. Group options: lr, momentum, nesterov, ns_steps, ns_dtype.

    State per parameter: "momentum_buffer", the EMA of gradients (same dtype as the gradient).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_dtype: str = "bfloat16",
    ):
        if ns_dtype not in NS_DTYPES:
            raise ValueError(f"ns_dtype={ns_dtype!r} is not one of {', '.join(NS_DTYPES)}")
        # A dtype's name, not the torch.dtype: param groups land in checkpoints as plain data.
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, ns_dtype=ns_dtype)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only optimises 2-D matrices, got a parameter of shape {tuple(p.shape)}")
        self.orthogonalise: Callable[..., torch.Tensor] = zeropower_via_newtonschulz5

    def compile(self) -> None:
        """Run the batched Newton-Schulz call compiled (one graph per stacked shape), or eager with a
        one-line note if compilation fails."""
        self.orthogonalise = CompiledOrEager(zeropower_via_newtonschulz5, "Muon's Newton-Schulz", dynamic=False)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            momentum = group["momentum"]
            grads = [p.grad for p in params]
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_lerp_(buffers, grads, 1 - momentum)
            # Nesterov: look one momentum step ahead, i.e. blend the fresh gradient with the buffer.
            updates = torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers
            dtype = getattr(torch, resolve_ns_dtype(group["ns_dtype"], params, group["ns_steps"]))
            for members in stacks(params).values():
                # Wide orientation for all, so tall matrices stack with their transposed-shape peers.
                stacked = torch.stack([updates[i] if is_wide(params[i]) else updates[i].mT for i in members])
                orthogonal = self.orthogonalise(stacked, group["ns_steps"], dtype)
                for i, update in zip(members, orthogonal.unbind(0), strict=True):
                    p = params[i]
                    # An orthogonalised [rows, cols] update has per-entry RMS 1/sqrt(max(rows, cols)).
                    # Scaling tall matrices by sqrt(rows / cols) makes it 1/sqrt(cols) = 1/sqrt(fan_in)
                    # for every shape.
                    shape_scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                    p.add_(update if is_wide(p) else update.mT, alpha=-group["lr"] * shape_scale)
        return loss


def is_wide(p: torch.Tensor) -> bool:
    return p.size(-2) <= p.size(-1)


def stacks(params: list[torch.Tensor]) -> dict[tuple[int, int], list[int]]:
    """Indices of params by their wide-orientation shape (rows <= cols), in order of first appearance."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(params):
        rows, cols = sorted(p.shape)
        groups.setdefault((rows, cols), []).append(i)
    return groups


# One measurement per process for each (device, shapes, steps, threads): every Muon built here
# (tests build many; a sharded and a replicated copy in one process) takes the same decision.
_NS_CHOICES: dict[tuple, PrecisionChoice] = {}


def resolve_ns_dtype(ns_dtype: str, params: list[torch.Tensor], ns_steps: int) -> str:
    """ns_dtype, with auto resolved: bfloat16 off the CPU (nanochat's choice on a GPU); on a CPU
    whichever dtype one Newton-Schulz iteration on one matrix of each stacked shape (weighted by
    how many matrices and iterations a step runs) measures faster at, printed once per process."""
    if ns_dtype != "auto":
        return ns_dtype
    device = params[0].device
    if device.type != "cpu":
        return "bfloat16"
    counts = {shape: len(members) for shape, members in stacks(params).items()}
    key = (str(device), tuple(sorted(counts.items())), ns_steps, torch.get_num_threads())
    if key not in _NS_CHOICES:
        generator = torch.Generator().manual_seed(0)
        tasks = []
        for shape, count in counts.items():
            matrix = torch.randn(*shape, generator=generator)
            tasks.append((lambda dtype, matrix=matrix: zeropower_via_newtonschulz5(matrix, 1, dtype), count * ns_steps))
        _NS_CHOICES[key] = choose_precision(tasks, device)
        log.info(_NS_CHOICES[key].describe("optimizer.ns_dtype=auto, Muon's Newton-Schulz"))
    return str(_NS_CHOICES[key].dtype).removeprefix("torch.")
