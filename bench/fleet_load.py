#!/usr/bin/env python3
"""Fleet load: 10,000 simulated agents against one simulated server, before and after.

Each simulated agent is driven by the policy functions of a real agent file: "after" imports
agent/heartbeat_agent.py (phase_anchor, next_beat_slot, calm_after, attempts_allowed,
retry_pause, retry_not_before, next_slot_after), "before" loads the agent of commit 52a0453
from `git show` at run time (next_slot_after, jitter_offset and the retry constants; its
retry loop lived inside Agent.with_retries, so LegacyPolicy follows that method line by
line). tests/test_policy.py checks that one simulated agent sends exactly the requests the
real old and new Agent.run send, on a fake clock against the same answers.

The clock is simulated (a heap of events, no sleeping); requests take no time; the server
answers from its state at that moment:
  up        every heartbeat is accepted
  down      connection refused (retryable, no Retry-After)
  capacity  SERVER_WORKERS workers serving CAPACITY heartbeats per second between them
            (exponential service times); a request that finds every worker busy gets a 503
            (retryable, no Retry-After). A 503 costs the server nothing here, which flatters
            the old policy: its retry storm does not slow the server down.
Scenarios: steady state; the whole fleet restarting within 2 s; a 10-minute outage and
recovery; 30 minutes at half capacity. Agents of the other scenarios started at random
times 300 s before t=0 (steady state by t=0). The server shows a host offline after
OFFLINE_AFTER_S (180 s) without a heartbeat; a host counts as "wrongly offline" when that happens
while the server is up (the offline clock restarts when the server comes back).

    .venv/bin/pip install -r bench/requirements.txt      # matplotlib, for the plots
    .venv/bin/python bench/fleet_load.py                 # table + docs/fleet_load_*.png
    .venv/bin/python bench/fleet_load.py --agents 2000 --no-plots --scenarios outage
"""

import argparse
import heapq
import importlib.util
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections import namedtuple
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AGENT_PATH = ROOT / "agent" / "heartbeat_agent.py"
LEGACY_COMMIT = "52a0453"
DOCS = ROOT / "docs"

INTERVAL_S = 30.0
TIMEOUT_S = 10.0
JITTER = 0.1
OFFLINE_AFTER_S = 180.0
WARMUP_S = 300.0
SERVER_WORKERS = 50

# What a simulated server answers; the policies read only these three fields of an Attempt.
Answer = namedtuple("Answer", "ok retryable retry_after_s")
ACCEPTED = Answer(True, False, None)
REFUSED = Answer(False, True, None)
BUSY = Answer(False, True, None)


def load_module(name, path=None, source=None):
    """Import an agent file (or its source text) as a module of its own."""
    if source is not None:
        handle, temp_path = tempfile.mkstemp(prefix=name + "-", suffix=".py")
        with os.fdopen(handle, "w") as temp_file:
            temp_file.write(source)
        path = temp_path
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        if source is not None:
            os.unlink(path)
    return module


def load_legacy_agent(commit=LEGACY_COMMIT):
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:agent/heartbeat_agent.py"],
                            check=True, capture_output=True, text=True).stdout
    return load_module("heartbeat_agent_" + commit, source=source)


# --------------------------------------------------------------------------- policies


class Host:
    """One simulated agent's state: what Agent.run and with_retries keep between calls."""

    __slots__ = ("attempts", "budget", "calm_beats", "failures", "first", "give_up_at",
                 "not_before", "slot")

    def __init__(self, started_at, calm_beats):
        self.slot = started_at
        self.first = True
        self.failures = 0  # consecutive failed beats (state["consecutive_failures"])
        self.calm_beats = calm_beats
        self.attempts = 0
        self.budget = None
        self.give_up_at = None
        self.not_before = None


class AgentPolicy:
    """The shipped agent: calls its policy functions exactly as Agent.run/with_retries do."""

    label = "after"

    def __init__(self, agent, interval=INTERVAL_S, timeout=TIMEOUT_S, jitter=JITTER):
        self.agent, self.interval, self.timeout, self.jitter = agent, interval, timeout, jitter

    def new_host(self, started_at):
        return Host(started_at, self.agent.CALM_AFTER_BEATS)

    def start_beat(self, host, now):
        host.give_up_at = self.agent.next_slot_after(host.slot, self.interval, now)
        host.budget = self.agent.attempts_allowed(host.failures, host.calm_beats)

    def retry_pause(self, host, answer, now, rng):
        host.not_before = self.agent.retry_not_before(answer, now)
        return self.agent.retry_pause(answer, host.attempts, host.budget, now, self.timeout,
                                      host.give_up_at, rng)

    def next_beat_at(self, host, ok, now, rng):
        agent = self.agent
        host.calm_beats = agent.calm_after(host.calm_beats, ok)
        if host.first:
            host.slot, host.first = agent.phase_anchor(host.slot, self.interval, rng), False
        host.slot = agent.next_beat_slot(host.slot, self.interval, now, host.calm_beats,
                                         self.jitter, rng, host.not_before)
        return host.slot


class LegacyPolicy(AgentPolicy):
    """The agent of 52a0453: its functions and constants; its loops followed line by line."""

    label = "before"

    def new_host(self, started_at):
        return Host(started_at, None)

    def start_beat(self, host, now):
        host.give_up_at = self.agent.next_slot_after(host.slot, self.interval, now)

    def retry_pause(self, host, answer, now, rng):
        old = self.agent  # Agent.with_retries of 52a0453, after `attempts += 1`:
        if answer.ok or not answer.retryable or host.attempts >= old.MAX_ATTEMPTS_PER_BEAT:
            return None
        backoff = min(old.BACKOFF_CAP_S, old.BACKOFF_BASE_S * 2 ** (host.attempts - 1))
        pause = rng.uniform(0, backoff)
        if answer.retry_after_s is not None:
            pause = answer.retry_after_s
        if now + pause + self.timeout > host.give_up_at:
            return None
        return pause

    def next_beat_at(self, host, ok, now, rng):
        old = self.agent  # Agent.run of 52a0453, after beat_once():
        host.slot = old.next_slot_after(host.slot, self.interval, now)
        return host.slot + old.jitter_offset(rng, self.interval, self.jitter)


def drive(policy, server, start_times, until, rng):
    """Run every host from its start time until `until`, on one event heap.

    Per host, the same calls in the same order as the real loop: a beat is one or more
    attempts (policy.retry_pause after each), then policy.next_beat_at.
    """
    hosts = [policy.new_host(at) for at in start_times]
    events = [(at, index, True) for index, at in enumerate(start_times)]
    heapq.heapify(events)
    pop, push = heapq.heappop, heapq.heappush
    while events:
        now, index, new_beat = pop(events)
        if now >= until:
            break
        host = hosts[index]
        if new_beat:
            host.attempts = 0
            policy.start_beat(host, now)
        answer = server.answer(index, now)
        host.attempts += 1
        pause = policy.retry_pause(host, answer, now, rng)
        if pause is not None:
            push(events, (now + pause, index, False))
            continue
        host.failures = 0 if answer.ok else host.failures + 1
        push(events, (policy.next_beat_at(host, answer.ok, now, rng), index, True))
    return hosts


# --------------------------------------------------------------------------- the server


class Server:
    """Answers by its state at `now` and records what the fleet did to it.

    `spells` is a list of (start, end, state, capacity per second); outside them it is up.
    """

    def __init__(self, hosts, spells=(), seed=0):
        self.spells = list(spells)
        self.request_times = []
        self.last_heard = [None] * hosts
        self.wrongly_offline = set()
        self.up_since = float("-inf")  # when it last came back from "down"
        self.busy_until = []  # when each busy worker is done (capacity states)
        self.service_rng = random.Random(seed)
        self.first_heard_after = {}  # spell end -> {host: first acceptance after it}

    def state_at(self, now):
        for start, end, state, capacity in self.spells:
            if start <= now < end:
                return state, capacity
        return "up", None

    def answer(self, host, now):
        self.request_times.append(now)
        state, capacity = self.state_at(now)
        if state == "down":
            self.up_since = None
            return REFUSED
        if self.up_since is None:
            self.up_since = now
        if state == "capacity" and not self.admit(now, capacity):
            return BUSY
        self.hear(host, now)
        return ACCEPTED

    def admit(self, now, capacity):
        """A pool of SERVER_WORKERS, each busy for an exponential time (mean workers/capacity)
        per heartbeat it serves: a request that finds them all busy gets a 503 (which costs
        nothing). The random service times make who gets in random, as on a real server."""
        busy = self.busy_until
        while busy and busy[0] <= now:
            heapq.heappop(busy)
        if len(busy) >= SERVER_WORKERS:
            return False
        heapq.heappush(busy, now + self.service_rng.expovariate(capacity / SERVER_WORKERS))
        return True

    def hear(self, host, now):
        since = self.last_heard[host]
        if since is not None and now - max(since, self.up_since) > OFFLINE_AFTER_S:
            self.wrongly_offline.add(host)
        self.last_heard[host] = now
        for end, heard in self.first_heard_after.items():
            if now >= end and host not in heard:
                heard[host] = now

    def watch_recovery(self, at):
        self.first_heard_after[at] = {}

    def finish(self, until):
        for host, since in enumerate(self.last_heard):
            if since is None or until - max(since, self.up_since or until) > OFFLINE_AFTER_S:
                self.wrongly_offline.add(host)


# --------------------------------------------------------------------------- scenarios

Scenario = namedtuple("Scenario", "name title until spells measure_from recovery_at")


def scenarios(agents):
    even = agents / INTERVAL_S
    return [
        Scenario("steady", "steady state", 600.0, [], 0.0, None),
        Scenario("restart", "whole fleet restarting within 2 s", 600.0, [], INTERVAL_S, None),
        Scenario("outage", "10-minute outage", 960.0, [(60.0, 660.0, "down", None)], 0.0,
                 660.0),
        Scenario("half", "30 minutes at half capacity", 2160.0,
                 [(60.0, 1860.0, "capacity", even / 2)], 0.0, 1860.0),
    ]


def start_times(scenario, agents, rng):
    if scenario.name == "restart":
        return sorted(rng.uniform(0.0, 2.0) for _ in range(agents))
    return sorted(rng.uniform(-WARMUP_S, 0.0) for _ in range(agents))


def run_scenario(policy, scenario, agents, seed):
    rng = random.Random(seed)
    server = Server(agents, scenario.spells, seed)
    if scenario.recovery_at is not None:
        server.watch_recovery(scenario.recovery_at)
    started = time.perf_counter()
    drive(policy, server, start_times(scenario, agents, rng), scenario.until, rng)
    server.finish(scenario.until)
    result = measure(server, scenario, agents)
    result["policy"], result["scenario"] = policy.label, scenario.name
    result["cpu_s"] = time.perf_counter() - started
    return result, server.request_times


def peak_per_second(times, start, end):
    """The most requests in any 1-second window [t, t + 1) within [start, end)."""
    times = sorted(t for t in times if start <= t < end)
    peak, low = 0, 0
    for high, at in enumerate(times):
        while times[low] <= at - 1.0:
            low += 1
        peak = max(peak, high - low + 1)
    return peak


def measure(server, scenario, agents):
    even = agents / INTERVAL_S
    times = server.request_times
    result = {"requests": sum(1 for t in times if t >= 0.0),
              "peak": peak_per_second(times, scenario.measure_from, scenario.until) / even,
              "wrongly_offline": len(server.wrongly_offline)}
    if scenario.spells:
        start, end = scenario.spells[0][0], scenario.spells[0][1]
        during = sum(1 for t in times if start + INTERVAL_S <= t < end)
        result["per_host_interval"] = during / agents / ((end - start - INTERVAL_S) / INTERVAL_S)
    if scenario.recovery_at is not None:
        heard = server.first_heard_after[scenario.recovery_at]
        result["all_heard_s"] = (max(heard.values()) - scenario.recovery_at
                                 if len(heard) == agents else float("inf"))
        result["peak_after"] = peak_per_second(times, scenario.recovery_at,
                                               scenario.until) / even
    return result


# --------------------------------------------------------------------------- report


def table(results, agents):
    lines = [
        f"N = {agents} agents, interval {INTERVAL_S:g} s: even rate {agents / INTERVAL_S:.0f}/s",
        "",
        "| scenario | policy | peak 1-s / even | peak after the spell | req/host/interval in "
        "spell | every host heard after spell (s) | wrongly offline | requests |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        lines.append("| {} | {} | {:.2f} | {} | {} | {} | {} | {} |".format(
            result["scenario"], result["policy"], result["peak"],
            shown(result, "peak_after", "{:.2f}"), shown(result, "per_host_interval", "{:.2f}"),
            shown(result, "all_heard_s", "{:.2f}"), result["wrongly_offline"],
            result["requests"]))
    return "\n".join(lines)


def shown(result, key, form):
    return "-" if result.get(key) is None else form.format(result[key])


def plot(scenario, traces, agents, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(traces), 1, figsize=(10, 2.6 * len(traces)), sharex=True,
                                sharey=True, squeeze=False)
    even = agents / INTERVAL_S
    for axis, (label, times) in zip(axes[:, 0], traces):
        counts = [0] * int(scenario.until)
        for at in times:
            if 0.0 <= at < scenario.until:
                counts[int(at)] += 1
        axis.plot(range(len(counts)), counts, linewidth=0.6)
        axis.axhline(even, color="grey", linestyle="--", linewidth=0.8)
        axis.axhline(1.25 * even, color="red", linestyle=":", linewidth=0.8)
        for start, end, _, capacity in scenario.spells:
            axis.axvspan(start, end, color="orange", alpha=0.12)
            if capacity:
                axis.hlines(capacity, start, end, color="green", linewidth=0.8)
        axis.set_ylabel("requests / s")
        axis.set_title(f"{label}: {scenario.title}", fontsize=10)
    axes[-1, 0].set_xlabel("simulated seconds (dashed: even rate N/interval; dotted: 1.25x; "
                           "shaded: the spell; green: the server's capacity)")
    figure.tight_layout()
    figure.savefig(str(path), dpi=90)
    plt.close(figure)


def describe_run(args):
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "agent", "bench"],
                           capture_output=True, text=True).stdout.strip()
    return "{} | Python {} | {} CPUs | commit {}{} | seed {}".format(
        datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), platform.python_version(),
        os.cpu_count(), commit, " (modified)" if dirty else "", args.seed)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scenarios", nargs="+", default=["steady", "restart", "outage", "half"])
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--plot-dir", default=str(DOCS))
    args = parser.parse_args(argv)
    policies = [LegacyPolicy(load_legacy_agent()), AgentPolicy(load_module("heartbeat_agent",
                                                                           AGENT_PATH))]
    results = []
    print(describe_run(args))
    for scenario in scenarios(args.agents):
        if scenario.name not in args.scenarios:
            continue
        traces = []
        for policy in policies:
            result, times = run_scenario(policy, scenario, args.agents, args.seed)
            results.append(result)
            traces.append((policy.label, times))
            print(f"  {scenario.name:8} {policy.label:6} {result['cpu_s']:5.1f} s",
                  file=sys.stderr)
        if not args.no_plots:
            plot(scenario, traces, args.agents,
                 Path(args.plot_dir) / f"fleet_load_{scenario.name}.png")
    print(table(results, args.agents))
    return 0


if __name__ == "__main__":
    sys.exit(main())
