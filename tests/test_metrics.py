"""Loss EMA debiasing, MFU arithmetic, gradient clipping and the run-length rule."""

import math

import pytest
import torch

from nanochat.data_parallel import ReplicatedOptimizers
from nanochat.metrics import LossEMA, mfu_percent
from nanochat.schema import TrainerConfig
from nanochat.trainer import resolve_num_iterations


def test_loss_ema_is_debiased_from_the_first_step():
    ema = LossEMA(beta=0.9)
    assert ema.update(4.0) == pytest.approx(4.0)  # a raw EMA would read 0.4
    assert ema.update(2.0) == pytest.approx((0.9 * 0.1 * 4.0 + 0.1 * 2.0) / (1 - 0.9**2))


def test_loss_ema_state_round_trips():
    ema = LossEMA()
    for loss in (5.0, 4.0, 3.5):
        ema.update(loss)
    restored = LossEMA()
    restored.load_state_dict(ema.state_dict())
    assert restored.update(3.0) == ema.update(3.0)


def test_mfu_is_model_flops_over_summed_peak_in_percent():
    assert mfu_percent(flops_per_token=1e9, tokens_per_second=1e5, peak_flops=1e15, world_size=2) == pytest.approx(5.0)


def _params_with_grads(norm: float) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    raw = torch.randn(7)
    raw *= norm / raw.norm()
    params[0].grad = raw[:3].clone()
    params[1].grad = raw[3:].view(2, 2).clone()
    return params


def clip_gradients(params, max_norm: float) -> torch.Tensor:
    """What a single-process step does to the gradients before the optimizer steps."""
    return ReplicatedOptimizers([torch.optim.SGD(params, lr=0.0)]).clip_grad_norm_(max_norm)


def _global_norm(params) -> float:
    return math.sqrt(sum(p.grad.pow(2).sum().item() for p in params))


def test_clipping_rescales_gradients_to_max_norm():
    params = _params_with_grads(norm=10.0)
    directions = [p.grad / 10.0 for p in params]
    reported = clip_gradients(params, max_norm=1.0)
    assert reported.item() == pytest.approx(10.0)  # the norm before clipping is what gets logged
    assert _global_norm(params) == pytest.approx(1.0, rel=1e-5)
    for p, direction in zip(params, directions):
        torch.testing.assert_close(p.grad, direction, rtol=1e-5, atol=1e-6)  # rescaled, not reshaped


def test_clipping_leaves_gradients_below_max_norm_alone():
    params = _params_with_grads(norm=0.5)
    before = [p.grad.clone() for p in params]
    assert clip_gradients(params, max_norm=1.0).item() == pytest.approx(0.5)
    for p, b in zip(params, before):
        assert torch.equal(p.grad, b)


def test_zero_max_norm_disables_clipping_but_still_measures():
    params = _params_with_grads(norm=50.0)
    assert clip_gradients(params, max_norm=0.0).item() == pytest.approx(50.0)
    assert _global_norm(params) == pytest.approx(50.0, rel=1e-5)


def test_run_length_prefers_explicit_steps_then_flops_then_ratio():
    config = TrainerConfig(
        num_iterations=7,
        target_flops=1e12,
        target_param_data_ratio=20,
        total_batch_size=1000,
        device_batch_size=1,
        grad_clip=1.0,
        seed=0,
        log_every=1,
        skip_nonfinite=0,
        overfit=False,
    )
    assert resolve_num_iterations(config, flops_per_token=1e6, num_params=10_000) == 7
    config.num_iterations = -1
    assert resolve_num_iterations(config, flops_per_token=1e6, num_params=10_000) == 1000  # 1e12 / (1e6 * 1000)
    config.target_flops = -1
    assert resolve_num_iterations(config, flops_per_token=1e6, num_params=10_000) == 200  # 20 * 10_000 / 1000
