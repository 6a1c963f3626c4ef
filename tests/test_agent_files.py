"""plugins/modules/agent_files.py: the role's files in one round trip, on a real file system
(tmp_path), called as plain functions and, for what Ansible sees, run as Ansible runs it."""

import grp
import json
import os
import pwd
import stat
import subprocess
import sys

import pytest
from conftest import ROOT, load_module, run_local_tasks

agent_files = load_module("stacksense_agent_files", "plugins/modules/agent_files.py")

USER = pwd.getpwuid(os.getuid()).pw_name
GROUP = grp.getgrgid(os.getgid()).gr_name
TOKEN = "s3cr3t-token-0123456789"
PROXY = "HTTPS_PROXY='http://user:pr0xy-passw0rd@proxy.example.com:3128'\n"


def request(tmp_path, token=TOKEN, unit="[Unit]\nDescription=x\n", absent=()):
    """What the role asks for: a directory, the agent and unit, the token (secret)."""
    base = tmp_path / "opt"
    return {
        "directories": [{"path": str(base), "owner": USER, "group": GROUP, "mode": "0755"}],
        "files": [
            {"path": str(base / "agent.py"), "content": "print('hi')\n", "owner": USER,
             "group": GROUP, "mode": "0755"},
            {"path": str(base / "agent.service"), "content": unit, "owner": USER,
             "group": GROUP, "mode": "0644"},
        ],
        "secret_files": [{"path": str(base / "api_token"), "content": token + "\n",
                          "owner": USER, "group": GROUP, "mode": "0600"}],
        "absent": [str(path) for path in absent],
    }


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_first_run_creates_everything_with_its_mode_and_says_which_paths_changed(tmp_path):
    result = agent_files.converge(**request(tmp_path))
    base = tmp_path / "opt"
    assert result["changed_paths"] == [str(base), str(base / "agent.py"),
                                       str(base / "agent.service"), str(base / "api_token")]
    assert set(result["changes"].values()) == {"created"}
    assert (base / "api_token").read_text() == TOKEN + "\n"
    assert (mode_of(base), mode_of(base / "agent.py"), mode_of(base / "api_token")) == (
        0o755, 0o755, 0o600)


def test_a_second_run_changes_nothing(tmp_path):
    agent_files.converge(**request(tmp_path))
    assert agent_files.converge(**request(tmp_path))["changed_paths"] == []


def test_only_the_file_whose_content_differs_is_rewritten_and_by_a_rename(tmp_path):
    agent_files.converge(**request(tmp_path))
    unit = tmp_path / "opt" / "agent.service"
    agent = tmp_path / "opt" / "agent.py"
    unit_inode, agent_inode = unit.stat().st_ino, agent.stat().st_ino
    result = agent_files.converge(**request(tmp_path, unit="[Unit]\nDescription=y\n"))
    assert result["changes"] == {str(unit): "updated"}
    assert unit.read_text() == "[Unit]\nDescription=y\n"
    assert unit.stat().st_ino != unit_inode  # a new file renamed over the old one
    assert agent.stat().st_ino == agent_inode
    assert sorted(os.listdir(tmp_path / "opt")) == ["agent.py", "agent.service", "api_token"]


def test_a_wrong_mode_is_corrected_in_place_without_rewriting(tmp_path):
    agent_files.converge(**request(tmp_path))
    token = tmp_path / "opt" / "api_token"
    token.chmod(0o644)
    inode = token.stat().st_ino
    result = agent_files.converge(**request(tmp_path))
    assert result["changes"] == {str(token): "attributes"}
    assert (mode_of(token), token.stat().st_ino) == (0o600, inode)


def test_check_mode_says_what_would_change_and_changes_nothing(tmp_path):
    result = agent_files.converge(**request(tmp_path), check_mode=True)
    assert len(result["changed_paths"]) == 4
    assert not (tmp_path / "opt").exists()


def test_check_mode_takes_a_group_that_an_earlier_task_would_create_as_a_change(tmp_path):
    files = request(tmp_path)
    files["secret_files"][0]["group"] = "no-such-group-xyz"
    result = agent_files.converge(**files, check_mode=True)
    assert str(tmp_path / "opt" / "api_token") in result["changed_paths"]


def test_removals_take_files_and_whole_directories_and_skip_what_is_gone(tmp_path):
    venv = tmp_path / "opt" / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("x")
    old_ca = tmp_path / "ca.pem"
    old_ca.write_text("x")
    result = agent_files.converge(
        **request(tmp_path, absent=[venv, old_ca, tmp_path / "never-there"]))
    assert [result["changes"][str(path)] for path in (venv, old_ca)] == ["removed", "removed"]
    assert str(tmp_path / "never-there") not in result["changes"]
    assert not venv.exists() and not old_ca.exists()


def test_a_secret_is_in_no_diff_while_other_files_show_old_and_new(tmp_path):
    agent_files.converge(**request(tmp_path))
    result = agent_files.converge(**request(tmp_path, token="n3w-t0ken", unit="[Unit]\n"))
    text = json.dumps(result)
    assert TOKEN not in text and "n3w-t0ken" not in text
    unit_diff = next(d for d in result["diff"] if d.get("after") == "[Unit]\n")
    assert unit_diff["before"] == "[Unit]\nDescription=x\n"
    assert any("content not shown" in d.get("prepared", "") for d in result["diff"])


@pytest.mark.parametrize("problem, spec, message", [
    ("a bad mode", {"mode": "644x"}, "mode '644x' is not an octal mode"),
    ("an unknown group", {"group": "no-such-group-xyz"}, "group no-such-group-xyz does not exist"),
])
def test_a_bad_request_fails_naming_the_path_and_the_problem(tmp_path, problem, spec, message):
    files = request(tmp_path)
    files["secret_files"][0].update(spec)
    with pytest.raises(agent_files.FilesError, match=message) as caught:
        agent_files.converge(**files)
    assert str(tmp_path / "opt" / "api_token") in str(caught.value)
    assert TOKEN not in str(caught.value)


def test_a_directory_where_a_file_belongs_is_refused_not_replaced(tmp_path):
    (tmp_path / "opt" / "agent.py").mkdir(parents=True)
    with pytest.raises(agent_files.FilesError, match="is not a regular file"):
        agent_files.converge(**request(tmp_path))


def run_as_ansible(tmp_path, args):
    """The module as Ansible runs it on a host: its arguments in a file, its answer on stdout."""
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    done = subprocess.run([sys.executable, str(ROOT / "plugins/modules/agent_files.py"),
                           str(args_file)], capture_output=True, text=True, check=False)
    return done, json.loads(done.stdout)


def test_what_ansible_receives_holds_no_secret_in_check_diff_or_failure(tmp_path):
    secret = request(tmp_path)
    secret["secret_files"].append({"path": str(tmp_path / "opt" / "proxy.env"),
                                   "content": PROXY, "owner": USER, "group": GROUP})
    answers = [run_as_ansible(tmp_path, {**secret, "_ansible_check_mode": True,
                                         "_ansible_diff": True}),
               run_as_ansible(tmp_path, {**secret, "_ansible_diff": True})]
    failing = {**secret, "secret_files": [{**secret["secret_files"][0], "group": "no-such-xyz"}]}
    answers.append(run_as_ansible(tmp_path, failing))
    for done, _answer in answers:
        everything = done.stdout + done.stderr
        assert TOKEN not in everything and "pr0xy-passw0rd" not in everything
    assert answers[1][1]["changed"] is True
    assert answers[2][1]["failed"] is True
    assert "no-such-xyz does not exist" in answers[2][1]["msg"]
    assert (tmp_path / "opt" / "proxy.env").read_text() == PROXY


def files_task(tmp_path, name, **packages):
    return {"name": name, "stacksense.fleet.agent_files": dict(
        directories=[{"path": str(tmp_path / "opt"), "mode": "0755"}],
        files=[{"path": str(tmp_path / "opt" / "agent.py"), "content": "print('hi')\n"}],
        **packages)}


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/apt-get"),
                    reason="apt as root")
def test_the_action_installs_the_packages_first_and_fails_before_any_file_on_a_bad_one(tmp_path):
    # Installed already (python3) and fresh lists (a valid time of 30 years): apt changes
    # nothing and reaches no network. A package apt cannot find fails the task with its names,
    # and no file was written.
    fresh = {"apt_cache_valid_time": 10 ** 9}
    results = run_local_tasks(tmp_path, [
        files_task(tmp_path / "ok", "present", packages=["python3"], **fresh),
        dict(files_task(tmp_path / "bad", "missing", packages=["stacksense-no-such-package"],
                        **fresh), ignore_errors=True),
        dict(files_task(tmp_path / "check", "check mode", packages=["stacksense-no-such-package"]),
             check_mode=True)])
    assert results["present"]["changed"] is True  # the files, not the package
    assert results["present"]["packages"] == ["python3"]
    assert (tmp_path / "ok" / "opt" / "agent.py").read_text() == "print('hi')\n"
    bad = results["missing"]
    assert bad["failed"] and bad["msg"].startswith(
        "the agent's packages (stacksense-no-such-package) could not be installed: "), bad
    assert not (tmp_path / "bad" / "opt").exists()
    # Check mode only says so (apt cannot update its lists in check mode), and writes nothing.
    check = results["check mode"]
    assert check["changed"] and check["packages"] == ["stacksense-no-such-package"], check
    assert "would install stacksense-no-such-package" in check["msg"]
    assert not (tmp_path / "check" / "opt").exists()
