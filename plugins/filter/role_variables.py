"""What is wrong with the role's variables, one message per problem, each naming the variable.

The role's preflight (role_plan.py's variable_problems) passes the values in one dict and
fails the host with every message at once. The checks were Jinja expressions in that task;
as Python they cost the controller one call per host instead of about 170 templates compiled
in each host's worker (docs/DEPLOY_BENCHMARKS.md), and a plain pytest can call them
(tests/test_filters.py).

Every value that reaches the unit, the cron file, a shell or a path is checked whole (\\A and
\\Z, or fullmatch: `$` also matches before a final newline) and shown JSON-quoted, so that a
message is one line whatever the value holds; a URL is shown without its user:password@
(plugins/filter/redacted.py). The agent's own settings are judged by the agent's rules
(plugins/filter/agent_settings.py), not here.
"""

import importlib.util
import json
import os
import re
from pathlib import Path

DOCUMENTATION = r"""
name: role_variable_problems
short_description: What is wrong with the stacksense_agent role's variables
description:
  - One message per problem, each naming the variable, its value (JSON-quoted, credentials
    hidden), what is expected and the fix; empty when all is well.
  - With C(removal=true), only the variables that removing the agent uses.
positional: _input, removal
options:
  _input:
    description: The variables, by name (role_plan.py lists them).
    type: dict
    required: true
  removal:
    description: Check only what C(stacksense_agent_state=absent) uses.
    type: bool
    default: false
version_added: 1.2.0
author: StackSense
"""

EXAMPLES = r"""
problems: >-
  {{ {'stacksense_api_url': stacksense_api_url, ...} | stacksense.fleet.role_variable_problems }}
"""

RETURN = r"""
_value:
  description: One-line messages; empty when all is well.
  type: list
  elements: str
"""

# An absolute path of safe characters, no empty, "." or ".." component, no trailing slash.
PATH = re.compile(r"(/[A-Za-z0-9_+-][A-Za-z0-9._+-]*)+\Z")
DOT_COMPONENT = re.compile(r"(\A|/)\.\.?(/|\Z)")
# http(s)://, a host name or [IPv6], an optional port, an optional path; no user:password@,
# ?query, #fragment, white space, quote or control character.
URL = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?)"
                 r"(:[0-9]{1,5})?(/[A-Za-z0-9._~%/+=:@,-]*)?\Z")
COUNT = re.compile(r"[0-9]+\Z")
POSITIVE = re.compile(r"[1-9][0-9]*\Z")
# A requirement for pip: a name, [extras], version specifiers (requests>=2.25,<3).
_PIP_VERSION = r" *(<|<=|==|!=|>=|>|~=|===) *[A-Za-z0-9.*+!_-]+ *"
PIP_SPEC = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9._,-]+\])?"
                      rf"({_PIP_VERSION}(,{_PIP_VERSION})*)?\Z")
# pip options: visible ASCII words separated by single spaces (pip gets them as arguments).
PIP_ARGS = re.compile(r"([!-~]+( [!-~]+)*)?\Z")
USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}\Z")
# A proxy URL, whole: http(s)://, optional user[:password]@ (no quote, $, backslash or white
# space: percent-encoded), a host name or [IPv6], a port.
PROXY_URL = re.compile(r"https?://(?:[A-Za-z0-9._~!&()*+,;=%-]+(?::[A-Za-z0-9._~!&()*+,;=%-]*)?@)?"
                       r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])"
                       r":([1-9][0-9]{0,4})/?\Z")
NO_PROXY = re.compile(r"[A-Za-z0-9.*:/\[\]_, -]*\Z")

# stacksense_install_dir may be none of these (uninstall removes it, with all it holds), nor
# under those the service cannot see or that do not survive a reboot, nor hold another of the
# role's paths.
SYSTEM_DIRS = frozenset([
    "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/media",
    "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr",
    "/usr/bin", "/usr/games", "/usr/include", "/usr/lib", "/usr/lib32", "/usr/lib64",
    "/usr/libexec", "/usr/local", "/usr/local/bin", "/usr/local/etc", "/usr/local/lib",
    "/usr/local/sbin", "/usr/local/share", "/usr/sbin", "/usr/share", "/usr/src", "/var",
    "/var/backups", "/var/cache", "/var/lib", "/var/local", "/var/log", "/var/mail", "/var/opt",
    "/var/spool", "/var/tmp"])
HIDDEN_TREES = ["/dev", "/home", "/proc", "/root", "/run", "/sys", "/tmp", "/var/tmp"]
HIDDEN_TREE = re.compile("(" + "|".join(map(re.escape, HIDDEN_TREES)) + r")(/|\Z)")
# Where the service cannot read a file: ProtectHome=, PrivateTmp=.
UNSEEN_BY_SERVICE = re.compile(r"/(home|root|run/user|tmp|var/tmp)(/|\Z)")


def _redacted_module():
    """plugins/filter/redacted.py: one rule for finding and hiding credentials."""
    spec = importlib.util.spec_from_file_location(
        "stacksense_filter_redacted", str(Path(__file__).with_name("redacted.py")))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_REDACTED = _redacted_module()
redacted = _REDACTED.redacted
# user:password@ (or user@) before the host.
URL_CREDENTIALS = _REDACTED.URL_CREDENTIALS


def _text(value):
    """The value as Jinja's `string` filter makes it."""
    return value if isinstance(value, str) else str(value)


def _quoted(value):
    return json.dumps(_text(value))


def _path(value):
    return isinstance(value, str) and PATH.match(value) and not DOT_COMPONENT.search(value)


def _proxy_ok(value):
    match = PROXY_URL.match(value) if isinstance(value, str) else None
    return value in ("", None) or bool(match and int(match.group(1)) <= 65535)


def _checks(v):
    """(ok, used on removal, message) for each check, in the order the messages are shown."""
    url, install_dir = v["stacksense_api_url"], v["stacksense_install_dir"]
    ca_bundle = _text(v["stacksense_ca_bundle"])
    https_proxy, http_proxy = v["stacksense_https_proxy"], v["stacksense_http_proxy"]
    fixed_paths = [_text(p) for p in v["__stacksense_fixed_paths"]]
    cron_user = _text(v["__stacksense_cron_user"])
    agent_source = v["stacksense_agent_source"]
    url_credentials = bool(URL_CREDENTIALS.search(_text(url)))
    shown_url = json.dumps(redacted(url))
    under_install_dir = re.compile(r"\A" + re.escape(_text(install_dir)) + r"(/|\Z)")
    bad_internal = [p for p in fixed_paths if not PATH.match(p)]
    bad_internal += [cron_user] if not USER.match(cron_user) else []
    https_url = _text(url).startswith("https://")
    http_url = _text(url).startswith("http://")
    return [
        (not url_credentials, False,
         f"stacksense_api_url is {shown_url}, which holds a user name or password before the "
         "host: it would show in logs, the state file and the unit, and StackSense "
         "authenticates with the token API instead. Fix: remove the user:password@ part from "
         "stacksense_api_url and put the token in stacksense_api_token (with Ansible Vault)."),
        ((isinstance(url, str) and URL.match(url)) or url_credentials
         or any(p.startswith("stacksense_api_url ") for p in v["__stacksense_agent_problems"]),
         False,
         f"stacksense_api_url is {shown_url}, expected the base URL of the StackSense server on "
         "one line: http:// or https://, a host name, an optional :port and path, no ?query, "
         "#fragment, white space or quote. Fix: set stacksense_api_url (e.g. in "
         "group_vars/stacksense_agents.yml) to something like https://stacksense.example.com"),
        (POSITIVE.match(_text(v["stacksense_verify_timeout"])), False,
         f"stacksense_verify_timeout is {_quoted(v['stacksense_verify_timeout'])}, expected a "
         "whole number of seconds of at least 1. Fix: set stacksense_verify_timeout, e.g. 60, "
         "or set stacksense_verify to false."),
        (COUNT.match(_text(v["stacksense_apt_cache_valid_time"])), False,
         "stacksense_apt_cache_valid_time is "
         f"{_quoted(v['stacksense_apt_cache_valid_time'])}, expected a whole number of "
         "seconds. Fix: set stacksense_apt_cache_valid_time, e.g. 3600."),
        (v["stacksense_service_manager"] in ("systemd", "cron"), True,
         f"stacksense_service_manager is {_quoted(v['stacksense_service_manager'])}, expected "
         "systemd or cron. Fix: set stacksense_service_manager to systemd (the default) or, "
         "for hosts without systemd, cron."),
        (v["stacksense_requests_source"] in ("package", "pip"), True,
         f"stacksense_requests_source is {_quoted(v['stacksense_requests_source'])}, expected "
         "package or pip. Fix: set stacksense_requests_source to package (the default) or pip."),
        (PIP_SPEC.match(_text(v["stacksense_pip_requests_spec"])), False,
         f"stacksense_pip_requests_spec is {_quoted(v['stacksense_pip_requests_spec'])}, "
         "expected one requirement on one line: a name, optional [extras] and version "
         "specifiers. Fix: set stacksense_pip_requests_spec, e.g. requests>=2.25,<3."),
        (PIP_ARGS.match(_text(v["stacksense_pip_extra_args"])), False,
         f"stacksense_pip_extra_args is {_quoted(v['stacksense_pip_extra_args'])}, expected "
         "pip options on one line, visible ASCII separated by single spaces. Fix: set "
         "stacksense_pip_extra_args, e.g. --index-url https://pypi.example.internal/simple, or "
         "leave it empty."),
        (_path(install_dir), True,
         f"stacksense_install_dir is {_quoted(install_dir)}, expected an absolute path of "
         'letters, digits and . _ + - on one line (no ".", ".." or empty component, no '
         "trailing /). Fix: set stacksense_install_dir, e.g. /opt/stacksense-heartbeat."),
        (_text(install_dir) not in SYSTEM_DIRS and not HIDDEN_TREE.match(_text(install_dir))
         and not any(under_install_dir.match(p) for p in fixed_paths), True,
         f"stacksense_install_dir is {_quoted(install_dir)}, which is a system directory, "
         f"under {', '.join(HIDDEN_TREES)} (the service cannot see them, or they are emptied "
         "at boot), or holds another of the role's files; the role owns this directory and "
         "removing the agent deletes it. Fix: set stacksense_install_dir to a directory of the "
         "agent's own, e.g. /opt/stacksense-heartbeat."),
        (_text(install_dir) != _text(v["__stacksense_push_agent_dir"]), True,
         f"stacksense_install_dir is {_quoted(install_dir)}, the directory of StackSense's own "
         "push agent (role 1.1.0 used it too); the heartbeat agent must not share it, and "
         "removing the agent would delete it. Fix: remove stacksense_install_dir from the "
         "inventory (default /opt/stacksense-heartbeat); hosts deployed by 1.1.0 move to the "
         "new directory by themselves."),
        (not ca_bundle
         or (_path(v["stacksense_ca_bundle"]) and not UNSEEN_BY_SERVICE.match(ca_bundle)), False,
         f"stacksense_ca_bundle is {_quoted(ca_bundle)}, expected an absolute path of letters, "
         "digits and . _ + - on one line, outside /home, /root, /run/user, /tmp and /var/tmp "
         "(the service cannot see those). Fix: install the bundle under e.g. /etc/ssl/certs or "
         "/usr/local/share/ca-certificates and point stacksense_ca_bundle at it, or leave it "
         "empty."),
        # The role's own values (vars/main.yml) reach the unit, the cron file and shells too.
        (not bad_internal, True,
         "the role's internal paths or cron user were overridden with unsafe values "
         f"({json.dumps(bad_internal)}). Fix: do not set the role's __stacksense_* variables."),
        (os.path.isfile(_text(agent_source)), False,
         f"stacksense_agent_source is {_quoted(agent_source)}, which is not a file on the "
         "controller. Fix: run from a complete clone of the repository "
         "(agent/heartbeat_agent.py) or point stacksense_agent_source at the agent."),
        (not os.path.isfile(_text(agent_source)) or v["__stacksense_expected_version"], False,
         f'{_text(agent_source)} has no line AGENT_VERSION = "x.y.z", so the deployed version '
         "could not be verified. Fix: point stacksense_agent_source at the StackSense heartbeat "
         "agent."),
        # The CA is parsed by plugins/filter/ca_certificate.py (its problem comes in as
        # __stacksense_ca_problem). A proxy URL may hold a password: it is checked whole and
        # shown without its credentials.
        (not (v["__stacksense_ca_mode"] and ca_bundle), False,
         "both stacksense_ca_certificate and stacksense_ca_bundle are set; the agent can use "
         "only one CA bundle. Fix: keep stacksense_ca_certificate (the role installs it) and "
         'set stacksense_ca_bundle to "", or the other way round.'),
        (not v["__stacksense_ca_problem"], False,
         f"stacksense_ca_certificate {v['__stacksense_ca_problem']}, so it cannot verify the "
         "server's certificate. Fix: set stacksense_ca_certificate to the PEM text of the CA "
         "certificate(s) that signed the server's certificate, e.g. with "
         "lookup('ansible.builtin.file', 'company-ca.pem') (check the file with: openssl x509 "
         "-in company-ca.pem -noout -subject -enddate)."),
    ] + [
        (_proxy_ok(proxy), False,
         f"{name} is '{redacted(proxy, 'proxy')}', expected a proxy URL, http:// or https://, "
         "optional user:password@, a host and a port, e.g. http://proxy.example.com:3128, and "
         "nothing else (no path, white space, quote, $ or backslash; percent-encode those in a "
         f"password, and @ as %40). Fix: correct {name} (in Ansible Vault when it holds a "
         "password).")
        for name, proxy in (("stacksense_https_proxy", https_proxy),
                            ("stacksense_http_proxy", http_proxy))
    ] + [
        (not (https_url and not https_proxy and http_proxy)
         and not (http_url and not http_proxy and https_proxy), False,
         f"the proxy that is set does not fit stacksense_api_url ({redacted(url)}): the agent "
         "uses stacksense_https_proxy for an https:// server and stacksense_http_proxy for an "
         "http:// one, so it would bypass the proxy. Fix: set "
         f"{'stacksense_https_proxy' if https_url else 'stacksense_http_proxy'} (it may be the "
         "same URL)."),
        (isinstance(v["stacksense_no_proxy"], str) and NO_PROXY.match(v["stacksense_no_proxy"]),
         False,
         f"stacksense_no_proxy is {_quoted(v['stacksense_no_proxy'])}, expected a "
         "comma-separated list of host names, domains, IP addresses or networks, e.g. "
         "localhost,.internal.example.com,10.0.0.0/8. Fix: correct stacksense_no_proxy, or "
         "leave it empty."),
    ]


def role_variable_problems(values, removal=False):
    """The message of each check that fails; with removal, only those removal needs. First
    (not on removal) the hosts of the run that share a token or a server id
    (__stacksense_fleet_conflicts) and the agent's own verdict on its settings
    (__stacksense_agent_problems)."""
    first = [] if removal else [*values.get("__stacksense_fleet_conflicts", []),
                                *values["__stacksense_agent_problems"]]
    return first + [message for ok, for_removal, message in _checks(values)
                    if not ok and (for_removal or not removal)]


class FilterModule:
    def filters(self):
        return {"role_variable_problems": role_variable_problems}
