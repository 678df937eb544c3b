"""Bits per byte against a hand computation, and samples that stop at a document boundary."""

import math

import torch

from nanochat.evaluation import evaluate_bpb

# A toy vocabulary: token id -> the UTF-8 bytes it decodes to; id 4 is a special token (BOS).
TOY_TOKEN_BYTES = torch.tensor([len("a".encode()), len("é".encode()), len("€".encode()), len("😀".encode()), 0])


class FixedLossModel(torch.nn.Module):
    """Per-token loss = 0.25 * (target id + 1)^2, so the expected sum is easy to write by hand."""

    def forward(self, inputs, targets, loss_reduction="mean"):
        assert loss_reduction == "none"
        return torch.where(targets >= 0, 0.25 * (targets + 1).float() ** 2, torch.zeros(()))


def test_bits_per_byte_matches_hand_computation_with_multibyte_and_special_tokens():
    targets = torch.tensor([[0, 1, 4, 2], [3, 4, 0, -1]])  # two BOS targets and one ignored position
    batches = [(torch.zeros_like(targets), targets)]
    bpb = evaluate_bpb(FixedLossModel(), batches, TOY_TOKEN_BYTES, torch.device("cpu"), torch.float32)
    # counted targets: a(1 byte, 0.25 nats) é(2, 1.0) €(3, 2.25) 😀(4, 4.0) a(1, 0.25); BOS and -1 left out
    nats = 0.25 + 1.0 + 2.25 + 4.0 + 0.25
    nbytes = 1 + 2 + 3 + 4 + 1
    assert math.isclose(bpb, nats / (math.log(2) * nbytes), rel_tol=1e-12)
    # and it is not bits per token
    assert not math.isclose(bpb, nats / 5 / math.log(2), rel_tol=1e-3)


def test_bits_per_byte_sums_over_batches_before_dividing():
    first = torch.tensor([[3, 3]])  # 8 bytes, 8 nats
    second = torch.tensor([[0, 0]])  # 2 bytes, 0.5 nats
    batches = [(torch.zeros_like(first), first), (torch.zeros_like(second), second)]
    bpb = evaluate_bpb(FixedLossModel(), batches, TOY_TOKEN_BYTES, torch.device("cpu"), torch.float32)
    assert math.isclose(bpb, 8.5 / (math.log(2) * 10), rel_tol=1e-12)  # not the mean of the two batches' bpb
