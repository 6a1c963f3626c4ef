"""The role's wait for a heartbeat (plugins/action/agent_heartbeat.py).

judge() is called directly; the action itself runs in a real ansible-playbook on localhost
(local connection), its probe a small shell script that answers from a list, one answer per
try, as files/agent_process.sh would (the Molecule scenarios run the real probe against real
agents under systemd and cron). No real sleeping: the tests pass delay 0.
"""

import json
import os

import pytest
from conftest import load_module, run_local_tasks

action = load_module("stacksense_action_agent_heartbeat", "plugins/action/agent_heartbeat.py")


def state(**changes):
    base = {"pid": 42, "agent_version": "2.0.0", "mode": "token", "last_success_at": "now",
            "consecutive_failures": 0, "api_url": "https://stacksense.example.com",
            "server_name": "web-01", "server_id": 7}
    base.update(changes)
    return base


def answer(process="42 running", **changes):
    return process + "\n" + json.dumps(state(**changes)) + "\n"


def verdict(stdout, rc=0, version="2.0.0", modes=("token",)):
    return action.judge(rc, stdout, version, list(modes))[0]


def test_accepted_only_from_the_running_process_of_the_wanted_version_and_mode():
    assert verdict(answer()) == "accepted"
    assert verdict(answer(pid=41)) == "waiting"  # an earlier process wrote the state file
    assert verdict(answer(agent_version="1.9.0")) == "waiting"  # the old agent still runs
    assert verdict(answer(mode="legacy")) == "waiting"
    assert verdict(answer(mode="legacy"), modes=("token", "legacy")) == "accepted"
    assert verdict(answer(last_success_at=None)) == "waiting"  # not heard yet
    assert verdict(answer(consecutive_failures=1)) == "waiting"  # refused since
    assert verdict(answer("0 running")) == "waiting"


def test_a_probe_that_failed_or_a_state_file_half_written_means_wait():
    assert verdict(answer(), rc=1) == "waiting"
    assert verdict("42 running\n{\"pid\": 4") == "waiting"
    assert verdict("42 running\n") == "waiting"
    assert verdict("") == "waiting"
    assert verdict("garbage\n{}") == "waiting"


def test_an_exited_process_ends_the_wait():
    assert action.judge(0, "42 exited:exit status 78\n", "2.0.0", ["token"]) == (
        "exited", "42 exited:exit status 78")


def test_the_wait_lasts_about_the_timeout_two_seconds_a_try():
    # As `until` with retries ceil(timeout / 2) and delay 2: the first try, then the retries.
    assert action.attempts_for(60) == 31
    assert action.attempts_for(5) == 4
    assert action.attempts_for(1) == 2


def run_wait(tmp_path, answers, timeout=10, keep=None, **start):
    """The action on localhost; its probe prints answers[n] on the n-th try (the last one
    again after the list ends). Returns the task's result and how many tries were made."""
    for n, text in enumerate(answers):
        (tmp_path / f"answer{n}").write_text(text)
    probe = (
        'n=$(cat "$1/count" 2>/dev/null || echo 0); echo $((n + 1)) >"$1/count"; '
        'f="$1/answer$n"; [ -e "$f" ] || f="$1/answer$2"; cat "$f"'
    )
    task = {
        "name": "wait",
        "stacksense.fleet.agent_heartbeat": {
            "argv": ["/bin/sh", "-c", probe, "probe", str(tmp_path), str(len(answers) - 1)],
            "version": "2.0.0", "modes": ["token"], "timeout": timeout, "delay": 0,
            "keep": keep, **start,
        },
    }
    result = run_local_tasks(tmp_path, [task])["wait"]
    count = tmp_path / "count"
    return result, int(count.read_text()) if count.exists() else 0


def test_passes_at_the_first_accepted_heartbeat_and_says_by_whom(tmp_path):
    result, tries = run_wait(tmp_path, [answer(agent_version="1.9.0"), answer(pid=41), answer()])
    assert not result.get("failed"), result
    assert tries == 3
    assert result["msg"] == (
        "web-01: heartbeat accepted by https://stacksense.example.com as server 'web-01' "
        "(id 7), agent 2.0.0")
    assert result["agent_version"] == "2.0.0" and result["changed"] is False


def test_fails_at_once_when_the_agent_exits_with_its_status(tmp_path):
    exited = "42 exited:exit status 78\n"
    result, tries = run_wait(tmp_path, [answer(agent_version="1.9.0"), exited])
    assert result["failed"] and result["exited"] is True
    assert tries == 2
    assert result["msg"] == "the agent exited:exit status 78"
    assert result["process"] == "42 exited:exit status 78"


def test_fails_after_the_timeout_when_no_heartbeat_is_accepted(tmp_path):
    result, tries = run_wait(tmp_path, [answer(consecutive_failures=3)], timeout=4)
    assert result["failed"] and result["exited"] is False
    assert tries == 3 == result["attempts"]
    assert "no heartbeat from agent 2.0.0" in result["msg"] and "within 4 s" in result["msg"]


@pytest.mark.skipif(os.geteuid() != 0, reason="the kept copies are owned by root")
def test_an_accepted_heartbeat_keeps_the_verified_files_and_forgets_unused_copies(tmp_path):
    kept = tmp_path / "rollback"
    agent, unit = tmp_path / "heartbeat_agent.py", tmp_path / "odd 'unit'.service"
    agent.write_text("v2\n")
    unit.write_text("[Service]\n")
    kept.mkdir(mode=0o700)
    (kept / "token").write_text("old token\n")  # kept by an earlier run; no token now
    keep = {"dir": str(kept), "files": [str(agent), str(unit)], "forget": [str(kept / "token")]}
    (tmp_path / "first").mkdir()
    result, _ = run_wait(tmp_path / "first", [answer()], keep=keep)
    assert not result.get("failed"), result
    assert result["changed"] is True
    assert result["kept"] == [f"kept {agent}", f"kept {unit}", f"forgot the kept {kept}/token"]
    assert (kept / agent.name).read_text() == "v2\n"
    assert oct((kept / unit.name).stat().st_mode & 0o777) == "0o600"
    assert not (kept / "token").exists()
    (tmp_path / "again").mkdir()
    result, _ = run_wait(tmp_path / "again", [answer()], keep=keep)
    assert result["changed"] is False and "kept" not in result


def test_nothing_is_kept_when_the_heartbeat_is_not_accepted(tmp_path):
    keep = {"dir": str(tmp_path / "rollback"), "files": [str(tmp_path / "a")], "forget": []}
    result, _ = run_wait(tmp_path, ["42 exited:exit status 1\n"], keep=keep)
    assert result["failed"] and not (tmp_path / "rollback").exists()


def test_without_wait_the_host_is_not_asked(tmp_path):
    # stacksense_verify off, or check mode: the start only (here no unit to start).
    result, tries = run_wait(tmp_path, [answer()], wait=False, start=None)
    assert not result.get("failed") and "agent_version" not in result, result
    assert tries == 0


@pytest.mark.parametrize("restart", [False, True], ids=["start", "restart"])
def test_a_unit_that_does_not_start_fails_at_once_with_systemds_reason(tmp_path, restart):
    # No systemd can start (or restart) this unit here (none is PID 1, or the unit does not
    # exist): the task fails with started false and systemd's first line, and never waits.
    result, tries = run_wait(tmp_path, [answer()], start="stacksense-test-no-such.service",
                             restart=restart)
    assert result["failed"] and result["started"] is False, result
    assert result["msg"].startswith("stacksense-test-no-such.service did not start (")
    assert "\n" not in result["msg"]
    assert tries == 0
