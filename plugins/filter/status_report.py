"""playbooks/status.yml's classification of every host, on the controller.

Reads each host's probe answer (roles/stacksense_agent/tasks/status.yml registers it as
__stacksense_status_root when it escalated, else __stacksense_status_login) and puts the host
in the first state of the playbook's order that applies (the states are described in
playbooks/status.yml). Errors are the agent's own, with any user:password@ in a URL, a
bearer token and the host's stacksense_api_token masked.
"""

import json
import re
from datetime import datetime

DOCUMENTATION = r"""
name: status_report
short_description: Classify the hosts of a status.yml run and summarise the fleet
description:
  - From each host's status probe, the host's state (healthy, failing, stale, not_running,
    old_names, push_agent, not_installed, outdated, unreachable), its record for the JSON
    report, its line, and the fleet summary.
positional: _input, hosts, order, names_shown
options:
  _input:
    description: C(hostvars).
    type: dict
    required: true
  hosts:
    description: The hosts to classify (C(ansible_play_hosts_all)).
    type: list
    elements: str
    required: true
  order:
    description: The states, first that applies wins; the summary counts them in this order.
    type: list
    elements: str
    required: true
  names_shown:
    description: Host names listed per state in the summary text.
    type: int
    default: 20
version_added: 1.2.0
author: StackSense
"""

EXAMPLES = r"""
fleet: >-
  {{ hostvars | stacksense.fleet.status_report(ansible_play_hosts_all, ['healthy', 'failing']) }}
"""

RETURN = r"""
_value:
  description:
    - C(hosts) (host to record), C(summary), C(lines) (one per host), C(text) (the summary).
  type: dict
"""

URL_CREDENTIALS = re.compile(r"(?i)([a-z][a-z0-9+.-]*://)[^/@\s]*@")
BEARER = re.compile(r"(?i)(bearer\s+)\S+")
TERMINAL_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
STATE_LINE = re.compile(r"(?m)^state:$")
NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?\Z")
WHOLE_NUMBER = re.compile(r"[0-9]+\Z")
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"
DEFAULT_INTERVAL_S = 30.0
FRESH_INTERVALS = 3
# States that do not fail the run: an agent that reports, and a host that deploy.yml leaves
# alone because StackSense's push agent already keeps it online.
OK_STATES = ("healthy", "push_agent")
PUSH_AGENT_LEFT_ALONE = "StackSense push agent present (left alone)"
# The probe's keys for role 1.1.0's agent under the old names, and those names.
LEGACY_NAMES = {"legacy_unit": "stacksense-agent.service",
                "legacy_cron": "/etc/cron.d/stacksense-agent"}
TRUE_WORDS = ("true", "yes", "on", "1")


def _text(value):
    """A value as Jinja's ~ writes it (None as "None")."""
    return value if isinstance(value, str) else str(value)


def mask(text, token):
    """Text without URL credentials, bearer tokens or the host's token, on one line."""
    masked = BEARER.sub(r"\1***", URL_CREDENTIALS.sub(r"\1***@", _text(text)))
    if len(token) >= 4:
        masked = masked.replace(token, "***")
    return re.sub(r"\s+", " ", masked).strip()


def truncate(text, length, leeway=5, end="..."):
    """Jinja's truncate filter (whole words, its default leeway)."""
    if len(text) <= length + leeway:
        return text
    return text[:length - len(end)].rsplit(" ", 1)[0] + end


def _int(value, default=0):
    """Jinja's int filter: a number from text, else `default`."""
    try:
        return int(value)
    except (TypeError, ValueError):
        try:
            return int(float(value))
        except (TypeError, ValueError):
            return default


def parse_answer(stdout):
    """(key=value lines, state file) of a probe answer that has its state: line."""
    out = stdout.replace("\r", "")
    head = out[:STATE_LINE.search(out).start()]
    body = out[STATE_LINE.search(out).end():].strip()
    kv = dict(line.split("=", 1) for line in head.split("\n") if re.match(r"[A-Za-z_]+=", line))
    state = {}
    if body.startswith("{"):
        try:
            state = json.loads(body)
        except ValueError:
            state = {"unreadable": True}
    return kv, state if isinstance(state, dict) else {"unreadable": True}


def without_agent(kv, beside_push_agent):
    """(state, reason) of a host without stacksense-heartbeat's unit or cron entry.

    Role 1.1.0's agent under the old names (StackSense's push-agent names, recognised as ours
    because it runs heartbeat_agent.py) needs a deploy to move it. A host with StackSense's
    push agent is left alone by deploy.yml unless stacksense_beside_push_agent asks for ours
    too: then ours is missing.
    """
    old = [name for key, name in LEGACY_NAMES.items() if kv.get(key) == "yes"]
    push_agent = kv.get("push_agent", "")
    if old:
        return "old_names", (f"{kv.get('legacy_version') or '?'} under the old names "
                             f"({', '.join(old)}): run deploy.yml to move it")
    if push_agent and not beside_push_agent:
        return "push_agent", f"{PUSH_AGENT_LEFT_ALONE}: {push_agent}"
    reason = "no stacksense-heartbeat unit or cron entry"
    if push_agent:
        reason += f"; {PUSH_AGENT_LEFT_ALONE}, stacksense_beside_push_agent is true"
    return "not_installed", reason


def classify(kv, st, token, beside_push_agent=False):
    """(state, reason, record fields, line tail) of a host that answered the probe."""
    manager = kv.get("manager", "")
    pid = _int(kv.get("MainPID", "0"))
    running = manager != "" and pid > 0 and (manager == "cron" or kv.get("ActiveState") == "active")
    own = running and _int(st.get("pid") or 0) == pid
    interval = float(kv["interval"]) if NUMBER.match(kv.get("interval", "")) else DEFAULT_INTERVAL_S
    success = st.get("last_success_at") if own else None
    age = None
    if success:
        try:
            age = int((datetime.strptime(kv.get("now", ""), TIME_FORMAT)
                       - datetime.strptime(_text(success)[:19], TIME_FORMAT)).total_seconds())
        except ValueError:
            age = None  # a clock or state file we cannot read: not a recent success
    fresh = age is not None and age < FRESH_INTERVALS * interval
    version = st.get("agent_version", kv.get("agent")) if own else kv.get("agent", "")
    failures = _int(st.get("consecutive_failures") or 0) if own else 0
    error = mask(st["last_error"], token) if st.get("last_error") else None
    expected = kv.get("expected")
    if running and fresh and version == expected:
        state, reason = "healthy", f"last success {age} s ago"
    elif running and own and failures > 0:
        state, reason = "failing", f"last error: {_text(error)}"
    elif running and not fresh:
        state = "stale"
        if not st:
            reason = "no state file yet"
        elif st.get("unreadable"):
            reason = "the state file is not JSON"
        elif not own:
            reason = f"the state file is from an earlier process (pid {_text(st.get('pid', ''))})"
        elif not success:
            reason = "no heartbeat accepted yet"
        else:
            reason = (f"last success {age} s ago, over {FRESH_INTERVALS} intervals "
                      f"({int(FRESH_INTERVALS * interval)} s)")
    elif not running and manager != "":
        state = "not_running"
        if manager == "systemd":
            reason = (f"stacksense-heartbeat.service is {kv.get('ActiveState', '?')}/"
                      f"{kv.get('SubState', '?')} (result {kv.get('Result', '?')}, exit status "
                      f"{kv.get('ExecMainStatus', '?')})")
        else:
            reason = "cron mode, no agent process (pid file)"
        reason += f"; last error: {error}" if error else ""
    elif not running:
        state, reason = without_agent(kv, beside_push_agent)
    else:
        state, reason = "outdated", f"runs agent {_text(version)}, expected {_text(expected or '')}"
    record = {
        "state": state, "ok": state in OK_STATES, "reason": reason, "manager": manager or None,
        "running": running, "push_agent": kv.get("push_agent") or None,
        "pid": pid if running else None,
        "restarts": int(kv["NRestarts"]) if WHOLE_NUMBER.match(kv.get("NRestarts", "")) else None,
        "version": version or None, "expected_version": expected, "interval": interval,
        "server_id": st.get("server_id"), "server_name": st.get("server_name"),
        "mode": st.get("mode"),
        "api_url": mask(st["api_url"], token) if st.get("api_url") else None,
        "started_at": st.get("started_at"), "last_attempt_at": st.get("last_attempt_at"),
        "last_success_at": st.get("last_success_at"), "last_success_age_s": age,
        "consecutive_failures": st.get("consecutive_failures"),
        "last_status": st.get("last_status"), "last_error": error, "state_file_current": own}
    return record, _line_tail(kv, st, manager, running, pid, version, age)


def _line_tail(kv, st, manager, running, pid, version, age):
    """What a host's line says after its state: the agent, its server and last success."""
    if manager == "":
        return ""
    tail = (f" | agent {version or '?'} ({manager}"
            + (f", pid {pid}" if running else ", stopped")
            + (f", {kv.get('NRestarts', '')} restarts" if manager == "systemd" else "") + ")")
    if st and not st.get("unreadable"):
        last = f"{age} s ago" if age is not None else (st.get("last_success_at") or "never")
        tail += (f", server {st.get('server_name') or '?'} (id {st.get('server_id') or '?'}), "
                 f"{_text(st.get('mode', '?'))} API, last success {last}, "
                 f"{_text(st.get('consecutive_failures', '?'))} failure(s) in a row")
    if kv.get("push_agent"):
        tail += f"; {PUSH_AGENT_LEFT_ALONE}"
    return tail


def host_status(host_vars, host):
    """(record, line, expected version or None) of one host."""
    root = host_vars.get("__stacksense_status_root") or {"skipped": True}
    probe = (host_vars.get("__stacksense_status_login") or {}) if root.get("skipped") else root
    token = _text(host_vars.get("stacksense_api_token") or "").strip()
    beside = _text(host_vars.get("stacksense_beside_push_agent", False)).lower() in TRUE_WORDS
    out = TERMINAL_ESCAPE.sub("", _text(probe.get("stdout", "")).replace("\r", ""))
    if probe.get("unreachable") or not STATE_LINE.search(out):
        why = mask(f"{_text(probe.get('msg', 'no answer'))} {_text(probe.get('stderr', ''))}",
                   token)
        why = re.sub(r"^Task failed: ", "", why)
        return ({"state": "unreachable", "ok": False, "reason": truncate(why, 300)},
                f"{host}: unreachable: {truncate(why, 200)}", None)
    kv, st = parse_answer(out)
    record, tail = classify(kv, st, token, beside)
    state = record["state"]
    said = "" if state == "healthy" else f": {truncate(record['reason'], 200)}"
    line = f"{host}: {state}{said}{tail}"
    return record, line, kv.get("expected") or None


def summary_text(total, expected, counts, names, names_shown):
    """The headline, one line per state that is not healthy and has hosts, the verdict.

    The run is fine (bad == 0) when every host is in one of OK_STATES.
    """
    lines = []
    for state, these in names.items():
        if state != "healthy" and these:
            more = len(these) - names_shown
            lines.append(f"{state} ({len(these)}): {', '.join(these[:names_shown])}"
                         + (f", and {more} more" if more > 0 else ""))
    bad = total - sum(counts.get(state, 0) for state in OK_STATES)
    headline = (f"StackSense agents: {total} host(s), expected agent {expected or '?'}: "
                + ", ".join(f"{count} {state}" for state, count in counts.items()))
    if bad:
        verdict = f"{bad} host(s) not healthy."
    elif counts.get("push_agent"):
        verdict = "All hosts are healthy or run StackSense's push agent (left alone)."
    else:
        verdict = "All hosts are healthy."
    return [headline, *lines, verdict], bad


def status_report(hostvars, hosts, order, names_shown=20):
    """{"hosts": {host: record}, "summary": {...}, "lines": [...], "text": [...]}."""
    records, lines, expected = {}, [], None
    for host in hosts:
        record, line, host_expected = host_status(hostvars[host], host)
        records[host] = record
        lines.append(line)
        expected = expected or host_expected
    names = {state: [h for h, r in records.items() if r["state"] == state] for state in order}
    counts = {state: len(these) for state, these in names.items()}
    text, bad = summary_text(len(records), expected, counts, names, names_shown)
    return {"hosts": records,
            "summary": {"total": len(records), "expected_version": expected, "healthy": bad == 0,
                        "counts": counts, "hosts": names},
            "lines": lines, "text": text}


class FilterModule:
    def filters(self):
        return {"status_report": status_report}
