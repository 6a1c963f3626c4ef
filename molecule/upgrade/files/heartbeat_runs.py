#!/usr/bin/env python3
"""Summarise one host's heartbeats as the receiver recorded them (JSON list on stdin).

    heartbeat_runs.py UNTIL INTERVAL_S [FAILED_FROM FAILED_TO] < heartbeats.json

Moments are ISO 8601; one without an offset is UTC, like the receiver's times. Prints JSON:
- "versions": the agent versions in the order they were heard, repeats folded ("1.1.0",
  "1.2.0"; two agents beating at once would show as "1.1.0", "1.2.0", "1.1.0", ...);
- "max_gap_s": the longest silence between two heartbeats received before UNTIL, leaving
  out the silence of a failed deploy that ran from FAILED_FROM to FAILED_TO (the new agent
  failed and the old one was started again), with when it began;
- "failed_gap_s": that failed deploy's longest silence, and "failed_s" how long it ran
  (both 0 without one);
- "long_gaps": every silence clearly longer than one interval (by over NOISE_S) before
  UNTIL, with the versions heard on either side, so that a run's output shows which move or
  restart each belongs to.
"""

import datetime
import json
import sys

NOISE_S = 0.5  # the receiver's clock sees each beat late by the request's latency, milliseconds


def parse(moment):
    """A moment in ISO 8601; one without an offset (as side_effect.yml writes) is UTC."""
    parsed = datetime.datetime.fromisoformat(moment)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.timezone.utc)


def silences(records, until):
    """Each silence between two heartbeats received before `until`, oldest first."""
    heard = sorted((parse(record["time"]), record["agent_version"]) for record in records)
    heard = [beat for beat in heard if beat[0] <= until]
    return [{"s": round((later - earlier).total_seconds(), 3), "began": earlier, "ended": later,
             "from": before, "to": after}
            for (earlier, before), (later, after) in zip(heard, heard[1:])]


def summarise(records, until, interval_s, failed=None):
    versions = []
    for record in sorted(records, key=lambda record: parse(record["time"])):
        if not versions or versions[-1] != record["agent_version"]:
            versions.append(record["agent_version"])
    gaps = silences(records, until)
    in_failed = [gap for gap in gaps
                 if failed and gap["began"] < failed[1] and gap["ended"] > failed[0]]
    others = [gap for gap in gaps if gap not in in_failed]
    longest = max(others, key=lambda gap: gap["s"], default={"s": 0.0, "began": None})
    return {"versions": versions, "max_gap_s": longest["s"],
            "max_gap_began": longest["began"] and longest["began"].isoformat(),
            "failed_gap_s": max((gap["s"] for gap in in_failed), default=0.0),
            "failed_s": round((failed[1] - failed[0]).total_seconds(), 3) if failed else 0.0,
            "long_gaps": [{"s": gap["s"], "began": gap["began"].isoformat(),
                           "from": gap["from"], "to": gap["to"]}
                          for gap in gaps if gap["s"] > interval_s + NOISE_S]}


if __name__ == "__main__":
    failed_window = tuple(map(parse, sys.argv[3:5])) if len(sys.argv) > 4 else None
    print(json.dumps(summarise(json.load(sys.stdin), parse(sys.argv[1]), float(sys.argv[2]),
                               failed_window)))
