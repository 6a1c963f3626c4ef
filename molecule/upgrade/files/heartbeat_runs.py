#!/usr/bin/env python3
"""Summarise one host's heartbeats as the receiver recorded them (JSON list on stdin).

Prints JSON: "versions", the agent versions in the order they were heard with repeats
folded ("1.1.0", "1.2.0"; two agents beating at once would show as "1.1.0", "1.2.0",
"1.1.0", ...), and "max_gap_s", the longest silence between two heartbeats received
before the time given as the only argument (ISO 8601), with when it began.
"""

import datetime
import json
import sys


def parse(moment):
    return datetime.datetime.fromisoformat(moment)


def summarise(records, until):
    records = sorted(records, key=lambda record: parse(record["time"]))
    versions = []
    for record in records:
        if not versions or versions[-1] != record["agent_version"]:
            versions.append(record["agent_version"])
    times = [parse(record["time"]) for record in records if parse(record["time"]) <= until]
    gaps = [((later - earlier).total_seconds(), earlier.isoformat())
            for earlier, later in zip(times, times[1:])]
    longest = max(gaps, default=(0.0, None))
    return {"versions": versions, "max_gap_s": round(longest[0], 3), "max_gap_after": longest[1]}


if __name__ == "__main__":
    print(json.dumps(summarise(json.load(sys.stdin), parse(sys.argv[1]))))
