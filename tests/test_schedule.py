"""The loop's schedule, on an injected clock: its own phase, fixed rate, no catch-up bursts."""

import random

from conftest import Reply, ok_reply


def beat_times(server, clock_start):
    """Fake-clock times at which the server saw each beat (recorded by the handler)."""
    return [r["at"] - clock_start for r in server.requests]


def test_the_first_beat_is_immediate_then_every_interval_on_the_agents_own_phase(
        server, make_agent, clock):
    clock.stop_after_waits = 20
    make_agent(server.url, interval=30.0, jitter=0.1).run()
    times = beat_times(server, 1000.0)
    assert times[0] == 0
    assert len(times) == 20
    assert 15.0 <= times[1] < 45.0  # the phase: 0.5 to 1.5 intervals after the first beat
    for k, at in enumerate(times[1:]):
        assert abs(at - (times[1] + 30.0 * k)) < 1e-6  # beats that succeed keep the phase


def test_agents_started_together_settle_on_different_phases(server, make_agent, clock):
    second_beats = set()
    for seed in range(5):
        clock.now, clock.waits, clock._stopped = 1000.0, [], False
        clock.stop_after_waits = 2
        agent = make_agent(server.url, interval=30.0)
        agent.rng = random.Random(seed)
        agent.run()
        second_beats.add(round(server.requests[-1]["at"], 3))
    assert len(second_beats) == 5


def test_slow_requests_do_not_drift_the_schedule(server, make_agent, clock):
    server.then(*[Reply(200, ok_reply().body, advance_clock_s=7.0) for _ in range(10)])
    clock.stop_after_waits = 10
    make_agent(server.url, interval=30.0, jitter=0.0).run()
    times = beat_times(server, 1000.0)
    assert [round(at - times[1], 6) for at in times[1:]] == [30.0 * k for k in range(9)]


def test_a_long_suspend_skips_missed_beats_instead_of_bursting(server, make_agent, clock):
    # the third beat's request "takes" 10 minutes: the host was suspended
    server.then(ok_reply(), ok_reply(), Reply(200, ok_reply().body, advance_clock_s=600.0))
    clock.stop_after_waits = 5
    make_agent(server.url, interval=30.0, jitter=0.0).run()
    times = beat_times(server, 1000.0)
    phase = times[1]
    assert [round(at - phase, 6) for at in times[1:]] == [0.0, 30.0, 660.0, 690.0]


def test_a_failing_server_gets_one_request_per_beat_after_the_first_failed_beat(
        server, make_agent, clock):
    server.then(*[Reply(500, {"error": "boom"}) for _ in range(200)])
    clock.stop_after_waits = 60
    agent = make_agent(server.url, interval=30.0, jitter=0.1, timeout=2.0)
    agent.rng = random.Random(1)
    agent.run()
    times = beat_times(server, 1000.0)
    first_beat = [at for at in times if at < 8.0]  # its retries wait <= 1 + 2 + 4 s
    later = times[len(first_beat):]
    assert len(first_beat) == 4  # the first failing beat still retries (a blip)
    assert agent.state["consecutive_failures"] >= 30
    gaps = [b - a for a, b in zip(later, later[1:])]
    assert all(27.0 - 1e-6 <= gap <= 30.0 + 1e-6 for gap in gaps)  # one per beat, <= 1 interval


def test_a_retry_after_holds_back_the_next_beat_to_a_slot_of_the_agents_phase(
        server, make_agent, clock):
    server.then(ok_reply(), ok_reply(), Reply(503, {"error": "busy"}, {"Retry-After": "100"}))
    clock.stop_after_waits = 4
    make_agent(server.url, interval=30.0, jitter=0.1).run()
    times = beat_times(server, 1000.0)
    assert len(times) == 4  # the 503's Retry-After does not fit in the beat: no retry
    assert times[3] - times[2] >= 100.0
    assert times[3] - times[2] < 130.0  # the first slot after it


def test_next_slot_skips_every_missed_slot(agent_module):
    assert agent_module.next_slot_after(0.0, 30.0, 0.0) == 30.0
    assert agent_module.next_slot_after(0.0, 30.0, 29.9) == 30.0
    assert agent_module.next_slot_after(0.0, 30.0, 30.0) == 60.0
    assert agent_module.next_slot_after(0.0, 30.0, 3601.0) == 3630.0
