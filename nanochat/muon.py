"""Muon: momentum SGD whose update is orthogonalised before it is applied (single process).

Muon (Keller Jordan et al., https://kellerjordan.github.io/posts/muon/) is meant for the 2-D weight
matrices of the hidden layers. Each step it

1. keeps an exponential moving average of the gradient (momentum, optionally Nesterov-style),
2. replaces that update G = U S V^T by (approximately) U V^T, i.e. sets all its singular values to
   about one, using a few Newton-Schulz iterations that run stably in bfloat16 (as nanochat does;
   `ns_dtype="float32"` runs them in fp32, for comparisons that must not see bf16 rounding;
   `ns_dtype="auto"` is bf16 on a GPU and, on a CPU, whichever of the two measures faster at the
   group's shapes when the first step runs: a CPU without native bf16 matmuls runs them dozens of
   times slower than fp32; there `ns_bf16_matmul` runs bf16 matmuls as fp32 matmuls of the bf16
   operands, the same arithmetic, see zeropower_via_newtonschulz5),
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

from nanochat.device import NO_BF16_MATMULS, CompiledOrEager, PrecisionChoice, choose_precision
from nanochat.logs import log

# Quintic coefficients chosen to maximise the slope at zero, so small singular values grow fast.
# The price is that the iteration does not converge to exactly one: after 5 steps the singular
# values land roughly in [0.7, 1.2], which trains as well as an exact U V^T.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


NS_DTYPES = ("auto", "bfloat16", "float32")
NS_BF16_MATMULS = ("auto", "native", "emulated")


def zeropower_via_newtonschulz5(
    G: torch.Tensor, steps: int, dtype: torch.dtype = torch.bfloat16, gemm_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Approximate U V^T for G = U S V^T (over the last two dims), computed in `dtype`.

    gemm_dtype=float32 with dtype=bfloat16 multiplies every pair of bf16 matrices with the fp32
    GEMM and rounds the product to bf16. That is the arithmetic of a bf16 GEMM: the product of two
    bf16 numbers (8-bit significands) is exact in fp32 (24 bits), bf16 GEMMs accumulate in fp32
    too, and the result is rounded to bf16 either way. Only the order of the fp32 sums can differ,
    by fp32 rounding (~1e-7 of the sum of the terms' magnitudes): a few elements in 10^4 come out
    one bf16 rounding apart, more only where the terms nearly cancel. Every other operation stays
    in bf16. On a CPU without native bf16 instructions it is dozens of times faster than torch's
    bf16 GEMM."""
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
        gram = matmul(X, X.mT, gemm_dtype)
        # the odd polynomial a*x + b*x^3 + c*x^5 of X
        X = a * X + matmul(b * gram + c * matmul(gram, gram, gemm_dtype), X, gemm_dtype)
    return X.mT if tall else X


def matmul(A: torch.Tensor, B: torch.Tensor, gemm_dtype: torch.dtype | None = None) -> torch.Tensor:
    """A @ B, by a GEMM in gemm_dtype whose result is rounded back to A's dtype (see
    zeropower_via_newtonschulz5)."""
    if gemm_dtype is None or gemm_dtype == A.dtype:
        return A @ B
    return (A.to(gemm_dtype) @ B.to(gemm_dtype)).to(A.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters. Group options: lr, momentum, nesterov, ns_steps, ns_dtype and
    ns_bf16_matmul (how a bf16 Newton-Schulz multiplies: native, emulated by fp32 GEMMs, or auto,
    whichever measures faster here; see resolve_ns_bf16_matmul).

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
        ns_bf16_matmul: str = "native",
    ):
        if ns_dtype not in NS_DTYPES:
            raise ValueError(f"ns_dtype={ns_dtype!r} is not one of {', '.join(NS_DTYPES)}")
        if ns_bf16_matmul not in NS_BF16_MATMULS:
            raise ValueError(f"ns_bf16_matmul={ns_bf16_matmul!r} is not one of {', '.join(NS_BF16_MATMULS)}")
        # A dtype's name, not the torch.dtype: param groups land in checkpoints as plain data.
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            ns_bf16_matmul=ns_bf16_matmul,
        )
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
            gemm_dtype = dtype
            if dtype == torch.bfloat16:
                bf16_matmul = resolve_ns_bf16_matmul(group["ns_bf16_matmul"], params, group["ns_steps"])
                gemm_dtype = torch.float32 if bf16_matmul == "emulated" else dtype
            for members in stacks(params).values():
                # Wide orientation for all, so tall matrices stack with their transposed-shape peers.
                stacked = torch.stack([updates[i] if is_wide(params[i]) else updates[i].mT for i in members])
                orthogonal = self.orthogonalise(stacked, group["ns_steps"], dtype, gemm_dtype)
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
_BF16_MATMUL_CHOICES: dict[tuple, PrecisionChoice] = {}


def _measured_on_a_cpu(
    params: list[torch.Tensor],
    ns_steps: int,
    iteration: Callable[[torch.Tensor, torch.dtype], torch.Tensor],
    choices: dict[tuple, PrecisionChoice],
    describe: Callable[[PrecisionChoice], str],
) -> PrecisionChoice | None:
    """None off the CPU; on a CPU, choose_precision over one Newton-Schulz iteration, iteration(matrix,
    dtype), on one matrix of each stacked shape, weighted by how many matrices and iterations a step
    runs. Measured once per process for each (device, shapes, steps, threads), described in the log
    when measured."""
    device = params[0].device
    if device.type != "cpu":
        return None
    counts = {shape: len(members) for shape, members in stacks(params).items()}
    key = (str(device), tuple(sorted(counts.items())), ns_steps, torch.get_num_threads())
    if key not in choices:
        generator = torch.Generator().manual_seed(0)
        tasks = []
        for shape, count in counts.items():
            matrix = torch.randn(*shape, generator=generator)
            tasks.append((lambda dtype, matrix=matrix: iteration(matrix, dtype), count * ns_steps))
        choices[key] = choose_precision(tasks, device)
        log.info(describe(choices[key]))
    return choices[key]


def resolve_ns_dtype(ns_dtype: str, params: list[torch.Tensor], ns_steps: int) -> str:
    """ns_dtype, with auto resolved: bfloat16 off the CPU (nanochat's choice on a GPU); on a CPU
    whichever dtype one Newton-Schulz iteration per stacked shape measures faster at."""
    if ns_dtype != "auto":
        return ns_dtype
    choice = _measured_on_a_cpu(
        params,
        ns_steps,
        lambda matrix, dtype: zeropower_via_newtonschulz5(matrix, 1, dtype),
        _NS_CHOICES,
        lambda choice: choice.describe("optimizer.ns_dtype=auto, Muon's Newton-Schulz"),
    )
    return "bfloat16" if choice is None else str(choice.dtype).removeprefix("torch.")


def resolve_ns_bf16_matmul(ns_bf16_matmul: str, params: list[torch.Tensor], ns_steps: int) -> str:
    """ns_bf16_matmul, with auto resolved: native off the CPU; on a CPU "emulated" (fp32 GEMMs of
    the bf16 operands) where one bf16 Newton-Schulz iteration per stacked shape measures faster
    than with torch's bf16 GEMM. ns_dtype=auto needs no such choice: an emulated bf16 iteration
    costs an fp32 one plus its roundings, so where native bf16 loses to fp32, fp32 is the faster."""
    if ns_bf16_matmul != "auto":
        return ns_bf16_matmul

    def bf16_iteration(matrix: torch.Tensor, gemm_dtype: torch.dtype) -> torch.Tensor:
        return zeropower_via_newtonschulz5(matrix, 1, torch.bfloat16, gemm_dtype)

    def describe(choice: PrecisionChoice) -> str:  # choose_precision's float32 is the fp32 GEMM here
        if not choice.measured:
            return f"optimizer.ns_bf16_matmul=auto, Muon's bf16 Newton-Schulz: {NO_BF16_MATMULS}, so emulated"
        ratio = f"{choice.bfloat16_s / choice.float32_s:.2f}x{'' if choice.complete else '+'}"
        return (
            f"optimizer.ns_bf16_matmul=auto, Muon's bf16 Newton-Schulz: torch's bf16 GEMM took {ratio} as long "
            f"as fp32 GEMMs of the bf16 operands on {torch.get_num_threads()} threads, so "
            f"{'native' if choice.dtype == torch.bfloat16 else 'emulated'}"
        )

    choice = _measured_on_a_cpu(params, ns_steps, bf16_iteration, _BF16_MATMUL_CHOICES, describe)
    return "native" if choice is None or choice.dtype == torch.bfloat16 else "emulated"
