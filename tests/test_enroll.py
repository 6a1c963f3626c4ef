"""playbooks/enroll.yml and its decisions (playbooks/files/stacksense_enroll.py).

The decisions are called as plain functions. The playbook runs for real (ansible-playbook,
about 5 s a run) against a stand-in for the StackSense server host on loopback: the server
host is `localhost` (connection local) whose checkout holds tests/standin/manage.py, which
answers `dumpdata` and `create_agent_token` like the real commands, backed by a reference
receiver in a thread, so that a minted token really works for heartbeats and a rotated one
stops at once. Vault files are written with the real ansible-vault and a password file.
"""

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
from conftest import load_module

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


enroll = load_module("stacksense_enroll", "playbooks/files/stacksense_enroll.py")
receiver_module = load_module("stacksense_receiver_for_enroll", "receiver/stacksense_receiver.py")

MINTED = """
Created agent token for 'web-01' (id=1).

  Save this token now -- it will not be shown again:

    AbCdEfGhIjKlMnOpQrStUvWxYz0123456789_-abcde

  (token prefix on record: AbCdEfGh...)

"""
ROTATED = MINTED.replace("Created agent token for 'web-01' (id=1).",
                         "Rotated agent token for 'web-01' (id=1). "
                         "The previous token no longer works.")


def dumpdata(*servers):
    """dumpdata JSON for (id, name, credential or None) triples, as the real server prints."""
    records = [{"model": "core.server", "pk": i, "fields": {"name": n, "ip_address": "10.0.0.1"}}
               for i, n, _ in servers]
    records += [{"model": "core.agentcredential", "pk": i, "fields": dict(
        {"server": i, "token_hash": "0" * 64, "token_prefix": "AbCdEfGh", "enabled": True,
         "last_used_at": None, "last_used_ip": None}, **c)} for i, _, c in servers if c is not None]
    return json.dumps(records)


def decide(host, dump, rotate=(), vars_dir="/nonexistent", server_id=""):
    return enroll.decide({"host": host, "name": host, "server_id": server_id},
                         enroll.parse_dumpdata(dump), set(rotate), vars_dir)


# ---------------------------------------------------------------- decisions


def test_a_server_without_a_token_gets_one_minted():
    decision = decide("web-01", dumpdata((1, "web-01", None)))

    assert (decision["action"], decision["server_id"]) == ("mint", 1)


def test_a_server_with_a_token_is_left_alone_saying_when_it_was_last_used():
    dump = dumpdata((4, "web-01", {"last_used_at": "2026-12-01T10:00:00Z",
                                   "last_used_ip": "10.0.0.9"}))

    decision = decide("web-01", dump)

    assert decision["action"] == "leave"
    assert "last used 2026-12-01T10:00:00Z from 10.0.0.9" in decision["message"]
    assert "stacksense_enroll_rotate_hosts" in decision["message"]


def test_a_server_with_a_token_is_rotated_only_when_its_host_is_named():
    dump = dumpdata((4, "web-01", {}), (5, "web-02", {}))

    assert decide("web-01", dump, rotate=["web-01"])["action"] == "rotate"
    assert decide("web-02", dump, rotate=["web-01"])["action"] == "leave"


def test_a_missing_server_is_listed_with_the_dashboard_form_to_use():
    decision = decide("web-09", dumpdata((1, "web-01", None)))

    assert decision["action"] == "missing"
    assert "Add server (agent)" in decision["message"] and "licence" in decision["message"]


def test_two_servers_of_one_name_need_the_hosts_server_id():
    dump = dumpdata((3, "web-01", None), (7, "web-01", None))

    assert decide("web-01", dump)["action"] == "conflict"
    assert "ids 3, 7" in decide("web-01", dump)["message"]
    assert decide("web-01", dump, server_id="7")["server_id"] == 7


@pytest.mark.parametrize(("server_id", "says"), [
    ("2", "has id 1: fix one of them"), ("x1", "is not a number")])
def test_an_inventory_id_that_does_not_match_the_name_is_refused(server_id, says):
    decision = decide("web-01", dumpdata((1, "web-01", None)), server_id=server_id)

    assert decision["action"] == "conflict" and says in decision["message"]


def test_an_existing_vars_file_is_never_overwritten(tmp_path):
    (tmp_path / "web-01").mkdir()
    (tmp_path / "web-01" / "stacksense_vault.yml").write_text("other: secret\n")

    decision = decide("web-01", dumpdata((1, "web-01", None)), vars_dir=str(tmp_path))

    assert decision["action"] == "conflict" and "exists" in decision["message"]


def test_rotating_a_host_outside_the_inventory_is_refused():
    with pytest.raises(enroll.EnrollError, match="not in the group stacksense_agents: web-9"):
        enroll.plan({"dumpdata": "[]", "hosts": [], "all_hosts": ["web-01"],
                     "rotate": ["web-9"], "vars_dir": "/x"})


def test_output_that_is_not_dumpdata_json_is_one_line_naming_the_command():
    with pytest.raises(enroll.EnrollError, match="dumpdata did not print JSON: Unknown command"):
        enroll.parse_dumpdata("Unknown command: 'dumpdata'\n")


@pytest.mark.parametrize(("output", "rotated"), [(MINTED, False), (ROTATED, True)])
def test_the_token_is_read_from_create_agent_token_output(output, rotated):
    assert enroll.parse_minted(output, 1) == (
        "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789_-abcde", rotated)


def test_a_token_minted_for_another_id_is_refused():
    with pytest.raises(enroll.EnrollError, match="for id 1, not for id 2"):
        enroll.parse_minted(MINTED, 2)


# ---------------------------------------------------------------- vault files


@pytest.fixture
def vault_password(tmp_path, monkeypatch):
    password_file = tmp_path / "vault-pass"
    password_file.write_text("correct horse\n")
    monkeypatch.setenv("ANSIBLE_VAULT_PASSWORD_FILE", str(password_file))
    monkeypatch.setattr(sys, "executable", str(BIN / "python"))  # ansible-vault beside it
    return password_file


def test_save_writes_an_encrypted_owner_only_file_and_returns_no_token(tmp_path, vault_password):
    path = tmp_path / "host_vars" / "web-01" / "stacksense_vault.yml"

    answer = enroll.save({"output": MINTED, "host": "web-01", "server_id": 1,
                          "path": str(path)})

    assert "AbCdEfGh" not in json.dumps(answer)
    text = path.read_text()
    assert text.startswith("$ANSIBLE_VAULT;") and "AbCdEfGh" not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    plain = subprocess.run([str(BIN / "ansible-vault"), "view", str(path)],
                           capture_output=True, text=True, check=True).stdout
    assert "stacksense_server_id: 1\n" in plain
    assert 'stacksense_api_token: "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789_-abcde"' in plain


def test_without_a_vault_password_the_check_fails_in_one_line_naming_the_settings(
        monkeypatch, tmp_path):
    monkeypatch.delenv("ANSIBLE_VAULT_PASSWORD_FILE", raising=False)
    monkeypatch.setenv("ANSIBLE_CONFIG", str(tmp_path / "none.cfg"))
    monkeypatch.setattr(sys, "executable", str(BIN / "python"))

    with pytest.raises(enroll.EnrollError,
                       match=r"vault_password_file.*stacksense_enroll_vault_id"):
        enroll.check_vault({})


# ---------------------------------------------------------------- the playbook


@pytest.fixture
def server():
    """The reference receiver: web-01 and web-02 without token, web-03 with one."""
    receiver = receiver_module.make_server([
        {"id": 1, "name": "web-01"}, {"id": 2, "name": "web-02"},
        {"id": 3, "name": "web-03", "token": "web-03-push-agent-token"}])
    thread = threading.Thread(target=receiver.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    yield receiver
    receiver.shutdown()
    receiver.server_close()


def write_inventory(directory, server, hosts, manage_command=False):
    """An operator's inventory; manage_command: the server's manage.py as a command (like
    `docker exec monitoring_web python manage.py`) instead of a checkout and its Python."""
    directory.mkdir(exist_ok=True)
    server_host = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                   "stacksense_enroll_server_environment": {
                       "STACKSENSE_STANDIN_RECEIVER": server.url}}
    if manage_command:
        server_host["stacksense_enroll_manage_command"] = [
            sys.executable, str(ROOT / "tests" / "standin" / "manage.py")]
    else:
        server_host.update(stacksense_enroll_server_dir=str(ROOT / "tests" / "standin"),
                           stacksense_enroll_server_python=sys.executable)
    inventory = {"all": {"children": {
        "stacksense_agents": {"hosts": {host: {} for host in hosts}},
        "stacksense_server": {"hosts": {"stacksense-server": server_host}}}}}
    (directory / "hosts.yml").write_text(json.dumps(inventory))
    return directory / "hosts.yml"


def run_enroll(inventory, vault_password, *extra):
    env = dict(os.environ, ANSIBLE_VAULT_PASSWORD_FILE=str(vault_password), ANSIBLE_NOCOLOR="1",
               ANSIBLE_FORCE_COLOR="0", ANSIBLE_STDOUT_CALLBACK="default")
    return subprocess.run(
        [str(BIN / "ansible-playbook"), "-v", "-i", str(inventory),
         str(ROOT / "playbooks" / "enroll.yml"), *extra],
        cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=300)


def token_of(server, server_id):
    return server.store.server_by_id(server_id)["token"]


def ping(server, token):
    return requests.get(server.url + "/api/agent/ping/", timeout=5,
                        headers={"Authorization": f"Bearer {token}"})


def test_enroll_mints_working_tokens_into_vault_files_and_a_second_run_changes_nothing(
        tmp_path, server, vault_password):
    inventory = write_inventory(tmp_path / "inventory", server, ["web-01", "web-02"])

    checked = run_enroll(inventory, vault_password, "--check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "web-01: server 'web-01' (id 1) has no agent token: creating one" in checked.stdout
    assert token_of(server, 1) is None  # --check mints nothing

    first = run_enroll(inventory, vault_password)
    second = run_enroll(inventory, vault_password)

    assert first.returncode == 0, first.stdout + first.stderr
    assert "changed=2" in first.stdout
    assert second.returncode == 0, second.stdout + second.stderr
    assert "changed=0" in second.stdout and "nothing to do" in second.stdout
    for server_id, host in ((1, "web-01"), (2, "web-02")):
        token = token_of(server, server_id)
        assert ping(server, token).json()["server_id"] == server_id
        assert token not in first.stdout + first.stderr + second.stdout + second.stderr
        vars_file = tmp_path / "inventory" / "host_vars" / host / "stacksense_vault.yml"
        assert stat.S_IMODE(vars_file.stat().st_mode) == 0o600
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert token_of(server, 1) not in path.read_text(errors="replace"), path


def test_a_server_that_has_a_token_keeps_it_unless_its_host_is_named_for_rotation(
        tmp_path, server, vault_password):
    inventory = write_inventory(tmp_path / "inventory", server, ["web-03"], manage_command=True)

    left = run_enroll(inventory, vault_password)

    assert left.returncode == 2
    assert "web-03: server 'web-03' (id 3) already has an agent token (never used): left " \
           "alone" in left.stdout
    assert ping(server, "web-03-push-agent-token").status_code == 200
    assert not (tmp_path / "inventory" / "host_vars").exists()

    rotated = run_enroll(inventory, vault_password,
                         "-e", '{"stacksense_enroll_rotate_hosts": ["web-03"]}')

    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    assert "its replaced token written to" in rotated.stdout
    assert ping(server, "web-03-push-agent-token").status_code == 401
    assert ping(server, token_of(server, 3)).json()["server_id"] == 3
