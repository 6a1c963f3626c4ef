"""The collection's filter plugins (plugins/filter/), called as plain functions."""

import math

import pytest
import yaml
from conftest import AGENT_PATH, ROOT, load_filters, load_module, role_values

host_probe = load_filters("host_probe")["host_probe"]

PROBE = [
    "pid1=systemd",
    "systemd=252 (252.39-1~deb12u1)",
    "os=debian ",
    "os_name=Debian GNU/Linux 12 (bookworm)",
    "container=podman",
    "propagation=shared",
    "apt_lists=4",
    "exists=/etc/systemd/system/stacksense-heartbeat.service",
    "exists=/etc/stacksense-heartbeat/api_token",
    "dir=/opt/stacksense-heartbeat 755 root:root",
    "dir=/etc/stacksense-heartbeat 700 root:root",
    "kept=/opt/stacksense-heartbeat/heartbeat_agent.py",
    "dpkg=python3 ii ",
    "dpkg=python3-requests un ",
    "dpkg=cron ii ",
]


def test_the_probe_gives_the_facts_with_values_that_hold_spaces_and_equal_signs():
    facts = host_probe([*PROBE, "os_name=Odd = Name"])["facts"]
    assert facts["pid1"] == "systemd"
    assert facts["systemd"] == "252 (252.39-1~deb12u1)"
    assert facts["os"].split() == ["debian"]
    assert facts["os_name"] == "Odd = Name"  # the last line of a name wins
    assert facts["apt_lists"] == "4"
    assert not {"exists", "dir", "kept", "dpkg"} & set(facts)


def test_the_probe_lists_the_files_dirs_and_kept_copies_it_found():
    probe = host_probe(PROBE)
    assert probe["files"] == ["/etc/systemd/system/stacksense-heartbeat.service",
                              "/etc/stacksense-heartbeat/api_token"]
    assert probe["dirs"] == {"/opt/stacksense-heartbeat": "755 root:root",
                             "/etc/stacksense-heartbeat": "700 root:root"}
    assert probe["kept"] == ["/opt/stacksense-heartbeat/heartbeat_agent.py"]


def test_only_packages_dpkg_reports_installed_count_as_installed():
    assert host_probe(PROBE)["packages"] == ["python3", "cron"]


def test_an_empty_or_missing_answer_gives_empty_facts_and_lists():
    for answer in (None, [], ["", "garbage", "Upper=case"]):
        assert host_probe(answer) == {"facts": {}, "files": [], "dirs": {}, "kept": [],
                                      "packages": []}


host_problems = load_filters("host_probe")["host_problems"]
GOOD_HOST = {"pid1": "systemd", "systemd": "252", "os": "debian ", "os_name": "Debian 12",
             "container": "", "propagation": "shared", "ca_bundle": "missing"}


def test_a_debian_host_with_systemd_247_or_newer_can_run_the_agent():
    assert host_problems(GOOD_HOST) == []
    assert host_problems(dict(GOOD_HOST, os="ubuntu debian", systemd="247"), token=True) == []


@pytest.mark.parametrize("facts, kwargs, says", [
    ({"pid1": "init"}, {}, "the init system (PID 1) is 'init'"),
    ({"systemd": "241"}, {}, "systemd is version 241;"),
    ({"systemd": ""}, {}, "systemd is version unknown;"),
    ({"os": "alpine ", "os_name": "Alpine"}, {}, "the OS is Alpine (ID and ID_LIKE 'alpine')"),
    ({}, {"ca_bundle": "/etc/ssl/ca.pem"}, "stacksense_ca_bundle is '/etc/ssl/ca.pem', but no"),
    ({"container": "podman", "propagation": "private"}, {"token": True},
     "this host is a container whose / has 'private' mount propagation"),
])
def test_each_host_problem_is_named(facts, kwargs, says):
    problems = host_problems(dict(GOOD_HOST, **facts), **kwargs)
    assert len(problems) == 1 and problems[0].startswith(says), problems


def test_cron_hosts_need_neither_systemd_nor_shared_propagation():
    facts = dict(GOOD_HOST, pid1="sh", systemd="", container="docker", propagation="private")
    assert host_problems(facts, cron=True, token=True) == []
    assert len(host_problems(facts, token=True)) == 3


# --- agent_settings: the role's settings judged by the agent's own rules ---------------------

agent_settings = load_filters("agent_settings")
agent_env = agent_settings["agent_env"]
agent_problems = agent_settings["agent_problems"]
agent_derived = agent_settings["agent_derived"]

ROLE_VARIABLES = {  # role_plan.py's SETTINGS: env -> variable
    "STACKSENSE_API_URL": "stacksense_api_url",
    "STACKSENSE_SERVER_ID": "stacksense_server_id",
    "STACKSENSE_INTERVAL": "stacksense_interval",
    "STACKSENSE_TIMEOUT": "stacksense_timeout",
    "STACKSENSE_JITTER": "stacksense_jitter",
    "STACKSENSE_LOG_LEVEL": "stacksense_log_level",
    "STACKSENSE_CA_BUNDLE": "stacksense_ca_bundle",
}
GOOD_ENV = {"STACKSENSE_API_URL": "https://stacksense.example.com", "STACKSENSE_SERVER_ID": "7",
            "STACKSENSE_INTERVAL": "30", "STACKSENSE_JITTER": "0.1", "STACKSENSE_LOG_LEVEL": "info"}

# One table for both judges: (environment variable, value). Values inside the server's
# offline window, so that the agent's settings_problems() alone decides.
AGENT_VALUES = [
    ("STACKSENSE_SERVER_ID", "42"), ("STACKSENSE_SERVER_ID", "0"), ("STACKSENSE_SERVER_ID", "-3"),
    ("STACKSENSE_SERVER_ID", "4.2"), ("STACKSENSE_SERVER_ID", "١٢"), ("STACKSENSE_SERVER_ID", "x"),
    ("STACKSENSE_SERVER_ID", " 42 "), ("STACKSENSE_SERVER_ID", "1" * 19),
    ("STACKSENSE_API_URL", "http://10.0.0.5:8000"), ("STACKSENSE_API_URL", "https://[::1]/s/"),
    ("STACKSENSE_API_URL", "ftp://s.example.com"), ("STACKSENSE_API_URL", "https://s.example.com:0"),
    ("STACKSENSE_API_URL", "https://s.exämple.com"), ("STACKSENSE_API_URL", "https://a b.com"),
    ("STACKSENSE_API_URL", "https://s.example.com/?q=1"), ("STACKSENSE_API_URL", "s.example.com"),
    ("STACKSENSE_API_URL", "https://999.1.1.1"),
    ("STACKSENSE_INTERVAL", "30"), ("STACKSENSE_INTERVAL", "1"), ("STACKSENSE_INTERVAL", "1.5"),
    ("STACKSENSE_INTERVAL", "0"), ("STACKSENSE_INTERVAL", "0.5"), ("STACKSENSE_INTERVAL", "-30"),
    ("STACKSENSE_INTERVAL", "abc"), ("STACKSENSE_INTERVAL", "nan"), ("STACKSENSE_INTERVAL", "inf"),
    ("STACKSENSE_TIMEOUT", "5"), ("STACKSENSE_TIMEOUT", "0.1"), ("STACKSENSE_TIMEOUT", "0.05"),
    ("STACKSENSE_TIMEOUT", "30"), ("STACKSENSE_TIMEOUT", "45"), ("STACKSENSE_TIMEOUT", "soon"),
    ("STACKSENSE_JITTER", "0"), ("STACKSENSE_JITTER", "0.5"), ("STACKSENSE_JITTER", "0.51"),
    ("STACKSENSE_JITTER", "-0.1"), ("STACKSENSE_JITTER", "nan"), ("STACKSENSE_JITTER", "10%"),
    ("STACKSENSE_LOG_LEVEL", "debug"), ("STACKSENSE_LOG_LEVEL", "WARNING"),
    ("STACKSENSE_LOG_LEVEL", "verbose"), ("STACKSENSE_LOG_LEVEL", "trace"),
]


def role_table(env):
    return [{"env": name, "var": var, "value": env.get(name, "")}
            for name, var in ROLE_VARIABLES.items()]


@pytest.mark.parametrize("name, value", AGENT_VALUES, ids=[f"{n}={v}" for n, v in AGENT_VALUES])
def test_preflight_refuses_exactly_what_the_agent_refuses_and_names_the_variable(
        agent_module, name, value):
    env = dict(GOOD_ENV, **{name: value})
    agent_says = agent_module.settings_problems(env)
    role_says = agent_problems(role_table(env))
    assert bool(role_says) == bool(agent_says), (agent_says, role_says)
    for message in role_says:
        assert message.startswith(ROLE_VARIABLES[name] + " "), message
        assert "STACKSENSE_" not in message and "Fix:" in message and "\n" not in message


def test_the_token_is_judged_by_the_agent_and_never_shown():
    for token, refused in (("tok-1", False), ("tok 1", True), ("tok\x01", True), ("", False)):
        says = agent_problems(role_table(dict(GOOD_ENV, STACKSENSE_SERVER_ID="")),
                              {"STACKSENSE_API_TOKEN": token} if token else {})
        assert bool(says) == (refused or not token), says
        assert all(token not in message for message in says if token)
    says = agent_problems(role_table(GOOD_ENV), {"STACKSENSE_API_TOKEN": "s3cret space"})
    assert says[0].startswith("stacksense_api_token ") and "s3cret" not in says[0]


def test_a_line_break_is_refused_even_where_the_agent_would_strip_it():
    says = agent_problems(role_table(dict(GOOD_ENV, STACKSENSE_INTERVAL="30\n")))
    assert says and says[0].startswith('stacksense_interval is "30\\n"'), says


def test_an_interval_that_outlasts_the_offline_window_is_refused_saying_why_and_how_far():
    assert agent_problems(role_table(dict(GOOD_ENV, STACKSENSE_INTERVAL="133"))) == []
    [message] = agent_problems(role_table(dict(GOOD_ENV, STACKSENSE_INTERVAL="134")))
    assert message.startswith("stacksense_interval is 134 s with a timeout of 10 s")
    assert "181 s, past the 180 s" in message and "at most 133" in message
    # A long timeout makes each try of a retried beat longer: less room for the interval.
    [message] = agent_problems(role_table(dict(GOOD_ENV, STACKSENSE_INTERVAL="100",
                                               STACKSENSE_TIMEOUT="30")))
    assert "at most 90" in message


def test_the_offline_window_follows_the_agents_policy_constants(agent_module):
    window = agent_module.SERVER_OFFLINE_AFTER_S
    backoff = sum(min(agent_module.BACKOFF_CAP_S, agent_module.BACKOFF_BASE_S * 2 ** n)
                  for n in range(agent_module.MAX_ATTEMPTS_PER_BEAT - 1))
    longest_beat = agent_module.MAX_ATTEMPTS_PER_BEAT * agent_module.DEFAULT_TIMEOUT_S + backoff
    last_good = int(window - longest_beat)
    assert agent_problems(role_table(dict(GOOD_ENV, STACKSENSE_INTERVAL=str(last_good)))) == []
    assert agent_problems(role_table(dict(GOOD_ENV, STACKSENSE_INTERVAL=str(last_good + 1))))


def test_the_unit_and_cron_get_the_set_settings_in_the_tables_order():
    table = role_table(dict(GOOD_ENV, STACKSENSE_TIMEOUT="", STACKSENSE_INTERVAL=15))
    assert list(agent_env(table)) == ["STACKSENSE_API_URL", "STACKSENSE_SERVER_ID",
                                      "STACKSENSE_INTERVAL", "STACKSENSE_JITTER",
                                      "STACKSENSE_LOG_LEVEL"]
    assert agent_env(table)["STACKSENSE_INTERVAL"] == "15"


def test_the_derived_timeout_and_watchdog_are_the_agents(agent_module):
    for interval in ("4", "12", "15", "19", "30", "600"):
        derived = agent_derived(role_table(dict(GOOD_ENV, STACKSENSE_INTERVAL=interval)))
        assert derived["timeout"] == agent_module.default_timeout(float(interval))
        assert derived["watchdog_s"] == max(60, math.ceil(derived["timeout"] * 4))
    assert agent_derived(role_table(dict(GOOD_ENV, STACKSENSE_TIMEOUT="20")))["watchdog_s"] == 80


def test_the_expected_version_is_the_agents_own_line(agent_module):
    agent_version = agent_settings["agent_version"]
    assert agent_version(AGENT_PATH.read_text()) == agent_module.AGENT_VERSION
    assert agent_version('x = 1\nAGENT_VERSION = "2.0.0-rc1"\n') == "2.0.0-rc1"
    for text in ("", None, '  AGENT_VERSION = "1"', 'AGENT_VERSION = ""', "AGENT_VERSION = 1"):
        assert agent_version(text) == ""


def test_the_agent_trusts_the_roles_certificate_else_the_bundle_set_else_pips_host_store():
    ca_bundle = agent_settings["agent_ca_bundle"]
    own, system = "/opt/s/ca-certificates.pem", "/etc/ssl/certs/ca-certificates.crt"
    assert ca_bundle("/etc/ssl/mine.pem", True, own, "pip", system) == own
    assert ca_bundle("/etc/ssl/mine.pem", False, own, "pip", system) == "/etc/ssl/mine.pem"
    assert ca_bundle("", False, own, "pip", system) == system
    assert ca_bundle(None, False, own, "package", system) == ""  # Debian's requests: the store


def test_the_packages_wanted_are_the_sources_and_crons_less_those_installed_in_order():
    agent_packages = load_filters("host_probe")["agent_packages"]
    table = {"package": ["python3", "python3-requests"],
             "pip": ["python3", "python3-venv", "ca-certificates"], "cron": ["cron", "python3"]}
    assert agent_packages(table, "package") == ["python3", "python3-requests"]
    assert agent_packages(table, "pip", cron=True) == ["python3", "python3-venv",
                                                        "ca-certificates", "cron"]
    assert agent_packages(table, "pip", cron=True, installed=["python3", "cron"]) == [
        "python3-venv", "ca-certificates"]
    assert agent_packages(table, "package", installed=["python3", "python3-requests"]) == []
    # A value the preflight refuses (it names stacksense_requests_source) breaks nothing first.
    assert agent_packages(table, "pip\n") == []


# --- fleet_conflicts: hosts of one run that would report as one server -----------------------

fleet_conflicts = load_filters("fleet_conflicts")["fleet_conflicts"]


def test_two_hosts_with_one_token_are_named_without_the_token():
    hostvars = {"web-01": {"stacksense_api_token": "tok-A\n"}, "web-02": {},
                "web-03": {"stacksense_api_token": "tok-A"},
                "web-04": {"stacksense_api_token": "B"}}
    [message] = fleet_conflicts(hostvars, list(hostvars))
    assert message.startswith("web-01 and web-03 have the same stacksense_api_token")
    assert "tok-A" not in message and "Fix:" in message


def test_hosts_with_one_server_id_are_named_with_the_id_and_empty_ids_are_not_shared():
    hostvars = {"a": {"stacksense_server_id": 12}, "b": {"stacksense_server_id": "12"},
                "c": {"stacksense_server_id": "12 "}, "d": {"stacksense_server_id": ""},
                "e": {"stacksense_server_id": None}, "f": {"stacksense_server_id": 13}}
    [message] = fleet_conflicts(hostvars, list(hostvars))
    assert message.startswith("a, b and c have the same stacksense_server_id (12)")


def test_only_the_hosts_of_the_run_count():
    hostvars = {"a": {"stacksense_server_id": 1}, "b": {"stacksense_server_id": 1}}
    assert fleet_conflicts(hostvars, ["a"]) == []


# --- rollback_files: what a rollback restores ------------------------------------------------

rollback_files = load_filters("rollback_files")["rollback_files"]
PATHS = {"agent": "/opt/s/heartbeat_agent.py", "unit": "/etc/systemd/system/s.service",
         "cron": "/etc/cron.d/s", "token": "/etc/s/api_token", "ca": "/opt/s/ca.pem",
         "proxy": "/etc/s/proxy.env"}


def test_a_plain_systemd_run_restores_agent_and_unit_and_forgets_every_other_kept_copy():
    sets = rollback_files(PATHS, "/opt/s/rollback")
    assert sets["restore"] == [PATHS["agent"], PATHS["unit"]]
    assert sets["candidates"] == [PATHS["agent"], PATHS["unit"], PATHS["token"], PATHS["ca"],
                                  PATHS["proxy"]]
    assert sets["unused_kept"] == ["/opt/s/rollback/api_token", "/opt/s/rollback/ca.pem",
                                   "/opt/s/rollback/proxy.env", "/opt/s/rollback/s"]


def test_a_cron_run_with_token_and_proxy_restores_those_and_forgets_the_unit_and_ca():
    sets = rollback_files(PATHS, "/opt/s/rollback", cron=True, token=True, proxy=True)
    assert sets["restore"] == [PATHS["agent"], PATHS["cron"], PATHS["token"], PATHS["proxy"]]
    assert sets["candidates"][:2] == [PATHS["agent"], PATHS["cron"]]
    assert sets["unused_kept"] == ["/opt/s/rollback/ca.pem", "/opt/s/rollback/s.service"]


# --- redacted: values as messages show them ---------------------------------------------------

redacted = load_filters("redacted")["redacted"]


def test_a_server_url_is_shown_without_its_credentials():
    assert redacted("https://ops:s3cret@s.example.com/x") == "https://***@s.example.com/x"
    assert redacted("https://s.example.com/a@b") == "https://s.example.com/a@b"


def test_a_proxy_is_shown_without_anything_before_its_last_at_or_not_at_all():
    assert (redacted("http://u:p@ss@proxy.example.com:3128", "proxy")
            == "http://<credentials hidden>@proxy.example.com:3128")
    assert redacted("u:p@proxy:3128", "proxy") == "<credentials hidden>@proxy:3128"
    assert redacted("http://u:s3cret/proxy:3128", "proxy") == "<hidden: it may hold a password>"
    assert redacted("http://proxy.example.com:3128", "proxy") == "http://proxy.example.com:3128"


# --- role_variable_problems: the role's variables, checked whole ------------------------------

role_variable_problems = load_filters("role_variables")["role_variable_problems"]
ROLE_DEFAULTS = {
    "stacksense_api_url": "https://stacksense.example.com", "stacksense_verify_timeout": 60,
    "stacksense_apt_cache_valid_time": 3600, "stacksense_service_manager": "systemd",
    "stacksense_requests_source": "package", "stacksense_pip_requests_spec": "requests>=2.25,<3",
    "stacksense_pip_extra_args": "", "stacksense_install_dir": "/opt/stacksense-heartbeat",
    "stacksense_ca_bundle": "", "stacksense_agent_source": str(AGENT_PATH),
    "stacksense_https_proxy": "", "stacksense_http_proxy": "", "stacksense_no_proxy": "",
    "__stacksense_agent_problems": [], "__stacksense_cron_user": "stacksense-heartbeat",
    "__stacksense_fixed_paths": ["/etc/systemd/system/stacksense-heartbeat.service",
                                 "/etc/stacksense-heartbeat"],
    "__stacksense_push_agent_dir": "/opt/stacksense-agent",
    "__stacksense_expected_version": "1.2.0", "__stacksense_ca_mode": False,
    "__stacksense_ca_problem": "",
}


def test_the_role_defaults_pass_the_variable_checks():
    assert role_variable_problems(ROLE_DEFAULTS) == []


@pytest.mark.parametrize("name, value, removal", [
    ("stacksense_api_url", "https://s.example.com\n", False),
    ("stacksense_verify_timeout", "60\n", False),
    ("stacksense_verify_timeout", 0, False),
    ("stacksense_apt_cache_valid_time", "-1", False),
    ("stacksense_service_manager", "cron\n", True),
    ("stacksense_requests_source", "conda", True),
    ("stacksense_pip_requests_spec", "requests\n--index-url=http://x", False),
    ("stacksense_pip_extra_args", "--pre  --no-deps", False),
    ("stacksense_install_dir", "/opt/x/", True),
    ("stacksense_install_dir", "/etc/systemd", True),
    ("stacksense_install_dir", "/opt/stacksense-agent", True),
    ("stacksense_ca_bundle", "/home/ops/ca.pem", False),
    ("stacksense_https_proxy", "http://proxy.example.com:99999", False),
    ("stacksense_https_proxy", "http://proxy.example.com", False),
    ("stacksense_no_proxy", "a;b", False),
])
def test_each_bad_value_gets_one_message_naming_its_variable(name, value, removal):
    problems = role_variable_problems(dict(ROLE_DEFAULTS, **{name: value}))
    assert len(problems) == 1 and problems[0].startswith(f"{name} is "), problems
    assert "\n" not in problems[0] and "Fix:" in problems[0]
    assert bool(role_variable_problems(dict(ROLE_DEFAULTS, **{name: value}), True)) == removal


def test_shared_tokens_and_the_agents_verdict_come_first_and_not_on_removal():
    values = dict(ROLE_DEFAULTS, stacksense_install_dir="/",
                  __stacksense_fleet_conflicts=["web-01 and web-02 share a token."],
                  __stacksense_agent_problems=["stacksense_interval is 0, ..."])
    problems = role_variable_problems(values)
    assert problems[:2] == ["web-01 and web-02 share a token.", "stacksense_interval is 0, ..."]
    assert problems[2].startswith("stacksense_install_dir is ")
    assert [p[:23] for p in role_variable_problems(values, True)] == ["stacksense_install_dir "]


def test_a_url_with_credentials_is_refused_without_showing_them():
    problems = role_variable_problems(dict(ROLE_DEFAULTS,
                                           stacksense_api_url="https://ops:s3cret@s.example.com"))
    assert problems and all("s3cret" not in p for p in problems)
    assert "https://***@s.example.com" in problems[0]


def test_a_proxy_of_the_other_scheme_is_refused_as_bypassed():
    problems = role_variable_problems(dict(ROLE_DEFAULTS,
                                           stacksense_http_proxy="http://u:pw@proxy.example.com:3128"))
    assert len(problems) == 1 and "Fix: set stacksense_https_proxy" in problems[0]
    assert "pw@" not in problems[0]


def test_an_agent_source_that_is_not_a_file_and_unsafe_internal_values_are_named(tmp_path):
    problems = role_variable_problems(dict(
        ROLE_DEFAULTS, stacksense_agent_source=str(tmp_path / "missing.py"),
        __stacksense_cron_user="root\n* * * * * root sh"))
    assert [p.split(" ", 1)[0] for p in problems] == ["the", "stacksense_agent_source"]
    assert "internal paths or cron user" in problems[0]


def test_a_host_needs_every_step_only_for_what_the_usual_deploy_does_not_do():
    host_probe_module = load_module("stacksense_filter_host_probe", "plugins/filter/host_probe.py")
    needs_steps = host_probe_module.needs_steps
    usual = {"facts": {"pid1": "systemd"}, "files": ["/etc/systemd/system/x.service"]}
    cron_file = "/etc/cron.d/stacksense-heartbeat"
    assert needs_steps(usual, cron_file=cron_file) is False  # a systemd deploy or re-run
    assert needs_steps(usual, present=False) is True  # removal
    assert needs_steps(usual, cron=True) is True
    assert needs_steps(usual, pip=True) is True
    assert needs_steps(dict(usual, files=[cron_file]), cron_file=cron_file) is True  # from cron
    for fact in ("stale", "legacy_unit", "legacy_cron"):
        assert needs_steps({"facts": {fact: "yes"}, "files": []}) is True, fact
    push = {"facts": {"push_agent": "/opt/stacksense-agent/stacksense_agent.py"}, "files": []}
    assert needs_steps(push) is True  # left alone
    assert needs_steps(push, beside_push_agent=True) is False


role_plan_module = load_module("stacksense_filter_role_plan", "plugins/filter/role_plan.py")


def test_the_plan_of_a_plain_systemd_deploy():
    plan = role_plan_module.role_plan(role_values({"stacksense_api_url": "https://s.example"}))
    assert plan["cron"] is False and plan["token_mode"] is False
    assert plan["rollback_files"] == ["/opt/stacksense-heartbeat/heartbeat_agent.py",
                                      "/etc/systemd/system/stacksense-heartbeat.service"]
    assert plan["wanted_modes"] == ["legacy"]
    assert plan["agent_env"] == {"STACKSENSE_API_URL": "https://s.example",
                                 "STACKSENSE_INTERVAL": "30", "STACKSENSE_JITTER": "0.1",
                                 "STACKSENSE_LOG_LEVEL": "info"}
    assert plan["watchdog_sec"] > 0
    files = plan["files"]
    assert files["directories"] == [{"path": "/opt/stacksense-heartbeat", "mode": "0755"}]
    assert [f["content"] for f in files["files"]] == ["agent", "unit"]
    assert files["secret_files"] == []
    assert files["absent"] == ["/etc/stacksense-heartbeat/api_token",
                               "/etc/stacksense-heartbeat/proxy.env",
                               "/opt/stacksense-heartbeat/ca-certificates.pem",
                               "/opt/stacksense-heartbeat/venv"]


def test_the_plan_of_a_cron_deploy_with_token_proxy_and_ca_holds_no_secret():
    values = role_values({
        "stacksense_service_manager": "cron", "stacksense_api_token": " tok-zq1 \n",
        "stacksense_https_proxy": "http://ops:pw-zq2@proxy:3128", "stacksense_server_id": 7,
        "stacksense_ca_certificate": "-----BEGIN CERTIFICATE-----\n..."})
    plan = role_plan_module.role_plan(values)
    assert "zq1" not in repr(plan) and "zq2" not in repr(plan)
    assert (plan["cron"], plan["token_mode"], plan["proxy_mode"], plan["ca_mode"]) == (
        True, True, True, True)
    assert plan["agent_env"]["STACKSENSE_SERVER_ID"] == "7" and plan["wanted_modes"] == ["token"]
    files = plan["files"]
    assert files["directories"][1] == {"path": "/etc/stacksense-heartbeat",
                                       "group": "stacksense-heartbeat", "mode": "0750"}
    assert [f["content"] for f in files["files"]] == ["agent", "ca"]  # no unit under cron
    assert [(f["content"], f["group"], f["mode"]) for f in files["secret_files"]] == [
        ("token", "stacksense-heartbeat", "0640"), ("proxy", "stacksense-heartbeat", "0640")]
    assert files["absent"] == ["/opt/stacksense-heartbeat/venv"]
    env = plan["cron_entry"]["env"]
    assert env["STACKSENSE_CA_BUNDLE"] == "/opt/stacksense-heartbeat/ca-certificates.pem"
    assert env["STACKSENSE_API_TOKEN_FILE"] == "/etc/stacksense-heartbeat/api_token"
    assert ". /etc/stacksense-heartbeat/proxy.env" in plan["cron_entry"]["command"]
    assert plan["rollback_files"][1:] == ["/etc/cron.d/stacksense-heartbeat",
                                          "/etc/stacksense-heartbeat/api_token",
                                          "/opt/stacksense-heartbeat/ca-certificates.pem",
                                          "/etc/stacksense-heartbeat/proxy.env"]
    assert role_plan_module.proxy_env_text(role_plan_module.proxy_env(values)) == (
        "# HTTPS_PROXY, HTTP_PROXY, NO_PROXY for the StackSense agent (Ansible managed)\n"
        "HTTPS_PROXY='http://ops:pw-zq2@proxy:3128'\n")


def test_after_the_probe_the_plan_says_what_to_install_start_and_keep():
    values = role_values({"stacksense_api_url": "https://s.example"})
    plan = role_plan_module.role_plan(values)
    unit = "/etc/systemd/system/stacksense-heartbeat.service"
    deployed = {"facts": {"apt_lists": "12"}, "files": [unit], "kept": plan["rollback_files"],
                "packages": ["python3", "python3-requests"]}
    after = role_plan_module.after_probe(values, plan, deployed)
    assert (after["steps"], after["missing_packages"], after["start"], after["wait"]) == (
        False, [], "stacksense-heartbeat.service", True)
    assert after["apt_cache_valid_time"] == 3600 and after["keep_anyway"] is False
    fresh = {"facts": {}, "files": [], "kept": [], "packages": ["python3"]}
    after = role_plan_module.after_probe(values, plan, fresh, check_mode=True)
    assert after["missing_packages"] == ["python3-requests"]
    assert after["apt_cache_valid_time"] == 0  # no lists at all: update them
    assert after["start"] is None and after["wait"] is False  # no unit to start in check mode
    assert after["keep_anyway"] is True  # nothing kept yet
    stray = dict(deployed, files=[unit, "/opt/stacksense-heartbeat/rollback/api_token"])
    assert role_plan_module.after_probe(values, plan, stray)["keep_anyway"] is True


@pytest.mark.parametrize("run_tags, skip_tags, cron, handler", [
    (["all"], [], False, False),  # a full run: the start restarts the unit itself
    (["stacksense_configure"], [], False, True),  # no start in this run: the handler
    (["stacksense_install", "stacksense_verify"], [], False, False),
    (["tagged"], [], False, False),
    (["all"], ["stacksense_service"], False, True),
    (["all"], ["tagged"], False, True),
    (["all"], [], True, True),  # cron: the handler stops the agent, cron.yml starts it
])
def test_a_change_restarts_the_agent_in_the_start_unless_the_run_leaves_the_start_out(
        run_tags, skip_tags, cron, handler):
    values = role_values({"stacksense_api_url": "https://s.example",
                          "stacksense_service_manager": "cron" if cron else "systemd"})
    plan = role_plan_module.role_plan(values)
    probe = {"facts": {}, "files": [], "kept": [], "packages": []}
    after = role_plan_module.after_probe(values, plan, probe, tags=(run_tags, skip_tags))
    assert after["restart_handler"] is handler


def test_start_tags_are_the_tags_of_the_starts_imports():
    # role_plan.START_TAGS decides whether a run reaches the systemd start; it must be what
    # tasks/main.yml and steps.yml tag that import of verify.yml with.
    tasks = ROOT / "roles/stacksense_agent/tasks"
    for name in ("main.yml", "steps.yml"):
        imports = [t for t in yaml.safe_load((tasks / name).read_text())
                   if t["name"] == "Start the service and verify that the server accepts the "
                                   "heartbeat"]
        assert [set(t["tags"]) for t in imports] == [role_plan_module.START_TAGS], name


def test_variable_problems_name_the_variable_and_removal_checks_only_what_it_uses():
    bad_interval = role_values({"stacksense_api_url": "https://s.example",
                                "stacksense_interval": "soon"})
    problems = role_plan_module.variable_problems(bad_interval)
    assert problems and problems[0].startswith("stacksense_interval")
    removal = dict(bad_interval, stacksense_agent_state="absent")
    assert role_plan_module.variable_problems(removal) == []
