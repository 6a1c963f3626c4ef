"""What happened to each host of a rollout (playbooks/deploy.yml), in plain Python.

deploy.yml notes the outcome of a host whose role failed (rollout_failed, in its rescue); at
the end of each batch one task on the controller (rollout_batch) gives every host of the batch
its outcome (that one, or rollout_unreachable, rollout_done) and checks the batch against the
share of hosts that may be skipped (rollout_batch_verdict); it prints one summary at the end or
at the stop (rollout_records, rollout_report; written as JSON with -e
stacksense_deploy_report=PATH). The decisions are here, so that a plain pytest
(tests/test_rollout.py) checks them on any number of synthetic hosts.

A host problem is not a version problem:
- unreachable, refused (preflight), broken (packages, dpkg lock, disk: the host failed before
  the new agent ran): the host is skipped, left as it was, and the rollout goes on;
- rolled back, or failed when there was nothing to roll back to (the new agent did not start
  or was not heard: the version is bad): the rollout stops after this batch.
A host where StackSense's push agent runs is left alone by the role (it ends the host's play
and says why in __stacksense_push_agent_left_alone): neither skipped nor failed.
"""

import re

DOCUMENTATION = r"""
name: rollout_report
short_description: The summary of a rollout of deploy.yml, per host and in counts
description:
  - From each host's outcome record (C(rollout_records)), the counts, the hosts grouped by
    outcome and reason, each reason said once, and the lines to print; readable at 1,000 hosts
    (hosts that need nothing more are counted, and named only in the JSON report past 50).
  - The same file holds the filters that make the records and judge a batch
    (C(rollout_unreachable), C(rollout_failed), C(rollout_done), C(rollout_batch_verdict),
    C(rollout_batch), C(rollout_records)); C(playbooks/deploy.yml) is their one user.
positional: _input, stopped
options:
  _input:
    description: Each host's outcome record by host name, as C(rollout_records) makes it.
    type: dict
    required: true
  stopped:
    description: Why the rollout stopped (C(rollout_batch_verdict)), empty when it did not.
    type: str
    default: ""
version_added: 1.2.0
author: StackSense
"""

EXAMPLES = r"""
report: >-
  {{ ansible_play_hosts_all | stacksense.fleet.rollout_records(hostvars, ansible_play_hosts)
     | stacksense.fleet.rollout_report(stop_reason) }}
"""

RETURN = r"""
_value:
  description: >-
    C(counts) per outcome, C(stopped), C(hosts) (each host's outcome and reason),
    C(incomplete) (the hosts that do not run the new agent and were not left alone) and
    C(summary), the lines to print.
  type: dict
"""

# The role's steps (tags of roles/stacksense_agent/tasks/main.yml) in which a failure means
# the new agent itself failed, and the one in which it means the host was refused.
VERSION_STEPS = ("stacksense_service", "stacksense_verify")
REFUSAL_STEPS = ("stacksense_preflight",)

# The outcomes, in the order the summary lists them.
LEFT_ALONE = "left alone (push agent)"
OUTCOMES = ("deployed", "unchanged", LEFT_ALONE, "unreachable", "refused", "broken",
            "rolled back", "failed", "lost", "not attempted")
# Outcomes after which a host needs nothing more from this rollout.
FINISHED = ("deployed", "unchanged", LEFT_ALONE)
SKIPPED = ("unreachable", "refused", "broken")
VERSION_FAILURES = ("rolled back", "failed")
SSH_ADDRESS = re.compile(r"(connect to host )\S+( port \d+)")
REASON_LENGTH = 300
# Hosts that need nothing more (deployed, unchanged, not attempted) are named in the printed
# summary up to this many; beyond, only in the JSON report. Every other host is always named.
LISTED = 50
LOST = "unreachable or failed during the run (see above)"


def _one_line(text, host=""):
    """The first line of a message, without the "host: " the role puts in front, bounded, and
    without a colon left at its end by an empty detail (apt's "after 5 retries: ")."""
    line = " ".join(str(text or "").split()).rstrip(":")
    if line.startswith("Task failed: "):  # ansible-core's prefix of every task error
        line = line[len("Task failed: "):]
    if host and line.startswith(f"{host}: "):
        line = line[len(host) + 2:]
    if len(line) > REASON_LENGTH:
        line = line[:REASON_LENGTH - 3] + "..."
    return line or "no message"


def rollout_unreachable(result, host=""):
    """The outcome of a host the play could not reach or run a command on (its first task's
    result: unreachable over SSH, or failed, e.g. a stopped container's connection)."""
    result = result or {}
    text = result.get("msg")
    if not result.get("unreachable") and (result.get("stderr") or "").strip():
        text = result["stderr"].strip().splitlines()[0]
    return {"outcome": "unreachable", "reason": _one_line(text, host)}


def rollout_failed(task, result, host=""):
    """The outcome of a host whose role failed: ansible_failed_task and ansible_failed_result."""
    task = task or {}
    result = result or {}
    tags = task.get("tags") or []
    reason = _one_line(result.get("msg"), host)
    if result.get("unreachable"):
        outcome = "unreachable"
    elif any(tag in VERSION_STEPS for tag in tags):
        # The whole message: the rollback note follows the agent's last error, which may be
        # a server's whole error page, past the reason's bound.
        whole = " ".join(str(result.get("msg") or "").split())
        outcome = "rolled back" if "rolled back to agent" in whole else "failed"
    elif any(tag in REFUSAL_STEPS for tag in tags):
        outcome = "refused"
    else:
        outcome = "broken"
        reason = _one_line(f"{task.get('name') or 'a task'} failed: {reason}")
    return {"outcome": outcome, "reason": reason}


def verified_version(probe):
    """The agent version the role's verification saw (registered __stacksense_probe, the
    result of plugins/action/agent_heartbeat.py), '' without one (check mode,
    stacksense_verify off, a failed wait)."""
    return str(probe.get("agent_version") or "") if isinstance(probe, dict) else ""


def rollout_done(changes, probe=None, check_mode=False):
    """The outcome of a host the role went through: deployed when it changed anything.
    probe: the role's last verification probe (verified_version reads the version from it)."""
    changed = any(isinstance(r, dict) and r.get("changed") for r in changes or [])
    version = verified_version(probe)
    agent = f"agent {version}" if version else "the agent"
    if changed and check_mode:
        return {"outcome": "deployed", "reason": f"check mode: would deploy {agent}"}
    if changed:
        return {"outcome": "deployed", "reason": f"{agent} verified" if version else "deployed"}
    return {"outcome": "unchanged", "reason": f"{agent} already running" if version else ""}


def _percent(value):
    try:
        percent = float(str(value).strip().rstrip("%"))
    except ValueError:
        percent = float("nan")  # refused below, with the same message
    if not 0 <= percent <= 100:
        raise ValueError(
            f"stacksense_max_skipped_percent is {value!r}, expected a number from 0 to 100. "
            "Fix: set it, e.g. 25.")
    return percent


def rollout_batch_verdict(outcomes, max_skipped_percent):
    """Why the rollout must stop after this batch ('' when it goes on).

    outcomes: the outcome records of the batch's hosts. The rollout stops when a host's new
    agent failed (a bad version), or when more than max_skipped_percent of the batch, and more
    than one host, was skipped (a network-wide or fleet-wide problem rather than a host's):
    one host down never stops a rollout, not even the canary.
    """
    percent = _percent(max_skipped_percent)
    outcomes = [o or {} for o in outcomes or []]
    bad = [o for o in outcomes if o.get("outcome") in VERSION_FAILURES]
    if bad:
        return (f"the new agent failed on {len(bad)} host(s) of this batch (a bad version, not a "
                "bad host), so no further batch was started")
    skipped = [o for o in outcomes if o.get("outcome") in SKIPPED]
    if len(skipped) > 1 and len(skipped) * 100 > percent * len(outcomes):
        return (f"{len(skipped)} of the {len(outcomes)} hosts of this batch were skipped "
                f"(unreachable, refused or broken), more than stacksense_max_skipped_percent "
                f"({percent:g} %): a problem of the network or of the settings rather than of "
                "single hosts, so no further batch was started")
    return ""


def host_outcome(host, host_vars, check_mode=False):
    """The outcome of one host of a batch, from deploy.yml's per-host results: what its rescue
    noted (__stacksense_outcome), else unreachable when its first command failed
    (__stacksense_login_uid), else what the role did (rollout_done)."""
    noted = host_vars.get("__stacksense_outcome")
    if noted:
        return dict(noted)
    login = host_vars.get("__stacksense_login_uid") or {}
    if login.get("rc", 1) != 0:
        return rollout_unreachable(login, host)
    changes = [host_vars.get(name) or {} for name in
               ("__stacksense_files", "__stacksense_cron_template", "__stacksense_pip",
                "__stacksense_restart_stale")]
    return rollout_done(changes, host_vars.get("__stacksense_probe") or {}, check_mode)


def rollout_batch(hostvars, batch, max_skipped_percent, check_mode=False):
    """Every host of the batch with its outcome, and why the rollout stops after it:
    {"outcomes": {host: record}, "stop": rollout_batch_verdict(...), '' when it goes on}.
    One task on the controller (run_once) instead of one per host."""
    outcomes = {host: host_outcome(host, hostvars[host], check_mode) for host in batch or []}
    return {"outcomes": outcomes,
            "stop": rollout_batch_verdict(list(outcomes.values()), max_skipped_percent)}


def rollout_records(all_hosts, hostvars, active_hosts):
    """{host: outcome record} for every host of the play, from deploy.yml's facts: each
    batch's outcomes (__stacksense_batch, set on every host of the batch).

    A host the role left alone because StackSense's push agent runs there (it ended the
    host's play, __stacksense_push_agent_left_alone says why) is "left alone (push agent)".
    Any other host without an outcome that is still in the play (ansible_play_hosts) was never
    reached by the rollout (it stopped first); one that dropped out of the play lost its
    connection (or failed) during the run.
    """
    active = set(active_hosts or [])
    records = {}
    for host in all_hosts or []:
        host_vars = hostvars.get(host, {})
        record = ((host_vars.get("__stacksense_batch") or {}).get("outcomes") or {}).get(host)
        left_alone = host_vars.get("__stacksense_push_agent_left_alone")
        if not record and left_alone:
            record = {"outcome": LEFT_ALONE, "reason": _one_line(left_alone, host)}
        if not record:
            record = ({"outcome": "not attempted", "reason": "the rollout stopped before its batch"}
                      if host in active else
                      {"outcome": "lost", "reason": LOST})
        records[host] = dict(record)
    return records


def rollout_report(records, stopped="", width=100):
    """The summary of a rollout: counts, per-host outcomes, and the lines to print.

    records: {host: outcome record or None}; None means the host has no outcome: "lost" when
    it dropped out of the play during the run, "not attempted" when the rollout stopped first
    (rollout_records says which). Hosts that need nothing more are listed by
    name only, and only up to LISTED of them (the JSON report has them all); every other host
    is named, grouped by outcome and reason, each reason said once.
    """
    hosts = {}
    for host in sorted(records or {}):
        record = records[host] or {"outcome": "lost", "reason": LOST}
        hosts[host] = {"outcome": record.get("outcome", "lost"), "reason": record.get("reason", "")}
    counts = {o: 0 for o in OUTCOMES}
    for record in hosts.values():
        counts[record["outcome"]] = counts.get(record["outcome"], 0) + 1
    counts = {o: n for o, n in counts.items() if n}
    noun = "host" if len(hosts) == 1 else "hosts"
    lines = [f"{len(hosts)} {noun}: " + ", ".join(f"{n} {o}" for o, n in counts.items())]
    if stopped:
        lines.append(f"ROLLOUT STOPPED: {stopped}.")
    for outcome in counts:
        names = [h for h, r in hosts.items() if r["outcome"] == outcome]
        if outcome in ("deployed", "unchanged", "not attempted", LEFT_ALONE):
            if len(names) > LISTED:
                lines.append(f"{outcome} ({len(names)}): the hosts are named in the JSON report "
                             "(-e stacksense_deploy_report=PATH)")
            else:
                lines.extend(_wrapped(f"{outcome} ({len(names)}): ", names, width))
            continue
        by_reason = {}
        for host in names:
            by_reason.setdefault(_shared(hosts[host]["reason"]), []).append(host)
        for reason, group in sorted(by_reason.items(), key=lambda item: (-len(item[1]), item[0])):
            lines.extend(_wrapped(f"{outcome} ({len(group)}), {reason}: ", group, width))
    incomplete = [h for h, r in hosts.items() if r["outcome"] not in FINISHED]
    return {"counts": counts, "stopped": stopped or None, "hosts": hosts,
            "incomplete": incomplete, "summary": lines}


def _shared(reason):
    """A reason as hosts share it in the summary: SSH names each host's own address ("ssh:
    connect to host 10.0.0.7 port 22: No route to host"), which would give each unreachable
    host a line of its own; the JSON report keeps the address."""
    return SSH_ADDRESS.sub(r"\1(its address)\2", reason)


def _wrapped(head, names, width):
    """head + names, comma-separated, in lines of about width characters."""
    lines, line = [], head
    for i, name in enumerate(names):
        piece = name + ("," if i < len(names) - 1 else "")
        if line != head and len(line) + 1 + len(piece) > width:
            lines.append(line)
            line = "    "
        line += ("" if line in (head, "    ") else " ") + piece
    lines.append(line)
    return lines


class FilterModule:
    def filters(self):
        return {
            "rollout_unreachable": rollout_unreachable,
            "rollout_failed": rollout_failed,
            "rollout_done": rollout_done,
            "rollout_batch_verdict": rollout_batch_verdict,
            "rollout_batch": rollout_batch,
            "rollout_records": rollout_records,
            "rollout_report": rollout_report,
        }
