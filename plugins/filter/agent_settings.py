"""The agent's settings as the role passes them, judged by the agent's own rules.

The role keeps one table of the settings it passes to the agent (plugins/filter/role_plan.py,
agent_settings: the environment variable, the Ansible variable that sets it
and its value). The systemd unit and the cron file both render agent_env() of it; preflight
asks agent_problems(), which runs the agent's own settings_problems() and
offline_window_problem() (agent/heartbeat_agent.py at the collection's root, loaded by path:
the clone's and the installed collection's alike) and names the Ansible variable in each
message; agent_derived() gives the timeout and the watchdog the agent derives, by the agent's
own derived_settings().
"""

import importlib.util
import json
import re
import sys
from pathlib import Path

DOCUMENTATION = r"""
name: agent_problems
short_description: What the heartbeat agent would refuse in the role's settings
description:
  - Runs the agent's own C(settings_problems()) on the environment the role gives it, and
    its C(offline_window_problem()) (interval, timeout and retries against the server's
    offline window); each message names the Ansible variable.
positional: _input
options:
  _input:
    description: The role's settings table, items with C(env), C(var) and C(value).
    type: list
    elements: dict
    required: true
  extra_env:
    description: Variables the check needs that the table does not pass (the token).
    type: dict
    default: {}
version_added: 1.2.0
author: StackSense
"""

EXAMPLES = r"""
problems: "{{ __stacksense_agent_settings | stacksense.fleet.agent_problems }}"
"""

RETURN = r"""
_value:
  description: One-line messages, each naming the Ansible variable; empty when all is well.
  type: list
  elements: str
"""

AGENT_PATH = Path(__file__).resolve().parents[2] / "agent" / "heartbeat_agent.py"
# "interval (environment STACKSENSE_INTERVAL)": how the agent names a setting it refuses.
AGENT_SOURCE = re.compile(r"\b[a-z_]+ \(environment ([A-Z_]+)\)")
ENV_NAME = re.compile(r"\b(?:STACKSENSE_[A-Z_]+|HTTPS?_PROXY|ALL_PROXY|https?_proxy|all_proxy)\b")
AGENT_VERSION_LINE = re.compile(r'^AGENT_VERSION = "([^"]+)"', re.MULTILINE)
CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")
_agents = {}


def load_agent(path=AGENT_PATH):
    """The agent module at `path`, loaded once, without `requests`: its settings rules need
    none, and importing requests (and urllib3) costs each Ansible worker, a fresh process per
    task and host, about 40 ms of CPU (docs/DEPLOY_BENCHMARKS.md)."""
    path = Path(path)
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _agents:
        spec = importlib.util.spec_from_file_location("stacksense_heartbeat_agent", str(path))
        module = importlib.util.module_from_spec(spec)
        blocked = [name for name in ("requests", "urllib3") if name not in sys.modules]
        sys.modules.update(dict.fromkeys(blocked))  # `import requests` raises ImportError
        try:
            spec.loader.exec_module(module)
        finally:
            for name in blocked:
                del sys.modules[name]
        _agents[key] = module
    return _agents[key]


def _text(value):
    return "" if value is None else value if isinstance(value, str) else str(value)


def agent_env(settings):
    """{ENV: value} of the table's settings that are set, in the table's order, as text."""
    return {item["env"]: _text(item["value"]) for item in settings
            if _text(item["value"]).strip()}


def _variable_names(settings):
    names = {item["env"]: item["var"] for item in settings}
    names.setdefault("STACKSENSE_API_TOKEN", "stacksense_api_token")
    for proxy in ("HTTPS_PROXY", "HTTP_PROXY"):
        names.setdefault(proxy, "stacksense_" + proxy.lower())
        names.setdefault(proxy.lower(), "stacksense_" + proxy.lower())
    return names


def _in_role_terms(agent, message, names):
    """The agent's message with the role's variable names in place of its own."""
    message = AGENT_SOURCE.sub(lambda m: names.get(m.group(1), m.group(0)), message)
    message = ENV_NAME.sub(lambda m: names.get(m.group(0), m.group(0)), message)
    first, rest = message.split(" ", 1) if " " in message else (message, "")
    setting = agent.SETTINGS_BY_NAME.get(first)
    if setting is not None and setting.env in names:
        first, message = names[setting.env], f"{names[setting.env]} {rest}"
    if "Fix:" not in message and first in names.values():
        message += f". Fix: set {first} as the agent expects it"
    return message


def agent_problems(settings, extra_env=None, agent_path=None):
    """What the agent would refuse in the role's settings, one line each, in role terms."""
    names = _variable_names(settings)
    agent = load_agent(agent_path or AGENT_PATH)
    problems = [f"{item['var']} is {json.dumps(agent.redact_url(_text(item['value'])))}, which "
                "holds a line break or control character: it would not reach the agent as one "
                f"line of its unit or cron file. Fix: give {item['var']} a one-line value."
                for item in settings if CONTROL_CHARACTER.search(_text(item["value"]))]
    env = dict(agent_env(settings), **(extra_env or {}))
    problems += [_in_role_terms(agent, message, names) for message in agent.settings_problems(env)]
    if not problems:
        window = agent.offline_window_problem(env)
        problems += [_in_role_terms(agent, window, names)] if window else []
    return problems


def agent_derived(settings, agent_path=None):
    """The agent's derived values for these settings: interval, timeout, jitter, watchdog_s."""
    from ansible.errors import AnsibleFilterError

    agent = load_agent(agent_path or AGENT_PATH)
    try:
        return agent.derived_settings(agent_env(settings))
    except ValueError as error:
        raise AnsibleFilterError(
            _in_role_terms(agent, str(error), _variable_names(settings))) from None


def agent_version(source_text):
    """The AGENT_VERSION of the agent's source text (a line `AGENT_VERSION = "..."`), or ''."""
    match = AGENT_VERSION_LINE.search(_text(source_text))
    return match.group(1) if match else ""


def agent_ca_bundle(ca_bundle, certificate_installed, certificate_path, requests_source,
                    system_bundle):
    """STACKSENSE_CA_BUNDLE as the role sets it; '' leaves the choice to requests.

    The role's copy of stacksense_ca_certificate when it installs one (where the sandboxed
    service and the cron user can read it); else stacksense_ca_bundle when set; else, when
    requests comes from pip, the host's store: pip's requests would trust its own certifi
    copy, not the host's store (Debian's python3-requests uses the store already).
    """
    if certificate_installed:
        return certificate_path
    if _text(ca_bundle):
        return _text(ca_bundle)
    return system_bundle if requests_source == "pip" else ""


class FilterModule:
    def filters(self):
        return {"agent_env": agent_env, "agent_problems": agent_problems,
                "agent_derived": agent_derived, "agent_version": agent_version,
                "agent_ca_bundle": agent_ca_bundle}
