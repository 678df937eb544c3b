"""The chunked loss head against the head in one piece (lm_head, softcap, cross-entropy as nanochat
writes them), for the loss, every gradient and validation bits per byte."""

import pytest
import torch
import torch.nn.functional as F
from test_model import random_model, random_tokens

import nanochat.loss_head as loss_head_module
import nanochat.model as model_module
from nanochat.evaluation import evaluate_bpb
from nanochat.loss_head import softcapped_cross_entropy, tanh_from_exp
from nanochat.model import GPTConfig

# vocab 67 and 2 x 11 = 22 tokens: neither is a multiple of the 8-token chunks, so the last chunk
# is a partial one and no chunk lines up with anything.
CONFIG = GPTConfig(sequence_len=16, vocab_size=67, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
CHUNK_TOKENS = 8


def plain_loss(hidden, weight, targets, reduction):
    logits = 15 * torch.tanh((hidden @ weight.T).float() / 15)
    return F.cross_entropy(logits, targets, ignore_index=-1, reduction=reduction)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def targets_with_ignored(n: int, vocab: int, seed: int) -> torch.Tensor:
    targets = random_tokens(1, n, vocab, seed=seed)[0]
    targets[[0, 5, n - 1]] = -1
    return targets


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunked_head_equals_the_head_in_one_piece(reduction):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(22, 32, generator=generator, requires_grad=True)
    weight = torch.randn(67, 32, generator=generator, requires_grad=True)
    targets = targets_with_ignored(22, 67, seed=1)
    upstream = torch.rand(22, generator=generator) if reduction == "none" else torch.tensor(0.37)
    results = []
    for loss_fn in (plain_loss, lambda *a: softcapped_cross_entropy(*a[:3], 15.0, a[3], CHUNK_TOKENS)):
        loss = loss_fn(hidden, weight, targets, reduction)
        grads = torch.autograd.grad((loss * upstream).sum(), (hidden, weight))
        results.append((loss.detach(), *grads))
    (plain, *plain_grads), (chunked, *chunked_grads) = results
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=0)
    if reduction == "none":
        assert torch.all(chunked[[0, 5, 21]] == 0)
    for ours, reference in zip(chunked_grads, plain_grads, strict=True):
        assert relative_error(ours, reference) < 1e-5
    assert torch.all(chunked_grads[0][[0, 5, 21]] == 0)  # ignored tokens get no gradient


def test_tanh_from_exp_is_tanh_to_float_rounding_and_finite_everywhere():
    z = torch.cat([torch.linspace(-200, 200, 40_001), torch.logspace(-30, 1, 500), -torch.logspace(-30, 1, 500)])
    z = torch.cat([z, torch.tensor([0.0, -0.0, 3e38, -3e38])])
    reference = torch.tanh(z.double())
    ours = tanh_from_exp(z)
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    assert (ours.double() - reference).abs().max().item() <= 1.2e-7  # about one ulp of 1.0
    assert torch.equal(torch.signbit(ours), torch.signbit(z))


@pytest.mark.slow
def test_compiled_chunked_head_equals_the_head_in_one_piece(monkeypatch):
    """Compiled code takes tanh_from_exp in place of torch.tanh (see loss_head.py); the loss and both
    gradients must still be the plain head's."""
    traced = []

    def recorded_tanh_from_exp(z):
        traced.append(z.shape)  # runs while Dynamo traces, not in the compiled code
        return tanh_from_exp(z)

    monkeypatch.setattr(loss_head_module, "tanh_from_exp", recorded_tanh_from_exp)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(22, 32, generator=generator, requires_grad=True)
    weight = torch.randn(67, 32, generator=generator, requires_grad=True)
    targets = targets_with_ignored(22, 67, seed=3)
    compiled = torch.compile(lambda h, w, t: softcapped_cross_entropy(h, w, t, 15.0, "mean", CHUNK_TOKENS))
    results = []
    for loss_fn in (lambda *a: plain_loss(*a, "mean"), compiled):
        loss = loss_fn(hidden, weight, targets)
        results.append((loss.detach(), *torch.autograd.grad(loss, (hidden, weight))))
    (plain, *plain_grads), (ours, *our_grads) = results
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=0)
    for mine, reference in zip(our_grads, plain_grads, strict=True):
        assert relative_error(mine, reference) < 1e-5
    assert traced  # the compiled branch was the one taken


def test_chunked_head_under_bf16_autocast_agrees_to_bf16_rounding():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(22, 32, generator=generator, requires_grad=True)
    weight = torch.randn(67, 32, generator=generator, requires_grad=True)
    targets = targets_with_ignored(22, 67, seed=2)
    results = []
    for loss_fn in (plain_loss, lambda *a: softcapped_cross_entropy(*a[:3], 15.0, a[3], CHUNK_TOKENS)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(hidden, weight, targets, "mean")
        results.append((loss, *torch.autograd.grad(loss, (hidden, weight))))
    (plain, *plain_grads), (chunked, *chunked_grads) = results
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=0)  # same bf16 matmul, fp32 after it
    for ours, reference in zip(chunked_grads, plain_grads, strict=True):
        assert ours.dtype == torch.float32
        assert relative_error(ours, reference) < 2**-8  # bf16 rounding of the chunks' weight gradients


@pytest.fixture
def small_chunks(monkeypatch):
    """GPT's loss head in 8-token chunks, as a much larger model's would be."""
    monkeypatch.setitem(model_module.LOSS_CHUNK_LOGITS, "cpu", CHUNK_TOKENS * CONFIG.vocab_size)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpt_loss_and_every_parameter_gradient_equal_the_plain_head(small_chunks, reduction):
    model = random_model(CONFIG)
    idx = random_tokens(2, 11, CONFIG.vocab_size, seed=3)
    targets = random_tokens(2, 11, CONFIG.vocab_size, seed=4)
    targets[0, 2] = targets[1, 7] = -1

    def plain_forward():
        logits = model._logits(model._hidden_states(idx))
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction=reduction)
        return loss.view_as(targets) if reduction == "none" else loss

    results = []
    for forward in (plain_forward, lambda: model(idx, targets, loss_reduction=reduction)):
        model.zero_grad()
        loss = forward()
        loss.sum().backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}))
    (plain, plain_grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-7)
    for name, reference in plain_grads.items():
        assert relative_error(chunked_grads[name], reference) < 1e-5, name


class PlainHead(torch.nn.Module):
    """A GPT whose loss is computed by the head in one piece, for comparison."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, targets, loss_reduction="mean"):
        logits = self.model._logits(self.model._hidden_states(idx))
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction=loss_reduction)
        return loss.view_as(targets)


def test_validation_bits_per_byte_is_unchanged_by_chunking(small_chunks):
    model = random_model(CONFIG)
    token_bytes = torch.randint(0, 4, (CONFIG.vocab_size,), generator=torch.Generator().manual_seed(5))
    batches = [
        (random_tokens(2, 11, CONFIG.vocab_size, seed=s), random_tokens(2, 11, CONFIG.vocab_size, seed=s + 1))
        for s in (6, 8, 10)
    ]
    chunked = evaluate_bpb(model, batches, token_bytes, torch.device("cpu"), torch.float32)
    plain = evaluate_bpb(PlainHead(model), batches, token_bytes, torch.device("cpu"), torch.float32)
    assert chunked == pytest.approx(plain, rel=1e-6)
