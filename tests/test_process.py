"""The agent as a real process: systemd notifications, signals, state file, logs, secrets."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import AGENT_PATH, Reply, run_agent_process

TOKEN = "tok-5f1b9c-never-print-me"


def agent_env(url, **extra):
    env = {"STACKSENSE_SERVER_ID": "42", "STACKSENSE_API_URL": url}
    env.update(extra)
    return env


def wait_for(predicate, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def stop_and_time(process):
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=5)
    return time.monotonic() - started, out, err


@pytest.fixture
def notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def receive_until(sock, wanted):
    messages = []
    while not any(wanted in m for m in messages):
        messages.append(sock.recv(4096).decode())
    return messages


def test_it_notifies_systemd_ready_status_watchdog_and_stopping(server, notify_socket):
    sock, path = notify_socket
    env = agent_env(server.url, NOTIFY_SOCKET=path, WATCHDOG_USEC="200000")
    process = run_agent_process(env=env)
    try:
        messages = receive_until(sock, "STATUS=heartbeat ok")
        messages += receive_until(sock, "WATCHDOG=1")
    finally:
        _, _, err = stop_and_time(process)
    messages += receive_until(sock, "STOPPING=1")
    assert messages[0].startswith("READY=1")
    assert any(m.startswith("STATUS=heartbeat ok at") for m in messages)
    assert process.returncode == 0, err


def test_an_abstract_notify_socket_is_reached(agent_module):
    name = f"stacksense-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        agent_module.Notifier({"NOTIFY_SOCKET": "@" + name}).notify("READY=1")
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()


@pytest.mark.parametrize("situation", ["waiting", "retrying", "mid-request"])
def test_sigterm_ends_the_process_within_a_second(server, tmp_path, situation):
    state = tmp_path / "state.json"
    if situation == "retrying":
        server.then(*[Reply(503, {"error": "down"}, {"Retry-After": "20"}) for _ in range(5)])
    if situation == "mid-request":
        server.then(Reply(stall_s=10))
    env = agent_env(server.url, STACKSENSE_STATE_FILE=str(state), STACKSENSE_INTERVAL="60",
                    STACKSENSE_TIMEOUT="15")
    process = run_agent_process(env=env)
    if situation == "waiting":
        assert wait_for(state.exists)
    else:  # the agent is in its first beat: stalled in a request or backing off
        assert wait_for(lambda: len(server.requests) == 1)
    time.sleep(0.2)
    elapsed, _, err = stop_and_time(process)
    assert process.returncode == 0, err
    assert elapsed < 1.0


def test_the_state_file_records_success_then_failure(server, make_agent, agent_module, tmp_path):
    agent = make_agent(server.url)
    assert agent.beat_once().ok
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["agent_version"] == agent_module.AGENT_VERSION
    assert state["server_id"] == 42 and state["server_name"] == "web-01"
    assert state["pid"] == os.getpid()
    assert state["last_success_at"] == state["last_attempt_at"]
    assert state["last_error"] is None and state["consecutive_failures"] == 0
    assert state["started_at"] and state["mode"] == "legacy"
    server.then(Reply(404, {"detail": "Not found."}))
    agent.beat_once()
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["consecutive_failures"] == 1 and state["last_status"] == 404
    assert "check STACKSENSE_SERVER_ID" in state["last_error"]  # legacy mode
    assert state["last_success_at"] is not None
    assert list(tmp_path.iterdir()) == [tmp_path / "state.json"]  # no temp files left


def test_an_unwritable_state_file_is_reported_once_and_heartbeats_go_on(
        server, make_agent, tmp_path, caplog):
    agent = make_agent(server.url, state_file=str(tmp_path / "missing-dir" / "state.json"))
    results = [agent.beat_once() for _ in range(3)]
    assert all(r.ok for r in results) and len(server.requests) == 3
    complaints = [r for r in caplog.records if "cannot write state file" in r.getMessage()]
    assert len(complaints) == 1


def test_under_journald_lines_carry_a_priority_and_no_timestamp(server, agent_module):
    server.then(Reply(404, {"detail": "Not found."}))
    process = run_agent_process(env=agent_env(server.url, JOURNAL_STREAM="8:1234"))
    assert wait_for(lambda: len(server.requests) >= 1)
    time.sleep(0.2)
    _, _, err = stop_and_time(process)
    lines = err.splitlines()
    assert lines[0].startswith(f"<6>stacksense-heartbeat {agent_module.AGENT_VERSION} starting")
    assert any(line.startswith("<4>heartbeat failed: HTTP 404") for line in lines)


def test_outside_journald_lines_start_with_an_iso_timestamp(server):
    process = run_agent_process(env=agent_env(server.url))
    assert wait_for(lambda: len(server.requests) >= 1)
    time.sleep(0.2)
    _, _, err = stop_and_time(process)
    first = err.splitlines()[0]
    assert first[:4].isdigit() and first[10] == "T" and " INFO stacksense-heartbeat" in first


def test_the_token_never_appears_in_any_output(server, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    server.then(Reply(401, {"error": "Invalid or missing token"}))
    state = tmp_path / "state.json"
    env = agent_env(server.url, STACKSENSE_API_TOKEN_FILE=str(token_file),
                    STACKSENSE_STATE_FILE=str(state), STACKSENSE_LOG_LEVEL="debug")
    process = run_agent_process(env=env)
    assert wait_for(state.exists)
    _, out, err = stop_and_time(process)
    once = run_agent_process(["--once", "-v"], env=dict(env, STACKSENSE_API_TOKEN=TOKEN))
    once_out, once_err = once.communicate(timeout=10)
    check = run_agent_process(["--check-config"], env=dict(env, STACKSENSE_API_TOKEN=TOKEN))
    check_out, check_err = check.communicate(timeout=10)
    everything = out + err + once_out + once_err + check_out + check_err + state.read_text()
    assert "check STACKSENSE_API_TOKEN" in everything  # the 401 hint was shown
    assert "<redacted>" in check_out
    assert TOKEN not in everything
    assert server.requests[0]["headers"]["Authorization"] == "Bearer " + TOKEN


def test_once_prints_the_answer_and_exits_0_or_1(server):
    ok = run_agent_process(["--once"], env=agent_env(server.url))
    out, _ = ok.communicate(timeout=10)
    assert ok.returncode == 0 and '"server_name": "web-01"' in out
    server.then(Reply(404, {"detail": "Not found."}))
    failed = run_agent_process(["--once"], env=agent_env(server.url))
    out, _ = failed.communicate(timeout=10)
    assert failed.returncode == 1 and "HTTP 404" in out


def test_a_server_id_mismatch_in_token_mode_exits_78(server):
    server.then(Reply(200, {"status": "ok", "server_id": 7, "server_name": "db-02",
                            "authenticated": True}))
    process = run_agent_process(env=agent_env(server.url, STACKSENSE_API_TOKEN=TOKEN))
    _, err = process.communicate(timeout=10)
    assert process.returncode == 78
    assert "server_id is 42 but the API token belongs to server 7" in err


def test_a_crashed_loop_exits_70_so_systemd_restarts_it(agent_module, make_agent, server):
    agent = make_agent(server.url)
    agent.stop = threading.Event()

    def crash():
        raise RuntimeError("a bug")

    agent.run = crash
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert agent_module.run_daemon(agent, agent_module.Notifier({})) == 70
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def sighup_caught(pid):
    """Whether the process has a handler for SIGHUP (SigCgt in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            caught = next(line for line in status if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGHUP - 1)))


def test_the_sighup_handler_comes_before_any_slow_import():
    source = AGENT_PATH.read_text()
    body = source[source.index('"""\n', 10) + 4:]  # after the module docstring
    handler = body.index("signal.signal(signal.SIGHUP")
    assert all(line.startswith(("import signal", "import threading", "#", "HANGUP", "if "))
               or not line.strip() for line in body[:handler].splitlines()), body[:handler]


def test_sighups_from_the_first_moment_never_end_the_agent(server):
    process = run_agent_process(env=agent_env(server.url, STACKSENSE_INTERVAL="1"))
    assert wait_for(lambda: sighup_caught(process.pid), 10)
    for _ in range(40):  # through the imports, the config and the first beat
        process.send_signal(signal.SIGHUP)
        time.sleep(0.01)
    assert wait_for(lambda: len(server.requests) >= 2, 10)
    assert process.poll() is None
    _, _, err = stop_and_time(process)
    assert process.returncode == 0, err
    assert "SIGHUP received: nothing to reload" in err


@pytest.mark.parametrize("closed", ["2>&-", "2>&- 1>&-"])
def test_a_config_error_exits_78_even_with_stderr_closed(closed):
    command = f'exec "$0" "$1" {closed}'
    process = subprocess.run(["sh", "-c", command, sys.executable, str(AGENT_PATH)],
                             env={"PATH": os.environ["PATH"], "HOME": "/nonexistent",
                                  "STACKSENSE_API_URL": "not a url"},
                             stdin=subprocess.DEVNULL, timeout=30, check=False)
    assert process.returncode == 78
