"""The learning-rate (warm-up + cosine) and beta2 schedules, as functions and as a run logs them."""

import math

import pytest

from internlm.train.lr_schedule import beta2_at, warmup_cosine_lr

PEAK, ETA = 1e-3, 1e-4


def test_warmup_is_linear_from_peak_over_warmup_steps():
    # total 101, warmup_ratio 0.1: round(10.1) = 10 warm-up updates reaching the peak at the 10th
    lrs = [warmup_cosine_lr(step, 101, PEAK, 0.1, ETA) for step in range(10)]
    assert lrs == pytest.approx([PEAK * (i + 1) / 10 for i in range(10)], rel=1e-12)


def test_cosine_from_peak_to_eta_min_at_the_last_update():
    total = 101  # 10 warm-up updates, then 91 more: progress (step - 10) / 90
    assert warmup_cosine_lr(10, total, PEAK, 0.1, ETA) == pytest.approx(PEAK, rel=1e-12)
    assert warmup_cosine_lr(55, total, PEAK, 0.1, ETA) == pytest.approx((PEAK + ETA) / 2, rel=1e-12)
    third = ETA + (PEAK - ETA) * 0.5 * (1 + math.cos(math.pi / 3))  # progress (40 - 10) / 90 = 1/3: 3/4 of the way
    assert warmup_cosine_lr(40, total, PEAK, 0.1, ETA) == pytest.approx(third, rel=1e-12)
    values = [warmup_cosine_lr(step, total, PEAK, 0.1, ETA) for step in range(10, 101)]
    assert values == sorted(values, reverse=True)
    assert warmup_cosine_lr(100, total, PEAK, 0.1, ETA) == pytest.approx(ETA, rel=1e-12)
    assert warmup_cosine_lr(150, total, PEAK, 0.1, ETA) == pytest.approx(ETA, rel=1e-12)  # stays at eta_min after


def test_no_warmup_starts_at_the_peak_and_init_steps_shift_the_schedule():
    assert warmup_cosine_lr(0, 50, PEAK, 0.0, ETA) == PEAK
    for step in range(20):
        assert warmup_cosine_lr(step, 101, PEAK, 0.1, ETA, init_steps=7) == warmup_cosine_lr(
            step + 7, 101, PEAK, 0.1, ETA
        )


def test_beta2_rule():
    assert beta2_at(1, 0.95, 0.0) == beta2_at(10_000, 0.95, 0.0) == 0.95  # c = 0: constant
    assert beta2_at(1, 0.95, 0.8) == 0.95  # 1 - 1 ** -0.8 = 0 < init
    assert beta2_at(1000, 0.95, 0.8) == pytest.approx(1 - 1000**-0.8, rel=1e-12)  # 0.99602
    assert beta2_at(0, 0.95, 0.8) == 0.95  # update counts from 1
    values = [beta2_at(u, 0.9, 0.5) for u in range(1, 500)]
    assert values == sorted(values) and values[-1] == pytest.approx(1 - 499**-0.5)
