"""The answer of the role's host probe (roles/stacksense_agent/files/probe_host.sh), parsed.

The probe prints one ``name=value`` line per fact in one round trip; this filter turns its
lines into what the role asks: the facts, the files that exist, owner and mode of the role's
directories, the files already kept for a rollback and the packages installed.
"""

import re

DOCUMENTATION = r"""
name: host_probe
short_description: Parse the answer of the role's host probe
description:
  - Turns the C(name=value) lines that the stacksense_agent role's probe prints into facts,
    existing files, directory owners and modes, kept rollback files and installed packages.
positional: _input
options:
  _input:
    description: The probe's standard output, as lines (C(stdout_lines)).
    type: list
    elements: str
    required: true
version_added: 1.2.0
author: StackSense
"""

EXAMPLES = r"""
probe: "{{ probe_result.stdout_lines | stacksense.fleet.host_probe }}"
"""

RETURN = r"""
_value:
  description:
    - C(facts), the single-valued lines (pid1, systemd, os, os_name, container, propagation,
      apt_lists, ca_bundle); C(files), the paths that exist; C(dirs), directory to
      C("MODE OWNER:GROUP"); C(kept), the files identical to their kept copy; C(packages), the
      packages dpkg reports installed.
  type: dict
"""

FACT_LINE = re.compile(r"([a-z0-9_]+)=(.*)\Z", re.DOTALL)
# dpkg-query's ${db:Status-Abbrev}: "ii " is installed.
INSTALLED_PACKAGE = re.compile(r"(\S+) ii")


def host_probe(lines):
    """The probe's lines as {facts, files, dirs, kept, packages}; unknown lines are ignored."""
    probe = {"facts": {}, "files": [], "dirs": {}, "kept": [], "packages": []}
    for line in lines or []:
        match = FACT_LINE.match(line)
        if not match:
            continue
        name, value = match.groups()
        if name == "exists":
            probe["files"].append(value)
        elif name == "kept":
            probe["kept"].append(value)
        elif name == "dir":
            path, owner_mode = value.split(" ", 1) if " " in value else (value, "")
            probe["dirs"][path] = owner_mode
        elif name == "dpkg":
            installed = INSTALLED_PACKAGE.match(value)
            if installed:
                probe["packages"].append(installed.group(1))
        else:
            probe["facts"][name] = value
    return probe


def needs_steps(probe, present=True, cron=False, pip=False, beside_push_agent=False,
                cron_file=""):
    """Whether a host needs more than the role's usual deploy (tasks/main.yml: its packages
    and files, a restart under systemd, the start and the wait): then tasks/steps.yml runs
    every step. `probe` as host_probe() gives it. Removal (not `present`); a host where
    StackSense's push agent runs, unless the agent is to run beside it (it is left alone);
    cron, or a host with our cron entry (a move from cron); requests from pip; an agent that
    runs older files than those installed (an interrupted run); an agent that role 1.1.0
    installed. Decided here once per host: as a template it cost every task of the usual
    deploy about 15 compiled templates per host (docs/DEPLOY_BENCHMARKS.md)."""
    facts = probe.get("facts") or {}
    return bool(not present
                or (facts.get("push_agent") and not beside_push_agent)
                or cron or cron_file in (probe.get("files") or [])
                or pip
                or facts.get("stale") == "yes"
                or facts.get("legacy_unit") == "yes" or facts.get("legacy_cron") == "yes")


def host_problems(facts, cron=False, token=False, ca_bundle=""):
    """What keeps the host from running the agent, one message each (empty when nothing):
    `facts` as host_probe() gives them, `cron` when cron runs the agent, `token` when the
    agent gets a token, `ca_bundle` the stacksense_ca_bundle it must find."""
    problems = []
    systemd = facts.get("systemd") or ""
    if not cron and facts.get("pid1") != "systemd":
        problems.append(
            f"the init system (PID 1) is '{facts.get('pid1', '')}', not systemd. The agent runs "
            "as a systemd service (Type=notify, watchdog, credentials), so this role needs a "
            "host booted with systemd 247 or newer (Debian 11+). Fix: boot the host with "
            "systemd, or set stacksense_service_manager to cron (cron then starts and "
            "supervises the agent, without watchdog or sandbox).")
    if not cron and not (systemd.isdigit() and int(systemd) >= 247):
        problems.append(
            f"systemd is version {systemd or 'unknown'}; the unit needs 247 or newer "
            "(LoadCredential=, ProtectProc=). Upgrade the host to Debian 11 or newer.")
    if "debian" not in facts.get("os", "").split():
        problems.append(
            f"the OS is {facts.get('os_name', '')} (ID and ID_LIKE "
            f"'{facts.get('os', '').strip()}'); this role installs Python and requests with apt "
            "and supports Debian 11, 12 and 13 (and derivatives) only.")
    if ca_bundle and facts.get("ca_bundle") != "file":
        problems.append(
            f"stacksense_ca_bundle is '{ca_bundle}', but no such file exists on the host. Fix: "
            "install the CA bundle first (e.g. with a copy task before this role) or correct "
            "the path.")
    # LoadCredential= (how the token reaches the service) copies the token into a fresh mount
    # that systemd moves under /run/credentials; the service only sees it when / has shared
    # mount propagation. systemd sets that up at boot, except in a container, where it keeps
    # the container manager's (podman's default is private): the agent would then find no
    # token. Say so now rather than fail later.
    propagation = facts.get("propagation", "")
    if not cron and token and facts.get("container") and "shared" not in propagation:
        problems.append(
            f"this host is a container whose / has '{propagation}' mount propagation, so "
            "systemd's LoadCredential= would give stacksense-heartbeat an empty credentials "
            "directory and the agent would not find stacksense_api_token. Fix: make / shared "
            "when the container boots (mount --make-rshared /, as systemd does itself on hosts "
            "that are not containers), or deploy this host with stacksense_server_id and no "
            "token.")
    return problems


def agent_packages(packages, requests_source, cron=False, installed=None):
    """The Debian packages the agent needs, in the table's order, less those `installed`.

    `packages` is the role's table: the packages of each requests source (package, pip) and
    those of cron; `installed` the probe's list (all are wanted when it is None). An unknown
    source wants none of its own: the preflight refuses it (stacksense_requests_source) before
    anything is installed, and this must not fail first.
    """
    wanted = list(packages.get(str(requests_source), ())) + (list(packages["cron"]) if cron else [])
    wanted = [name for index, name in enumerate(wanted) if name not in wanted[:index]]
    return [name for name in wanted if name not in (installed or ())]


class FilterModule:
    def filters(self):
        return {"host_probe": host_probe, "host_problems": host_problems,
                "agent_packages": agent_packages}
