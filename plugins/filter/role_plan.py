"""What the stacksense_agent role derives from its variables for one host, computed once.

The preflight action (plugins/action/agent_probe.py) templates the role's variables and the
fixed values of vars/main.yml named in INTERNAL once, checks them (variable_problems), and
returns this plan in its registered result; vars/main.yml reads each derived value from
there (``__stacksense_X`` is the plan's ``X``), and the usual deploy's tasks take the plan
itself. As Jinja, each of these values was a chain of templates that ansible-core 2.19
compiled again at every use, in every worker: most of the role's controller CPU at fleet scale
(docs/DEPLOY_BENCHMARKS.md). The plan holds no secret: of the token and the proxy settings
only whether they are set.

after_probe() adds what the host's probe decides: the packages it lacks, whether it needs
tasks/steps.yml, the start and the wait of the verification, and what it keeps for a
rollback.
"""

import importlib.util
import shlex
from pathlib import Path

DOCUMENTATION = r"""
name: role_plan
short_description: The stacksense_agent role's derived values for one host
description:
  - From the role's variables and the fixed values of its vars/main.yml (templated), every
    value the role derives from them (modes, the agent's settings, its unit's and cron
    entry's values, the files a rollback restores, the packages it wants, what the probe
    asks), as the role's preflight task computes them once per host.
positional: _input
options:
  _input:
    description: The role's variables and the internal values named by INTERNAL, by name.
    type: dict
    required: true
version_added: 1.3.0
author: StackSense
"""

EXAMPLES = r"""
plan: "{{ {'stacksense_service_manager': 'cron', ...} | stacksense.fleet.role_plan }}"
"""

RETURN = r"""
_value:
  description: The derived values by the name they have in vars/main.yml without its
    C(__stacksense_) prefix (C(cron), C(token_mode), C(agent_env), C(rollback_files), ...).
  type: dict
"""

# The fixed values of vars/main.yml the plan is derived from, with the role's variables (every
# option of its meta/argument_specs.yml, which the preflight action templates anyway).
INTERNAL = (
    "__stacksense_service", "__stacksense_unit_path", "__stacksense_agent_path",
    "__stacksense_venv_dir", "__stacksense_rollback_dir", "__stacksense_config_dir",
    "__stacksense_token_path", "__stacksense_state_dir", "__stacksense_private_state_dir",
    "__stacksense_state_file", "__stacksense_cron_user", "__stacksense_cron_file",
    "__stacksense_lock_file", "__stacksense_pid_file", "__stacksense_log_dir",
    "__stacksense_log_file", "__stacksense_logrotate_file", "__stacksense_ca_path",
    "__stacksense_system_ca_bundle", "__stacksense_proxy_env_path", "__stacksense_packages",
    "__stacksense_push_agent_files", "__stacksense_push_agent_unit",
    "__stacksense_push_agent_dir", "__stacksense_legacy_cron_file",
    "__stacksense_legacy_keep_dir", "__stacksense_legacy_agent_path",
    "__stacksense_legacy_service", "__stacksense_legacy_pid_file",
    "__stacksense_legacy_log_file", "__stacksense_legacy_cron_user",
    "__stacksense_expected_version", "__stacksense_agent_process_sh",
    "__stacksense_fleet_conflicts",
)
# The agent's settings: its environment variable, the role's variable that sets it.
SETTINGS = (
    ("STACKSENSE_API_URL", "stacksense_api_url"), ("STACKSENSE_SERVER_ID", "stacksense_server_id"),
    ("STACKSENSE_INTERVAL", "stacksense_interval"), ("STACKSENSE_TIMEOUT", "stacksense_timeout"),
    ("STACKSENSE_JITTER", "stacksense_jitter"), ("STACKSENSE_LOG_LEVEL", "stacksense_log_level"),
    ("STACKSENSE_CA_BUNDLE", "stacksense_ca_bundle"),
)
PROXIES = (("HTTPS_PROXY", "stacksense_https_proxy"), ("HTTP_PROXY", "stacksense_http_proxy"),
           ("NO_PROXY", "stacksense_no_proxy"))


def _sibling(name):
    """A filter file of this directory, as a module (the action plugins load this one so)."""
    spec = importlib.util.spec_from_file_location(
        f"stacksense_filter_{name}", str(Path(__file__).with_name(f"{name}.py")))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_SETTINGS = _sibling("agent_settings")
_CRON = _sibling("cron_entry")
_PROBE = _sibling("host_probe")
_ROLLBACK = _sibling("rollback_files")
_VARIABLES = _sibling("role_variables")
_CA = _sibling("ca_certificate")


def _text(value):
    """The value as Jinja's `string` filter makes it (None is '')."""
    return "" if value is None else value if isinstance(value, str) else str(value)


def is_set(value):
    """Jinja's `value | default('', true) | string | trim | length > 0`."""
    return bool(_text(value or "").strip())


def _bool(value):
    """Jinja's `bool` filter."""
    if isinstance(value, str):
        return value.strip().lower() in ("yes", "on", "1", "true", "y", "t")
    return bool(value)


def proxy_env(v):
    """{HTTPS_PROXY, HTTP_PROXY, NO_PROXY: value} of those set. Secret: a proxy URL may hold
    a password, so only the files action writes it (the plan says whether there is any)."""
    return {name: v[var] for name, var in PROXIES if v.get(var)}


def agent_settings(v):
    """The agent's settings as the unit and the cron file pass them: one table, two renderings
    (agent_env leaves out those that are empty; the checks judge them by the agent's own
    rules, naming `var`)."""
    values = dict(v, stacksense_server_id=_text(v["stacksense_server_id"]),
                  stacksense_ca_bundle=_SETTINGS.agent_ca_bundle(
                      v["stacksense_ca_bundle"], is_set(v["stacksense_ca_certificate"]),
                      v["__stacksense_ca_path"], v["stacksense_requests_source"],
                      v["__stacksense_system_ca_bundle"]))
    return [{"env": env, "var": var, "value": values[var]} for env, var in SETTINGS]


def role_plan(v):
    """The role's derived values for `v` (the role's variables and INTERNAL, templated)."""
    present = v["stacksense_agent_state"] == "present"
    cron = v["stacksense_service_manager"] == "cron"
    pip = v["stacksense_requests_source"] == "pip"
    token, ca, proxy = (is_set(v["stacksense_api_token"]), is_set(v["stacksense_ca_certificate"]),
                        bool(proxy_env(v)))
    rollback_dir = v["__stacksense_rollback_dir"]
    python = f"{v['__stacksense_venv_dir']}/bin/python" if pip else "/usr/bin/python3"
    settings = agent_settings(v)
    agent_env = _SETTINGS.agent_env(settings)
    rollback = _ROLLBACK.rollback_files(
        {"agent": v["__stacksense_agent_path"], "unit": v["__stacksense_unit_path"],
         "cron": v["__stacksense_cron_file"], "token": v["__stacksense_token_path"],
         "ca": v["__stacksense_ca_path"], "proxy": v["__stacksense_proxy_env_path"]},
        rollback_dir, cron=cron, token=token, ca=ca, proxy=proxy)
    process_args = _process_args(cron, v["__stacksense_pid_file"], v["__stacksense_service"])
    process = ["/bin/sh", "-c", v["__stacksense_agent_process_sh"], "agent_process.sh"]
    plan = {
        "cron": cron, "token_mode": token, "ca_mode": ca, "proxy_mode": proxy,
        "python": python,
        "secret_group": v["__stacksense_cron_user"] if cron else "root",
        "config_dir_mode": "0750" if cron else "0700",
        "token_file_mode": "0640" if cron else "0600",
        "agent_env": agent_env,
        "cron_entry": _CRON.cron_entry(
            agent_env, python=python, agent=v["__stacksense_agent_path"],
            lock_file=v["__stacksense_lock_file"], pid_file=v["__stacksense_pid_file"],
            log_file=v["__stacksense_log_file"], state_file=v["__stacksense_state_file"],
            home=v["__stacksense_state_dir"],
            token_file=v["__stacksense_token_path"] if token else "",
            proxy_file=v["__stacksense_proxy_env_path"] if proxy else ""),
        "agent_process_argv": process,
        "agent_process_args": process_args,
        "agent_process_cmd": " ".join(_quote(a) for a in process + process_args),
        "cron_start_args": [v["__stacksense_pid_file"], v["__stacksense_cron_file"],
                            v["__stacksense_cron_user"], v["__stacksense_log_file"]],
        # The same for role 1.1.0's agent, which recover.yml may start again (its unit, or
        # else its cron entry).
        "legacy_cron_start_args": [
            v["__stacksense_legacy_pid_file"], v["__stacksense_legacy_cron_file"],
            v["__stacksense_legacy_cron_user"], v["__stacksense_legacy_log_file"]],
        "wanted_modes": ["token"] if token else ["legacy"],
        "rollback_files": rollback["restore"],
        "rollback_candidates": rollback["candidates"],
        "unused_kept_files": rollback["unused_kept"],
        "wanted_packages": _PROBE.agent_packages(v["__stacksense_packages"],
                                                 v["stacksense_requests_source"], cron=cron),
        "probed_files": [
            v["__stacksense_unit_path"], v["__stacksense_cron_file"], v["__stacksense_venv_dir"],
            *[path for name in ("token_path", "ca_path", "proxy_env_path")
              for path in (v[f"__stacksense_{name}"],
                           f"{rollback_dir}/{_basename(v[f'__stacksense_{name}'])}")]],
        "probed_dirs": [v["stacksense_install_dir"], v["__stacksense_config_dir"]],
        "expected_version": v["__stacksense_expected_version"] if present else "",
        "agent_source": v["stacksense_agent_source"],
        # The timeout and the systemd watchdog the agent derives (its derived_settings): only
        # for a deploy, whose settings the checks passed.
        "watchdog_sec": _SETTINGS.agent_derived(settings)["watchdog_s"] if present else None,
    }
    plan["files"] = files_plan(v, plan)
    return plan


def files_plan(v, plan):
    """configure.yml's one task (plugins/modules/agent_files.py), each file's content named
    rather than given (agent, ca, unit, token, proxy: plugins/action/agent_files.py fills it
    in): the install directory and the agent; the configuration directory, which only holds
    the secrets; the token (root-only for systemd, which hands it to the service with
    LoadCredential=; readable by the group stacksense-heartbeat under cron); the proxy
    settings beside it; the CA certificates next to the agent (not a secret: where the
    sandboxed service and the cron user can read them); the systemd unit. And what this run
    does not use goes: the token file (legacy API), the proxy settings (no proxy), the CA
    certificates, the virtualenv that the OS package replaces."""
    token, proxy, ca = plan["token_mode"], plan["proxy_mode"], plan["ca_mode"]
    group = plan["secret_group"]
    return {
        "directories": [{"path": v["stacksense_install_dir"], "mode": "0755"}] + (
            [{"path": v["__stacksense_config_dir"], "group": group,
              "mode": plan["config_dir_mode"]}] if token or proxy else []),
        "files": [{"path": v["__stacksense_agent_path"], "mode": "0755", "content": "agent"}]
        + ([{"path": v["__stacksense_ca_path"], "mode": "0644", "content": "ca"}] if ca else [])
        + ([] if plan["cron"] else [{"path": v["__stacksense_unit_path"], "mode": "0644",
                                     "content": "unit"}]),
        "secret_files": [{"path": v[f"__stacksense_{name}_path"], "group": group,
                          "mode": plan["token_file_mode"], "content": content}
                         for name, content, used in (("token", "token", token),
                                                     ("proxy_env", "proxy", proxy)) if used],
        "absent": [v[f"__stacksense_{name}_path"]
                   for name, used in (("token", token), ("proxy_env", proxy), ("ca", ca))
                   if not used]
        + ([v["__stacksense_venv_dir"]] if v["stacksense_requests_source"] == "package" else []),
    }


def proxy_env_text(env):
    """The proxy settings file: systemd's EnvironmentFile= and the cron job's ". file" both
    read single-quoted values literally (the checks allow no quote, $, backslash or white
    space in them)."""
    lines = ["# HTTPS_PROXY, HTTP_PROXY, NO_PROXY for the StackSense agent (Ansible managed)"]
    lines += [f"{name}='{value}'" for name, value in sorted(env.items())]
    return "\n".join(lines) + "\n"


def _process_args(cron, pid_file, service):
    """files/agent_process.sh's arguments for the running agent: "PID running" or "PID
    exited:STATUS" of the cron-run agent (its pid file) or of the systemd unit."""
    return ["process", "cron", pid_file] if cron else ["process", "systemd", service]


def _basename(path):
    return _text(path).rstrip("/").rsplit("/", 1)[-1]


def _quote(value):
    return shlex.quote(_text(value))


def variable_problems(v):
    """Every problem of the variables `v`, one line each, naming the variable and the fix
    (plugins/filter/role_variables.py and the agent's own rules); removal checks only what
    it uses. The plan is not computed when there is one."""
    removal = v["stacksense_agent_state"] != "present"
    token, ca = is_set(v["stacksense_api_token"]), is_set(v["stacksense_ca_certificate"])
    values = {name: v[name] for name in (
        "stacksense_api_url", "stacksense_verify_timeout", "stacksense_apt_cache_valid_time",
        "stacksense_service_manager", "stacksense_requests_source",
        "stacksense_pip_requests_spec", "stacksense_pip_extra_args", "stacksense_install_dir",
        "stacksense_ca_bundle", "stacksense_agent_source", "stacksense_https_proxy",
        "stacksense_http_proxy", "stacksense_no_proxy")}
    paths = [v[f"__stacksense_{name}"] for name in (
        "unit_path", "config_dir", "token_path", "state_dir", "private_state_dir",
        "state_file", "cron_file", "lock_file", "pid_file", "log_dir", "log_file",
        "logrotate_file")]
    settings = None if removal else agent_settings(v)
    values.update({
        "__stacksense_fleet_conflicts": v.get("__stacksense_fleet_conflicts") or [],
        "__stacksense_agent_problems": [] if removal else _SETTINGS.agent_problems(
            settings, {"STACKSENSE_API_TOKEN": _text(v["stacksense_api_token"]).strip()}
            if token else {}),
        "__stacksense_fixed_paths": paths,
        "__stacksense_cron_user": v["__stacksense_cron_user"],
        "__stacksense_push_agent_dir": v["__stacksense_push_agent_dir"],
        "__stacksense_expected_version": "" if removal else v["__stacksense_expected_version"],
        "__stacksense_ca_mode": ca,
        "__stacksense_ca_problem": _CA.ca_certificate_problem(v["stacksense_ca_certificate"])
        if ca and not removal else "",
    })
    return _VARIABLES.role_variable_problems(values, removal=removal)


def probe_settings(v, plan):
    """The STACKSENSE_PROBE_* settings of files/probe_host.sh: what it looks for."""
    return {
        "STACKSENSE_PROBE_FILES": "\n".join(plan["probed_files"]),
        "STACKSENSE_PROBE_DIRS": "\n".join(plan["probed_dirs"]),
        "STACKSENSE_PROBE_KEPT": "\n".join(plan["rollback_files"]),
        "STACKSENSE_PROBE_ROLLBACK_DIR": v["__stacksense_rollback_dir"],
        "STACKSENSE_PROBE_CA_BUNDLE": _text(v["stacksense_ca_bundle"]),
        "STACKSENSE_PROBE_PACKAGES": " ".join(plan["wanted_packages"]),
        "STACKSENSE_PROBE_PROCESS_CMD": plan["agent_process_cmd"],
        "STACKSENSE_PROBE_PUSH_AGENT_FILES": "\n".join(v["__stacksense_push_agent_files"]),
        "STACKSENSE_PROBE_PUSH_AGENT_UNIT": v["__stacksense_push_agent_unit"],
        "STACKSENSE_PROBE_LEGACY_CRON": v["__stacksense_legacy_cron_file"],
        "STACKSENSE_PROBE_LEGACY_KEPT_CRON":
            f"{v['__stacksense_legacy_keep_dir']}/stacksense-agent.cron",
        "STACKSENSE_PROBE_LEGACY_AGENT": v["__stacksense_legacy_agent_path"],
    }


def host_checks(v, plan):
    """What host_problems weighs for a deploy (None: removal only probes)."""
    if v["stacksense_agent_state"] != "present":
        return None
    return {"cron": plan["cron"], "token": plan["token_mode"],
            "ca_bundle": _text(v["stacksense_ca_bundle"])}


# The tags of the systemd start (tasks/main.yml's and steps.yml's import of verify.yml;
# tests/test_filters.py checks that they are the same).
START_TAGS = frozenset({"stacksense_service", "stacksense_verify"})


def start_runs(run_tags=None, skip_tags=None):
    """Whether a run with these --tags and --skip-tags (ansible_run_tags, ansible_skip_tags)
    reaches the start, by Ansible's rules for a task tagged START_TAGS."""
    matching = START_TAGS | {"all", "tagged"}
    return bool(set(run_tags or ["all"]) & matching) and not set(skip_tags or []) & matching


def after_probe(v, plan, probe, check_mode=False, tags=(None, None)):
    """What the probe's answer (host_probe's dict) decides, added to the plan: the packages
    the host lacks and the apt lists' age that updates them, whether it needs
    tasks/steps.yml (needs_steps), and the verification's start (the unit, unless cron starts
    the agent or check mode finds no unit yet), wait and what it keeps for a rollback: the
    files a rollback restores and the kept copies this run does not use, kept (and forgotten)
    when this run changed a file or what is kept differs from what it needs.
    restart_handler: whether a change notifies the restart handler: under cron always (it
    stops the agent, cron.yml starts the new one), under systemd only when this run's tags
    (run, skip) leave out the start, which otherwise restarts the unit itself."""
    facts, files = probe.get("facts", {}), probe.get("files", [])
    unit_exists = v["__stacksense_unit_path"] in files
    plan = dict(plan)
    plan.update(
        host=facts,
        in_container=bool(facts.get("container")),
        legacy_agent_process_args=_process_args(
            facts.get("legacy_unit") != "yes", v["__stacksense_legacy_pid_file"],
            v["__stacksense_legacy_service"]),
        steps=_PROBE.needs_steps(
            probe, present=v["stacksense_agent_state"] == "present", cron=plan["cron"],
            pip=v["stacksense_requests_source"] == "pip",
            beside_push_agent=_bool(v["stacksense_beside_push_agent"]),
            cron_file=v["__stacksense_cron_file"]),
        missing_packages=_PROBE.agent_packages(
            v["__stacksense_packages"], v["stacksense_requests_source"], cron=plan["cron"],
            installed=probe.get("packages", [])),
        apt_cache_valid_time=v["stacksense_apt_cache_valid_time"]
        if _int(facts.get("apt_lists")) > 0 else 0,
        start=None if plan["cron"] or (check_mode and not unit_exists)
        else v["__stacksense_service"],
        wait=_bool(v["stacksense_verify"]) and not check_mode,
        restart_handler=plan["cron"] or not start_runs(*tags),
        keep={"dir": v["__stacksense_rollback_dir"], "files": plan["rollback_files"],
              "forget": plan["unused_kept_files"]},
        keep_anyway=bool(set(plan["rollback_files"]) - set(probe.get("kept", []))
                         or set(plan["unused_kept_files"]) & set(files)),
    )
    return plan


def _int(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


class FilterModule:
    def filters(self):
        return {"role_plan": role_plan}
