import math

import numpy as np
import pytest

from cribo.pretrain.schedules import cosine_schedule, teacher_temp_schedule


def dino_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """DINO's utils.cosine_scheduler, rewritten here from its published definition (epochs x iterations)."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, schedule))


def test_cosine_exact_values_with_warmup():
    s = cosine_schedule(1.0, 0.0, total_steps=10, warmup_steps=3, warmup_start=0.0)
    assert s.shape == (10,) and s.dtype == np.float64
    # warm-up: linspace(0, 1, 3) includes both ends
    assert s[:3].tolist() == [0.0, 0.5, 1.0]
    # cosine part: n = 7 steps, value at i is 0.5 * (1 + cos(pi i / 7))
    assert s[3] == 1.0
    for i in range(7):
        assert s[3 + i] == pytest.approx(0.5 * (1 + math.cos(math.pi * i / 7)), abs=1e-15)
    assert s[-1] > 0.0  # as in DINO the final value is approached, not reached


def test_momentum_schedule_midpoint_and_ends():
    m = cosine_schedule(0.996, 1.0, total_steps=100)
    assert m[0] == 0.996
    assert m[50] == pytest.approx(0.998, abs=1e-15)  # cos(pi/2) = 0
    assert np.all(np.diff(m) > 0) and m[-1] < 1.0


def test_weight_decay_increases_from_base_to_final():
    wd = cosine_schedule(0.04, 0.4, total_steps=7)
    assert wd[0] == pytest.approx(0.04, abs=1e-15)
    assert np.all(np.diff(wd) > 0)
    assert wd[-1] == pytest.approx(0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * 6 / 7)))


@pytest.mark.parametrize("epochs,niter,warmup_ep,start", [(5, 7, 0, 0.0), (10, 3, 2, 0.0), (4, 11, 1, 1e-6)])
def test_cosine_matches_dino_scheduler(epochs, niter, warmup_ep, start):
    lr = 5e-4 * 1024 / 256
    ours = cosine_schedule(lr, 1e-5, epochs * niter, warmup_ep * niter, start)
    np.testing.assert_array_equal(ours, dino_cosine_scheduler(lr, 1e-5, epochs, niter, warmup_ep, start))


def test_cosine_warmup_equal_to_run_is_pure_warmup():
    s = cosine_schedule(2.0, 0.0, total_steps=4, warmup_steps=4, warmup_start=1.0)
    np.testing.assert_allclose(s, [1.0, 4 / 3, 5 / 3, 2.0], rtol=0, atol=1e-15)


@pytest.mark.parametrize("kwargs,match", [
    (dict(total_steps=0), "total_steps must be a positive integer"),
    (dict(total_steps=5, warmup_steps=6), "warmup_steps=6 exceeds total_steps=5"),
    (dict(total_steps=5, warmup_steps=-1), "warmup_steps must be a non-negative integer"),
    (dict(total_steps=2.5), "total_steps must be a positive integer"),
])
def test_cosine_rejects_bad_lengths(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cosine_schedule(1.0, 0.0, **kwargs)


def test_teacher_temp_linear_then_constant():
    t = teacher_temp_schedule(0.04, 0.07, warmup_steps=30, total_steps=100)
    assert t.shape == (100,)
    assert t[0] == 0.04 and t[29] == pytest.approx(0.07, abs=1e-17)
    assert t[15] == pytest.approx(0.04 + 0.03 * 15 / 29, abs=1e-15)
    assert np.all(t[29:] == t[29]) and np.all(t[30:] == 0.07)
    assert np.all(np.diff(t[:30]) > 0)


def test_teacher_temp_warmup_longer_than_run_is_cut_keeping_slope():
    full = teacher_temp_schedule(0.04, 0.07, warmup_steps=30, total_steps=100)
    short = teacher_temp_schedule(0.04, 0.07, warmup_steps=30, total_steps=10)
    np.testing.assert_array_equal(short, full[:10])
    assert short[-1] < 0.07


def test_teacher_temp_without_warmup_is_constant():
    np.testing.assert_array_equal(teacher_temp_schedule(0.04, 0.07, 0, 5), np.full(5, 0.07))


def test_teacher_temp_rejects_bad_input():
    with pytest.raises(ValueError, match="temperatures must be > 0"):
        teacher_temp_schedule(0.0, 0.07, 3, 10)
    with pytest.raises(ValueError, match="total_steps must be a positive integer"):
        teacher_temp_schedule(0.04, 0.07, 3, 0)
