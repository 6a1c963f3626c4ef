"""stacksense_service_manager=cron without a container: the cron entry the role renders
(plugins/filter/cron_entry.py) and files/agent_process.sh, which starts, finds and stops the
agent from that entry as the role does. A stand-in agent named heartbeat_agent.py (the
script finds the agent by that name) records its pid and environment and waits for SIGTERM;
the real flock, setsid and setpriv start it, as the user root (the test runs as root)."""

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT, load_filters

cron_entry = load_filters("cron_entry")["cron_entry"]
SCRIPT = ROOT / "roles" / "stacksense_agent" / "files" / "agent_process.sh"
STAND_IN = """\
import json, os, signal, sys
ran = os.path.join(os.path.dirname(sys.argv[0]), "ran.json")
with open(ran + ".tmp", "w") as out:
    json.dump({"pid": os.getpid(), "env": dict(os.environ)}, out)
os.rename(ran + ".tmp", ran)
signal.pause()
"""


def wait_for(path, seconds=10):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)
    return path


def run(*args):
    return subprocess.run(["/bin/sh", str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.fixture
def cron_host(tmp_path):
    """A cron file as the role writes it, for the stand-in agent, with a proxy file."""
    agent = tmp_path / "heartbeat_agent.py"
    agent.write_text(STAND_IN)
    proxy = tmp_path / "proxy.env"
    proxy.write_text("HTTPS_PROXY='http://proxy.example:3128'\n")
    paths = {name: tmp_path / name for name in ("agent.lock", "agent.pid", "agent.log",
                                                 "state.json", "cron", "ran.json")}
    settings = {"STACKSENSE_API_URL": "https://s.example.com/%x", "STACKSENSE_INTERVAL": "30"}
    entry = cron_entry(settings, python=sys.executable, agent=str(agent),
                       lock_file=str(paths["agent.lock"]), pid_file=str(paths["agent.pid"]),
                       log_file=str(paths["agent.log"]), state_file=str(paths["state.json"]),
                       home=str(tmp_path), token_file="/etc/x/api_token", proxy_file=str(proxy))
    lines = ['MAILTO=""'] + [f'{name}="{value}"' for name, value in sorted(entry["env"].items())]
    lines.append("* * * * * root " + entry["command"].replace("%", "\\%"))
    paths["cron"].write_text("\n".join(lines) + "\n")
    paths["entry"] = entry
    yield paths
    run("stop", paths["agent.pid"])


def test_the_command_line_keeps_the_shape_the_readme_shows():
    entry = cron_entry({}, python="/usr/bin/python3", agent="/opt/s/heartbeat_agent.py",
                       lock_file="/var/lib/s/agent.lock", pid_file="/var/lib/s/agent.pid",
                       log_file="/var/log/s/agent.log", state_file="/var/lib/s/state.json",
                       home="/var/lib/s")
    assert entry["command"] == (
        "/usr/bin/flock -n -F /var/lib/s/agent.lock /bin/sh -c 'echo $$ >\"$0\" && exec \"$@\"' "
        "/var/lib/s/agent.pid /usr/bin/python3 /opt/s/heartbeat_agent.py "
        ">>/var/log/s/agent.log 2>&1")
    assert entry["env"] == {"PATH": "/usr/bin:/bin", "SHELL": "/bin/sh", "HOME": "/var/lib/s",
                            "STACKSENSE_STATE_FILE": "/var/lib/s/state.json"}


@pytest.mark.skipif(os.geteuid() != 0, reason="starts the agent as root with setpriv")
def test_start_runs_the_cron_entry_as_cron_would_and_stop_ends_it(cron_host):
    started = run("start", cron_host["agent.pid"], cron_host["cron"], "root",
                  cron_host["agent.log"])
    assert started.returncode == 0, started.stderr
    assert started.stdout.startswith("started: ")
    pid = int(started.stdout.split()[1])
    ran = json.loads(wait_for(cron_host["ran.json"]).read_text())
    # The lock holder's pid is the agent's, and the agent got the entry's variables (the
    # % unescaped), the proxy from its file, and nothing of this process's environment.
    assert ran["pid"] == pid == int(cron_host["agent.pid"].read_text())
    for name, value in cron_host["entry"]["env"].items():
        assert ran["env"][name] == value
    assert ran["env"]["STACKSENSE_API_URL"] == "https://s.example.com/%x"
    assert ran["env"]["HTTPS_PROXY"] == "http://proxy.example:3128"
    assert "PYTEST_CURRENT_TEST" not in ran["env"]
    assert run("process", "cron", cron_host["agent.pid"]).stdout == f"{pid} running\n"

    # Cron's next minute, and the role's next start, leave the running agent alone.
    again = subprocess.run(["/bin/sh", "-c", cron_host["entry"]["command"]], timeout=30,
                           check=False)
    assert again.returncode != 0 and int(cron_host["agent.pid"].read_text()) == pid
    assert run("start", cron_host["agent.pid"], cron_host["cron"], "root",
               cron_host["agent.log"]).stdout == f"running: {pid}\n"

    stopped = run("stop", cron_host["agent.pid"])
    assert stopped.returncode == 0 and stopped.stdout == f"stopping {pid}\n"
    assert run("pid", cron_host["agent.pid"]).stdout == "0\n"
    cron_host["state.json"].write_text('{"pid": 1}')
    assert run("process", "cron", cron_host["agent.pid"], cron_host["state.json"]).stdout == (
        '0 exited:unknown status\n{"pid": 1}')


def test_start_fails_saying_so_when_the_cron_file_has_no_command(tmp_path):
    (tmp_path / "cron").write_text('MAILTO=""\n')
    result = run("start", tmp_path / "pid", tmp_path / "cron", "root", tmp_path / "log")
    assert result.returncode == 1 and "no command in" in result.stderr


def test_an_unknown_action_is_refused_with_the_usage():
    result = run("reload")
    assert result.returncode == 2 and "usage: agent_process.sh" in result.stderr
