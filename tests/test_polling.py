"""rsp.polling.PollChooser: takes the way of waiting that cost less lately, and tries the other now and then."""

from rsp.polling import PollChooser


def wait(chooser: PollChooser, now: float, poll_cost: float, sleep_cost: float) -> tuple[bool, float]:
    """One wait that costs `poll_cost` when polled, `sleep_cost` when slept; returns (polled, end time)."""
    polled = chooser.begin(now) > now
    end = now + (poll_cost if polled else sleep_cost)
    chooser.end(end)
    return polled, end


def run(chooser: PollChooser, waits: int, poll_cost: float, sleep_cost: float) -> list[bool]:
    now, ways = 0.0, []
    for _ in range(waits):
        polled, now = wait(chooser, now, poll_cost, sleep_cost)
        ways.append(polled)
    return ways


def test_tries_each_way_first_then_polls_when_polling_pays():
    chooser = PollChooser(0.001, seed=1)
    ways = run(chooser, 400, poll_cost=20e-6, sleep_cost=50e-6)
    assert ways[:2] == [True, False]
    assert chooser.polling
    # Mostly polls; the other way about one wait in 16 (EXPLORE), never all the time.
    assert 0 < ways.count(False) - 1 < 400 // 8


def test_sleeps_when_polling_costs_more_and_comes_back_when_the_host_frees_up():
    chooser = PollChooser(0.001, seed=2)
    ways = run(chooser, 400, poll_cost=4e-3, sleep_cost=100e-6)  # a busy host: a poll costs a time slice
    assert not chooser.polling
    assert 0 < ways[2:].count(True) < 400 // 8
    ways = run(chooser, 800, poll_cost=20e-6, sleep_cost=50e-6)  # the other guests stopped
    assert chooser.polling
    assert ways[-100:].count(True) > 80


def test_a_long_wait_counts_as_at_most_longest():
    chooser = PollChooser(0.001, seed=3)
    chooser.begin(0.0)
    chooser.end(5.0)  # the guest ran five seconds before the stop
    assert chooser.cost[True] == PollChooser.LONGEST


def test_window_zero_never_polls():
    chooser = PollChooser(0.0)
    assert run(chooser, 50, poll_cost=1e-6, sleep_cost=1.0) == [False] * 50
    assert not chooser.polling
