"""The role writes one line of the expected shape per value, or refuses the value.

Each test runs the real thing: ansible-playbook (the virtualenv's), against aliases of localhost
with the local connection, with the role's own files: the check task of tasks/preflight.yml,
the templates of templates/ rendered by ansible.builtin.template into a temporary directory,
and playbooks/deploy.yml itself. Nothing leaves the machine, nothing outside tmp_path is
written. One playbook run serves many hosts (one hostile value each), so the whole file takes
a few ansible-playbook start-ups.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import collections_path, load_module, role_values

ROOT = Path(__file__).resolve().parent.parent
ROLE = ROOT / "roles" / "stacksense_agent"
TEMPLATES = ROLE / "templates"
ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
UNIT = "stacksense-heartbeat.service.j2"
CRON = "stacksense-heartbeat.cron.j2"
LOGROTATE = "stacksense-heartbeat.logrotate.j2"

GOOD = {"stacksense_api_url": "https://stacksense.example.com", "stacksense_server_id": 7}
PID1 = Path("/proc/1/comm").read_text().strip()
INJECTION = "\nExecStartPre=+/bin/sh -c 'id >/tmp/pwned'\nX-Tail=/opt/y"

# (host, its variables, what the one-line message must name). Each is refused by preflight.
HOSTILE = [
    ("server_id_newline", {"stacksense_server_id": "12\n"}, ["stacksense_server_id", '"12\\n"']),
    ("server_id_unicode_digits", {"stacksense_server_id": "١٢"}, ["stacksense_server_id"]),
    (
        "url_newline",
        {"stacksense_api_url": "https://stacksense.example.com\n"},
        ["stacksense_api_url", '"https://stacksense.example.com\\n"'],
    ),
    (
        "url_injection",
        {"stacksense_api_url": "https://s.example.com" + INJECTION},
        ["stacksense_api_url"],
    ),
    (
        "url_credentials",
        {"stacksense_api_url": "https://ops:s3cret@stacksense.example.com"},
        ["stacksense_api_url", "token API", "https://***@stacksense.example.com"],
    ),
    ("url_quote", {"stacksense_api_url": 'https://s.example.com/"x'}, ["stacksense_api_url"]),
    (
        "install_dir_injection",
        {"stacksense_install_dir": "/opt/x" + INJECTION},
        ["stacksense_install_dir"],
    ),
    (
        "install_dir_newline",
        {"stacksense_install_dir": "/opt/stacksense-heartbeat\n"},
        ["stacksense_install_dir", '"/opt/stacksense-heartbeat\\n"'],
    ),
    ("install_dir_root", {"stacksense_install_dir": "/"}, ["stacksense_install_dir", '"/"']),
    (
        "install_dir_usr",
        {"stacksense_install_dir": "/usr"},
        ["stacksense_install_dir", "system directory"],
    ),
    ("install_dir_relative", {"stacksense_install_dir": "opt/agent"}, ["stacksense_install_dir"]),
    ("install_dir_dotdot", {"stacksense_install_dir": "/opt/../etc"}, ["stacksense_install_dir"]),
    (
        "install_dir_space",
        {"stacksense_install_dir": "/opt/stack sense"},
        ["stacksense_install_dir"],
    ),
    ("install_dir_percent", {"stacksense_install_dir": "/opt/%n"}, ["stacksense_install_dir"]),
    (
        "install_dir_home",
        {"stacksense_install_dir": "/home/ops/agent"},
        ["stacksense_install_dir", "/home"],
    ),
    (
        "install_dir_parent_of_unit",
        {"stacksense_install_dir": "/etc/systemd"},
        ["stacksense_install_dir"],
    ),
    (
        "ca_bundle_injection",
        {"stacksense_ca_bundle": "/etc/ssl/ca.pem" + INJECTION},
        ["stacksense_ca_bundle"],
    ),
    (
        "ca_bundle_tmp",
        {"stacksense_ca_bundle": "/tmp/ca.pem"},
        ["stacksense_ca_bundle", '"/tmp/ca.pem"'],
    ),
    ("interval_newline", {"stacksense_interval": "30\n"}, ["stacksense_interval", '"30\\n"']),
    ("timeout_newline", {"stacksense_timeout": "5\n"}, ["stacksense_timeout", '"5\\n"']),
    ("jitter_newline", {"stacksense_jitter": "0.1\n"}, ["stacksense_jitter"]),
    (
        "verify_timeout_newline",
        {"stacksense_verify_timeout": "60\n"},
        ["stacksense_verify_timeout"],
    ),
    (
        "apt_cache_newline",
        {"stacksense_apt_cache_valid_time": "3600\n"},
        ["stacksense_apt_cache_valid_time"],
    ),
    ("log_level_newline", {"stacksense_log_level": "info\n"}, ["stacksense_log_level"]),
    (
        "service_manager_newline",
        {"stacksense_service_manager": "cron\n"},
        ["stacksense_service_manager"],
    ),
    (
        "requests_source_newline",
        {"stacksense_requests_source": "pip\n"},
        ["stacksense_requests_source"],
    ),
    (
        "pip_spec_newline",
        {"stacksense_pip_requests_spec": "requests\n--index-url=http://x"},
        ["stacksense_pip_requests_spec"],
    ),
    (
        "pip_args_newline",
        {"stacksense_pip_extra_args": "--pre\n--no-deps"},
        ["stacksense_pip_extra_args"],
    ),
    (
        "token_newline_inside",
        {"stacksense_api_token": "tok-abc\ntok-def"},
        ["stacksense_api_token", "hidden"],
    ),
    (
        "token_control",
        {"stacksense_api_token": "zq-secret\x1b[2J"},
        ["stacksense_api_token", "hidden"],
    ),
    (
        "removal_install_dir_root",
        {"stacksense_agent_state": "absent", "stacksense_install_dir": "/"},
        ["stacksense_install_dir"],
    ),
]
# Values a template would write, each with a line break, rendered with no preflight at all.
BREAKS = ["\n", "\r", "\r\n", "\x00", "\u2028"]
UNIT_VALUES = {
    "stacksense_api_url": ("https://s.example.com", "STACKSENSE_API_URL"),
    "stacksense_server_id": ("12", "STACKSENSE_SERVER_ID"),
    "stacksense_interval": ("30", "STACKSENSE_INTERVAL"),
    "stacksense_timeout": ("5", "STACKSENSE_TIMEOUT"),
    "stacksense_jitter": ("0.1", "STACKSENSE_JITTER"),
    "stacksense_log_level": ("info", "STACKSENSE_LOG_LEVEL"),
    "stacksense_ca_bundle": ("/etc/ssl/ca.pem", "STACKSENSE_CA_BUNDLE"),
    "stacksense_install_dir": ("/opt/x", "ExecStart"),
}
UNIT_KEYS = re.compile(r"\A(#.*|\[(Unit|Service|Install)\]|[A-Z][A-Za-z]+=.*|)\Z")


def run_playbook(tmp_path, hosts, plays, extra_args=(), path_prefix=None, env_extra=None):
    """Run `plays` against `hosts` (name -> variables, all local) with the role's defaults as
    the inventory's group_vars (the lowest precedence, as role defaults are). Returns
    {task name: {host: result}} from the json callback, and the process."""
    inventory = tmp_path / "inventory"
    (inventory / "group_vars").mkdir(parents=True)
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    defaults["stacksense_agent_source"] = str(ROOT / "agent" / "heartbeat_agent.py")
    defaults.update(ansible_connection="local", ansible_python_interpreter=sys.executable)
    (inventory / "group_vars" / "all.yml").write_text(yaml.safe_dump(defaults))
    group = {"hosts": {name: dict(GOOD, **values) for name, values in hosts.items()}}
    (inventory / "hosts.yml").write_text(
        yaml.safe_dump({"all": {"children": {"stacksense_agents": group}}})
    )
    playbook = tmp_path / "playbook.yml"
    playbook.write_text(yaml.safe_dump(plays, sort_keys=False))
    env = dict(
        os.environ,
        ANSIBLE_STDOUT_CALLBACK="json",
        ANSIBLE_LOCALHOST_WARNING="false",
        ANSIBLE_ROLES_PATH=str(ROOT / "roles"),
        ANSIBLE_COLLECTIONS_PATH=collections_path(),
        ANSIBLE_FORKS="8",
        NO_COLOR="1",
        ANSIBLE_PIPELINING="true",
    )
    env.pop("ANSIBLE_CONFIG", None)
    env.update(env_extra or {})
    if path_prefix:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "-i", str(inventory), str(playbook), *extra_args],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    results = {}
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(
            f"ansible-playbook printed no JSON: {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
        )
    for play in report["plays"]:
        for task in play["tasks"]:
            name = task["task"]["name"].split(" : ", 1)[-1]  # without "role_name : "
            results.setdefault(name, {}).update(task["hosts"])
    return results, proc


def play(tasks, **keywords):
    # role_path: as in the role, for vars/main.yml's reads of the role's files.
    keywords["vars"] = dict(keywords.get("vars", {}), role_path=str(ROLE))
    return dict(
        {
            "hosts": "stacksense_agents",
            "gather_facts": False,
            "vars_files": [str(ROLE / "vars" / "main.yml")],
            "tasks": tasks,
        },
        **keywords,
    )


PREFLIGHT = "Check the role's variables, probe the host and check it"


def var_check_task():
    """The preflight task, its variable checks only: the probe answers nothing and the host is
    not judged (the tests below run the probe itself; tests/test_agent_probe.py the rest)."""
    tasks = yaml.safe_load((ROLE / "tasks" / "preflight.yml").read_text())
    task = next(task for task in tasks if task["name"] == PREFLIGHT)
    task["stacksense.fleet.agent_probe"].update(script="true", environment={}, checks=None)
    return task


@pytest.fixture(scope="module")
def preflight(tmp_path_factory):
    hosts = {name: values for name, values, _ in HOSTILE}
    hosts["good"] = {}
    hosts["good_token_with_final_newline"] = {
        "stacksense_server_id": "",
        "stacksense_api_token": "tok-1\n",
    }
    hosts["good_others"] = {
        "stacksense_pip_requests_spec": "requests[socks] >= 2.25, < 3",
        "stacksense_pip_extra_args": "--index-url https://pypi.example.internal/simple",
        "stacksense_ca_bundle": "/etc/ssl/certs/ca-certificates.crt",
        "stacksense_install_dir": "/srv/stacksense-heartbeat",
        "stacksense_api_url": "http://[::1]:8080/stacksense/",
        "stacksense_timeout": "2.5",
    }
    hosts["good_absent_with_bad_url"] = {
        "stacksense_agent_state": "absent",
        "stacksense_api_url": "x\n",
    }
    results, _ = run_playbook(
        tmp_path_factory.mktemp("preflight"), hosts, [play([var_check_task()])]
    )
    return results[PREFLIGHT]


@pytest.mark.parametrize("host, values, says", HOSTILE, ids=[case[0] for case in HOSTILE])
def test_preflight_refuses_the_hostile_value_in_one_line_naming_host_variable_and_value(
    preflight, host, values, says
):
    result = preflight[host]
    assert result.get("failed"), f"{host}: {values} passed the checks"
    message = result["msg"]
    assert message.startswith(f"{host}: ")
    assert "\n" not in message and "\r" not in message
    assert "Fix:" in message
    for fragment in says:
        assert fragment in message


def test_preflight_never_shows_a_password_or_a_token(preflight):
    assert "s3cret" not in preflight["url_credentials"]["msg"]
    assert "tok-" not in preflight["token_newline_inside"]["msg"]
    assert "zq-secret" not in preflight["token_control"]["msg"]


def test_preflight_accepts_good_values_and_a_token_with_a_final_newline(preflight):
    assert not preflight["good"].get("failed"), preflight["good"].get("msg")
    assert not preflight["good_token_with_final_newline"].get("failed")
    assert not preflight["good_others"].get("failed"), preflight["good_others"].get("msg")


def test_preflight_for_removal_checks_only_what_removal_uses(preflight):
    assert not preflight["good_absent_with_bad_url"].get("failed")
    assert preflight["removal_install_dir_root"].get("failed")


def test_dollar_lets_a_trailing_newline_through_jinja_match_and_the_role_patterns_do_not(tmp_path):
    task = {"name": "Match", "ansible.builtin.debug": {"msg": "{{ '12\n' is match('^[0-9]+$') }}"}}
    results, _ = run_playbook(tmp_path, {"one": {}}, [play([task])])
    assert results["Match"]["one"]["msg"] is True
    patterns = load_module("stacksense_role_variables", "plugins/filter/role_variables.py")
    assert not patterns.POSITIVE.match("12\n") and patterns.POSITIVE.match("12")
    assert not patterns.PATH.match("/opt/x\n") and patterns.PATH.match("/opt/x")


def render_tasks(template, manager="systemd"):
    return [
        {
            "name": "Render",
            "ansible.builtin.template": {
                "src": str(TEMPLATES / template),
                "dest": "{{ out_dir }}/{{ inventory_hostname }}",
                "mode": "0644",
            },
            "vars": {"stacksense_service_manager": manager},
            "ignore_errors": True,
        }
    ]


ROLE_PLAN = load_module("stacksense_role_plan", "plugins/filter/role_plan.py")


def plan_for(values, manager):
    """The preflight's plan for these values, which its checks would refuse: computed as for
    a removal (nothing derived from the agent's settings), with a watchdog of 30 s."""
    v = dict(role_values(dict(GOOD, **values)), stacksense_service_manager=manager,
             stacksense_agent_state="absent")
    return dict(ROLE_PLAN.role_plan(v), watchdog_sec=30, host={"systemd": "252"},
                in_container=False)


def render(tmp_path, template, hosts, manager="systemd"):
    """The template rendered by ansible.builtin.template with vars/main.yml, for each host a
    plan in place of the preflight's (which would refuse the values first)."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    hosts = {name: dict(values, __stacksense_host_probe={"plan": plan_for(values, manager)})
             for name, values in hosts.items()}
    results, _ = run_playbook(
        tmp_path, hosts, [play(render_tasks(template, manager), vars={"out_dir": str(out_dir)})]
    )
    return results["Render"], out_dir


@pytest.mark.parametrize("template, manager", [(UNIT, "systemd"), (CRON, "cron")])
def test_no_value_with_a_line_break_reaches_the_file_even_without_preflight(
    tmp_path, template, manager
):
    hosts = {}
    for variable, (value, _) in UNIT_VALUES.items():
        for number, line_break in enumerate(BREAKS):
            hosts[f"{variable}_{number}"] = {
                variable: value + line_break + "ExecStartPre=+/bin/true"
            }
        hosts[f"{variable}_final"] = {variable: value + "\n"}  # what `$` lets through
    hosts["token_mode"] = {"stacksense_api_token": "tok-1"}
    results, out_dir = render(tmp_path, template, hosts, manager)
    assert not results["token_mode"].get("failed"), results["token_mode"].get("msg")
    for host in hosts:
        if host == "token_mode":
            continue
        assert results[host].get("failed"), f"{host}: {hosts[host]} was written"
        assert "holds a line break or control character" in results[host]["msg"]
        assert "ExecStartPre" not in results[host]["msg"]  # the value is not shown
        assert not (out_dir / host).exists()


def test_preflight_refuses_an_unsafe_internal_value_set_with_extra_vars(tmp_path):
    extra = {"__stacksense_cron_user": "stacksense\n* * * * * root /bin/sh"}
    results, _ = run_playbook(
        tmp_path, {"h": {}}, [play([var_check_task()])], ["-e", json.dumps(extra)]
    )
    assert results[PREFLIGHT]["h"].get("failed")
    assert "internal paths or cron user" in results[PREFLIGHT]["h"]["msg"]


def test_the_refusal_names_the_setting(tmp_path):
    results, _ = render(tmp_path, UNIT, {"h": {"stacksense_install_dir": "/opt/x" + INJECTION}})
    assert "the value for ExecStart holds a line break" in results["h"]["msg"]


def test_quotes_backslashes_and_percent_signs_stay_inside_their_line(tmp_path):
    odd = 'https://s.example.com/"%n\\" ExecStartPre=+/bin/true #'
    hosts = {
        "plain": {},
        "odd": {"stacksense_api_url": odd, "stacksense_ca_bundle": odd},
        "plain_ca": {"stacksense_ca_bundle": "/etc/ssl/ca.pem"},
    }
    results, out_dir = render(tmp_path, UNIT, hosts)
    assert not results["odd"].get("failed"), results["odd"].get("msg")
    plain = (out_dir / "plain_ca").read_text().splitlines()
    lines = (out_dir / "odd").read_text().splitlines()
    assert len(lines) == len(plain)
    assert [line.split("=", 1)[0] for line in lines] == [line.split("=", 1)[0] for line in plain]
    # One line: the quote and backslash escaped, the % doubled, the rest is text.
    escaped = 'https://s.example.com/\\"%%n\\\\\\" ExecStartPre=+/bin/true #'
    assert f'Environment="STACKSENSE_API_URL={escaped}"' in lines
    assert all(UNIT_KEYS.match(line) for line in lines)
    assert not any(line.startswith("ExecStartPre") for line in lines)


def test_every_value_a_template_writes_goes_through_one_line():
    allowed = re.compile(r"\A\s*(one_line\(|env\(|ansible_managed \| comment\s*\Z)")
    for template in (UNIT, CRON, LOGROTATE):
        source = (TEMPLATES / template).read_text()
        # Inside the macros the value is already guarded: their bodies are checked by the
        # render tests above.
        body = re.sub(r"{%-? macro .*?{%-? endmacro -?%}", "", source, flags=re.S)
        expressions = re.findall(r"{{(.*?)}}", body, flags=re.S)
        assert expressions, template
        for expression in expressions:
            assert allowed.match(expression), f"{template}: {{{{{expression}}}}} is not guarded"


def deploy(tmp_path, extra_vars, login_uid=None, host_vars=None, playbook="deploy.yml"):
    """playbooks/deploy.yml on localhost, logged in as root, up to the role's probe of the
    host and its checks (nothing is installed). Escalation would run a sudo that does not
    exist (ansible_become_exe), so any attempt fails, whether or not sudo is installed.
    Ansible skips a become to the user it knows it is logged in as, which it does not know
    over SSH without ansible_user (~/.ssh/config) or over podman: BECOME_ALLOW_SAME_USER
    stands for that here. With login_uid, `id -u` answers that uid, as for another user."""
    path_prefix = None
    if login_uid is not None:
        path_prefix = tmp_path / "bin"
        path_prefix.mkdir()
        (path_prefix / "id").write_text(f"#!/bin/sh\necho {login_uid}\n")
        (path_prefix / "id").chmod(0o755)
    hosts = {"localhost": host_vars or {"ansible_become_exe": str(tmp_path / "no-sudo-here")}}
    plays = [{"ansible.builtin.import_playbook": str(ROOT / "playbooks" / playbook)}]
    return run_playbook(
        tmp_path,
        hosts,
        plays,
        ["--tags", "stacksense_preflight", "-e", json.dumps(extra_vars)],
        path_prefix=path_prefix,
        env_extra={"ANSIBLE_BECOME_ALLOW_SAME_USER": "true"},
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="logs in as the current user, which must be root")
def test_deploy_logged_in_as_root_escalates_nothing(tmp_path):
    results, _ = deploy(tmp_path, {})
    assert results["Read the login user's uid"]["localhost"]["stdout"].strip() == "0"
    probe = results[PREFLIGHT]["localhost"]
    # The probe ran and answered (it may then refuse this machine: no systemd as PID 1).
    assert probe.get("facts", {}).get("pid1") == PID1, probe.get("msg")


@pytest.mark.skipif(os.geteuid() != 0, reason="logs in as the current user, which must be root")
def test_deploy_logged_in_as_another_user_escalates_with_the_become_method(tmp_path):
    results, _ = deploy(tmp_path, {}, login_uid=1000)
    assert results["Read the login user's uid"]["localhost"]["stdout"].strip() == "1000"
    assert "no-sudo-here" in json.dumps(results[PREFLIGHT]["localhost"])


@pytest.mark.skipif(os.geteuid() != 0, reason="logs in as the current user, which must be root")
def test_deploy_escalates_with_su_when_the_inventory_says_so(tmp_path):
    # su from root to root asks for no password; a wrapper records that it ran.
    calls = tmp_path / "su-calls"
    wrapper = tmp_path / "su"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >>{calls}\nexec /bin/su "$@"\n')
    wrapper.chmod(0o755)
    host_vars = {"ansible_become_method": "su", "ansible_become_exe": str(wrapper)}
    results, _ = deploy(tmp_path, {}, login_uid=1000, host_vars=host_vars)
    probe = results[PREFLIGHT]["localhost"]
    # The probe ran and answered (it may then refuse this machine: no systemd as PID 1).
    assert probe.get("facts", {}).get("pid1") == PID1, probe.get("msg")
    assert calls.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="logs in as the current user, which must be root")
def test_deploy_with_a_hostile_install_dir_stops_before_the_probe(tmp_path):
    results, _ = deploy(tmp_path, {"stacksense_install_dir": "/opt/x" + INJECTION})
    refused = results[PREFLIGHT]["localhost"]
    assert refused.get("failed") and "stacksense_install_dir" in refused["msg"]
    assert "facts" not in refused  # the host was not probed


@pytest.mark.skipif(os.geteuid() != 0, reason="logs in as the current user, which must be root")
def test_the_role_refuses_every_hostile_value_before_it_probes_the_host(tmp_path):
    # The real deploy.yml, whose preflight task also computes the probe's settings from the
    # same values: none of them may break that before the check has refused the value.
    hosts = {name: dict({"stacksense_server_id": number,
                         "ansible_become_exe": str(tmp_path / "no-sudo-here")}, **values)
             for number, (name, values, _) in enumerate(HOSTILE, 1)
             if values.get("stacksense_agent_state", "present") == "present"}
    plays = [{"ansible.builtin.import_playbook": str(ROOT / "playbooks" / "deploy.yml")}]
    one_batch = {"stacksense_serial": ["100%"], "stacksense_max_skipped_percent": 100}
    results, _ = run_playbook(tmp_path, hosts, plays,
                              ["--tags", "stacksense_preflight", "-e", json.dumps(one_batch)],
                              env_extra={"ANSIBLE_BECOME_ALLOW_SAME_USER": "true"})
    for host in hosts:
        refused = results[PREFLIGHT][host]
        assert refused.get("failed") and refused["msg"].startswith(f"{host}: "), refused
        assert "\n" not in refused["msg"], refused
        assert "facts" not in refused, f"{host} was probed"


@pytest.mark.skipif(os.geteuid() != 0, reason="logs in as the current user, which must be root")
def test_the_preflight_checks_the_argument_spec_that_deploy_does_not_run_twice(tmp_path):
    # deploy.yml turns Ansible's own check of meta/argument_specs.yml off (one task per host);
    # the preflight task runs it instead, after the role's own checks found nothing.
    results, _ = deploy(tmp_path, {"stacksense_beside_push_agent": "perhaps"})
    assert not any(name.startswith("Validating arguments") for name in results)
    refused = results[PREFLIGHT]["localhost"]
    assert refused["msg"].startswith("localhost: the role's arguments: "), refused
    assert "stacksense_beside_push_agent" in refused["msg"] and "facts" not in refused


@pytest.mark.skipif(os.geteuid() != 0, reason="logs in as the current user, which must be root")
def test_remove_logged_in_as_root_escalates_nothing_and_refuses_to_remove_slash(tmp_path):
    results, _ = deploy(tmp_path / "good", {}, playbook="remove.yml")
    assert not results[PREFLIGHT]["localhost"].get("failed")
    results, _ = deploy(tmp_path / "slash", {"stacksense_install_dir": "/"}, playbook="remove.yml")
    refused = results[PREFLIGHT]["localhost"]
    assert '"/"' in refused["msg"] and "facts" not in refused


def test_preflight_parses_the_ca_certificate_on_the_controller_and_names_the_variable(
    tmp_path,
):
    from test_role_ca_check import ca_pem

    hosts = {
        "ca_good": {"stacksense_ca_certificate": ca_pem(days=365 * 30)},
        "ca_not_pem": {"stacksense_ca_certificate": "just some text\n"},
        "ca_broken": {"stacksense_ca_certificate": "-----BEGIN CERTIFICATE-----\nMIIB!!\n"
                      "-----END CERTIFICATE-----\n"},
    }
    for values in hosts.values():
        values["role_path"] = str(ROLE)  # as inside the role
    results, _ = run_playbook(tmp_path, hosts, [play([var_check_task()])])
    checked = results[PREFLIGHT]
    assert not checked["ca_good"].get("failed"), checked["ca_good"].get("msg")
    assert "stacksense_ca_certificate holds no PEM certificate" in checked["ca_not_pem"]["msg"]
    assert "stacksense_ca_certificate certificate 1 is not base64" in checked["ca_broken"]["msg"]
