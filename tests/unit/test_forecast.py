"""The port-exhaustion forecast on hand-worked numbers, and the sliding-window rates that feed it."""

import pytest

from monitor.forecast import TIME_WAIT_SECONDS, PortForecast, RateWindow, forecast


def test_below_capacity_never_runs_out():
    # P = 1000 ports, W = 200 in TIME_WAIT, O = 50 otherwise held, r = 15 entries/s, T = 60 s:
    #   demand = r*T + O = 15*60 + 50 = 950 < P   -> utilization 950/1000 = 0.95, no exhaustion
    fc = forecast(1000, 200, 50, 15.0)
    assert TIME_WAIT_SECONDS == 60.0
    assert fc == PortForecast(in_use=250, demand=950.0, utilization=0.95, seconds_to_exhaustion=None)


def test_above_capacity_runs_out_at_the_net_rate():
    # Same, with r = 20/s:
    #   demand = 20*60 + 50 = 1250 >= P      -> utilization capped at 1.0
    #   in use now N = W + O = 250; W/T = 200/60 = 3.333.. ports freed per second
    #   seconds = (P - N) / (r - W/T) = 750 / (20 - 3.333..) = 750 / 16.666.. = 45.0
    fc = forecast(1000, 200, 50, 20.0)
    assert fc.in_use == 250
    assert fc.demand == 1250.0
    assert fc.utilization == 1.0
    assert 200 / 60 == pytest.approx(3.3333333)
    assert fc.seconds_to_exhaustion == pytest.approx(45.0)


def test_demand_exactly_at_capacity_runs_out():
    # demand == P counts as running out: r*T + O = 15*60 + 100 = 1000; N = 100 + 100 = 200;
    # seconds = 800 / (15 - 100/60) = 800 / 13.333.. = 60.0
    fc = forecast(1000, 100, 100, 15.0)
    assert fc.utilization == 1.0
    assert fc.seconds_to_exhaustion == pytest.approx(60.0)


@pytest.mark.parametrize("time_wait, other", [(1000, 0), (600, 400), (900, 200)])
def test_already_exhausted_is_zero(time_wait, other):
    # Whatever the rate, once every port is taken the time left is 0, not a negative number.
    for rate in (0.0, 1.0, 100.0):
        assert forecast(1000, time_wait, other, rate).seconds_to_exhaustion == 0.0


def test_idle_endpoint():
    fc = forecast(28232, 0, 0, 0.0)
    assert fc == PortForecast(0, 0.0, 0.0, None)


@pytest.mark.parametrize("args", [(0, 0, 0, 1.0), (-5, 0, 0, 1.0), (1000, 0, 0, -0.1)])
def test_invalid_input_raises(args):
    with pytest.raises(ValueError):
        forecast(*args)


def test_invalid_lifetime_raises():
    with pytest.raises(ValueError):
        forecast(1000, 0, 0, 1.0, lifetime=0)


# --- RateWindow ---------------------------------------------------------------------------------

def test_first_sample_has_no_rate():
    rw = RateWindow(30)
    assert rw.update(100.0, {"a": 5}) is None


def test_rate_over_the_elapsed_time():
    rw = RateWindow(30)
    rw.update(100.0, {"a": 5, "b": 0})
    assert rw.update(110.0, {"a": 25, "b": 3}) == {"a": 2.0, "b": 0.3}


def test_base_slides_to_the_newest_sample_at_or_before_the_window_start():
    # Samples every 10 s in a 30 s window: at t = 40 the window starts at 10, so the base is
    # the sample taken at 10 (not 0, which is older; not 20, which is inside the window).
    rw = RateWindow(30)
    counts = {0: 0, 10: 100, 20: 300, 30: 600, 40: 1000}
    rates = {t: rw.update(float(t), {"k": c}) for t, c in counts.items()}
    assert rates[0] is None
    assert rates[10] == {"k": 10.0}  # (100 - 0) / 10
    assert rates[20] == {"k": 15.0}  # (300 - 0) / 20
    assert rates[30] == {"k": 20.0}  # (600 - 0) / 30
    assert rates[40] == {"k": 30.0}  # (1000 - 100) / 30
    assert rw.update(50.0, {"k": 1600}) == {"k": 1300 / 30}  # base 20: (1600 - 300) / 30


def test_irregular_samples_keep_a_base_older_than_the_window():
    # With no sample exactly at now - window, the base is the newest one before it, so the
    # rate covers a bit more than the window rather than less.
    rw = RateWindow(30)
    for t, c in ((0, 0), (25, 50), (34, 68)):
        rates = rw.update(float(t), {"k": c})
    assert rates == {"k": 68 / 34}  # base 0: 25 is after 34 - 30 = 4
    assert rw.update(56.0, {"k": 112}) == {"k": (112 - 50) / 31}  # base 25 <= 26


def test_a_count_that_went_down_restarts_from_zero():
    # The in-kernel LRU map evicted the key and later re-added it: its count started over, so
    # all of the new count happened since (a negative rate would be nonsense).
    rw = RateWindow(30)
    rw.update(0.0, {"k": 500})
    assert rw.update(10.0, {"k": 40}) == {"k": 4.0}


def test_a_key_appearing_later_counts_from_zero():
    rw = RateWindow(30)
    rw.update(0.0, {"a": 10})
    rw.update(10.0, {"a": 20})
    assert rw.update(20.0, {"a": 30, "new": 60}) == {"a": 1.0, "new": 3.0}


def test_keys_gone_now_have_no_rate():
    rw = RateWindow(30)
    rw.update(0.0, {"a": 10, "b": 10})
    assert rw.update(10.0, {"a": 20}) == {"a": 1.0}


def test_no_time_elapsed_gives_no_rate():
    rw = RateWindow(30)
    rw.update(5.0, {"a": 1})
    assert rw.update(5.0, {"a": 2}) is None


def test_window_must_be_positive():
    with pytest.raises(ValueError):
        RateWindow(0)
