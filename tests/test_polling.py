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


def test_no_poll_while_no_core_is_free_and_the_averages_are_left_alone():
    """A poll takes a core: with none free lately (`rsp.hostcores.FreeCores`), every wait sleeps, and those
    waits do not count as samples of sleeping (they say nothing about which way is cheaper)."""
    free = {"cores": 0.4}
    chooser = PollChooser(0.001, seed=1, free_cores=lambda now: free["cores"])
    assert run(chooser, 50, poll_cost=20e-6, sleep_cost=50e-6) == [False] * 50
    assert chooser.cost == {True: None, False: None}
    free["cores"] = 1.3
    ways = run(chooser, 400, poll_cost=20e-6, sleep_cost=50e-6)
    assert ways[:2] == [True, False] and chooser.polling
    free["cores"] = None  # (unknown: /proc unreadable) as without the gate
    assert run(chooser, 1, poll_cost=20e-6, sleep_cost=50e-6) in ([True], [False])


def test_free_cores_counts_idle_time_and_our_own(monkeypatch):
    from rsp import hostcores

    samples = iter([(1000, 400, 10), (1200, 450, 60)])  # 200 ticks: 50 idle, 50 ours
    monkeypatch.setattr(hostcores, "_sample", lambda: next(samples))
    monkeypatch.setattr(hostcores.os, "cpu_count", lambda: 2)
    cores = hostcores.FreeCores(interval=0.1)
    cores._cores = 2
    assert cores.free(0.0) is None  # one sample: nothing to compare yet
    assert cores.free(0.05) is None  # (not measured again within the interval)
    assert cores.free(0.2) == 2 * (50 + 50) / 200
