"""The loop's schedule, on an injected clock: fixed rate, jittered, no catch-up bursts."""

import random

from conftest import Reply, ok_reply


def beat_times(server, clock_start):
    """Fake-clock times at which the server saw each beat (recorded by the handler)."""
    return [r["at"] - clock_start for r in server.requests]


def test_the_first_beat_is_immediate_then_every_interval_within_jitter(
        server, make_agent, clock):
    clock.stop_after_waits = 20
    make_agent(server.url, interval=30.0, jitter=0.1).run()
    times = beat_times(server, 1000.0)
    assert times[0] == 0
    assert len(times) == 20
    for k, at in enumerate(times[1:], start=1):
        assert abs(at - 30.0 * k) <= 3.0 + 1e-9  # slot k, jittered by at most 10 %
    offsets = {round(at - 30.0 * k, 3) for k, at in enumerate(times)}
    assert len(offsets) > 10  # each beat drew its own jitter


def test_slow_requests_do_not_drift_the_schedule(server, make_agent, clock):
    server.then(*[Reply(200, ok_reply().body, advance_clock_s=7.0) for _ in range(10)])
    clock.stop_after_waits = 10
    make_agent(server.url, interval=30.0, jitter=0.0).run()
    assert beat_times(server, 1000.0) == [30.0 * k for k in range(10)]


def test_a_long_suspend_skips_missed_beats_instead_of_bursting(server, make_agent, clock):
    # the third beat's request "takes" 10 minutes: the host was suspended
    server.then(ok_reply(), ok_reply(), Reply(200, ok_reply().body, advance_clock_s=600.0))
    clock.stop_after_waits = 5
    make_agent(server.url, interval=30.0, jitter=0.0).run()
    times = beat_times(server, 1000.0)
    assert times == [0.0, 30.0, 60.0, 690.0, 720.0]


def test_a_failing_server_keeps_the_normal_rate(server, make_agent, clock):
    server.then(*[Reply(500, {"error": "boom"}) for _ in range(200)])
    clock.stop_after_waits = 60
    agent = make_agent(server.url, interval=30.0, jitter=0.0, timeout=2.0)
    agent.rng = random.Random(1)
    agent.run()
    elapsed_s = clock.now - 1000.0
    beats = beat_times(server, 1000.0)
    assert agent.state["consecutive_failures"] >= 10
    assert len(beats) / (elapsed_s / 30.0) <= 4  # at most 4 requests per interval, ever


def test_next_slot_skips_every_missed_slot(agent_module):
    assert agent_module.next_slot_after(0.0, 30.0, 0.0) == 30.0
    assert agent_module.next_slot_after(0.0, 30.0, 29.9) == 30.0
    assert agent_module.next_slot_after(0.0, 30.0, 30.0) == 60.0
    assert agent_module.next_slot_after(0.0, 30.0, 3601.0) == 3630.0
