"""Learning-rate schedules: nanochat's trapezoid exactly, and the cosine and constant choices."""

import math

import pytest
from configs import compose

from nanochat.config import build
from nanochat.errors import InvalidArgument
from nanochat.schedules import Constant, Cosine, Trapezoid


def nanochat_lr_multiplier(it, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac):
    """nanochat's scripts/base_train.py get_lr_multiplier (classic), restated as the reference."""
    warmup_iters = round(warmup_ratio * num_iterations)
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if it < warmup_iters:
        return (it + 1) / warmup_iters
    elif it <= num_iterations - warmdown_iters:
        return 1.0
    else:
        progress = (num_iterations - it) / warmdown_iters
        return progress * 1.0 + (1 - progress) * final_lr_frac


@pytest.mark.parametrize("num_iterations", [7, 100, 21_400])
@pytest.mark.parametrize("ratios", [(0.0, 0.2, 0.0), (0.1, 0.3, 0.0), (0.18, 0.26, 0.1), (0.0, 0.4, 0.05)])
def test_trapezoid_equals_nanochats_multiplier_at_every_step(num_iterations, ratios):
    schedule = Trapezoid(*ratios)
    steps = range(num_iterations + 1) if num_iterations < 1000 else range(0, num_iterations + 1, 7)
    assert [schedule(s, num_iterations) for s in steps] == [
        nanochat_lr_multiplier(s, num_iterations, *ratios) for s in steps
    ]


def test_trapezoid_without_warmup_is_one_until_warmdown_then_reaches_final_fraction():
    # N = 100, no warmup, warmdown 20 steps (80..100), final 0.1
    schedule = Trapezoid(warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.1)
    assert schedule(0, 100) == 1.0
    assert schedule(80, 100) == 1.0  # N - D is the last full-lr step
    assert schedule(81, 100) == pytest.approx(19 / 20 + (1 / 20) * 0.1)
    assert schedule(90, 100) == pytest.approx(0.55)
    assert schedule(99, 100) == pytest.approx(1 / 20 + (19 / 20) * 0.1)  # last optimizer step
    assert schedule(100, 100) == pytest.approx(0.1)


def test_trapezoid_rounds_the_phase_lengths_to_nearest():
    # 0.18 * 10 = 1.8 -> a 2-step warmup; 0.26 * 10 = 2.6 -> a 3-step warmdown (truncation would give 1 and 2)
    schedule = Trapezoid(warmup_ratio=0.18, warmdown_ratio=0.26, final_lr_frac=0.0)
    assert [schedule(s, 10) for s in range(11)] == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1, 2 / 3, 1 / 3, 0])


def test_cosine_warms_up_then_follows_half_a_cosine_to_the_final_fraction():
    # N = 100, warmup W = 10 (steps 0..9), then p = (step - 10) / 90
    schedule = Cosine(warmup_ratio=0.1, final_lr_frac=0.1)
    assert [schedule(s, 100) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert schedule(10, 100) == pytest.approx(1.0)  # p = 0
    assert schedule(55, 100) == pytest.approx(0.1 + 0.9 * 0.5)  # p = 1/2: halfway down
    assert schedule(40, 100) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 3)) / 2)  # p = 1/3
    assert schedule(100, 100) == pytest.approx(0.1)  # p = 1
    after_warmup = [schedule(s, 100) for s in range(10, 101)]
    assert all(a > b for a, b in zip(after_warmup, after_warmup[1:]))  # strictly decreasing


def test_constant_warms_up_then_holds_one():
    schedule = Constant(warmup_ratio=0.2)
    assert [schedule(s, 20) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert [schedule(s, 20) for s in range(4, 21)] == [1.0] * 17
    assert [Constant(warmup_ratio=0.0)(s, 5) for s in range(6)] == [1.0] * 6


@pytest.mark.parametrize("choice, kind", [("trapezoid", Trapezoid), ("cosine", Cosine), ("constant", Constant)])
def test_schedule_is_a_command_line_choice(choice, kind):
    schedule = build("schedule", compose(f"schedule={choice}").schedule)
    assert isinstance(schedule, kind)
    assert schedule(0, 10) > 0


def test_default_schedule_is_nanochats_trapezoid_of_the_default_run():
    schedule = build("schedule", compose().schedule)
    assert [schedule(s, 400) for s in (0, 240, 241, 399)] == [
        1.0,
        1.0,
        pytest.approx(159 / 160),
        pytest.approx(1 / 160),
    ]


@pytest.mark.parametrize(
    "make, sentence",
    [
        (lambda: Trapezoid(0.6, 0.5, 0.0), "warmup_ratio=0.6 + warmdown_ratio=0.5 exceeds 1"),
        (lambda: Trapezoid(0.0, 1.5, 0.0), "warmdown_ratio=1.5 must be between 0 and 1."),
        (lambda: Cosine(1.0, 0.0), "warmup_ratio=1.0 leaves no steps for the cosine."),
        (lambda: Constant(-0.1), "warmup_ratio=-0.1 must be between 0 and 1."),
    ],
)
def test_schedules_refuse_ratios_that_leave_no_schedule(make, sentence):
    with pytest.raises(InvalidArgument) as error:
        make()
    assert str(error.value).startswith(sentence)
