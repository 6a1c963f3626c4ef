#!/usr/bin/env python3
"""The counts and times the resilience drill may see, derived from the agent's own policy.

    drill_bounds.py AGENT_PY RESILIENCE_JSON HOST INTERVAL JITTER TIMEOUT OK_BEFORE_FAULT

prints a JSON object of bounds for one host (TIMEOUT may be "" for the agent's default;
OK_BEFORE_FAULT is how many heartbeats the restarted receiver accepted before the fault was
on). The agent file is loaded by path, so the bounds follow its policy functions
(congested_stretch, default_timeout, the jitter) instead of numbers written into YAML.
"""

import importlib.util
import json
import math
import sys
from datetime import datetime

SLACK_S = 0.5  # the controller's measurement and the request itself


def load_agent(path):
    spec = importlib.util.spec_from_file_location("heartbeat_agent", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seconds(start, end):
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def beats_at_least(window_s, first_within_s, interval):
    """Beats certain to fall in a window: the first within first_within_s, then at most an
    interval apart."""
    return max(0, math.floor((window_s - first_within_s - SLACK_S) / interval) + 1)


def beats_at_most(window_s, interval, jitter):
    """Beats that can fall in a window: a failing agent's beats are at least (1 - jitter)
    intervals apart."""
    return math.floor((window_s + SLACK_S) / (interval * (1 - jitter))) + 1


def bounds(agent, drill, host, interval, jitter, timeout, ok_before_fault):
    env = {"STACKSENSE_API_URL": "http://x.invalid", "STACKSENSE_SERVER_ID": "1",
           "STACKSENSE_INTERVAL": str(interval), "STACKSENSE_JITTER": str(jitter),
           "STACKSENSE_TIMEOUT": timeout}
    timeout_s = agent.derived_settings(env)["timeout"]
    probes = drill["probes"][host]
    # Refused: healthy before, on its fixed schedule: a beat within an interval of the cut,
    # which may retry until the next slot; then failing beats at most an interval apart. Each
    # beat counts one failure when it ends.
    refused_narrow = seconds(drill["down_after"], probes["refused"]["at"])
    refused_wide = seconds(drill["down_before"], probes["refused"]["at"])
    # 500: one request per beat (the agent is already failing). A heartbeat the restarted
    # receiver accepted just before the fault makes the agent congested: its next beat comes
    # congested_stretch() intervals later.
    lead_s = interval * (agent.congested_stretch(interval) if ok_before_fault else 1)
    fault_narrow = seconds(drill["fault_on"]["after"], drill["fault_off"]["before"])
    fault_wide = seconds(drill["fault_on"]["before"], drill["fault_off"]["after"])
    return {
        "timeout_s": timeout_s,
        "refused_beats": [beats_at_least(refused_narrow, 2 * interval, interval),
                          beats_at_most(refused_wide, interval, jitter)],
        "fault_requests": [beats_at_least(fault_narrow, lead_s, interval),
                           beats_at_most(fault_wide, interval, jitter)],
        "fault_s": round(fault_wide, 3),
        "fault_lead_s": lead_s,
        # Failing beats are at most an interval apart; the first after the fault is lifted
        # is accepted at once (the timeout: in case it met the last moment of the fault).
        "recovery_s": interval + timeout_s + 1.0,
    }


def main(agent_path, drill_path, host, interval, jitter, timeout, ok_before_fault):
    with open(drill_path) as drill_file:
        drill = json.load(drill_file)
    print(json.dumps(bounds(load_agent(agent_path), drill, host, float(interval), float(jitter),
                            timeout, int(ok_before_fault))))


if __name__ == "__main__":
    main(*sys.argv[1:])
