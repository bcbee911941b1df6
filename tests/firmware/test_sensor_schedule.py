# SensorHub's sampling grid: late wake-ups must not accumulate into a lower frame rate.
from iotlib.sensors import next_deadline


def test_a_late_wake_up_shortens_the_next_wait():
    # Regression: the next sample was scheduled interval_ms after the *actual* start, so every late wake-up
    # (a busy loop, a loaded host) was lost for good and the stream ran slow.
    d = next_deadline(1000, 1030, 50)  # sampled 30 ms late against the deadline 1000
    assert d == 1050  # next deadline stays on the grid: 20 ms away, not 50


def test_on_time_samples_follow_the_grid():
    d = 0
    for _ in range(10):
        d = next_deadline(d, d, 100)
    assert d == 1000


def test_far_behind_restarts_the_grid_instead_of_bursting():
    assert next_deadline(1000, 1300, 50) == 1300  # 250 ms behind: one sample now, then a fresh grid
    assert next_deadline(1000, 1099, 50) == 1050  # less than an interval behind: catch up once
