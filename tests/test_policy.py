"""The schedule and retry policy as pure functions, with an injected clock and random source.

The last tests drive one agent through the fleet simulation (bench/fleet_load.py) and through
the real Agent.run against a real HTTP server on loopback, and compare the requests sent: the
simulation runs the shipped policy (and, for "before", the policy of commit 52a0453).
"""

import importlib.util
import random
import shutil
import subprocess

import pytest
from conftest import ROOT, Reply, ok_reply

INTERVAL = 30.0


class NoRandom:
    """A random source that must not be used."""

    def random(self):
        raise AssertionError("drew a random number")

    uniform = random


class Attempt:
    def __init__(self, ok=False, retryable=True, retry_after_s=None):
        self.ok, self.retryable, self.retry_after_s = ok, retryable, retry_after_s


@pytest.fixture(scope="module")
def fleet_load():
    spec = importlib.util.spec_from_file_location("fleet_load", str(ROOT / "bench" /
                                                                     "fleet_load.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def second_beat(agent_module, first_at, rng):
    anchor = agent_module.phase_anchor(first_at, INTERVAL, rng)
    return agent_module.next_beat_slot(anchor, INTERVAL, first_at + 0.1,
                                       agent_module.CALM_AFTER_BEATS, 0.1, rng)


# --------------------------------------------------------------------------- phase spread


def test_a_fleet_started_in_the_same_second_is_spread_evenly_from_its_second_beat(
        agent_module):
    rng = random.Random(1)
    seconds = [second_beat(agent_module, rng.uniform(0, 1), rng) for _ in range(10000)]
    assert all(15.0 <= at < 46.0 for at in seconds)
    per_second = [0] * 30
    for at in seconds:
        per_second[int(at) % 30] += 1
    even = 10000 / 30
    assert max(per_second) <= 1.25 * even
    assert min(per_second) >= 0.75 * even


def test_the_phase_is_kept_exactly_while_beats_succeed(agent_module):
    slot = 1007.25
    for _ in range(100):
        after = agent_module.next_beat_slot(slot, INTERVAL, slot + 0.3,
                                            agent_module.CALM_AFTER_BEATS, 0.1, NoRandom())
        assert after == slot + INTERVAL
        slot = after


def test_the_second_beat_is_never_caught_up_when_the_first_beat_ran_long(agent_module):
    anchor = agent_module.phase_anchor(0.0, INTERVAL, random.Random(3))
    late = agent_module.next_beat_slot(anchor, INTERVAL, 50.0, agent_module.CALM_AFTER_BEATS,
                                       0.1, random.Random(3))
    assert 50.0 < late <= 80.0


# --------------------------------------------------------------------------- budget


def test_a_calm_agent_may_retry_within_a_beat_a_failed_one_sends_one_request(agent_module):
    calm = agent_module.CALM_AFTER_BEATS
    assert agent_module.attempts_allowed(0, calm) == agent_module.MAX_ATTEMPTS_PER_BEAT == 4
    assert agent_module.attempts_allowed(1, 0) == 1
    assert agent_module.attempts_allowed(0, calm - 1) == 1  # succeeded, but not calm yet
    assert agent_module.attempts_allowed(3) == 1  # beat_once() outside run(): failures count


def test_retry_pause_ends_the_beat_at_its_budget(agent_module):
    rng = random.Random(1)
    failed = Attempt()
    pauses = [agent_module.retry_pause(failed, n, 4, 0.0, 2.0, 30.0, rng) for n in (1, 2, 3)]
    assert 0 <= pauses[0] <= 1 and 0 <= pauses[1] <= 2 and 0 <= pauses[2] <= 4
    assert agent_module.retry_pause(failed, 4, 4, 0.0, 2.0, 30.0, rng) is None
    assert agent_module.retry_pause(failed, 1, 1, 0.0, 2.0, 30.0, NoRandom()) is None
    assert agent_module.retry_pause(Attempt(ok=True), 1, 4, 0.0, 2.0, 30.0, NoRandom()) is None
    definite = Attempt(retryable=False)
    assert agent_module.retry_pause(definite, 1, 4, 0.0, 2.0, 30.0, NoRandom()) is None


def test_calm_returns_after_ten_beats_in_a_row_succeed(agent_module):
    calm = 0
    for _ in range(agent_module.CALM_AFTER_BEATS):
        assert agent_module.attempts_allowed(0, calm) == 1
        calm = agent_module.calm_after(calm, True)
    assert agent_module.attempts_allowed(0, calm) == 4
    assert agent_module.calm_after(calm, True) == agent_module.CALM_AFTER_BEATS
    assert agent_module.calm_after(calm, False) == 0


def test_a_congested_agent_spreads_its_successful_beats_within_the_offline_window(
        agent_module):
    assert agent_module.congested_stretch(30.0) == 3
    assert agent_module.congested_stretch(5.0) == 3  # never more than 3 intervals
    assert agent_module.congested_stretch(45.0) == 2
    assert agent_module.congested_stretch(60.0) == 1
    assert agent_module.congested_stretch(600.0) == 1
    after = agent_module.next_beat_slot(100.0, INTERVAL, 100.2, 1, 0.1, NoRandom())
    assert after == 190.0  # succeeded after a failure: 3 intervals on, same phase


# --------------------------------------------------------------------------- recovery


def test_a_failing_agent_is_heard_within_one_interval_of_the_servers_return(agent_module):
    rng = random.Random(5)
    beats = [1000.0]
    while beats[-1] < 1000.0 + 3600.0:
        beats.append(agent_module.next_beat_slot(beats[-1], INTERVAL, beats[-1] + 0.05, 0, 0.1,
                                                 rng))
    gaps = [b - a for a, b in zip(beats, beats[1:])]
    assert max(gaps) <= INTERVAL  # so a beat falls in every interval the server is back
    assert min(gaps) >= 0.9 * INTERVAL
    assert len(gaps) / (3600.0 / INTERVAL) <= 1.1  # requests per interval while failing


def test_the_failing_agents_order_changes_from_beat_to_beat(agent_module):
    rng = random.Random(2)
    offsets = {round(agent_module.next_beat_slot(0.0, INTERVAL, 0.05, 0, 0.1, rng), 3)
               for _ in range(20)}
    assert len(offsets) == 20 and all(27.0 <= at <= 30.0 for at in offsets)


# --------------------------------------------------------------------------- Retry-After


def test_retry_after_is_the_pause_within_a_calm_beat(agent_module):
    pause = agent_module.retry_pause(Attempt(retry_after_s=7.0), 1, 4, 0.0, 2.0, 30.0,
                                     NoRandom())
    assert pause == 7.0
    past = agent_module.retry_pause(Attempt(retry_after_s=120.0), 1, 4, 0.0, 2.0, 30.0,
                                    NoRandom())
    assert past is None  # the beat ends; the next beat waits for it


def test_retry_after_holds_back_the_next_beat_to_a_slot_after_it(agent_module):
    not_before = agent_module.retry_not_before(Attempt(retry_after_s=120.0), 100.0)
    assert not_before == 220.0
    after = agent_module.next_beat_slot(100.0, INTERVAL, 100.0, 0, 0.0, random.Random(1),
                                        not_before)
    assert after == 250.0  # the first slot after 220, on the agent's own phase


def test_a_retry_after_of_a_day_is_taken_as_ten_minutes(agent_module):
    not_before = agent_module.retry_not_before(Attempt(retry_after_s=86400.0), 100.0)
    assert not_before == 100.0 + agent_module.MAX_RETRY_AFTER_S == 700.0
    assert agent_module.retry_not_before(Attempt(ok=True, retry_after_s=9.0), 1.0) is None
    assert agent_module.retry_not_before(Attempt(), 1.0) is None


# --------------------------------------------------------------------------- no burst


def test_missed_slots_are_skipped_in_every_state(agent_module):
    for calm in (0, 1, agent_module.CALM_AFTER_BEATS):
        after = agent_module.next_beat_slot(0.0, INTERVAL, 3601.0, calm, 0.1, random.Random(1))
        assert 3601.0 < after <= 3601.0 + 3 * INTERVAL


# --------------------------------------------------------------------------- the real agent


def test_a_first_failing_beat_retries_and_later_failing_beats_send_one_request(
        server, make_agent):
    server.then(*[Reply(503, {"error": "busy"}) for _ in range(6)])
    agent = make_agent(server.url)
    assert agent.beat_once().attempts == 4
    assert agent.beat_once().attempts == 1
    assert agent.beat_once().attempts == 1
    assert agent.beat_once().ok  # the script ran out: the server answers again
    assert agent.beat_once().attempts == 1 and len(server.requests) == 8


SCRIPT = ([ok_reply()] * 3 + [Reply(503, {"error": "busy"})] * 7
          + [Reply(429, {"error": "slow"}, {"Retry-After": "100"})] + [ok_reply()] * 14
          + [Reply(503, {"error": "blip"})] + [ok_reply()] * 5)


def sim_script(fleet_load):
    answers = []
    for reply in SCRIPT:
        if reply.status == 200:
            answers.append(fleet_load.ACCEPTED)
        else:
            retry_after = reply.headers.get("Retry-After")
            answers.append(fleet_load.Answer(False, True, retry_after and float(retry_after)))

    class ScriptServer:
        def answer(self, host, now):
            return answers.pop(0) if answers else fleet_load.ACCEPTED

    return ScriptServer()


def real_request_times(module, server, clock, tmp_path, waits):
    config = {"server_id": 42, "api_url": server.url, "interval": INTERVAL, "timeout": 2.0,
              "api_token": None, "api_token_file": None, "ca_bundle": None,
              "state_file": str(tmp_path / "state.json"), "log_level": "info", "jitter": 0.1}
    server.then(*SCRIPT)
    clock.stop_after_waits = waits
    module.Agent(config, clock=clock, stop=clock, rng=random.Random(7)).run()
    return [round(r["at"], 6) for r in server.requests]


def simulated_request_times(fleet_load, policy, until):
    times = []

    class Recorder:
        inner = sim_script(fleet_load)

        def answer(self, host, now):
            times.append(round(now, 6))
            return self.inner.answer(host, now)

    policy.timeout = 2.0
    fleet_load.drive(policy, Recorder(), [1000.0], until, random.Random(7))
    return times


def test_the_simulation_sends_what_the_shipped_agent_sends(
        agent_module, fleet_load, server, clock, tmp_path):
    real = real_request_times(agent_module, server, clock, tmp_path, waits=40)
    simulated = simulated_request_times(fleet_load, fleet_load.AgentPolicy(agent_module),
                                        until=real[-1] + 0.001)
    assert len(real) >= 30
    assert simulated == real


@pytest.mark.skipif(not shutil.which("git") or subprocess.run(
    ["git", "-C", str(ROOT), "cat-file", "-e", "52a0453"], capture_output=True).returncode,
    reason="needs the git history (commit 52a0453)")
def test_the_simulation_sends_what_the_agent_of_52a0453_sent(
        fleet_load, server, clock, tmp_path):
    legacy = fleet_load.load_legacy_agent()
    real = real_request_times(legacy, server, clock, tmp_path, waits=40)
    simulated = simulated_request_times(fleet_load, fleet_load.LegacyPolicy(legacy),
                                        until=real[-1] + 0.001)
    assert len(real) >= 30
    assert simulated == real


def load_drill_bounds():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "molecule" / "resilience" / "files" / \
        "drill_bounds.py"
    spec = importlib.util.spec_from_file_location("drill_bounds", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def drill(fault_s, refused_s=20.0):
    def at(seconds):
        minutes, rest = divmod(seconds, 60)
        return f"2026-12-06T04:{int(minutes):02d}:{rest:06.3f}+00:00"
    return {"down_before": at(0), "down_after": at(0.5),
            "fault_on": {"before": at(30), "after": at(30.1)},
            "fault_off": {"before": at(30.1 + fault_s), "after": at(30.2 + fault_s)},
            "probes": {"h": {"refused": {"at": at(0.5 + refused_s)}}}}


@pytest.mark.parametrize("ok_before_fault", [0, 1])
def test_the_resilience_drill_allows_what_the_policy_allows(agent_module, ok_before_fault):
    bounds = load_drill_bounds().bounds(agent_module, drill(22.6), "h", 4.0, 0.1, "",
                                        ok_before_fault)
    low, high = bounds["fault_requests"]
    # The fresh-clone failure: a heartbeat accepted just before the fault stretched the next
    # beat (congested), and the agent sent 3 requests in 22.6 s, as its policy allows.
    assert low <= (3 if ok_before_fault else 5) <= high
    assert bounds["timeout_s"] == 2.0 and bounds["recovery_s"] == 7.0
    assert 1 <= bounds["refused_beats"][0] <= bounds["refused_beats"][1]
