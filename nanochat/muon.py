"""Muon: momentum SGD whose update is orthogonalised before it is applied (single process).

Muon (Keller Jordan et al., https://kellerjordan.github.io/posts/muon/) is meant for the 2-D weight
matrices of the hidden layers. Each step it

1. keeps an exponential moving average of the gradient (momentum, optionally Nesterov-style),
2. replaces that update G = U S V^T by (approximately) U V^T, i.e. sets all its singular values to
   about one, using a few Newton-Schulz iterations that run stably in bfloat16 (as nanochat does;
   `ns_dtype="float32"` runs them in fp32, slower, for comparisons that must not see bf16 rounding),
3. applies it with a learning rate scaled by sqrt(max(1, rows / cols)).

Why: the raw momentum of a transformer weight matrix is dominated by a few directions; equalising
the singular values makes every direction of the update move at the same speed, which trains
faster per token than AdamW on these matrices. Embeddings, the output head and any 0-/1-D
parameters are not matrices in this sense and belong to AdamW (see nanochat/optim.py). There is no
weight decay, as in nanochat's classic recipe.
"""

from collections.abc import Iterable
from typing import Any, Callable

import torch

# Quintic coefficients chosen to maximise the slope at zero, so small singular values grow fast.
# The price is that the iteration does not converge to exactly one: after 5 steps the singular
# values land roughly in [0.7, 1.2], which trains as well as an exact U V^T.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


NS_DTYPES = ("bfloat16", "float32")


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

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            momentum = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buffer = state["momentum_buffer"]
                buffer.lerp_(p.grad, 1 - momentum)
                # Nesterov: look one momentum step ahead, i.e. blend the fresh gradient with the buffer.
                update = p.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                update = zeropower_via_newtonschulz5(update, group["ns_steps"], getattr(torch, group["ns_dtype"]))
                # An orthogonalised [rows, cols] update has per-entry RMS 1/sqrt(max(rows, cols)).
                # Scaling tall matrices by sqrt(rows / cols) makes it 1/sqrt(cols) = 1/sqrt(fan_in)
                # for every shape.
                shape_scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                p.add_(update, alpha=-group["lr"] * shape_scale)
        return loss
