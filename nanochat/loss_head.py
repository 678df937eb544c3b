"""The loss head, chunked: output projection, logit softcap and cross-entropy over a few thousand
tokens at a time, so the [tokens, vocab] fp32 logits never exist whole.

    loss = cross_entropy(softcap * tanh((hidden @ weight.T).float() / softcap), targets)

is what GPT computed in one piece (nanochat's head); this module gives the same loss, and the same
gradients for hidden and weight, to float rounding. In one piece, a d20 micro-batch (32 x 2,048
tokens, vocab 65,536) holds its fp32 logits several times over: the tanh output and the
log-softmax output kept for backward, 17.2 GB each, plus the matmul output and the gradient buffers
of the backward pass. Here each chunk's logits are made, used and dropped in turn.

How the gradient is had without keeping the logits: for a "mean" loss (training), the upstream
gradient is a scalar, so forward already computes each chunk's gradient for upstream 1 (Liger
Kernel's fused linear cross-entropy does the same), keeps only grad_hidden [tokens, width] and
grad_weight [vocab, width], and backward scales them by the real upstream value. For "none"
(per-token losses, evaluation) nothing is kept when no gradient is needed; if one is, backward
recomputes each chunk's logits with the per-token upstream gradients. Either way the matmuls run
in the autocast dtype when autocast is on, as nn.Linear would, and everything after them in fp32.

Per token i with logits z = hidden_i @ weight.T, t = tanh(z / cap), s = cap * t:
    loss_i = logsumexp(s) - s[target_i]
    d loss_i / d z = (softmax(s) - onehot(target_i)) * (1 - t^2)
Tokens whose target is ignore_index (-1) have loss 0 and no gradient; "mean" divides by the number
of the others, as F.cross_entropy does.
"""

import torch

IGNORE_INDEX = -1


def softcapped_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float,
    reduction: str,
    chunk_tokens: int,
) -> torch.Tensor:
    """hidden [N, width], weight [vocab, width], targets [N] int64 (-1 = ignore). Returns the
    mean cross-entropy in nats ("mean") or the [N] per-token losses, 0 where ignored ("none")."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction={reduction!r} is not one of mean, none")
    device_type = hidden.device.type
    # The dtype nn.Linear would multiply in: autocast's, when it is on here.
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return _ChunkedSoftcapCrossEntropy.apply(hidden, weight, targets, softcap, reduction, chunk_tokens, compute_dtype)


def _chunk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float,
    row_weights: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk: hidden and weight already in the compute dtype. Returns the per-token losses
    (fp32, 0 where ignored) and, given row_weights (each token's upstream gradient), dL/dz in the
    compute dtype."""
    logits = (hidden @ weight.T).float()
    z = logits.div_(softcap)  # in place: the matmul output is not needed again
    t = tanh_from_exp(z) if torch.compiler.is_compiling() else z.tanh_()
    s = t * softcap
    lse = torch.logsumexp(s, dim=1)
    valid = targets != IGNORE_INDEX
    safe_targets = targets.clamp(min=0)
    target_logit = s.gather(1, safe_targets[:, None]).squeeze(1)
    losses = torch.where(valid, lse - target_logit, 0.0)
    if row_weights is None:
        return losses, None
    grad = s.sub_(lse[:, None]).exp_()  # softmax, in s's storage
    grad.scatter_add_(1, safe_targets[:, None], -valid[:, None].to(grad.dtype))
    grad.mul_(torch.where(valid, row_weights, 0.0)[:, None])
    grad.mul_(t.square_().neg_().add_(1))  # the softcap's derivative 1 - t^2
    return losses, grad.to(hidden.dtype)


def tanh_from_exp(z: torch.Tensor) -> torch.Tensor:
    """tanh(z) as (1 - e) / (1 + e) with e = exp(-2|z|), signed like z: within 1e-7 of tanh (absolute)
    and finite for every z, as exp's argument is never positive. Compiled code takes it: Inductor's
    CPU tanh measured ~3x as slow as this one fused kernel on a chunk's [256, 4096] fp32 logits, and
    was the largest elementwise kernel of a step; eager torch.tanh_ is the faster of the two."""
    e = torch.exp(z.abs() * -2)
    return torch.copysign((1 - e) / (1 + e), z)


class _ChunkedSoftcapCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, reduction, chunk_tokens, compute_dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            wants_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
            h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
            n = h.size(0)
            losses = torch.empty(n, dtype=torch.float32, device=h.device)
            grads_now = wants_grad and reduction == "mean"
            if grads_now:
                count = (targets != IGNORE_INDEX).sum()
                row_weight = 1.0 / count.to(torch.float32)  # a tensor: no device-to-host sync
                grad_hidden = torch.empty_like(h)
                grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            for start in range(0, n, chunk_tokens):
                rows = slice(start, min(start + chunk_tokens, n))
                weights = row_weight.expand(rows.stop - start) if grads_now else None
                losses[rows], grad = _chunk(h[rows], w, targets[rows], softcap, weights)
                if grads_now:
                    grad_hidden[rows] = grad @ w
                    grad_weight.add_(grad.T @ h[rows])
            ctx.softcap, ctx.reduction, ctx.chunk_tokens = softcap, reduction, chunk_tokens
            ctx.dtypes = (hidden.dtype, weight.dtype)
            if grads_now:
                ctx.save_for_backward(grad_hidden, grad_weight)
                return losses.sum() / count
            if wants_grad:
                ctx.save_for_backward(h, w, targets)
            if reduction == "mean":
                return losses.sum() / (targets != IGNORE_INDEX).sum()
            return losses

    @staticmethod
    def backward(ctx, grad_output):
        hidden_dtype, weight_dtype = ctx.dtypes
        with torch.autocast(grad_output.device.type, enabled=False):
            if ctx.reduction == "mean":
                grad_hidden, grad_weight = ctx.saved_tensors
                grad_hidden = (grad_hidden.float() * grad_output).to(hidden_dtype)
                grad_weight = (grad_weight * grad_output).to(weight_dtype)
            else:
                h, w, targets = ctx.saved_tensors
                grad_hidden = torch.empty_like(h)
                grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
                for start in range(0, h.size(0), ctx.chunk_tokens):
                    rows = slice(start, min(start + ctx.chunk_tokens, h.size(0)))
                    _, grad = _chunk(h[rows], w, targets[rows], ctx.softcap, grad_output[rows].float())
                    grad_hidden[rows] = grad @ w
                    grad_weight.add_(grad.T @ h[rows])
                grad_hidden, grad_weight = grad_hidden.to(hidden_dtype), grad_weight.to(weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None
