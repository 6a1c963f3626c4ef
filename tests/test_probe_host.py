"""roles/stacksense_agent/files/probe_host.sh, run here as the role runs it on a host: the
stale-agent check that lets a run interrupted between installing new files and restarting the
agent converge (the next run restarts the agent that runs older files)."""

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = ROOT / "roles" / "stacksense_agent" / "files" / "probe_host.sh"


@pytest.fixture
def running_agent():
    """A real process standing in for the agent, and its start as the probe reads it."""
    process = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                               stdin=subprocess.PIPE)
    fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(") ", 1)[1].split()
    btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                 if line.startswith("btime "))
    started = btime + int(fields[19]) // os.sysconf("SC_CLK_TCK")
    yield process.pid, started
    process.communicate(b"")


def probe(agent_file, process_line):
    env = {"PATH": os.environ["PATH"], "STACKSENSE_PROBE_KEPT": str(agent_file),
           "STACKSENSE_PROBE_ROLLBACK_DIR": str(agent_file.parent / "rollback"),
           "STACKSENSE_PROBE_PROCESS_CMD": f"echo '{process_line}'"}
    out = subprocess.run(["/bin/sh", str(PROBE)], env=env, capture_output=True, text=True,
                         check=True).stdout
    return out.splitlines()


def test_an_agent_older_than_its_files_is_stale(tmp_path, running_agent):
    pid, started = running_agent
    agent_file = tmp_path / "heartbeat_agent.py"
    agent_file.write_text("new\n")
    os.utime(agent_file, (started + 60, started + 60))  # installed after the agent started
    assert "stale=yes" in probe(agent_file, f"{pid} running")


def test_an_agent_restarted_after_its_files_is_not(tmp_path, running_agent):
    pid, started = running_agent
    agent_file = tmp_path / "heartbeat_agent.py"
    agent_file.write_text("new\n")
    # A run's own restart comes right after its copy: within the probe's 2 s margin.
    os.utime(agent_file, (started + 2, started + 2))
    assert "stale=yes" not in probe(agent_file, f"{pid} running")
    os.utime(agent_file, (started - 3600, started - 3600))
    assert "stale=yes" not in probe(agent_file, f"{pid} running")


def test_no_running_agent_is_never_stale(tmp_path):
    agent_file = tmp_path / "heartbeat_agent.py"
    agent_file.write_text("new\n")
    os.utime(agent_file, (time.time() + 60,) * 2)
    for line in ("0 exited:exit status 78", "", "not-a-pid"):
        assert "stale=yes" not in probe(agent_file, line)


def test_the_roles_own_process_command_names_the_running_cron_agent(tmp_path):
    """What preflight passes (vars/main.yml's __stacksense_agent_process_cmd):
    files/agent_process.sh run as `/bin/sh -c TEXT agent_process.sh process cron PID_FILE`,
    here for a real process whose command line runs heartbeat_agent.py, as the cron-run
    agent's does."""
    agent = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()",
                              "heartbeat_agent.py"], stdin=subprocess.PIPE)
    try:
        pid_file = tmp_path / "agent.pid"
        pid_file.write_text(f"{agent.pid}\n")
        script = (ROOT / "roles" / "stacksense_agent" / "files" / "agent_process.sh").read_text()
        command = f"/bin/sh -c {shlex.quote(script)} agent_process.sh process cron {pid_file}"
        agent_file = tmp_path / "heartbeat_agent.py"
        agent_file.write_text("new\n")
        os.utime(agent_file, (time.time() + 60,) * 2)
        env = {"PATH": os.environ["PATH"], "STACKSENSE_PROBE_KEPT": str(agent_file),
               "STACKSENSE_PROBE_PROCESS_CMD": command}
        out = subprocess.run(["/bin/sh", str(PROBE)], env=env, capture_output=True, text=True,
                             check=True).stdout
        assert "stale=yes" in out.splitlines()
    finally:
        agent.communicate(b"")
