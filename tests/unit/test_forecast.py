"""The port-exhaustion forecast on hand-worked numbers."""

import pytest

from monitor.sockets.forecast import PortForecast, forecast


def test_below_capacity_never_runs_out():
    # P = 1000 ports, W = 200 in TIME_WAIT, O = 50 otherwise held, r = 15 entries/s, T = 60 s:
    #   demand = r*T + O = 15*60 + 50 = 950 < P   -> utilization 950/1000 = 0.95, no exhaustion
    fc = forecast(1000, 200, 50, 15.0)
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
