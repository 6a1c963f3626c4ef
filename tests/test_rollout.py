"""playbooks/deploy.yml's decisions (plugins/filter/rollout_report.py), on synthetic hosts:
which failure is a host's and which a version's, when a batch stops the rollout, and the
summary an operator reads, at 3 and at 1,000 hosts."""

import json

import pytest
from conftest import load_module

rollout = load_module("stacksense_filter_rollout_report", "plugins/filter/rollout_report.py")


def failed(tags, msg, name="a task", host="web-01"):
    return rollout.rollout_failed({"tags": tags, "name": name}, {"msg": msg}, host)


def test_a_failure_before_the_new_agent_runs_is_the_hosts():
    assert failed(["stacksense_preflight"], "web-01: the init system is 'sleep'") == {
        "outcome": "refused", "reason": "the init system is 'sleep'"}
    # As plugins/action/agent_files.py words a failed apt, in the role's files task.
    task = "Install the agent's packages, the agent, its credential and the systemd unit"
    broken = failed(["stacksense_install", "stacksense_configure"],
                    "the agent's packages (python3-requests) could not be installed: Failed to "
                    "lock apt for exclusive operation", name=task)
    assert broken["outcome"] == "broken"
    assert broken["reason"] == (f"{task} failed: the agent's packages (python3-requests) could "
                                "not be installed: Failed to lock apt for exclusive operation")
    assert failed(["stacksense_configure"], "No space left on device")["outcome"] == "broken"
    # apt's message with an empty detail, as met at 100 hosts (bench/fleet_rollout.py): the
    # summary puts its own colon after the reason, so none is left at its end.
    no_lists = failed(["stacksense_install"], "the agent's packages (python3-requests) could "
                      "not be installed: Failed to update apt cache after 5 retries: ", name=task)
    assert no_lists["reason"].endswith("after 5 retries"), no_lists


def test_a_failure_of_the_new_agent_is_the_versions():
    for tags in (["stacksense_service"], ["stacksense_verify"]):
        outcome = failed(tags, "web-01: no heartbeat from stacksense-heartbeat 1.3.0 ... "
                               "rolled back to agent 1.2.0, which heartbeats again.")
        assert outcome["outcome"] == "rolled back"
        assert outcome["reason"].startswith("no heartbeat from stacksense-heartbeat 1.3.0")
    first_deploy = failed(["stacksense_verify"], "web-01: no heartbeat ... Nothing to roll back to")
    assert first_deploy["outcome"] == "failed"
    assert "failed on 1 host(s)" in rollout.rollout_batch_verdict([first_deploy], 25)


def test_a_rollback_is_named_however_long_the_agents_last_error():
    # The agent's last error may carry a server's whole error page (an HTML 404 here, as
    # bench/fleet_rollout.py's bad version met): the rollback note comes after it.
    page = "<!doctype html> <html> <head> <title>Not Found</title> </head> " + "x" * 400
    said = (f"web-01: no heartbeat from stacksense-heartbeat 9.9.9 (the running process) was "
            f"accepted within 30 s; last error: HTTP 404: {page} (check STACKSENSE_API_URL).")
    rolled_back = failed(["stacksense_verify"], said + " rolled back to agent 1.2.0, which "
                                                       "heartbeats again")
    assert rolled_back["outcome"] == "rolled back"
    assert len(rolled_back["reason"]) == rollout.REASON_LENGTH
    assert failed(["stacksense_verify"], said + " Nothing to roll back to")["outcome"] == "failed"


def test_unreachable_hosts_and_long_messages():
    assert rollout.rollout_unreachable(
        {"unreachable": True, "msg": "ssh: connect to host 10.0.0.9 port 22:\nNo route"}) == {
        "outcome": "unreachable", "reason": "ssh: connect to host 10.0.0.9 port 22: No route"}
    stopped_container = {"failed": True, "rc": 125, "msg": "non-zero return code",
                         "stderr": "Error: container state improper\n"}
    assert rollout.rollout_unreachable(stopped_container) == {
        "outcome": "unreachable", "reason": "Error: container state improper"}
    assert failed(["stacksense_verify"], "x", host="h")["outcome"] == "failed"
    mid_run = rollout.rollout_failed({"tags": []}, {"unreachable": True, "msg": "gone"})
    assert mid_run["outcome"] == "unreachable"
    assert len(failed(["stacksense_install"], "y" * 5000)["reason"]) == rollout.REASON_LENGTH


def verified(version):
    """The role's verification, as registered (plugins/action/agent_heartbeat.py)."""
    return {"changed": False, "agent_version": version, "msg": "h: heartbeat accepted by ..."}


def test_deployed_only_when_something_changed():
    assert rollout.rollout_done([{"changed": False}, {}], verified("1.2.0")) == {
        "outcome": "unchanged", "reason": "agent 1.2.0 already running"}
    assert rollout.rollout_done([{"changed": False}, {"changed": True}], verified("1.2.0")) == {
        "outcome": "deployed", "reason": "agent 1.2.0 verified"}
    # Check mode and stacksense_verify: false run no verification: no version to name.
    assert rollout.rollout_done([{"changed": True}], {}, True)["reason"] == (
        "check mode: would deploy the agent")
    failed_wait = {"failed": True, "exited": True, "process": "0 exited:exit status 1"}
    assert rollout.rollout_done([{"changed": True}], failed_wait) == {
        "outcome": "deployed", "reason": "deployed"}


def batch(*outcomes):
    return [{"outcome": o, "reason": ""} for o in outcomes]


def test_one_bad_version_stops_the_rollout_whatever_the_share():
    verdict = rollout.rollout_batch_verdict(batch(*["deployed"] * 99, "rolled back"), 25)
    assert "the new agent failed on 1 host(s)" in verdict


def test_one_host_down_never_stops_it_not_even_the_canary():
    assert rollout.rollout_batch_verdict(batch("unreachable"), 25) == ""
    assert rollout.rollout_batch_verdict(batch("refused", *["deployed"] * 4), 25) == ""


def test_more_than_the_share_of_a_batch_skipped_stops_it():
    # 2 of 5 is 40 % > 25 %; 2 of 8 is exactly 25 %: not more.
    assert "2 of the 5 hosts" in rollout.rollout_batch_verdict(
        batch("unreachable", "broken", "deployed", "deployed", "unchanged"), 25)
    two_of_eight = batch("unreachable", "broken", *["deployed"] * 6)
    assert rollout.rollout_batch_verdict(two_of_eight, 25) == ""
    assert rollout.rollout_batch_verdict(two_of_eight, "10%")
    assert rollout.rollout_batch_verdict(batch(*["unreachable"] * 10), 100) == ""


@pytest.mark.parametrize("value", ["many", "-1", "101", ""])
def test_a_bad_share_says_which_variable_and_the_fix(value):
    with pytest.raises(ValueError, match=r"stacksense_max_skipped_percent is .*Fix: set it"):
        rollout.rollout_batch_verdict([], value)


NO_ROUTE = "ssh: connect to host 10.0.0.3 port 22: No route to host"


def test_one_task_gives_each_host_of_the_batch_its_outcome_and_judges_the_batch():
    changed = {"changed": True, "changed_paths": ["/opt/stacksense-heartbeat/heartbeat_agent.py"]}
    rolled_back = {"outcome": "rolled back", "reason": "no heartbeat; rolled back to agent 1.1.0"}
    hostvars = {
        "web-01": {"__stacksense_login_uid": {"rc": 0}, "__stacksense_files": changed,
                   "__stacksense_probe": verified("1.2.0")},
        "web-02": {"__stacksense_login_uid": {"rc": 0}, "__stacksense_files": {"changed": False},
                   "__stacksense_probe": verified("1.2.0")},
        "web-03": {"__stacksense_login_uid": {"unreachable": True, "msg": NO_ROUTE}},
        "web-04": {"__stacksense_login_uid": {"rc": 0}, "__stacksense_outcome": rolled_back},
        "web-05": {"__stacksense_login_uid": {"rc": 0}, "__stacksense_files": changed},
    }
    batch = rollout.rollout_batch(hostvars, ["web-01", "web-02", "web-03", "web-04"], 25)
    assert batch["outcomes"] == {
        "web-01": {"outcome": "deployed", "reason": "agent 1.2.0 verified"},
        "web-02": {"outcome": "unchanged", "reason": "agent 1.2.0 already running"},
        "web-03": {"outcome": "unreachable", "reason": NO_ROUTE},
        "web-04": rolled_back,
    }
    assert batch["stop"].startswith("the new agent failed on 1 host(s) of this batch")
    would = {"outcome": "deployed", "reason": "check mode: would deploy the agent"}
    assert rollout.rollout_batch(hostvars, ["web-05"], 25, check_mode=True) == {
        "outcomes": {"web-05": would}, "stop": ""}


def test_records_name_hosts_lost_during_the_run_and_those_never_attempted():
    deployed = {"outcome": "deployed", "reason": "agent 1.2.0 verified"}
    hostvars = {"a": {"__stacksense_batch": {"outcomes": {"a": deployed}, "stop": ""}},
                "b": {}, "c": {}}
    records = rollout.rollout_records(["a", "b", "c"], hostvars, ["a", "c"])
    assert records["b"]["outcome"] == "lost"
    assert records["c"] == {"outcome": "not attempted",
                            "reason": "the rollout stopped before its batch"}


def test_a_host_left_alone_for_the_push_agent_is_neither_deployed_nor_missing():
    deployed = {"outcome": "deployed", "reason": "agent 1.2.0 verified"}
    why = ("web-02: StackSense's push agent runs here (found /opt/stacksense-agent/"
           "stacksense_agent.py); its metrics push already keeps this host online")
    hostvars = {"web-01": {"__stacksense_batch": {"outcomes": {"web-01": deployed}}},
                "web-02": {"__stacksense_push_agent_left_alone": why},
                "web-03": {}}
    # The role ended web-02's play (meta: end_host): it is no longer an active host.
    records = rollout.rollout_records(["web-01", "web-02", "web-03"], hostvars, ["web-01"])
    assert records["web-02"]["outcome"] == "left alone (push agent)"
    assert records["web-02"]["reason"].startswith("StackSense's push agent runs here")
    report = rollout.rollout_report(records)
    assert report["counts"] == {"deployed": 1, "left alone (push agent)": 1, "lost": 1}
    assert report["incomplete"] == ["web-03"]
    assert "left alone (push agent) (1): web-02" in report["summary"]
    # Never a reason to stop: the batch that held it goes on.
    assert rollout.rollout_batch_verdict([records["web-02"], records["web-01"]], 0) == ""


def test_summary_of_a_small_rollout():
    records = {"web-01": {"outcome": "deployed", "reason": "agent 1.2.0 verified"},
               "web-02": {"outcome": "unreachable", "reason": "ssh: no route to host"},
               "web-03": {"outcome": "rolled back", "reason": "no heartbeat; rolled back to 1.1.0"}}
    report = rollout.rollout_report(records, "the new agent failed on 1 host(s)")
    assert report["counts"] == {"deployed": 1, "unreachable": 1, "rolled back": 1}
    assert report["summary"] == [
        "3 hosts: 1 deployed, 1 unreachable, 1 rolled back",
        "ROLLOUT STOPPED: the new agent failed on 1 host(s).",
        "deployed (1): web-01",
        "unreachable (1), ssh: no route to host: web-02",
        "rolled back (1), no heartbeat; rolled back to 1.1.0: web-03",
    ]
    assert json.loads(json.dumps(report))["hosts"]["web-02"]["outcome"] == "unreachable"


def test_a_thousand_hosts_fit_on_one_screen():
    """1,000 hosts: 950 deployed, 30 unreachable (2 reasons), 15 refused, 5 broken."""
    records = {}
    for i in range(1000):
        host = f"web-{i:04d}.dc1.example.com"
        if i < 20:
            records[host] = {"outcome": "unreachable", "reason": "ssh: connect timed out"}
        elif i < 30:
            records[host] = {"outcome": "unreachable", "reason": "ssh: no route to host"}
        elif i < 45:
            records[host] = {"outcome": "refused",
                             "reason": "the init system is 'sleep', not systemd"}
        elif i < 50:
            records[host] = {"outcome": "broken", "reason": "Install the agent's packages failed: "
                             "Could not get lock /var/lib/dpkg/lock-frontend"}
        else:
            records[host] = {"outcome": "deployed", "reason": "agent 1.2.0 verified"}
    report = rollout.rollout_report(records)
    lines = report["summary"]
    assert lines[0] == "1000 hosts: 950 deployed, 30 unreachable, 15 refused, 5 broken"
    # Every host with a problem is named once, each reason is said once, the 950 deployed
    # hosts are counted (and named in the JSON report): a screen rather than a thousand lines.
    text = "\n".join(lines)
    assert all(text.count(host) == 1 for host, r in records.items() if r["outcome"] != "deployed")
    assert "deployed (950): the hosts are named in the JSON report" in text
    assert len(report["hosts"]) == 1000
    assert text.count("ssh: connect timed out") == 1
    assert max(len(line) for line in lines) <= 100 + 40
    assert len(lines) < 25
    assert report["counts"]["deployed"] == 950


def test_unreachable_hosts_share_one_line_whatever_their_address():
    records = {
        f"web-{n:02d}": {"outcome": "unreachable",
                         "reason": f"ssh: connect to host 10.0.0.{n} port 22: No route to host"}
        for n in range(1, 31)
    }
    records["db-01"] = {"outcome": "unreachable",
                        "reason": "ssh: connect to host 10.0.1.1 port 2222: Connection refused"}
    report = rollout.rollout_report(records)
    lines = [line for line in report["summary"] if line.startswith("unreachable")]
    assert lines[0].startswith("unreachable (30), ssh: connect to host (its address) port 22: "
                               "No route to host: web-01, web-02")
    assert lines[-1] == ("unreachable (1), ssh: connect to host (its address) port 2222: "
                         "Connection refused: db-01")
    assert report["hosts"]["web-07"]["reason"] == (
        "ssh: connect to host 10.0.0.7 port 22: No route to host")
