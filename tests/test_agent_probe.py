"""The role's probe of the host (plugins/action/agent_probe.py), run by a real ansible-playbook
on this machine (local connection) with the role's real probe script: its settings reach the
script whatever they hold, its answer is parsed, and the host checks judge it. This machine's
PID 1 is not systemd, so a systemd deploy is refused here and a cron deploy is not."""

from pathlib import Path

from conftest import load_module, run_local_tasks

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = (ROOT / "roles" / "stacksense_agent" / "files" / "probe_host.sh").read_text()
PID1 = Path("/proc/1/comm").read_text().strip()
action = load_module("stacksense_action_agent_probe", "plugins/action/agent_probe.py")


def probe(tmp_path, environment=None, checks=None):
    task = {"name": "probe", "stacksense.fleet.agent_probe": {
        "script": SCRIPT, "environment": environment or {}, "checks": checks}}
    return run_local_tasks(tmp_path, [task])["probe"]


def test_the_answer_is_parsed_and_odd_paths_reach_the_script_whole(tmp_path):
    odd = tmp_path / "it's a \"file\" $(id) `x`\tand more"
    odd.write_text("")
    result = probe(tmp_path, {"STACKSENSE_PROBE_FILES": f"{odd}\n{tmp_path}/missing"})
    assert not result.get("failed"), result.get("msg")
    assert result["facts"]["pid1"] == PID1
    assert result["files"] == [str(odd)]
    assert result["changed"] is False


def test_removal_only_probes_and_a_deploy_is_judged(tmp_path):
    cases = {
        "removal": None,
        "cron": {"cron": True, "token": True, "ca_bundle": ""},
        "systemd": {"cron": False, "token": False, "ca_bundle": ""},
        "no bundle": {"cron": True, "token": False, "ca_bundle": str(tmp_path / "none.pem")},
    }
    results = run_local_tasks(tmp_path, [
        {"name": name, "ignore_errors": True, "stacksense.fleet.agent_probe": {
            "script": SCRIPT, "checks": checks}}
        for name, checks in cases.items()])
    assert not results["removal"].get("failed")
    assert not results["cron"].get("failed"), results["cron"].get("msg")
    if PID1 != "systemd":
        assert results["systemd"]["failed"]
        assert results["systemd"]["msg"].startswith(f"web-01: the init system (PID 1) is '{PID1}'")
    assert results["no bundle"]["failed"] and "stacksense_ca_bundle" in results["no bundle"]["msg"]


def test_a_failed_probe_says_why(tmp_path):
    task = {"name": "probe", "stacksense.fleet.agent_probe": {
        "script": "echo half-way; echo 'disk on fire' >&2; exit 3", "environment": {}}}
    result = run_local_tasks(tmp_path, [task])["probe"]
    assert result["failed"] and result["msg"] == "the probe of the host failed (rc 3): disk on fire"


def test_only_probe_settings_reach_the_shell(tmp_path):
    result = probe(tmp_path, {"PATH": "/tmp/evil"})
    assert result["failed"] and "not a probe setting" in result["msg"]
    command = action.probe_command("echo", {"STACKSENSE_PROBE_FILES": "a'b"})
    assert command == "STACKSENSE_PROBE_FILES='a'\"'\"'b' /bin/sh -c echo probe_host.sh"


def test_variable_problems_fail_the_host_before_anything_reaches_it(tmp_path):
    marker = tmp_path / "probed"
    task = {"name": "probe", "stacksense.fleet.agent_probe": {
        "problems": ["stacksense_install_dir is \"/\", ...", "stacksense_no_proxy is ..."],
        "script": f"touch {marker}", "checks": {"cron": True}}}
    result = run_local_tasks(tmp_path, [task])["probe"]
    assert result["failed"] and result["msg"] == (
        'web-01: stacksense_install_dir is "/", ... stacksense_no_proxy is ...')
    assert not marker.exists() and "facts" not in result
