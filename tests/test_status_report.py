"""playbooks/status.yml's classification (plugins/filter/status_report.py) of probe answers.

The probe's answers (what roles/stacksense_agent/tasks/status.yml prints on a host) are
written here for each case and classified by the playbook's filter, called as status.yml
calls it, with the playbook's own state order; the status scenario runs the playbook.
"""

import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml
from conftest import load_filters

ROOT = Path(__file__).resolve().parent.parent
NOW = "2026-12-01T12:00:00"
TOKEN = "s3cret-token-4711"
status_report = load_filters("status_report")["status_report"]


def status_vars():
    play = yaml.safe_load((ROOT / "playbooks" / "status.yml").read_text())[0]
    return {k: v for k, v in play["vars"].items() if k.startswith("__stacksense_status_")}


def state_file(pid=100, success_age=5, failures=0, error=None, version="1.1.0", **extra):
    success = None
    if success_age is not None:
        moment = datetime.fromisoformat(NOW) - timedelta(seconds=success_age)
        success = moment.isoformat() + "+00:00"
    state = {"agent_version": version, "pid": pid, "started_at": "2026-12-01T10:00:00+00:00",
             "api_url": "https://stacksense.example.com", "mode": "legacy", "server_id": 7,
             "server_name": "web", "last_attempt_at": f"{NOW}+00:00", "last_success_at": success,
             "last_error": error, "last_status": 200 if not failures else 503,
             "consecutive_failures": failures}
    state.update(extra)
    return json.dumps(state)


def probe(manager="systemd", active="active", pid=100, interval="5", agent="1.1.0",
          state=None, names=("push_agent=", "legacy_version=")):
    """The probe's answer; `names` are files/probe_host.sh's lines about the other names."""
    lines = [f"manager={manager}", f"now={NOW}", f"agent={agent}", "expected=1.1.0"]
    if manager == "systemd":
        sub = "running" if active == "active" else "dead"
        lines += [f"ActiveState={active}", f"SubState={sub}", f"MainPID={pid}", "NRestarts=2",
                  "Result=success", "ExecMainStatus=0"]
    elif manager == "cron":
        lines.append(f"MainPID={pid}")
    if manager:
        lines.append(f"interval={interval}")
    lines += names
    lines.append("state:")
    if state is not None:
        lines.append(state)
    return {"changed": False, "rc": 0, "stdout": "\r\n".join(lines) + "\r\n", "stderr": ""}


CASES = {
    "fresh": probe(state=state_file()),
    "one-failure-after-a-recent-success": probe(state=state_file(success_age=6, failures=1,
                                                                 error="HTTP 503")),
    "slow-interval": probe(interval="30", state=state_file(success_age=60)),
    "failing": probe(state=state_file(success_age=60, failures=3, error=(
        f"proxy https://ops:hunter2@proxy.example.com:3128 refused; token {TOKEN}; "
        "Authorization: Bearer abc.def"))),
    "hung": probe(state=state_file(success_age=60)),
    "restarted": probe(pid=101, state=state_file(pid=100)),
    "never-accepted": probe(state=state_file(success_age=None)),
    "unreadable": probe(state='{"unreadable": true}'),
    "stopped": probe(active="failed", pid=0, state=state_file(failures=2, error="HTTP 401")),
    "cron-dead": probe(manager="cron", pid=0, state=state_file()),
    "bare": probe(manager=""),
    "old": probe(agent="1.0.0", state=state_file(version="1.0.0")),
    "old-and-failing": probe(agent="1.0.0", state=state_file(version="1.0.0", success_age=60,
                                                             failures=4, error="HTTP 500")),
    "cron": probe(manager="cron", pid=200, state=state_file(pid=200)),
    # role 1.1.0's agent under StackSense's push-agent names, as files/probe_host.sh finds it
    "moved-not-yet": probe(manager="", names=("legacy_unit=yes", "push_agent=",
                                              "legacy_version=1.1.0")),
    "moved-not-yet-cron": probe(manager="", names=("push_agent=", "legacy_cron=yes",
                                                   "legacy_version=1.1.0")),
    # StackSense's own push agent: alone, beside ours, and alone where ours was asked for
    "push": probe(manager="", names=("push_agent=/opt/stacksense-agent/stacksense_agent.py",
                                     "legacy_version=")),
    "push-and-ours": probe(state=state_file(), names=(
        "push_agent=/etc/systemd/system/stacksense-agent.service", "legacy_version=")),
    "push-ours-missing": probe(manager="", names=(
        "push_agent=/opt/stacksense-agent/stacksense_agent.py", "legacy_version=")),
    # raw over SSH runs on a terminal, where systemctl may colour its answer
    "coloured": dict(probe(state=state_file()), stdout=probe(state=state_file())["stdout"]
                     .replace("ActiveState=active", "ActiveState=active\x1b[m")
                     .replace("MainPID=100", "MainPID=100\x1b[0m")),
    "down": {"unreachable": True, "changed": False,
             "msg": "Failed to connect to the host via ssh: Connection refused"},
}


@pytest.fixture(scope="module")
def fleet():
    hostvars = {name: {"__stacksense_status_login": result,
                       "stacksense_api_token": TOKEN if name == "failing" else ""}
                for name, result in CASES.items()}
    hostvars["push-ours-missing"]["stacksense_beside_push_agent"] = True
    play_vars = status_vars()
    report = status_report(hostvars, list(CASES), play_vars["__stacksense_status_order"],
                           play_vars["__stacksense_status_names"])
    return json.loads(json.dumps(report))  # as the playbook's JSON report has it


def state(fleet, host):
    return fleet["hosts"][host]["state"]


def test_a_running_agent_of_the_expected_version_with_a_recent_success_is_healthy(fleet):
    assert state(fleet, "fresh") == "healthy"
    assert state(fleet, "cron") == "healthy"
    assert state(fleet, "coloured") == "healthy"
    assert fleet["hosts"]["cron"]["restarts"] is None
    assert fleet["hosts"]["fresh"]["last_success_age_s"] == 5


def test_one_failure_after_a_success_within_three_intervals_is_still_healthy(fleet):
    assert state(fleet, "one-failure-after-a-recent-success") == "healthy"


def test_the_interval_is_the_hosts_own(fleet):
    assert state(fleet, "slow-interval") == "healthy"  # 60 s < 3 x 30 s
    assert state(fleet, "hung") == "stale"  # 60 s > 3 x 5 s


def test_a_running_agent_whose_last_heartbeat_failed_is_failing_with_its_error(fleet):
    host = fleet["hosts"]["failing"]
    assert host["state"] == "failing"
    assert host["consecutive_failures"] == 3
    assert "refused" in host["last_error"]


def test_failing_wins_over_outdated(fleet):
    assert state(fleet, "old-and-failing") == "failing"


def test_a_state_file_the_running_process_did_not_write_is_stale(fleet):
    assert state(fleet, "restarted") == "stale"
    assert "earlier process" in fleet["hosts"]["restarted"]["reason"]
    assert state(fleet, "never-accepted") == "stale"
    assert state(fleet, "unreadable") == "stale"
    assert "not JSON" in fleet["hosts"]["unreadable"]["reason"]


def test_an_installed_agent_without_a_process_is_not_running(fleet):
    assert state(fleet, "stopped") == "not_running"
    assert "failed/dead" in fleet["hosts"]["stopped"]["reason"]
    assert "HTTP 401" in fleet["hosts"]["stopped"]["reason"]
    assert state(fleet, "cron-dead") == "not_running"


def test_a_host_without_unit_or_cron_entry_is_not_installed(fleet):
    assert state(fleet, "bare") == "not_installed"


def test_a_host_still_on_the_old_names_of_role_1_1_0_is_told_to_run_deploy(fleet):
    for host, where in (("moved-not-yet", "stacksense-agent.service"),
                        ("moved-not-yet-cron", "/etc/cron.d/stacksense-agent")):
        record = fleet["hosts"][host]
        assert (record["state"], record["ok"]) == ("old_names", False)
        assert record["reason"] == (f"1.1.0 under the old names ({where}): "
                                    "run deploy.yml to move it")
    assert ("moved-not-yet: old_names: 1.1.0 under the old names (stacksense-agent.service): "
            "run deploy.yml to move it") in fleet["lines"]


def test_a_host_with_only_the_push_agent_is_named_and_does_not_fail_the_run(fleet):
    record = fleet["hosts"]["push"]
    assert (record["state"], record["ok"]) == ("push_agent", True)
    assert record["push_agent"] == "/opt/stacksense-agent/stacksense_agent.py"
    assert ("push: push_agent: StackSense push agent present (left alone): "
            "/opt/stacksense-agent/stacksense_agent.py") in fleet["lines"]


def test_the_push_agent_beside_ours_is_named_on_the_hosts_line(fleet):
    assert state(fleet, "push-and-ours") == "healthy"
    line = next(line for line in fleet["lines"] if line.startswith("push-and-ours:"))
    assert line.endswith("; StackSense push agent present (left alone)")


def test_ours_missing_beside_the_push_agent_when_asked_for_is_not_installed(fleet):
    record = fleet["hosts"]["push-ours-missing"]
    assert (record["state"], record["ok"]) == ("not_installed", False)
    assert "StackSense push agent present (left alone)" in record["reason"]


def test_a_fleet_of_healthy_and_push_agent_hosts_passes(fleet):
    hostvars = {name: {"__stacksense_status_login": CASES[name]}
                for name in ("fresh", "cron", "push")}
    play_vars = status_vars()
    report = status_report(hostvars, list(hostvars), play_vars["__stacksense_status_order"])
    assert report["summary"]["healthy"]
    assert report["text"][-1] == ("All hosts are healthy or run StackSense's push agent "
                                  "(left alone).")


def test_a_healthy_agent_of_another_version_is_outdated(fleet):
    host = fleet["hosts"]["old"]
    assert host["state"] == "outdated"
    assert (host["version"], host["expected_version"]) == ("1.0.0", "1.1.0")


def test_a_host_that_cannot_be_reached_is_unreachable_with_the_reason(fleet):
    assert state(fleet, "down") == "unreachable"
    assert "Connection refused" in fleet["hosts"]["down"]["reason"]


def test_passwords_bearer_tokens_and_the_hosts_token_are_masked_everywhere(fleet):
    text = json.dumps(fleet)
    for secret in ("hunter2", TOKEN, "abc.def"):
        assert secret not in text
    assert "https://***@proxy.example.com:3128" in fleet["hosts"]["failing"]["last_error"]


def test_the_summary_counts_every_state_in_the_documented_order(fleet):
    summary = fleet["summary"]
    assert summary["counts"] == {"healthy": 6, "failing": 2, "stale": 4, "not_running": 2,
                                 "old_names": 2, "push_agent": 1, "not_installed": 2,
                                 "outdated": 1, "unreachable": 1}
    assert summary["total"] == len(CASES) and not summary["healthy"]
    assert fleet["text"][0].endswith(": 6 healthy, 2 failing, 4 stale, 2 not_running, "
                                     "2 old_names, 1 push_agent, 2 not_installed, 1 outdated, "
                                     "1 unreachable")
    assert f"{len(CASES) - 7} host(s) not healthy." == fleet["text"][-1]
    assert "failing (2): failing, old-and-failing" in fleet["text"]
    assert len(fleet["lines"]) == len(CASES)
